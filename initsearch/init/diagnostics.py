"""Signal propagation at init, measured on one batch: a zero-cost look at an initialization before training.

* ``signal_report``: per linear/conv layer (forward order) the std and mean of its output before the
  activation, the norm of the loss gradient with respect to its weight, and its weight std.
* ``gradient_quotient``: MetaInit's gradient quotient (Dauphin & Schoenholz, NeurIPS 2019).
* ``is_degenerate``: a one-line reason when a report shows a vanishing, exploding or non-finite signal.

Both measurements run the model in its current mode and leave it as it was: parameters, ``.grad`` fields,
``requires_grad`` flags, buffers (BatchNorm running statistics are saved and restored) and the global RNG
state (dropout draws happen inside ``torch.random.fork_rng``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from initsearch.init.layers import layer_family

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LayerSignal:
    """One linear/conv layer at init: its output's std and mean (pre-activation, first call), the L2 norm of
    d loss / d weight, and the std of its weight."""

    name: str
    output_std: float
    output_mean: float
    grad_norm: float
    weight_std: float


@dataclass
class SignalReport:
    """The per-layer signals in forward order and the loss on the batch."""

    layers: list[LayerSignal]
    loss: float

    def summary(self) -> dict[str, float]:
        """Scalars for logging: min/max/last output std, min/max grad norm, ``grad_ratio`` = max/min grad norm
        over layers with a positive finite gradient (how unevenly the layers would learn), and the loss.
        Values without data are NaN."""
        stds = [s.output_std for s in self.layers]
        grads = [s.grad_norm for s in self.layers]
        positive = [g for g in grads if math.isfinite(g) and g > 0]
        return {
            "output_std_min": min(stds, default=math.nan),
            "output_std_max": max(stds, default=math.nan),
            "output_std_last": stds[-1] if stds else math.nan,
            "grad_norm_min": min(grads, default=math.nan),
            "grad_norm_max": max(grads, default=math.nan),
            "grad_ratio": max(positive) / min(positive) if positive else math.nan,
            "loss": self.loss,
        }

    def to_rows(self) -> list[dict[str, Any]]:
        """One plain dict per layer (JSON-ready, in forward order)."""
        return [asdict(s) for s in self.layers]


# ---- helpers ----------------------------------------------------------------------------------------------
def _call(model: nn.Module, x: Any) -> Any:
    """Run the model: a tuple is positional arguments, anything else the single argument."""
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def _cuda_devices(model: nn.Module, x: Any) -> list[int]:
    """The CUDA devices whose RNG a forward pass may draw from (for ``fork_rng``)."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += list(x) if isinstance(x, tuple) else [x]
    return sorted({t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda})


@contextmanager
def _untouched(model: nn.Module, x: Any, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run a measurement that must leave no trace: ``params`` require grad inside (frozen ones too, so they
    can be measured), buffers and the RNG state are restored on exit. ``.grad`` fields are never written
    because gradients are taken with ``torch.autograd.grad``."""
    flags = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model, x)), torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear/conv layers (subclasses too), by qualified name, in registration order."""
    return [(name, m) for name, m in model.named_modules() if layer_family(m) in ("linear", "conv")]


def _std(t: torch.Tensor) -> torch.Tensor:
    """Std of all entries as a 0-d float tensor (NaN for fewer than two entries)."""
    flat = t.detach().float().reshape(-1)
    return flat.std() if flat.numel() > 1 else torch.full((), math.nan, device=t.device)


# ---- signal_report ----------------------------------------------------------------------------------------
def signal_report(model: nn.Module, x: Any, y: torch.Tensor, loss_fn: LossFn = F.cross_entropy) -> SignalReport:
    """One forward and one backward pass on ``(x, y)`` in the model's current mode.

    ``x``: a tensor or a tuple of positional inputs. For each linear/conv layer in forward order (first
    call; layers never called are not listed): std and mean of its output, the L2 norm of
    ``d loss_fn(model(x), y) / d weight`` (all calls of a shared layer contribute; 0 where the loss does not
    depend on the weight) and the std of the weight. Statistics stay on the device until one transfer at the
    end. The model is left as it was (see the module docstring).
    """
    layers = _weighted_layers(model)
    weights = [m.weight for _, m in layers]
    order: list[int] = []
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if i not in stats:
                order.append(i)
                stats[i] = (_std(output), output.detach().float().mean())

        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, (_, m) in enumerate(layers)]
    try:
        with _untouched(model, x, weights):
            loss = loss_fn(_call(model, x), y)
            used = [weights[i] for i in order]
            grads = torch.autograd.grad(loss, used, allow_unused=True) if used else ()
    finally:
        for h in handles:
            h.remove()
    rows = []
    for i, g in zip(order, grads):
        w = weights[i]
        norm = g.detach().float().norm() if g is not None else torch.zeros((), device=w.device)
        rows.append(torch.stack([stats[i][0], stats[i][1], norm, _std(w).to(norm.device)]))
    values = torch.stack(rows).tolist() if rows else []
    signals = [LayerSignal(layers[i][0], *v) for i, v in zip(order, values)]
    return SignalReport(signals, float(loss.detach()))


# ---- gradient quotient ------------------------------------------------------------------------------------
def gradient_quotient(model: nn.Module, x: Any, y: torch.Tensor, loss_fn: LossFn = F.cross_entropy,
                      eps: float = 1e-5) -> float:
    """MetaInit's gradient quotient (Dauphin & Schoenholz 2019) of the model at its current weights.

    With ``g`` the gradient of the loss on ``(x, y)`` and ``H`` its Hessian, both over the parameters with at
    least 2 dimensions (weights; biases and norm scales are left out, as in the paper)::

        GQ = (1/N) * sum_i | (g_i - (H g)_i) / (g_i + eps * s_i) - 1 |,   s_i = +1 if g_i >= 0 else -1

    where N counts the entries of those tensors. ``g - H g`` is, to first order, the gradient after one
    gradient-descent step of size 1 (``g(θ - g) ≈ g - H g``), so GQ is the mean relative change of the
    gradient over one step: 0 when the loss is locally linear along ``g``, large where curvature dominates
    (a badly conditioned init). ``eps`` keeps the quotient finite where ``g`` is (near) zero; ``s`` is the
    paper's sign that is +1 at exactly 0. ``H g`` is a Hessian-vector product by double backward
    (``create_graph=True``). Tensors the loss does not depend on are left out of the mean.

    Raises ``ValueError`` if the model has no parameter with >= 2 dimensions. The model is left as it was.
    """
    params = [p for p in model.parameters() if p.dim() >= 2]
    if not params:
        raise ValueError(f"gradient_quotient: {type(model).__name__} has no parameter with >= 2 dimensions")
    with _untouched(model, x, params):
        loss = loss_fn(_call(model, x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        if not pairs:
            return math.nan
        used, g = [p for p, _ in pairs], [g for _, g in pairs]
        hvp = torch.autograd.grad(g, used, grad_outputs=[gi.detach() for gi in g], allow_unused=True)
        total = torch.zeros((), dtype=torch.float64, device=g[0].device)
        count = 0
        for gi, hi in zip(g, hvp):
            gi = gi.detach().double()
            hi = torch.zeros_like(gi) if hi is None else hi.detach().double()
            sign = torch.where(gi >= 0, 1.0, -1.0)
            total += ((gi - hi) / (gi + eps * sign) - 1).abs().sum()
            count += gi.numel()
    return float(total) / count


# ---- the pre-screen ---------------------------------------------------------------------------------------
def _bad(value: float, low: float, high: float) -> str | None:
    """``non-finite``, ``vanishing`` or ``exploding`` for a magnitude outside [low, high], else ``None``."""
    if not math.isfinite(value):
        return "non-finite"
    if value < low:
        return "vanishing"
    if value > high:
        return "exploding"
    return None


def is_degenerate(report: SignalReport, *, low: float = 1e-3, high: float = 1e3) -> str | None:
    """A one-line reason when the signal at init is broken, else ``None`` (a zero-cost pre-screen).

    Broken: a non-finite loss; some layer's output std or weight-gradient norm that is not finite, below
    ``low`` (vanishing) or above ``high`` (exploding). The first problem in forward order is named, output
    stds before gradients.

    Deliberate zero layers are not broken: a layer whose weight is exactly zero (weight std 0, e.g. a
    zero-initialized last layer as in Fixup/ZerO) is not reported for its own vanishing output, and the
    vanishing gradients of the layers before it are expected (a zero weight passes no gradient back).
    """
    if not math.isfinite(report.loss):
        return f"loss is {report.loss} at init"
    last_zero = max((i for i, s in enumerate(report.layers) if s.weight_std == 0), default=-1)
    for s in report.layers:
        kind = _bad(s.output_std, low, high)
        if kind and not (kind == "vanishing" and s.weight_std == 0):
            return f"{kind} signal: layer {s.name!r} output std {s.output_std:.3g} (allowed [{low:g}, {high:g}])"
    for i, s in enumerate(report.layers):
        kind = _bad(s.grad_norm, low, high)
        if kind and not (kind == "vanishing" and i < last_zero):
            return f"{kind} gradient: layer {s.name!r} weight grad norm {s.grad_norm:.3g} (allowed [{low:g}, {high:g}])"
    return None
