"""Find a model's weighted layers in forward order, and the activation that follows each one.

``discover_layers(model, example_input)`` builds a small dataflow graph of the model's forward pass and reads
each weighted layer's role off it:

* **torch.fx first** (``method="fx"``): ``symbolic_trace``-style tracing with a tracer that keeps every
  Linear/ConvNd/norm module as one ``call_module`` node (also user subclasses of them). Nothing is run.
* **forward hooks when tracing fails** (``method="hooks"``), e.g. data-dependent control flow such as
  ``if x.sum() > 0:``. The model runs once on ``example_input`` (``torch.no_grad()``, eval mode; the
  training flag of every submodule is restored afterwards). A ``TorchFunctionMode`` records every torch
  function / tensor method called at the model's level (``F.relu``, ``torch.tanh``, ``x.relu()``, ``+``,
  ``view``...) together with which recorded tensors it read and wrote, and pre/post forward hooks on the
  weighted modules record each layer call as one node (the ops inside a layer's own forward are hidden).
  Tensors are matched by object identity; an in-place op (``relu_``, ``+=``, ``inplace=True``) makes the
  tensor it modified point at the in-place op's node, which is what later readers of that tensor see.

Both give the same graph shape: nodes in execution order, each knowing its consumers. The activation of a
layer is then the first activation node (smallest forward index) reachable from the layer's output
without passing through another Linear/ConvNd layer; everything else (norm layers, dropout, pooling,
flatten/view/reshape/permute, residual ``+``, concatenation, scalar multiplications...) is looked through.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.parameter import UninitializedParameter
from torch.overrides import TorchFunctionMode

LINEAR_TYPES = ("Linear",)
CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d")
NORM_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
              "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")


@dataclass(frozen=True)
class LayerInfo:
    """One weighted layer of a model, as a policy rule sees it.

    ``family`` is ``linear``, ``conv`` or ``norm``. ``position`` is ``first``, ``hidden`` or ``last`` by
    forward order among the linear and conv layers (``None`` for norm layers). ``activation`` is the
    nonlinearity applied to this layer's output on its way to the next linear/conv layer (norm layers,
    dropout, pooling and reshapes are looked through), ``linear`` if none; ``activation_param`` is the
    negative slope of a leaky_relu (or alpha of an elu), else ``None``. Fans follow ``torch.nn.init``
    (``None`` for norm layers). ``branch_last``: the layer ends a residual branch (its output reaches, through
    element-wise ops and norm layers, an addition whose other operand is a skip path: ``x + f(x)``).
    """

    name: str
    type: str
    family: str
    fan_in: int | None
    fan_out: int | None
    activation: str
    activation_param: float | None
    position: str | None
    index: int
    weight_shape: tuple[int, ...]
    branch_last: bool = False


@dataclass(frozen=True)
class LayerDiscovery:
    """The result of ``discover_layers``: the layers in forward order and how they were found."""

    layers: tuple[LayerInfo, ...]
    method: str  # "fx" or "hooks"

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerInfo:
        return self.layers[i]

    def by_name(self) -> dict[str, LayerInfo]:
        return {layer.name: layer for layer in self.layers}


# ---- which modules are weighted layers --------------------------------------------------------------------
_LINEAR_CLASSES: tuple[type[nn.Module], ...] = (nn.Linear,)
_CONV_CLASSES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_CLASSES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
_BLOCKING = ("linear", "conv")  # families that end the search for an activation


def layer_family(module: nn.Module) -> str | None:
    """``linear``, ``conv`` or ``norm`` for a weighted layer, else ``None``.

    Subclasses count (``LazyLinear`` once materialized, a user's ``MyConv(nn.Conv2d)``). ConvTranspose is
    not a ConvNd subclass and is not listed. A norm layer counts only with an affine weight
    (``affine=False`` / ``elementwise_affine=False`` layers are looked through like any other op).
    """
    if isinstance(module, _LINEAR_CLASSES):
        return "linear"
    if isinstance(module, _CONV_CLASSES):
        return "conv"
    if isinstance(module, _NORM_CLASSES) and getattr(module, "weight", None) is not None:
        return "norm"
    return None


def layer_fans(weight_shape: Sequence[int], family: str) -> tuple[int | None, int | None]:
    """Fans as ``torch.nn.init`` computes them; ``(None, None)`` for norm layers.

    Linear (out, in): fan_in = in, fan_out = out. ConvNd (out, in/groups, *k): fan_in = in/groups * prod(k),
    fan_out = out * prod(k) (fan_out is not divided by groups, as in torch).
    """
    if family == "norm":
        return None, None
    receptive = math.prod(weight_shape[2:])
    return int(weight_shape[1]) * receptive, int(weight_shape[0]) * receptive


# ---- which calls are activations --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Act:
    """An activation found in the graph. ``name`` is a policy activation name; ``linear`` marks a known
    nonlinearity outside that vocabulary (softplus, mish, softmax...), which ends the search: the layer's
    output is not followed by any activation the policy format can name."""

    name: str
    param: float | None = None


_NO_ACTIVATION = _Act("linear")

# Function / tensor-method names (``__name__`` of F.relu, torch.relu, Tensor.relu, torch._C._nn.gelu...,
# or the fx call_method target) that are activations with no parameter.
_PLAIN_ACTIVATIONS: dict[str, str] = {
    "relu": "relu", "relu_": "relu", "relu6": "relu",
    "tanh": "tanh", "tanh_": "tanh",
    "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "gelu": "gelu", "silu": "silu", "silu_": "silu",
    "selu": "selu", "selu_": "selu",
}
# Nonlinearities the policy vocabulary has no name for: they end the search with "linear".
_OTHER_NONLINEARITIES = frozenset({
    "softplus", "softsign", "mish", "hardswish", "hardsigmoid", "celu", "celu_", "glu", "logsigmoid",
    "log_sigmoid", "softmax", "log_softmax", "softmin", "tanhshrink", "hardshrink", "softshrink",
    "threshold", "threshold_",
})


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], pos: int, name: str, default: Any) -> Any:
    """The argument given by keyword ``name`` or at position ``pos`` (position 0 is the input)."""
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else default


def _number(value: Any, default: float) -> float:
    """A float from a python number or a tensor (its mean, e.g. PReLU's slopes); ``default`` otherwise."""
    if isinstance(value, torch.Tensor) and not isinstance(value, UninitializedParameter):
        return float(value.detach().float().mean())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return default


def _classify_call(name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> _Act | None:
    """The activation a function call is, from its name and arguments; ``None`` if it is not one.

    leaky_relu keeps its negative slope (default 0.01) and elu its alpha (default 1.0) as the parameter;
    hardtanh(0, 6) (relu6) counts as relu; PReLU counts as leaky_relu with the mean of its slopes and RReLU
    (eval mode) as leaky_relu with slope (lower + upper) / 2. Other hardtanh ranges and the nonlinearities in
    ``_OTHER_NONLINEARITIES`` give ``linear`` (see ``_Act``).
    """
    kwargs = kwargs or {}
    if name in _PLAIN_ACTIVATIONS:
        return _Act(_PLAIN_ACTIVATIONS[name])
    if name in ("leaky_relu", "leaky_relu_"):
        return _Act("leaky_relu", _number(_arg(args, kwargs, 1, "negative_slope", 0.01), 0.01))
    if name in ("elu", "elu_"):
        return _Act("elu", _number(_arg(args, kwargs, 1, "alpha", 1.0), 1.0))
    if name == "prelu":
        return _Act("leaky_relu", _number(_arg(args, kwargs, 1, "weight", 0.25), 0.25))
    if name in ("rrelu", "rrelu_"):
        lower = _number(_arg(args, kwargs, 1, "lower", 1.0 / 8), 1.0 / 8)
        upper = _number(_arg(args, kwargs, 2, "upper", 1.0 / 3), 1.0 / 3)
        return _Act("leaky_relu", (lower + upper) / 2)
    if name in ("hardtanh", "hardtanh_"):
        low = _number(_arg(args, kwargs, 1, "min_val", -1.0), -1.0)
        high = _number(_arg(args, kwargs, 2, "max_val", 1.0), 1.0)
        return _Act("relu") if (low, high) == (0.0, 6.0) else _NO_ACTIVATION
    if name in _OTHER_NONLINEARITIES:
        return _NO_ACTIVATION
    return None


# Activation modules as the equivalent functional call (fx keeps torch.nn modules as call_module nodes).
_MODULE_CALLS: tuple[tuple[type[nn.Module], Callable[[Any], tuple[str, dict[str, Any]]]], ...] = (
    (nn.ReLU, lambda m: ("relu", {})),
    (nn.ReLU6, lambda m: ("relu6", {})),
    (nn.Hardtanh, lambda m: ("hardtanh", {"min_val": m.min_val, "max_val": m.max_val})),
    (nn.LeakyReLU, lambda m: ("leaky_relu", {"negative_slope": m.negative_slope})),
    (nn.ELU, lambda m: ("elu", {"alpha": m.alpha})),
    (nn.PReLU, lambda m: ("prelu", {"weight": m.weight})),
    (nn.RReLU, lambda m: ("rrelu", {"lower": m.lower, "upper": m.upper})),
    (nn.Tanh, lambda m: ("tanh", {})),
    (nn.Sigmoid, lambda m: ("sigmoid", {})),
    (nn.GELU, lambda m: ("gelu", {})),
    (nn.SiLU, lambda m: ("silu", {})),
    (nn.SELU, lambda m: ("selu", {})),
    (nn.Softplus, lambda m: ("softplus", {})),
    (nn.Softsign, lambda m: ("softsign", {})),
    (nn.Mish, lambda m: ("mish", {})),
    (nn.Hardswish, lambda m: ("hardswish", {})),
    (nn.Hardsigmoid, lambda m: ("hardsigmoid", {})),
    (nn.CELU, lambda m: ("celu", {})),
    (nn.GLU, lambda m: ("glu", {})),
    (nn.LogSigmoid, lambda m: ("logsigmoid", {})),
    (nn.Softmax, lambda m: ("softmax", {})),
    (nn.LogSoftmax, lambda m: ("log_softmax", {})),
    (nn.Softmin, lambda m: ("softmin", {})),
    (nn.Softmax2d, lambda m: ("softmax", {})),
    (nn.Tanhshrink, lambda m: ("tanhshrink", {})),
    (nn.Hardshrink, lambda m: ("hardshrink", {})),
    (nn.Softshrink, lambda m: ("softshrink", {})),
    (nn.Threshold, lambda m: ("threshold", {})),
)


def _classify_module(module: nn.Module) -> _Act | None:
    """The activation an activation module is (``nn.ReLU6`` -> relu, ``nn.LeakyReLU(a)`` -> leaky_relu a...)."""
    for cls, as_call in _MODULE_CALLS:  # ReLU6 before its base class Hardtanh
        if isinstance(module, cls):
            name, kwargs = as_call(module)
            return _classify_call(name, (), kwargs)
    return None


# ---- the graph both methods produce -----------------------------------------------------------------------
@dataclass
class _Node:
    """One step of the forward pass: a weighted-layer call (``module``/``family`` set), an activation
    (``act`` set), or anything else (looked through). ``users`` are the indices of the nodes reading it."""

    module: nn.Module | None = None
    family: str | None = None
    act: _Act | None = None
    users: list[int] = field(default_factory=list)
    add: bool = False  # an addition of two tensors (a residual join candidate)
    operands: list[int] = field(default_factory=list)  # an addition's tensor operands (-1: not from the graph)
    const: bool = False  # a parameter or buffer read as a value (fx get_attr): never a skip path


# Names of an addition of tensors: ``a + b`` (Tensor.__add__, operator.add), ``a += b``, torch.add, Tensor.add_.
_ADDITIONS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "iadd"})


def _weighted_depths(nodes: Sequence[_Node]) -> list[int]:
    """Per node, the most linear/conv layers on any path from the graph's inputs to it (nodes come in a
    topological order: forward order)."""
    inputs: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for user in node.users:
            inputs[user].append(i)
    depth = [0] * len(nodes)
    for i, node in enumerate(nodes):
        depth[i] = max((depth[j] for j in inputs[i]), default=0) + (1 if node.family in _BLOCKING else 0)
    return depth


def _ends_branch(nodes: Sequence[_Node], start: int, depth: Sequence[int]) -> bool:
    """Whether layer node ``start`` ends a residual branch: its output reaches, through nodes that are not
    linear/conv layers nor additions and that read one graph tensor (element-wise ops, norm layers), an
    addition whose other operand went through fewer linear/conv layers (the skip path: the block's input,
    or a projection shortcut of one layer against a branch of two)."""
    readers: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for user in node.users:
            readers[user] = readers.get(user, 0) + 1
    stack = [(user, start) for user in nodes[start].users]
    seen: set[int] = set()
    while stack:
        i, came_from = stack.pop()
        node = nodes[i]
        if node.add:
            others = [o for o in node.operands if o != came_from]
            if len(others) == len(node.operands) - 1 and any(
                    o >= 0 and not nodes[o].const and depth[o] < depth[came_from] for o in others):
                return True
            continue
        if i in seen or node.family in _BLOCKING or readers.get(i, 0) != 1:
            continue
        seen.add(i)
        stack.extend((user, i) for user in node.users)
    return False


def _activation_after(nodes: Sequence[_Node], start: int) -> _Act:
    """The first activation (smallest node index) reachable from node ``start`` through its users, without
    passing through a linear/conv layer or an activation; ``linear`` if none is reachable."""
    best: int | None = None
    seen: set[int] = set()
    stack = list(nodes[start].users)
    while stack:
        i = stack.pop()
        if i in seen or (best is not None and i > best):
            continue  # anything reached from i comes later than i: it cannot beat the best found
        seen.add(i)
        node = nodes[i]
        if node.act is not None:
            best = i
        elif node.family not in _BLOCKING:
            stack.extend(node.users)
    return _NO_ACTIVATION if best is None else nodes[best].act  # type: ignore[return-value]


def _positions(count: int) -> list[str]:
    """first/hidden/last for ``count`` linear/conv layers in forward order; a lone one is ``last``."""
    return ["last" if i == count - 1 else "first" if i == 0 else "hidden" for i in range(count)]


def _layer_infos(model: nn.Module, nodes: Sequence[_Node]) -> tuple[LayerInfo, ...]:
    """One ``LayerInfo`` per weighted module, at its first call, in node (forward) order."""
    names = _module_names(model)
    first_calls: list[int] = []
    called: set[int] = set()
    for i, node in enumerate(nodes):
        if node.module is not None and id(node.module) not in called:
            called.add(id(node.module))
            first_calls.append(i)
    weighted = [i for i in first_calls if nodes[i].family in _BLOCKING]
    position = dict(zip(weighted, _positions(len(weighted))))
    depth = _weighted_depths(nodes)
    infos = []
    for index, i in enumerate(first_calls):
        node = nodes[i]
        module, family = node.module, node.family
        assert module is not None and family is not None
        shape = tuple(int(s) for s in module.weight.shape)
        fan_in, fan_out = layer_fans(shape, family)
        act = _activation_after(nodes, i)
        infos.append(LayerInfo(
            name=names[id(module)], type=type(module).__name__, family=family, fan_in=fan_in, fan_out=fan_out,
            activation=act.name, activation_param=act.param, position=position.get(i), index=index,
            weight_shape=shape, branch_last=family in _BLOCKING and _ends_branch(nodes, i, depth),
        ))
    return tuple(infos)


def _module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its qualified name; a module registered twice keeps its first name (as fx does)."""
    return {id(m): name for name, m in reversed(list(model.named_modules(remove_duplicate=False)))}


def _weighted_modules(model: nn.Module) -> list[nn.Module]:
    """The distinct weighted modules of ``model``; refuses lazy ones that have no weight shape yet."""
    found = [m for m in model.modules() if layer_family(m) is not None]
    for m in found:
        if isinstance(m.weight, UninitializedParameter):
            name = _module_names(model)[id(m)]
            raise ValueError(f"layer {name!r} ({type(m).__name__}) is lazy and not initialized yet: "
                             "run one forward pass before discovering layers")
    return found


# ---- method 1: torch.fx -----------------------------------------------------------------------------------
class _LayerTracer(fx.Tracer):
    """fx tracer whose leaves are the weighted layers (subclasses included) and torch.nn modules holding no
    weighted layer; torch.nn modules that do hold one (e.g. a Transformer layer) are traced into."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if layer_family(m) is not None:
            return True
        if not super().is_leaf_module(m, module_qualified_name):
            return False
        return not any(layer_family(sub) is not None for sub in m.modules())


def _fx_value(model: nn.Module, arg: Any) -> Any:
    """A traced argument as a value where it is a constant or a module attribute (PReLU's weight)."""
    if isinstance(arg, fx.Node):
        if arg.op == "get_attr":
            value: Any = model
            for part in str(arg.target).split("."):
                value = getattr(value, part, None)
            return value
        return None
    return arg


def _fx_node(model: nn.Module, node: fx.Node, order: Mapping[fx.Node, int]) -> _Node:
    """Classify one fx node."""
    if node.op == "get_attr":
        return _Node(const=True)
    if node.op == "call_module":
        module = model.get_submodule(node.target)  # type: ignore[arg-type]
        family = layer_family(module)
        if family is not None:
            return _Node(module=module, family=family)
        return _Node(act=_classify_module(module))
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        args = [_fx_value(model, a) for a in node.args]
        kwargs = {k: _fx_value(model, v) for k, v in node.kwargs.items()}
        operands = [order[a] for a in node.args[:2] if isinstance(a, fx.Node)]
        if name in _ADDITIONS and len(operands) == 2:
            return _Node(add=True, operands=operands)
        return _Node(act=_classify_call(name, args, kwargs))
    return _Node()


def _fx_nodes(model: nn.Module) -> list[_Node]:
    """The model's graph from torch.fx (raises whatever the tracer raises on untraceable code)."""
    if layer_family(model) is not None:  # the root is traced through; a bare layer is its own graph
        return [_Node(module=model, family=layer_family(model))]
    graph = _LayerTracer().trace(model)
    order = {node: i for i, node in enumerate(graph.nodes)}
    nodes = []
    for node in graph.nodes:
        ours = _fx_node(model, node, order)
        ours.users = sorted(order[u] for u in node.users)
        nodes.append(ours)
    return nodes


# ---- method 2: one forward pass with hooks and a TorchFunctionMode ----------------------------------------
def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    """The tensors inside nested tuples/lists/dicts (a module's or a function's inputs and outputs)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from _tensors(item)


class _GraphRecorder:
    """Builds ``_Node``s during one forward pass.

    ``producer`` maps id(tensor) -> the node that last wrote it; every recorded tensor is kept alive in
    ``_keep`` for the pass so its id cannot be reused by another tensor. ``depth`` > 0 while inside a
    weighted layer: the ops of the layer's own forward are not recorded.
    """

    def __init__(self) -> None:
        self.nodes: list[_Node] = []
        self.producer: dict[int, int] = {}
        self.depth = 0
        self._pending: list[list[int] | None] = []
        self._keep: list[torch.Tensor] = []

    def _inputs(self, *objs: Any) -> list[int]:
        return sorted({self.producer[id(t)] for t in _tensors(objs) if id(t) in self.producer})

    def add(self, node: _Node, inputs: Sequence[int], outputs: Any) -> None:
        """Append ``node`` as a user of ``inputs`` and the producer of the tensors in ``outputs``."""
        index = len(self.nodes)
        self.nodes.append(node)
        for i in inputs:
            self.nodes[i].users.append(index)
        for t in _tensors(outputs):
            self.producer[id(t)] = index
            self._keep.append(t)

    def op(self, func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], result: Any) -> None:
        """Record one torch function / tensor method called outside the weighted layers.

        Ops that read no recorded tensor are skipped (they cannot lie between two layers). In-place writes
        that return nothing (``x[...] = y``) or go to ``out=`` count as producing that tensor.
        """
        if self.depth:
            return
        inputs = self._inputs(args, kwargs)
        if not inputs:
            return
        name = getattr(func, "__name__", "")
        tensors = [t for t in args[:2] if isinstance(t, torch.Tensor)]
        if name in _ADDITIONS and len(tensors) == 2:
            operands = [self.producer.get(id(t), -1) for t in tensors]
            self.add(_Node(add=True, operands=operands), inputs, [result, *(tensors[:1] if name.endswith("_") else [])])
            return
        outputs = [result]
        if name == "__setitem__" and args:
            outputs.append(args[0])
        if "out" in kwargs:
            outputs.append(kwargs["out"])
        self.add(_Node(act=_classify_call(name, args, kwargs)), inputs, outputs)

    def enter_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of a weighted layer: remember what it reads (outermost layer only)."""
        self._pending.append(None if self.depth else self._inputs(args, kwargs))
        self.depth += 1

    def leave_layer(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook of a weighted layer: one node for the whole call."""
        self.depth -= 1
        inputs = self._pending.pop()
        if inputs is not None:
            self.add(_Node(module=module, family=layer_family(module)), inputs, output)


class _RecordingMode(TorchFunctionMode):
    """Passes every torch function call through and tells the recorder about it."""

    def __init__(self, recorder: _GraphRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self.recorder.op(func, args, kwargs, result)
        return result


def _call(model: nn.Module, example_input: Any) -> Any:
    """Run the model: a tuple is positional arguments, anything else the single argument."""
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _hook_nodes(model: nn.Module, example_input: Any) -> list[_Node]:
    """The model's graph from one eval-mode, no-grad forward pass; training flags and hooks are restored."""
    recorder = _GraphRecorder()
    handles = []
    flags = [(m, m.training) for m in model.modules()]
    try:
        for module in _weighted_modules(model):
            handles.append(module.register_forward_pre_hook(recorder.enter_layer, with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.leave_layer, with_kwargs=True))
        model.eval()
        recorder.add(_Node(), [], example_input)  # the inputs: a source node, so ``x + f(x)`` sees its skip
        with torch.no_grad(), _RecordingMode(recorder):
            _call(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    return recorder.nodes


# ---- the entry point --------------------------------------------------------------------------------------
def discover_layers(model: nn.Module, example_input: Any = None) -> LayerDiscovery:
    """The model's weighted layers in forward order, each with its fans, position and following activation.

    Listed: every ``nn.Linear``, ``nn.Conv1d/2d/3d`` (subclasses too) and every BatchNorm/LayerNorm/
    GroupNorm/InstanceNorm with an affine weight, named as in ``model.named_modules()``.

    Method: torch.fx tracing first (``method="fx"``, nothing is run); if tracing raises, one forward pass
    on ``example_input`` (a tensor, or a tuple of positional inputs) under ``torch.no_grad()`` in eval mode
    (``method="hooks"``). Neither changes the model's parameters, buffers or training flags.

    Decisions:

    * forward order is the order of the first call; a layer called several times (weight sharing) is
      listed once, at its first call, with the activation that follows that call;
    * layers never called in forward (or only used through their weights, like MultiheadAttention's
      ``out_proj``) are not listed, by either method; with hooks, "called" means on this input's path;
    * ``position`` counts linear/conv layers only; a lone one is ``last``;
    * the activation is the first activation (in forward order) reached from the layer's output without
      crossing another linear/conv layer; every other op is looked through. A nonlinearity with no policy
      name (softplus, mish, hardswish, softmax, hardtanh other than relu6...) ends the search as ``linear``.
      ReLU6 counts as relu, PReLU/RReLU as leaky_relu (mean slope);
    * leaky_relu and elu always carry their parameter (defaults 0.01 and 1.0).

    Raises ``ValueError`` if tracing fails and no ``example_input`` was given, or if a lazy layer has no
    weight yet; errors of the model's own forward pass propagate.
    """
    _weighted_modules(model)  # refuse uninitialized lazy layers up front
    try:
        nodes, method = _fx_nodes(model), "fx"
    except Exception as exc:
        if example_input is None:
            raise ValueError(
                f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
                "pass an example input so the layers can be found by running the model once"
            ) from exc
        nodes, method = _hook_nodes(model, example_input), "hooks"
    return LayerDiscovery(_layer_infos(model, nodes), method)
