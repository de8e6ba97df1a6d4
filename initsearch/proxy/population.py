"""Population training: K candidate models of one architecture trained together, one pass per step.

``train_population(models, data, cfg, seeds=...)`` gives the same curves as ``train_run(models[i], data, cfg,
seed=seeds[i])`` for every ``i`` (within float tolerance), at the cost of one batched step instead of K:

- **Stacking.** The members' parameters and buffers are stacked along a new leading dimension K, and one
  of two engines runs all K members in one pass:

  * ``stacked`` (plain ``nn.Sequential`` MLPs: ``Flatten``, ``Linear``, ``LayerNorm``, ``BatchNorm1d`` and
    element-wise activations, i.e. the MLP proxy). Activations are **feature-major**, ``(K, features, B)``,
    so the stacked ``Linear`` weights are the members' own ``(out, in)`` weights stacked as ``(K, out, in)``
    (no transposed copy, and no transpose on write-back) and each ``Linear`` is one
    ``baddbmm(bias (K, out, 1), W, h (K, in, B))``. A ``ReLU`` right after a ``Linear`` runs in place on the
    product (the product saves its inputs, not its output). ``BatchNorm1d`` sees ``(K, H, B)`` as
    ``(1, K * H, B)``: one ``F.batch_norm`` over ``K * H`` channels, per member and feature the statistics of
    a solo layer, with no copy. ``LayerNorm`` normalizes a ``(K, B, H)`` view. Plain ``nn.Sequential`` CNNs
    (``Conv2d``, ``BatchNorm2d``, pooling; the VGG-style proxies) run on it too: their image activations are
    channel-stacked, ``(B, K * C, H, W)``, every convolution after the first is one grouped convolution
    (``groups=K``), and the memory layout (channels-last or not) is measured per stack (``_conv_layout``).
    The residual ``ResCNN`` proxy runs on it as well: each of its basic blocks is run as one unit, its
    branch and shortcut on the same channel-stacked maps, added per channel.
  * **Shared batches.** When every member has the same seed (what batched studies pass: one evaluation
    seed for the K trials of a round), every member would draw the same indices, so one generator draws
    them once, ``x[idx]`` is gathered once as ``(B, ...)``, and the first ``Linear`` of all members is one
    ``addmm`` of the weights viewed as ``(K * out, in)`` with ``x.T``; its weight gradient is one ``mm``
    (``x`` needs no gradient). Validation runs the same way (the validation set is shared anyway).
  * The optimizer is ``train.training_optimizer``'s, the one ``train_run`` uses (torch's fused update
    kernel where it takes the tensors: one kernel per tensor instead of several element-wise passes).
  * **Kernels.** The training steps run their float32 products on the route the ``kernels`` module chooses
    for this stack's shapes: oneDNN where a probe step shows it exact to float32 precision and faster, ATen's
    default (MKL) otherwise. Validation always runs on the default route. On CPUs where MKL takes a slow
    path, the matrix products dominate a stacked step and oneDNN computes the same float32 products faster;
    on a single model the oneDNN route can be slower, which is one reason it is measured per stack (the
    figures are in docs/performance.md).
  * ``vmap`` (any other model, e.g. a user's own ``nn.Module``): a copy of the first model on the ``meta`` device
    is the stateless skeleton that ``torch.func.functional_call`` runs with member ``k``'s slice, mapped
    over K by ``torch.func.vmap`` (convolutions become grouped convolutions by torch.func's batching rules).
- **Each member its own batches.** Member ``k`` draws its batch indices from a ``torch.Generator`` seeded with
  ``seeds[k]``, exactly as ``train_run`` does, so ``idx`` has shape ``(K, B)`` and the batch is ``x[idx]``
  (when all seeds are equal: one generator, ``idx`` of shape ``(B,)``, see "Shared batches").
  On the CPU the indices of a whole segment (the steps up to the next checkpoint) come from one
  ``randint((steps, B))`` call per member, which consumes the generator exactly like ``steps`` calls of
  ``randint((B,))`` (the CPU generator is sequential); on other devices they come from one call per step.
- **Independent gradients.** The step minimizes ``sum_k loss_k``: the gradient of that sum with respect to
  member ``k``'s parameters is the gradient of ``loss_k`` alone, since no operation mixes members.
- **Optimizers.** SGD (momentum), Adam and AdamW update every element from its own gradient and state (Adam's
  step count is shared, and equal for all members), so one optimizer over the stacked tensors
  (``train.training_optimizer``'s) performs K independent updates. Warmup is
  the same schedule.
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

On the CPU, ``auto`` trains models that only ``vmap`` can stack (the residual CNN) one after another: there
vmap's batched convolutions were slower than the loop. ``mode="vmap"`` forces them (the equivalence tests do).
``train_population`` returns a ``PopulationResult``: the curves and the engine that actually ran.

Not batched (``mode="loop"``: the members are trained one after another with ``train_run``): models with
dropout, whose masks come from the global RNG and could not match a solo run; and models whose forward
fails on their engine (a probe of the training loss and of the validation logits on two examples decides; a
user's model with data-dependent Python control flow, ``.item()`` calls or in-place ops on its input under
``vmap``, or a ``Linear`` on unflattened inputs under ``stacked``, for example). The returned curves are the
same either way.

On CUDA the step runs under bf16 autocast when ``train.bf16`` is on, as ``train_run``'s does; the stacked
engine keeps CNN activations channels-last there (as ``train_run`` converts CNNs), ``vmap`` keeps the
contiguous layout. Nothing in a step waits for the device: losses stay on it until the checkpoint.

``Curve.seconds`` of a member is the wall time from the start of the population to that member's end.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from initsearch.errors import first_line
from initsearch.proxy.kernels import Route, choose_route
from initsearch.proxy.kernels import known as known_route
from initsearch.proxy.losses import Loss, resolve_loss
from initsearch.proxy.models import BasicBlock, ResCNN
from initsearch.proxy.optimizers import FusedOptimizer
from initsearch.proxy.train import (
    Curve,
    TrainConfig,
    TrainData,
    bf16_autocast,
    check_data,
    curve_snapshot,
    divergence_reason,
    draw_batches,
    segment_steps,
    train_run,
    training_optimizer,
)

log = logging.getLogger("initsearch")

Callback = Callable[[int, Curve], bool]
POPULATION_MODES: tuple[str, ...] = ("auto", "stacked", "vmap", "loop")  # ``auto`` or the engine to insist on


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
SPATIAL: tuple[type[nn.Module], ...] = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)  # per channel, as-is
_STACKABLE: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Linear, nn.LayerNorm, nn.BatchNorm1d, nn.Conv2d,
                                           nn.BatchNorm2d, nn.Identity, *SPATIAL, *ELEMENTWISE)


def stacked_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The layers the stacked engine runs, in order, as ``(dotted name, module)``: a plain ``nn.Sequential``'s
    children, or ``ResCNN``'s stem, its ``BasicBlock`` s (each run as one unit) and its head; ``None`` for
    any other model."""
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        return list(model.named_children())
    if type(model) is ResCNN:
        blocks = [(f"stages.{s}.{b}", block) for s, stage in enumerate(model.stages) for b, block in enumerate(stage)]
        return [("stem", model.stem), ("stem_norm", model.stem_norm), ("stem_act", model.stem_act), *blocks,
                ("gap", model.gap), ("flatten", model.flatten), ("out", model.out)]
    return None


def stacked_blocker(model: nn.Module) -> str | None:
    """Why the ``stacked`` engine cannot run ``model``, or ``None``: it takes a plain ``nn.Sequential`` (its
    own ``forward``), or the residual ``ResCNN`` proxy (exact types), of ``Flatten(1, -1)``, ``Linear``,
    ``LayerNorm`` over the last dimension, ``BatchNorm1d`` on 2-d inputs and ``BatchNorm2d``, both with a
    momentum, ungrouped zero-padded ``Conv2d``, ``MaxPool2d`` (without indices), ``AvgPool2d``,
    ``AdaptiveAvgPool2d``, ``Identity`` and element-wise activations (in ``ResCNN``'s basic blocks too)."""
    layers = stacked_layers(model)
    if layers is None:
        return "not a plain nn.Sequential or the ResCNN proxy"
    for name, module in layers:
        inner = [(f"{name}.{n}", m) for n, m in module.named_children()] if type(module) is BasicBlock else [(name, module)]
        for inner_name, inner_module in inner:
            reason = _unstackable(inner_name, inner_module)
            if reason is not None:
                return reason
    return None


def _unstackable(name: str, module: nn.Module) -> str | None:
    """Why the stacked engine cannot run this one layer, or ``None``."""
    if type(module) not in _STACKABLE:  # exact types: a subclass may compute something else
        return f"{name} is a {type(module).__name__}"
    if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
        return f"{name} flattens dims {module.start_dim}..{module.end_dim}"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return f"{name} normalizes over {len(module.normalized_shape)} dims"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.momentum is None:
        return f"{name} keeps a cumulative average (momentum=None)"
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        return f"{name} is a grouped or {module.padding_mode}-padded convolution"
    if isinstance(module, nn.MaxPool2d) and module.return_indices:
        return f"{name} returns its indices"
    return None


class _StackedSequential:
    """Runs K stacked members of a plain ``nn.Sequential`` MLP (see the module docstring).

    Activations are **feature-major**: ``(K, features, B)``, so every stacked ``Linear`` weight is the members'
    ``(out, in)`` weights stacked as ``(K, out, in)`` (no transposed copy) and a layer is
    ``baddbmm(bias (K, out, 1), W (K, out, in), h (K, in, B))``. A batch shared by all members stays one
    ``(B, ...)`` tensor up to the first ``Linear``, which is then one ``addmm`` over the members' weights
    viewed as ``(K * out, in)``; its weight gradient is one ``mm`` as well.

    Image activations (before the ``Flatten``) are **channel-stacked**, ``(B, K * C, H, W)``: member ``k``'s
    channels are ``k * C ... (k + 1) * C - 1``. A ``Conv2d`` on a shared batch is one convolution with the
    members' weights viewed as ``(K * out, in, kh, kw)`` (on the CPU one matrix product of the batch's
    patches, ``_shared_conv``); every later one is a grouped convolution with
    ``groups=K`` (each member's output channels see only its own input channels). ``BatchNorm2d`` is one
    ``F.batch_norm`` over ``K * C`` channels; pooling and activations are per channel, so they run as they
    are. ``Flatten`` turns ``(B, K * C, H, W)`` into the feature-major ``(K, C * H * W, B)``. With
    ``channels_last`` the image activations are kept in NHWC memory (``_conv_layout`` measures whether that
    is faster: on the CPU, max pooling of NCHW maps is many times slower than of NHWC ones).
    """

    def __init__(self, model: nn.Module, loss: Loss) -> None:
        self.loss_fn = loss
        self.layers = stacked_layers(model) or []
        self.plan = _fuse_relus(self.layers)
        self.training = True
        self.channels_last = False

    def train(self) -> None:
        self.training = True

    def eval(self) -> None:
        self.training = False

    @staticmethod
    def stored(name: str, member_tensor: torch.Tensor) -> torch.Tensor:
        """A stacked tensor's row as the module holds it (the same layout)."""
        return member_tensor

    @staticmethod
    def stack(models: Sequence[nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        params = {name: torch.stack([m.get_parameter(name).detach() for m in models]).requires_grad_(p.requires_grad)
                  for name, p in models[0].named_parameters()}
        buffers = {name: torch.stack([m.get_buffer(name).detach() for m in models]).clone()
                   for name, _ in models[0].named_buffers()}
        return params, buffers

    def forward(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], x: torch.Tensor,
                shared: bool) -> torch.Tensor:
        """Inputs ``(B, ...)`` shared by every member (``shared``) or ``(K, B, ...)`` -> logits ``(K, C, B)``.

        ``form`` tracks the activation's layout: ``shared`` ``(B, ...)``, ``rows`` ``(K, B, ...)`` (a member's
        own batch, before the first layer with parameters), ``maps`` ``(B, K * C, H, W)`` (channel-stacked
        images) or ``cols`` ``(K, F, B)``. A shared batch reaching a ``BatchNorm2d`` or a padded-by-name
        ``Conv2d`` first is copied for every member (``_to_maps``).
        """
        k = next(iter(p.values())).shape[0]
        form = "shared" if shared else "rows"
        for name, module, relu in self.plan:
            if isinstance(module, nn.Flatten):
                if form == "maps":
                    x, form = x.reshape(x.shape[0], k, -1).permute(1, 2, 0), "cols"
                else:
                    x = x if form == "cols" else x.flatten(1 if form == "shared" else 2)
            elif isinstance(module, nn.Conv2d):
                x, form = self._conv(module, p, name, x, form, k), "maps"
            elif isinstance(module, BasicBlock):
                x, form = self._block(module, p, b, name, _to_maps(x, form, k, name), k), "maps"
            elif isinstance(module, nn.BatchNorm2d):
                x, form = self._batch_norm(module, p, b, name, _to_maps(x, form, k, name)), "maps"
            elif isinstance(module, SPATIAL):
                if form == "cols":  # flat features: not an image (a solo run would refuse them too)
                    raise ValueError(f"{name} needs (C, H, W) images per example")
                x = module(x if form == "shared" else _to_maps(x, form, k, name))
                form = "shared" if form == "shared" else "maps"
            elif isinstance(module, nn.Linear):
                x = self._linear(p, name, _flat(x, form, name), form, relu)
                form = "cols"
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
                x, form = _to_cols(_flat(x, form, name), form, k), "cols"
                x = self._layer_norm(module, p, name, x) if isinstance(module, nn.LayerNorm) else \
                    self._batch_norm(module, p, b, name, x)
            else:
                x = module(x)
        return _to_cols(_flat(x, form, "the output"), form, k)

    @staticmethod
    def _linear(p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, form: str, relu: bool) -> torch.Tensor:
        """One ``Linear`` (and the ``ReLU`` after it when ``relu``) for all members: one ``addmm``/``mm`` on a
        shared batch, one ``baddbmm``/``bmm`` otherwise; the result is ``(K, out, B)``.

        The ``ReLU`` runs in place on the product, before any view of it is taken: the product saves its
        inputs, not its output, for the backward pass, so this is exact and saves an activation buffer (an
        in-place op on a view would make autograd copy the whole base instead)."""
        w, bias = p[f"{name}.weight"], p.get(f"{name}.bias")
        k, out_features, in_features = w.shape
        if form == "shared":  # (K * out, in) @ (in, B): every member's layer in one matrix product
            flat = w.view(k * out_features, in_features)
            y = torch.mm(flat, x.t()) if bias is None else torch.addmm(bias.view(-1, 1), flat, x.t())
        else:
            h = x.transpose(1, 2) if form == "rows" else x  # (K, in, B)
            y = torch.bmm(w, h) if bias is None else torch.baddbmm(bias.unsqueeze(2), w, h)
        if relu:
            y = torch.relu_(y)
        return y.view(k, out_features, -1)

    @staticmethod
    def _layer_norm(module: nn.LayerNorm, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
        """Over the features of ``(K, F, B)``: ``F.layer_norm`` on the ``(K, B, F)`` view, then the affine."""
        y = F.layer_norm(x.transpose(1, 2), module.normalized_shape, eps=module.eps)
        if module.elementwise_affine:
            y = y * p[f"{name}.weight"].unsqueeze(1)
            if f"{name}.bias" in p:
                y = y + p[f"{name}.bias"].unsqueeze(1)
        return y.transpose(1, 2)

    def _conv(self, module: nn.Conv2d, p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, form: str,
              k: int) -> torch.Tensor:
        """One ``Conv2d`` for all members -> ``(B, K * out, H', W')``: on a shared ``(B, in, H, W)`` batch one
        convolution with ``K * out`` output channels, otherwise a grouped one (``groups=K``) on the
        channel-stacked input."""
        w, bias = p[f"{name}.weight"], p.get(f"{name}.bias")
        flat_w = w.view(k * w.shape[1], *w.shape[2:])
        flat_b = None if bias is None else bias.view(-1)
        if form == "shared" and x.dim() == 4 and not isinstance(module.padding, str) and x.device.type == "cpu":
            y = _shared_conv(x, flat_w, flat_b, module)
        else:
            x = _to_maps(x, form, k, name)
            x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
            y = F.conv2d(x, flat_w, flat_b, module.stride, module.padding, module.dilation, k)
        return y.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _block(self, block: BasicBlock, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], name: str,
               x: torch.Tensor, k: int) -> torch.Tensor:
        """One residual ``BasicBlock`` for all members on channel-stacked maps, as its ``forward`` computes it:
        ``act2(norm2(conv2(act1(norm1(conv1(x))))) + shortcut)``, the shortcut ``x`` or ``proj_norm(proj(x))``;
        the sum is per channel, so member ``k``'s branch meets member ``k``'s shortcut."""
        def norm(module: nn.Module, suffix: str, h: torch.Tensor) -> torch.Tensor:
            return self._batch_norm(module, p, b, f"{name}.{suffix}", h) if isinstance(module, nn.BatchNorm2d) else module(h)

        h = block.act1(norm(block.norm1, "norm1", self._conv(block.conv1, p, f"{name}.conv1", x, "maps", k)))
        h = norm(block.norm2, "norm2", self._conv(block.conv2, p, f"{name}.conv2", h, "maps", k))
        shortcut = x
        if block.proj is not None:
            shortcut = self._conv(block.proj, p, f"{name}.proj", x, "maps", k)
            if block.proj_norm is not None:
                shortcut = norm(block.proj_norm, "proj_norm", shortcut)
        return block.act2(h + shortcut)

    def _batch_norm(self, module: nn.BatchNorm1d | nn.BatchNorm2d, p: Mapping[str, torch.Tensor],
                    b: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
        """Per member and feature: ``(K, H, B)`` is ``(1, K * H, B)``, one ``F.batch_norm`` over ``K * H``
        channels (statistics over the B examples of each, as a solo ``BatchNorm1d`` computes them); a
        channel-stacked ``(B, K * C, H, W)`` map is normalized over its ``K * C`` channels as it is."""
        mean, var = b.get(f"{name}.running_mean"), b.get(f"{name}.running_var")
        use_batch_stats = self.training or mean is None
        if self.training and module.track_running_stats and f"{name}.num_batches_tracked" in b:
            b[f"{name}.num_batches_tracked"].add_(1)
        weight, bias = p.get(f"{name}.weight"), p.get(f"{name}.bias")
        flat = x if x.dim() == 4 else x.reshape(1, x.shape[0] * x.shape[1], x.shape[2])
        out = F.batch_norm(flat, None if mean is None else mean.view(-1),
                           None if var is None else var.view(-1), None if weight is None else weight.reshape(-1),
                           None if bias is None else bias.reshape(-1), use_batch_stats, module.momentum, module.eps)
        return out if x.dim() == 4 else out.view(x.shape)

    def loss(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], xb: torch.Tensor,
             yb: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Every member's mean loss, ``(K,)``: ``F.cross_entropy`` on ``(K, C, B)`` logits, or the study's
        other loss per example on the ``(K * B, C)`` outputs."""
        logits = self.forward(p, b, xb, shared)
        k, _, batch = logits.shape
        target = yb.expand(k, *yb.shape) if shared else yb
        if self.loss_fn.name == "cross_entropy":
            return F.cross_entropy(logits, target, reduction="none").mean(1)
        out = logits.transpose(1, 2).flatten(0, 1)
        return self.loss_fn.per_example(out, target.flatten(0, 1)).view(k, batch).mean(1)

    def logits(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(n, ...)`` (the same for every member) -> ``(K, n, C)``."""
        return self.forward(p, b, x, shared=True).transpose(1, 2)


def _flat(x: torch.Tensor, form: str, name: str) -> torch.Tensor:
    """``x`` if each member's activation is a flat feature vector per example, else ``ValueError`` (the probe
    then sends the model to another engine)."""
    if x.dim() != (2 if form == "shared" else 3):
        raise ValueError(f"{name} gets a {x.dim() - (form != 'shared') - 1}-d input per example; the stacked "
                         "engine takes flat features")
    return x


def _shared_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, module: nn.Conv2d) -> torch.Tensor:
    """Every member's first convolution of a shared batch ``x`` ``(B, in, H, W)`` as one matrix product:
    the patches of ``x`` (``F.unfold``, no gradient needed), ``(B * H' * W', in * kh * kw)``, times the members'
    weights ``(K * out, in * kh * kw)`` transposed. The result ``(B, H', W', K * out)`` is returned as the
    ``(B, K * out, H', W')`` channels-last view of it (no copy). On the CPU a convolution with a few input
    channels and many output channels runs far below the machine's speed; this product does not, and its
    weight gradient is one product as well. (CPU only: on CUDA, cuDNN runs the convolution itself.)"""
    batch, _, height, width = x.shape
    kh, kw = module.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = module.stride, module.padding, module.dilation
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    patches = F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw)).transpose(1, 2).reshape(batch * out_h * out_w, -1)
    flat = weight.view(weight.shape[0], -1).t()
    y = torch.mm(patches, flat) if bias is None else torch.addmm(bias, patches, flat)
    return y.view(batch, out_h, out_w, -1).permute(0, 3, 1, 2)


def _to_maps(x: torch.Tensor, form: str, k: int, name: str) -> torch.Tensor:
    """An image activation in the channel-stacked layout ``(B, K * C, H, W)``, else ``ValueError``."""
    if form == "maps":
        return x
    if form == "shared" and x.dim() == 4:
        return x.repeat(1, k, 1, 1)
    if form == "rows" and x.dim() == 5:
        return x.transpose(0, 1).reshape(x.shape[1], k * x.shape[2], *x.shape[3:])
    raise ValueError(f"{name} needs (C, H, W) images per example")


def _to_cols(x: torch.Tensor, form: str, k: int) -> torch.Tensor:
    """A flat activation in the ``cols`` layout ``(K, F, B)`` (views: no copy)."""
    if form == "shared":
        return x.t().unsqueeze(0).expand(k, *x.t().shape)
    return x.transpose(1, 2) if form == "rows" else x


def _fuse_relus(layers: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module, bool]]:
    """The layers to run, as ``(name, module, relu)``: a plain ``nn.ReLU`` right after a ``Linear`` is folded
    into it (``relu`` True on the ``Linear``, the ``ReLU`` itself dropped)."""
    plan: list[tuple[str, nn.Module, bool]] = []
    for name, module in layers:
        if type(module) is nn.ReLU and plan and isinstance(plan[-1][1], nn.Linear) and not plan[-1][2]:
            plan[-1] = (plan[-1][0], plan[-1][1], True)
        else:
            plan.append((name, module, False))
    return plan


class _Vmapped:
    """Runs K stacked members of any model with ``torch.func.vmap`` over ``functional_call``."""

    def __init__(self, model: nn.Module, loss: Loss) -> None:
        self.loss_fn = loss
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
        out = functional_call(self.skeleton, (p, b), (xb,))
        return self.loss_fn.mean(out, yb)

    def _member_logits(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.skeleton, (p, b), (x,))

    def loss(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], xb: torch.Tensor,
             yb: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Every member's mean loss, ``(K,)``; a ``shared`` batch is expanded to every member (a view)."""
        if shared:
            k = next(iter(p.values())).shape[0]
            xb, yb = xb.expand(k, *xb.shape), yb.expand(k, *yb.shape)
        return self._loss(p, b, xb, yb)

    def logits(self, p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self._logits(p, b, x)


# ---- the stacked state -------------------------------------------------------------------------------------
class _Holder(nn.Module):
    """Holds the stacked parameters, so ``train.training_optimizer`` builds the very optimizer ``train_run`` uses."""

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
    optimizer: torch.optim.Optimizer | FusedOptimizer
    members: list[int]
    generators: list[torch.Generator]  # one per row; a single one when ``shared``
    shared: bool  # all members have one seed: one batch per step serves them all
    structure: str  # the members' architecture as text (``repr`` of one of them): part of ``RouteKey``
    pending: list[torch.Tensor] = field(default_factory=list)  # (rows,) losses of the steps since the checkpoint
    plan: torch.Tensor | None = None  # (steps, rows, batch), or (steps, batch) when shared: the current segment's
    offset: int = 0  # the next step's position in ``plan``

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows``: parameters, buffers, optimizer state, generators, loss rows."""
        index = torch.tensor(rows, dtype=torch.long, device=next(iter(self.params.values())).device)
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
        self.pending = [loss.index_select(0, index) for loss in self.pending]
        if not self.shared:
            self.generators = [self.generators[r] for r in rows]
            if self.plan is not None:
                self.plan = self.plan.index_select(1, index.to(self.plan.device))


def _build_stack(models: Sequence[nn.Module], seeds: Sequence[int], cfg: TrainConfig, device: torch.device,
                 engine: _StackedSequential | _Vmapped) -> _Stack:
    """Stack the members (copies: the models themselves are untouched until written back)."""
    params, buffers = engine.stack(models)
    names = list(params)
    holder = _Holder([params[n] for n in names])
    shared = len({int(s) for s in seeds}) == 1
    return _Stack(
        engine=engine, params=dict(zip(names, holder.stacked)), buffers=buffers,
        optimizer=training_optimizer(holder, cfg), members=list(range(len(models))),
        generators=[torch.Generator(device=device).manual_seed(int(s)) for s in (seeds[:1] if shared else seeds)],
        shared=shared, structure=repr(models[0]),
    )


def _probe(stack: _Stack, data: TrainData) -> str | None:
    """Run the engine's training loss (in the batch form training will use) and its validation logits once on
    two examples (no grad, buffers copied); the error text if either fails."""
    n = min(2, len(data.x_train))
    rows = len(stack.members)
    xb, yb = data.x_train[:n], data.y_train[:n]
    if not stack.shared:
        xb, yb = xb.unsqueeze(0).expand(rows, *xb.shape), yb.unsqueeze(0).expand(rows, *yb.shape)
    try:
        with torch.no_grad():
            buffers = {k: v.clone() for k, v in stack.buffers.items()}
            stack.engine.loss(stack.params, buffers, xb, yb, shared=stack.shared)
            stack.engine.eval()
            try:
                stack.engine.logits(stack.params, buffers, data.x_val[:n])
            finally:
                stack.engine.train()
    except Exception as exc:
        engine = "stacked" if isinstance(stack.engine, _StackedSequential) else "vmap"
        return f"the {engine} engine failed on this model ({type(exc).__name__}: {first_line(exc)})"
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

    Each member's generator yields exactly what ``train_run``'s draws would (``train.draw_batches``).
    """
    return torch.stack([draw_batches(gen, n, steps, batch_size, device) for gen in generators], dim=1)


# ---- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_members(stack: _Stack, x: torch.Tensor, y: torch.Tensor, batch_size: int, bf16: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss and accuracy of every row on ``(x, y)``, in eval mode, with one host sync (accuracy NaN
    where the study's loss has none).

    Chunks hold ``max(1, batch_size // rows)`` examples, so the activations of a chunk stay about the size
    ``train.evaluate`` uses for one model; sums accumulate in float64 as there.
    """
    rows = len(stack.members)
    chunk = max(1, batch_size // max(rows, 1))
    total = torch.zeros(rows, dtype=torch.float64, device=x.device)
    correct = torch.zeros(rows, dtype=torch.float64, device=x.device)
    loss = stack.engine.loss_fn
    stack.engine.eval()
    try:
        with bf16_autocast(x.device, bf16):
            for start in range(0, len(x), chunk):
                logits = stack.engine.logits(stack.params, stack.buffers, x[start:start + chunk]).float()  # (rows, n, C)
                target = y[start:start + chunk]
                targets = target.repeat(rows, *[1] * (target.dim() - 1))
                if loss.name == "cross_entropy":
                    per_example = F.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
                else:
                    per_example = loss.per_example(logits.flatten(0, 1), targets)
                total += per_example.view(rows, -1).double().sum(dim=1)
                if loss.hits is not None:
                    correct += loss.hits(logits.flatten(0, 1), targets).view(rows, -1).sum(dim=1)
    finally:
        stack.engine.train()
    both = torch.stack([total, correct]).cpu().numpy()  # one sync
    return both[0] / len(x), (both[1] / len(x) if loss.has_accuracy else np.full(rows, math.nan))


# ---- the run ---------------------------------------------------------------------------------------------
def choose_mode(models: Sequence[nn.Module], mode: str = "auto", device: torch.device | str = "cpu"
                ) -> tuple[str, str | None]:
    """The engine for these models on ``device`` and, for ``loop``, why.

    ``auto``: ``stacked`` for plain Sequentials (MLPs, VGG-style CNNs) and the residual ``ResCNN`` proxy;
    ``vmap`` for other models without dropout on CUDA; ``loop`` otherwise: for dropout, a single member, and for ``vmap`` models on the CPU,
    where vmap's batched convolutions ran slower than one model at a time (docs/performance.md). Any other
    ``mode`` insists on that engine and raises ``ValueError`` when the models cannot take it.
    """
    if mode not in POPULATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(POPULATION_MODES)}, got {mode!r}")
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


@dataclass
class PopulationResult:
    """What ``train_population`` did: one ``Curve`` per member (in the caller's order), the engine that
    actually ran them (``stacked``, ``vmap`` or ``loop``: one after another with ``train_run``), why it was
    ``loop`` (``None`` otherwise), and whether the image activations were kept channels-last."""

    curves: list[Curve]
    engine: str
    reason: str | None = None
    channels_last: bool = False

    def describe(self) -> str:
        """One line for the log: the engine, its layout, and why one by one."""
        if self.engine == "loop":
            return f"one by one ({self.reason})"
        return self.engine + (", channels-last" if self.channels_last else "")


def train_population(models: Sequence[nn.Module], data: TrainData, cfg: TrainConfig, *, seeds: Sequence[int],
                     on_checkpoint: Sequence[Callback | None] | None = None, mode: str = "auto"
                     ) -> PopulationResult:
    """Train every model in place, member ``i`` with ``seeds[i]`` and ``on_checkpoint[i]``; one Curve each,
    and the engine that ran them (``PopulationResult``).

    Equivalent to ``[train_run(m, data, cfg, seed=s, on_checkpoint=cb) for m, s, cb in ...]`` (see the
    module docstring for how, and for the models that fall back to exactly that loop). ``mode``: ``auto``,
    or an engine to insist on (``stacked``, ``vmap``, ``loop``). Models must share one architecture and
    live on the data's device.
    """
    cfg.validate()
    check_data(data)
    callbacks = list(on_checkpoint) if on_checkpoint is not None else [None] * len(models)
    if not models:
        return PopulationResult(curves=[], engine="loop", reason="no members")
    _check_members(models, seeds, callbacks)
    device = data.x_train.device
    how, reason = choose_mode(models, mode, device)
    if how != "loop":
        loss = resolve_loss(cfg.loss, data.y_train)
        engine = _StackedSequential(models[0], loss) if how == "stacked" else _Vmapped(models[0], loss)
        stack = _build_stack(models, seeds, cfg, device, engine)
        reason = _probe(stack, data)
        if reason is None:
            if isinstance(engine, _StackedSequential):
                engine.channels_last = _conv_layout(stack, data, cfg)
            curves = _train_stacked(stack, models, data, cfg, callbacks)
            return PopulationResult(curves=curves, engine=how, channels_last=getattr(engine, "channels_last", False))
        if mode != "auto":
            raise ValueError(f"train_population: {reason}")
    log.debug("population of %d trained one by one: %s", len(models), reason)
    curves = [train_run(m, data, cfg, seed=int(s), on_checkpoint=cb) for m, s, cb in zip(models, seeds, callbacks)]
    return PopulationResult(curves=curves, engine="loop", reason=reason)


def _train_stacked(stack: _Stack, models: Sequence[nn.Module], data: TrainData, cfg: TrainConfig,
                   callbacks: Sequence[Callback | None]) -> list[Curve]:
    """The batched loop: one stacked step per training step, checkpoints as ``train_run`` has them. The
    steps run on the matrix-product route ``_onednn_route`` chose (validation on the default one)."""
    x, y, device = data.x_train, data.y_train, data.x_train.device
    curves = [Curve(train_loss=np.zeros(0, dtype=np.float64)) for _ in models]
    route = Route()
    rows, onednn = len(stack.members), _onednn_route(stack, data, cfg)
    started = time.perf_counter()
    try:
        for step in range(1, cfg.steps + 1):
            if step <= cfg.warmup_steps + 1:
                for group in stack.optimizer.param_groups:
                    group["lr"] = cfg.lr_at(step)
            if stack.plan is None or stack.offset == stack.plan.shape[0]:
                stack.plan = draw_indices(stack.generators, len(x), segment_steps(step, cfg), cfg.batch_size, device)
                if stack.shared:
                    stack.plan = stack.plan[:, 0]  # (steps, batch): every member's indices
                stack.offset = 0
            idx = stack.plan[stack.offset]
            stack.offset += 1
            route.use(onednn)
            with bf16_autocast(device, cfg.bf16):
                losses = stack.engine.loss(stack.params, stack.buffers, x[idx], y[idx], shared=stack.shared)
            for p in stack.params.values():  # what zero_grad(set_to_none=True) does, without its per-call wrapping
                p.grad = None
            losses.sum().backward()
            stack.optimizer.step()
            stack.pending.append(losses.detach())
            if step % cfg.eval_every == 0 or step == cfg.steps:
                route.use(False)
                _checkpoint(stack, curves, step, models, data, cfg, callbacks, started)
                if not stack.members:
                    break
                if len(stack.members) != rows:  # members left: other shapes (their verdicts are cached)
                    rows, onednn = len(stack.members), _onednn_route(stack, data, cfg)
    finally:
        route.restore()
    _leave(stack, list(range(len(stack.members))), models)
    return curves


@dataclass(frozen=True)
class RouteKey:
    """What the matrix-product route of a stack's training step depends on: the engine and the model's
    structure (``repr``: strides, paddings, flags), every stacked tensor's shape and dtype (rows included),
    the batch (size, shared or per row, input shape), and the threads."""

    engine: str
    structure: str
    rows: int
    shared: bool
    batch_size: int
    threads: int
    params: tuple[tuple[str, tuple[int, ...], str, bool], ...]
    buffers: tuple[tuple[str, tuple[int, ...], str], ...]
    inputs: tuple[tuple[int, ...], str]
    channels_last: bool = False


def _route_key(stack: _Stack, data: TrainData, cfg: TrainConfig) -> RouteKey:
    return RouteKey(
        engine=type(stack.engine).__name__, structure=stack.structure, rows=len(stack.members),
        shared=stack.shared, batch_size=cfg.batch_size, threads=torch.get_num_threads(),
        params=tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in stack.params.items()),
        buffers=tuple((n, tuple(b.shape), str(b.dtype)) for n, b in stack.buffers.items()),
        inputs=(tuple(data.x_train.shape[1:]), str(data.x_train.dtype)),
        channels_last=bool(getattr(stack.engine, "channels_last", False)),
    )


def _onednn_route(stack: _Stack, data: TrainData, cfg: TrainConfig) -> bool:
    """Whether the stack's training steps run their float32 products on oneDNN (the ``kernels`` module): on
    the CPU, when one step of this stack's engine, shapes, batch and threads gives the same loss and
    gradients as the default route to float32 precision, and runs faster.

    The probe step runs on **synthetic operands** of the stack's shapes and dtypes: parameters
    ``N(0, 1/fan_in)`` (``N(0, 1)`` for vectors) and float inputs ``N(0, 1)`` from a fixed generator, the
    real labels, copies of the buffers. Real weights could hide a down-converting kernel (zeros, or powers
    of two, are exact in bfloat16), and the verdict is cached for every later stack with the same key."""
    device = data.x_train.device
    if device.type != "cpu":
        return False
    key = _route_key(stack, data, cfg)
    verdict = known_route(key)
    if verdict is not None:
        return verdict
    built: list[Callable[[], list[torch.Tensor]]] = []

    def step() -> list[torch.Tensor]:  # built at its first call: a refused family calls it never
        if not built:
            built.append(_synthetic_step(stack, data, cfg))
        return built[0]()

    # Speed is timed once per family of stacks that differ only in their row count (2 or more: a round's
    # members leave at checkpoints, and each new row count needs only the exactness check, 2 steps).
    return choose_route(step, key, speed_key=route_family(key))


def route_family(key: RouteKey) -> RouteKey:
    """``key`` without its row count: rows 1 stays apart, every count of 2 or more is one family, and each
    stacked tensor's shape loses its leading dimension (the rows: ``torch.stack`` and ``stack_module_state``
    put them first), leaving a member's own shape."""
    return replace(key, rows=min(key.rows, 2),
                   params=tuple((n, shape[1:], dtype, grad) for n, shape, dtype, grad in key.params),
                   buffers=tuple((n, shape[1:], dtype) for n, shape, dtype in key.buffers))


def _synthetic_step(stack: _Stack, data: TrainData, cfg: TrainConfig) -> Callable[[], list[torch.Tensor]]:
    """One training step of the stack's engine on synthetic operands of its shapes (see ``_onednn_route``),
    on copies: the losses and gradients it returns, nothing of the stack's changed."""
    device = data.x_train.device
    gen = torch.Generator(device=device).manual_seed(0)
    idx = torch.arange(cfg.batch_size, device=device) % len(data.x_train)
    if not stack.shared:
        idx = idx.expand(len(stack.members), -1)  # (rows, batch): each row's own gather, as in training
    xb, yb = data.x_train[idx], data.y_train[idx]
    if xb.is_floating_point():
        xb = torch.randn(xb.shape, generator=gen, dtype=xb.dtype, device=device)
    synthetic = {name: _synthetic(p, gen) for name, p in stack.params.items()}

    def step() -> list[torch.Tensor]:
        params = {name: p.clone().requires_grad_(stack.params[name].requires_grad) for name, p in synthetic.items()}
        buffers = {name: b.clone() for name, b in stack.buffers.items()}
        losses = stack.engine.loss(params, buffers, xb, yb, shared=stack.shared)
        losses.sum().backward()
        return [losses.detach(), *(p.grad for p in params.values() if p.grad is not None)]

    return step


_LAYOUTS: dict[RouteKey, bool] = {}  # per stack key (layout field False): channels-last timed faster


def _conv_layout(stack: _Stack, data: TrainData, cfg: TrainConfig, repeats: int = 3, min_gain: float = 0.05
                 ) -> bool:
    """Whether the stacked engine keeps this stack's image activations channels-last (NHWC).

    Only for models with convolutions. On CUDA: yes (as ``train_run`` does there). On the CPU it is measured
    once per stack key (engine, shapes, batch, threads): the best of ``repeats`` synthetic training steps
    each way, channels-last taken when at least ``min_gain`` faster. Both layouts compute the same sums;
    only the kernels and their rounding order differ."""
    engine = stack.engine
    if not isinstance(engine, _StackedSequential) or not any(isinstance(m, nn.Conv2d) for _, m, _ in engine.plan):
        return False
    if data.x_train.device.type != "cpu":
        return True
    engine.channels_last = False
    key = _route_key(stack, data, cfg)
    if key not in _LAYOUTS:
        step = _synthetic_step(stack, data, cfg)
        best = {False: math.inf, True: math.inf}
        for layout in (False, True, False, True):  # the first of each pays one-time costs
            engine.channels_last = layout
            step()
        for _ in range(repeats):
            for layout in (False, True):
                engine.channels_last = layout
                start = time.perf_counter()
                step()
                best[layout] = min(best[layout], time.perf_counter() - start)
        _LAYOUTS[key] = best[True] < (1.0 - min_gain) * best[False]
        log.debug("conv layout for %s: %s (%.2f ms NCHW, %.2f ms NHWC)", key,
                  "channels-last" if _LAYOUTS[key] else "contiguous", best[False] * 1e3, best[True] * 1e3)
    engine.channels_last = _LAYOUTS[key]
    return engine.channels_last


def _synthetic(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random values of ``p``'s shape and dtype (rows first): ``N(0, 1/fan_in)`` where a row is a matrix or
    more (fan_in: the elements per output), ``N(0, 1)`` for vectors; ``p`` itself (detached) when not float."""
    if not p.is_floating_point():
        return p.detach().clone()
    values = torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
    if p.dim() >= 3:
        values /= math.sqrt(max(1, math.prod(p.shape[2:])))
    return values


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
    chunk = torch.stack(stack.pending, dim=1).double().cpu().numpy()  # (rows, steps since the last checkpoint)
    stack.pending = []
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
        if callback is not None and callback(step, curve_snapshot(curve)):
            curve.stopped, curve.reason = True, f"stopped by callback at step {step}"
            stopped.append(r)
    elapsed = time.perf_counter() - started
    for r in range(len(stack.members)):
        curves[stack.members[r]].seconds = elapsed
    _leave(stack, stopped, models)
