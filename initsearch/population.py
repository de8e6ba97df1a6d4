"""Population training: K candidate models of one architecture trained together, one pass per step.

``train_population(models, data, cfg, seeds=...)`` gives the same curves as ``train_run(models[i], data, cfg,
seed=seeds[i])`` for every ``i`` (within float tolerance), at the cost of one batched step instead of K:

- **Stacking.** The members' parameters and buffers are stacked along a new leading dimension K, and one
  of two engines runs all K members in one pass:

  * ``stacked`` (plain ``nn.Sequential`` MLPs: ``Flatten``, ``Linear``, ``LayerNorm``, ``BatchNorm1d`` and
    element-wise activations, i.e. the MLP proxy): each ``Linear`` is one ``torch.baddbmm`` over the K
    members, with the stacked weights kept as ``(K, in, out)`` so neither pass copies a transposed matrix;
    ``BatchNorm1d`` is one ``F.batch_norm`` over the ``K * features`` channels (per member, per feature:
    the same statistics as K separate layers). On this project's CPU (digits_mlp, K=10, one thread) a
    member-step took 0.43 ms, against 0.48 ms with ``vmap`` (whose batching rules add copies and transposes
    around every matmul) and 0.58 ms with ``train_run`` one model at a time.
  * ``vmap`` (any other model, the CNN proxies included): a copy of the first model on the ``meta`` device
    is the stateless skeleton that ``torch.func.functional_call`` runs with member ``k``'s slice, mapped
    over K by ``torch.func.vmap`` (convolutions become grouped convolutions by torch.func's batching rules).
- **Each member its own batches.** Member ``k`` draws its batch indices from a ``torch.Generator`` seeded with
  ``seeds[k]``, exactly as ``train_run`` does, so ``idx`` has shape ``(K, B)`` and the batch is ``x[idx]``.
  On the CPU the indices of a whole segment (the steps up to the next checkpoint) come from one
  ``randint((steps, B))`` call per member, which consumes the generator exactly like ``steps`` calls of
  ``randint((B,))`` (the CPU generator is sequential); on other devices they come from one call per step.
- **Independent gradients.** The step minimizes ``sum_k loss_k``: the gradient of that sum with respect to
  member ``k``'s parameters is the gradient of ``loss_k`` alone, since no operation mixes members.
- **Optimizers.** SGD (momentum), Adam and AdamW update every element from its own gradient and state (Adam's
  step count is shared, and equal for all members), so one ``torch.optim`` optimizer over the stacked
  tensors (built by ``train.make_optimizer``) performs K independent updates. Warmup is the same schedule.
- **BatchNorm.** In train mode every member normalizes with its own batch statistics and updates its own
  slice of the stacked running statistics (torch.func supports batched running stats; the stacked engine
  passes ``K * features`` running statistics to one ``F.batch_norm``); eval mode uses them.
- **Checkpoints, divergence, pruning per member.** At each checkpoint one host sync reads every member's
  losses; a member whose losses are NaN/inf or above ``divergence_factor`` x its first loss is marked
  diverged exactly as ``train_run`` would mark it; the others are validated in one batched pass (one more
  sync), then each member's own ``on_checkpoint`` callback may stop it. Members that diverged or were
  stopped are **removed from the stack** (their parameters, buffers and optimizer state are dropped), so a
  diverged member can neither poison the others nor cost compute after its checkpoint. Between two
  checkpoints a diverging member keeps computing garbage in its own slice only.
- **Written back.** When a member leaves the stack, and at the end, its weights and buffers are copied back
  into its model, so the models end as ``train_run`` would leave them.

On the CPU, ``auto`` trains models that only ``vmap`` can stack (the CNNs) one after another: there the
batched convolutions were slower than the loop. ``mode="vmap"`` forces them (the equivalence tests do).

Not batched (``mode="loop"``: the members are trained one after another with ``train_run``): models with
dropout, whose masks come from the global RNG and could not match a solo run; and models whose forward
fails under ``vmap`` (a probe on two examples decides; a user's model with data-dependent Python control flow,
``.item()`` calls or in-place ops on its input, for example). The returned curves are the same either way.

On CUDA the step runs under bf16 autocast when ``train.bf16`` is on, as ``train_run``'s does; the batched
path keeps the contiguous layout (``train_run`` alone converts CNNs to channels-last on CUDA).

``Curve.seconds`` of a member is the wall time from the start of the population to that member's end.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from initsearch.train import (
    Curve,
    TrainConfig,
    TrainData,
    _autocast,
    _check_data,
    _snapshot,
    divergence_reason,
    make_optimizer,
    train_run,
)

log = logging.getLogger("initsearch")

Callback = Callable[[int, Curve], bool]
MODES: tuple[str, ...] = ("auto", "stacked", "vmap", "loop")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ---- which way to train --------------------------------------------------------------------------------------
def static_blocker(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained as a stacked population (seen from its modules), or ``None``.

    Dropout (any ``nn.Dropout*`` with ``p > 0``) draws masks from the global RNG: under ``vmap`` the members'
    masks could not be the ones a solo ``train_run`` draws, so such models are trained one by one instead.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{name or 'model'} is a dropout layer (random masks cannot match a solo run under vmap)"
    return None


def _signature(model: nn.Module) -> list[tuple[str, ...]]:
    """The architecture as names, module types and tensor shapes/dtypes (what must be equal to stack)."""
    sig = [(name, type(module).__name__) for name, module in model.named_modules()]
    sig += [(name, str(tuple(t.shape)), str(t.dtype), str(t.requires_grad)) for name, t in model.named_parameters()]
    sig += [(name, str(tuple(t.shape)), str(t.dtype)) for name, t in model.named_buffers()]
    return sig


def _check_members(models: Sequence[nn.Module], seeds: Sequence[int],
                   callbacks: Sequence[Callback | None]) -> None:
    """Refuse populations that cannot be stacked: unequal lengths, or architectures that differ."""
    if len(seeds) != len(models) or len(callbacks) != len(models):
        raise ValueError(f"train_population: {len(models)} models, {len(seeds)} seeds and {len(callbacks)} "
                         "callbacks; give one of each per member")
    first = _signature(models[0])
    for i, model in enumerate(models[1:], start=1):
        if _signature(model) != first:
            raise ValueError(f"train_population: model {i} differs from model 0 (modules, parameter names or "
                             "shapes); a population shares one architecture")


# ---- the engines: how K members run in one pass -------------------------------------------------------------
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
)
_STACKABLE: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Linear, nn.LayerNorm, nn.BatchNorm1d, *ELEMENTWISE)


def stacked_blocker(model: nn.Module) -> str | None:
    """Why the ``stacked`` engine cannot run ``model``, or ``None``: it takes a plain ``nn.Sequential`` (its
    own ``forward``) of ``Flatten(1, -1)``, ``Linear``, ``LayerNorm`` over the last dimension, ``BatchNorm1d``
    on 2-d inputs with a momentum, and element-wise activations."""
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return "not a plain nn.Sequential"
    for name, module in model.named_children():
        if type(module) not in _STACKABLE:  # exact types: a subclass may compute something else
            return f"{name} is a {type(module).__name__}"
        if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
            return f"{name} flattens dims {module.start_dim}..{module.end_dim}"
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
            return f"{name} normalizes over {len(module.normalized_shape)} dims"
        if isinstance(module, nn.BatchNorm1d) and module.momentum is None:
            return f"{name} keeps a cumulative average (momentum=None)"
    return None


class _StackedSequential:
    """Runs K stacked members of a plain ``nn.Sequential`` MLP on ``(K, B, ...)`` inputs (see the module
    docstring). Linear weights are stored ``(K, in, out)``; everything else in its module's layout."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = list(model.named_children())
        self.training = True
        self.transposed = {f"{name}.weight" for name, m in self.layers if isinstance(m, nn.Linear)}

    def train(self) -> None:
        self.training = True

    def eval(self) -> None:
        self.training = False

    def stored(self, name: str, member_tensor: torch.Tensor) -> torch.Tensor:
        """A stacked tensor's row as the module holds it."""
        return member_tensor.t() if name in self.transposed else member_tensor

    def stack(self, models: Sequence[nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        params = {}
        for name, p in models[0].named_parameters():
            rows = torch.stack([m.get_parameter(name).detach() for m in models])
            if name in self.transposed:
                rows = rows.transpose(1, 2).contiguous()
            params[name] = rows.requires_grad_(p.requires_grad)
        buffers = {name: torch.stack([m.get_buffer(name).detach() for m in models]).clone()
                   for name, _ in models[0].named_buffers()}
        return params, buffers

    def forward(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``(K, B, ...)`` inputs -> ``(K, B, classes)`` outputs."""
        for name, module in self.layers:
            if isinstance(module, nn.Flatten):
                x = x.flatten(2)
            elif isinstance(module, nn.Linear):
                bias = p.get(f"{name}.bias")
                w = p[f"{name}.weight"]
                x = torch.bmm(x, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, w)
            elif isinstance(module, nn.LayerNorm):
                x = self._layer_norm(module, p, name, x)
            elif isinstance(module, nn.BatchNorm1d):
                x = self._batch_norm(module, p, b, name, x)
            else:
                x = module(x)
        return x

    @staticmethod
    def _layer_norm(module: nn.LayerNorm, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        if module.elementwise_affine:
            x = x * p[f"{name}.weight"].unsqueeze(1)
            if f"{name}.bias" in p:
                x = x + p[f"{name}.bias"].unsqueeze(1)
        return x

    def _batch_norm(self, module: nn.BatchNorm1d, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                    name: str, x: torch.Tensor) -> torch.Tensor:
        """Per member and feature: ``(K, B, H)`` -> ``(B, K * H)`` channels -> one ``F.batch_norm``."""
        k, batch, h = x.shape
        flat = x.transpose(0, 1).reshape(batch, k * h)
        mean, var = b.get(f"{name}.running_mean"), b.get(f"{name}.running_var")
        use_batch_stats = self.training or mean is None
        if self.training and module.track_running_stats and f"{name}.num_batches_tracked" in b:
            b[f"{name}.num_batches_tracked"].add_(1)
        weight, bias = p.get(f"{name}.weight"), p.get(f"{name}.bias")
        out = F.batch_norm(flat, None if mean is None else mean.view(-1), None if var is None else var.view(-1),
                           None if weight is None else weight.reshape(-1), None if bias is None else bias.reshape(-1),
                           use_batch_stats, module.momentum, module.eps)
        return out.view(batch, k, h).transpose(0, 1)

    def loss(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], xb: torch.Tensor,
             yb: torch.Tensor) -> torch.Tensor:
        logits = self.forward(p, b, xb)
        k, batch, classes = logits.shape
        return F.cross_entropy(logits.reshape(k * batch, classes), yb.reshape(-1), reduction="none").view(k, batch).mean(1)

    def logits(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        k = next(iter(p.values())).shape[0]
        return self.forward(p, b, x.unsqueeze(0).expand(k, *x.shape))


class _Vmapped:
    """Runs K stacked members of any model with ``torch.func.vmap`` over ``functional_call``."""

    def __init__(self, model: nn.Module) -> None:
        self.skeleton = copy.deepcopy(model).to("meta")
        self.skeleton.train()
        self._loss = vmap(self._member_loss)
        self._logits = vmap(self._member_logits, in_dims=(0, 0, None))

    def train(self) -> None:
        self.skeleton.train()

    def eval(self) -> None:
        self.skeleton.eval()

    @staticmethod
    def stored(name: str, member_tensor: torch.Tensor) -> torch.Tensor:
        return member_tensor

    @staticmethod
    def stack(models: Sequence[nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        params, buffers = stack_module_state(list(models))
        return dict(params), dict(buffers)

    def _member_loss(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], xb: torch.Tensor,
                     yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.skeleton, (p, b), (xb,)), yb)

    def _member_logits(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.skeleton, (p, b), (x,))

    def loss(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], xb: torch.Tensor,
             yb: torch.Tensor) -> torch.Tensor:
        return self._loss(p, b, xb, yb)

    def logits(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self._logits(p, b, x)


# ---- the stacked state -------------------------------------------------------------------------------------
class _Holder(nn.Module):
    """Holds the stacked parameters, so ``train.make_optimizer`` builds the very optimizer ``train_run`` uses."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.stacked = nn.ParameterList([nn.Parameter(t.detach(), requires_grad=t.requires_grad) for t in tensors])


@dataclass
class _Stack:
    """The active members' parameters and buffers stacked along dim 0, their optimizer, and bookkeeping.

    ``members[r]`` is the index (into the caller's lists) of the member in row ``r`` of every stacked tensor.
    """

    engine: _StackedSequential | _Vmapped
    params: dict[str, nn.Parameter]
    buffers: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    members: list[int]
    generators: list[torch.Generator]
    losses: torch.Tensor  # (rows, steps): the loss of every step, on the device
    plan: torch.Tensor | None = None  # (steps, rows, batch): the batch indices of the current segment
    offset: int = 0  # the next step's position in ``plan``

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows``: parameters, buffers, optimizer state, generators, loss rows."""
        index = torch.tensor(rows, dtype=torch.long, device=self.losses.device)
        old = len(self.members)
        with torch.no_grad():
            # New leaf tensors (autograd remembers a leaf's shape), moved into the optimizer with their state.
            replaced: dict[nn.Parameter, nn.Parameter] = {}
            for name, p in list(self.params.items()):
                new = nn.Parameter(p.detach().index_select(0, index), requires_grad=p.requires_grad)
                state = self.optimizer.state.pop(p, None)
                if state is not None:
                    self.optimizer.state[new] = {
                        key: value.index_select(0, index.to(value.device))
                        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == old else value
                        for key, value in state.items()
                    }
                self.params[name] = replaced[p] = new
            for group in self.optimizer.param_groups:
                group["params"] = [replaced.get(p, p) for p in group["params"]]
            for name, b in list(self.buffers.items()):
                self.buffers[name] = b.index_select(0, index)
        self.members = [self.members[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        self.losses = self.losses.index_select(0, index)
        if self.plan is not None:
            self.plan = self.plan.index_select(1, index.to(self.plan.device))


def _build_stack(models: Sequence[nn.Module], seeds: Sequence[int], cfg: TrainConfig, device: torch.device,
                 engine: _StackedSequential | _Vmapped) -> _Stack:
    """Stack the members (copies: the models themselves are untouched until written back)."""
    params, buffers = engine.stack(models)
    names = list(params)
    holder = _Holder([params[n] for n in names])
    return _Stack(
        engine=engine, params=dict(zip(names, holder.stacked)), buffers=buffers,
        optimizer=make_optimizer(holder, cfg), members=list(range(len(models))),
        generators=[torch.Generator(device=device).manual_seed(int(s)) for s in seeds],
        losses=torch.empty(len(models), cfg.steps, dtype=torch.float32, device=device),
    )


def _probe(stack: _Stack, data: TrainData) -> str | None:
    """Run the engine's loss once on two examples (no grad, buffers copied); the error text if it fails."""
    n = min(2, len(data.x_train))
    rows = len(stack.members)
    xb = data.x_train[:n].unsqueeze(0).expand(rows, *data.x_train[:n].shape)
    yb = data.y_train[:n].unsqueeze(0).expand(rows, n)
    try:
        with torch.no_grad():
            stack.engine.loss(stack.params, {k: v.clone() for k, v in stack.buffers.items()}, xb, yb)
    except Exception as exc:  # noqa: BLE001 - any failure means: train them one by one
        engine = "stacked" if isinstance(stack.engine, _StackedSequential) else "vmap"
        return f"the {engine} engine failed on this model ({type(exc).__name__}: {_first_line(exc)})"
    return None


def _write_back(stack: _Stack, rows: Sequence[int], models: Sequence[nn.Module]) -> None:
    """Copy rows' parameters and buffers into their members' models."""
    with torch.no_grad():
        for r in rows:
            model = models[stack.members[r]]
            for name, p in stack.params.items():
                model.get_parameter(name).copy_(stack.engine.stored(name, p[r]))
            for name, b in stack.buffers.items():
                model.get_buffer(name).copy_(b[r])


# ---- batches -----------------------------------------------------------------------------------------------
def draw_indices(generators: Sequence[torch.Generator], n: int, steps: int, batch_size: int,
                 device: torch.device) -> torch.Tensor:
    """The batch indices of the next ``steps`` steps for each member: shape ``(steps, K, batch_size)``.

    Each member's generator yields exactly what ``train_run``'s ``randint(0, n, (batch_size,))`` calls would,
    one per step, in order (see the module docstring for the CPU shortcut).
    """
    per_member = []
    for gen in generators:
        if device.type == "cpu":
            per_member.append(torch.randint(0, n, (steps, batch_size), generator=gen, device=device))
        else:
            per_member.append(torch.stack([torch.randint(0, n, (batch_size,), generator=gen, device=device)
                                           for _ in range(steps)]))
    return torch.stack(per_member, dim=1)


def _segment_length(step: int, cfg: TrainConfig) -> int:
    """Steps from ``step`` (1-based) up to and including the next checkpoint."""
    next_checkpoint = min(cfg.steps, ((step - 1) // cfg.eval_every + 1) * cfg.eval_every)
    return next_checkpoint - step + 1


# ---- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_members(stack: _Stack, x: torch.Tensor, y: torch.Tensor, batch_size: int, bf16: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Mean cross-entropy and accuracy of every row on ``(x, y)``, in eval mode, with one host sync.

    Chunks hold ``max(1, batch_size // rows)`` examples, so the activations of a chunk stay about the size
    ``train.evaluate`` uses for one model; sums accumulate in float64 as there.
    """
    rows = len(stack.members)
    chunk = max(1, batch_size // max(rows, 1))
    total = torch.zeros(rows, dtype=torch.float64, device=x.device)
    correct = torch.zeros(rows, dtype=torch.int64, device=x.device)
    stack.engine.eval()
    try:
        with _autocast(x.device, bf16):
            for start in range(0, len(x), chunk):
                logits = stack.engine.logits(stack.params, stack.buffers, x[start:start + chunk]).float()  # (rows, n, C)
                target = y[start:start + chunk]
                per_example = F.cross_entropy(logits.flatten(0, 1), target.repeat(rows), reduction="none")
                total += per_example.view(rows, -1).double().sum(dim=1)
                correct += (logits.argmax(dim=-1) == target).sum(dim=1)
    finally:
        stack.engine.train()
    both = torch.stack([total, correct.double()]).cpu().numpy()  # one sync
    return both[0] / len(x), both[1] / len(x)


# ---- the run ---------------------------------------------------------------------------------------------
def choose_mode(models: Sequence[nn.Module], mode: str = "auto", device: torch.device | str = "cpu"
                ) -> tuple[str, str | None]:
    """The engine for these models on ``device`` and, for ``loop``, why.

    ``auto``: ``stacked`` for plain MLP Sequentials; ``vmap`` for other models without dropout on CUDA;
    ``loop`` otherwise: for dropout, a single member, and for ``vmap`` models on the CPU, where the batched
    convolutions ran slower than one model at a time (0.96x on digits_cnn, about 0.5x on a CIFAR-shaped CNN
    on this project's 2-core CPU; docs/performance.md). Any other ``mode`` insists on that engine and raises
    ``ValueError`` when the models cannot take it.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "loop":
        return "loop", "asked for"
    if len(models) == 1 and mode == "auto":
        return "loop", "a single member"
    reason = static_blocker(models[0])
    if reason is not None:
        if mode != "auto":
            raise ValueError(f"train_population: cannot stack: {reason}")
        return "loop", reason
    stacked_reason = stacked_blocker(models[0])
    if mode == "stacked" and stacked_reason is not None:
        raise ValueError(f"train_population: the stacked engine cannot run this model: {stacked_reason}")
    if mode in ("auto", "stacked") and stacked_reason is None:
        return "stacked", None
    if mode == "auto" and torch.device(device).type == "cpu":
        return "loop", "on the CPU, vmap of this model is slower than one at a time"
    return "vmap", None


def train_population(models: Sequence[nn.Module], data: TrainData, cfg: TrainConfig, *, seeds: Sequence[int],
                     on_checkpoint: Sequence[Callback | None] | None = None, mode: str = "auto") -> list[Curve]:
    """Train every model in place, member ``i`` with ``seeds[i]`` and ``on_checkpoint[i]``; one Curve each.

    Equivalent to ``[train_run(m, data, cfg, seed=s, on_checkpoint=cb) for m, s, cb in ...]`` (see the
    module docstring for how, and for the models that fall back to exactly that loop). ``mode``: ``auto``,
    or an engine to insist on (``stacked``, ``vmap``, ``loop``). Models must share one architecture and
    live on the data's device.
    """
    cfg.validate()
    _check_data(data)
    callbacks = list(on_checkpoint) if on_checkpoint is not None else [None] * len(models)
    if not models:
        return []
    _check_members(models, seeds, callbacks)
    device = data.x_train.device
    how, reason = choose_mode(models, mode, device)
    if how != "loop":
        engine = _StackedSequential(models[0]) if how == "stacked" else _Vmapped(models[0])
        stack = _build_stack(models, seeds, cfg, device, engine)
        reason = _probe(stack, data)
        if reason is None:
            return _train_stacked(stack, models, data, cfg, callbacks)
        if mode != "auto":
            raise ValueError(f"train_population: {reason}")
    log.debug("population of %d trained one by one: %s", len(models), reason)
    return [train_run(m, data, cfg, seed=int(s), on_checkpoint=cb) for m, s, cb in zip(models, seeds, callbacks)]


def _train_stacked(stack: _Stack, models: Sequence[nn.Module], data: TrainData, cfg: TrainConfig,
                   callbacks: Sequence[Callback | None]) -> list[Curve]:
    """The batched loop: one vmapped step per training step, checkpoints as ``train_run`` has them."""
    x, y, device = data.x_train, data.y_train, data.x_train.device
    curves = [Curve(train_loss=np.zeros(0, dtype=np.float64)) for _ in models]
    started = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        if step <= cfg.warmup_steps + 1:
            for group in stack.optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
        if stack.plan is None or stack.offset == stack.plan.shape[0]:
            stack.plan = draw_indices(stack.generators, len(x), _segment_length(step, cfg), cfg.batch_size, device)
            stack.offset = 0
        idx = stack.plan[stack.offset]
        stack.offset += 1
        with _autocast(device, cfg.bf16):
            losses = stack.engine.loss(stack.params, stack.buffers, x[idx], y[idx])
        stack.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        stack.optimizer.step()
        stack.losses[:, step - 1] = losses.detach()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            _checkpoint(stack, curves, step, models, data, cfg, callbacks, started)
            if not stack.members:
                break
    _leave(stack, list(range(len(stack.members))), models)
    return curves


def _leave(stack: _Stack, rows: list[int], models: Sequence[nn.Module]) -> None:
    """Members in ``rows`` are done: write their state back into their models and drop them from the stack."""
    if rows:
        _write_back(stack, rows, models)
        stack.keep([r for r in range(len(stack.members)) if r not in rows])


def _checkpoint(stack: _Stack, curves: list[Curve], step: int, models: Sequence[nn.Module], data: TrainData,
                cfg: TrainConfig, callbacks: Sequence[Callback | None], started: float) -> None:
    """Record every row's losses since the last checkpoint (one sync) and check them for divergence, as
    ``train._checkpoint`` does; validate the members that did not diverge (one more sync) and ask each one's
    callback. Members that diverged or were stopped leave the stack."""
    first = curves[stack.members[0]].steps_done + 1
    chunk = stack.losses[:, first - 1:step].double().cpu().numpy()
    elapsed = time.perf_counter() - started
    diverged = []
    for r, member in enumerate(stack.members):
        curve = curves[member]
        curve.train_loss = np.concatenate([curve.train_loss, chunk[r]])
        curve.steps_done, curve.seconds = step, elapsed
        curve.reason = divergence_reason(chunk[r], first, float(curve.train_loss[0]), cfg.divergence_factor)
        if curve.reason is not None:
            curve.diverged = True
            diverged.append(r)
    _leave(stack, diverged, models)
    if not stack.members:
        return
    val_loss, val_acc = evaluate_members(stack, data.x_val, data.y_val, cfg.eval_batch_size, cfg.bf16)
    stopped = []
    for r, member in enumerate(stack.members):
        curve = curves[member]
        curve.val_steps.append(step)
        curve.val_loss.append(float(val_loss[r]))
        curve.val_acc.append(float(val_acc[r]))
        callback = callbacks[member]
        if callback is not None and callback(step, _snapshot(curve)):
            curve.stopped, curve.reason = True, f"stopped by callback at step {step}"
            stopped.append(r)
    elapsed = time.perf_counter() - started
    for r in range(len(stack.members)):
        curves[stack.members[r]].seconds = elapsed
    _leave(stack, stopped, models)
