"""LSUV: layer-sequential unit-variance rescaling (Mishkin & Matas, "All you need is a good init", ICLR 2016).

After the weights have their initial values, the linear/conv layers are visited in **forward order** (the
order of their first call, not of registration). For each one the model is run on one batch, the standard
deviation of that layer's whole output (before any activation) is taken, and the weight is multiplied by
``target_std / std``; this repeats until ``|std - target_std| < tol`` or ``max_iter`` rescales. Biases are not
scaled (as in the paper). Because every earlier layer has already been fixed, each layer sees a normalized
input when its turn comes.

Decisions where the paper is silent:

* **eval mode for every pass.** The model is put in eval mode for LSUV's passes and each module's training
  flag is restored afterwards. Dropout is then off (a deterministic measurement), and BatchNorm neither
  renormalizes nor updates its running statistics, so LSUV changes no buffer. The price: BatchNorm uses its
  running statistics, which at init are the defaults (mean 0, var 1, i.e. the identity up to ``eps``); since
  LSUV makes the output of the layer before it unit-variance, that is close to what train mode would see.
* **early stop.** A forward pass stops (by a private exception raised from a forward hook) as soon as the
  layer being measured has produced its output, so later layers cost nothing. Such partial passes count in
  ``LsuvReport.forward_passes``, as does the one full pass that finds the forward order (it also stops early
  once every requested layer has been seen).
* **shared layers.** A module called several times is measured at its first call.
* **dead layers.** A layer whose output std is below ``eps`` or not finite is left alone with ``skipped``
  set (no division by zero); so is one whose weight is all zeros, and one whose output std does not move
  when its weight is rescaled (its input is constant, e.g. after a dead ReLU, so only the bias shows).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from initsearch.init.layers import layer_family

# A rescale that moves the output std by less than this relative amount has no effect worth repeating.
_NO_EFFECT_RTOL = 1e-6


@dataclass
class LsuvLayerResult:
    """What LSUV did to one layer.

    ``iterations``: how many times the weight was rescaled (0 if it was already within ``tol`` or skipped).
    ``std_before``: the output std before the first rescale; ``std_after``: measured after the last rescale.
    ``converged``: ``|std_after - target_std| < tol``. ``skipped``: why the layer was left alone, else ``None``.
    """

    name: str
    iterations: int
    std_before: float
    std_after: float
    converged: bool
    skipped: str | None = None


@dataclass
class LsuvReport:
    """Per-layer results in forward order (requested layers never called come last) and the number of
    forward passes run, partial ones included."""

    layers: list[LsuvLayerResult]
    forward_passes: int


class _Captured(Exception):
    """Raised from a forward hook to stop the pass once the wanted output is in hand."""


def _call(model: nn.Module, batch: Any) -> Any:
    """Run the model: a tuple is positional arguments, anything else the single argument."""
    if isinstance(batch, tuple):
        return model(*batch)
    return model(batch)


def _candidate_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    """The linear/conv layers to rescale, by qualified name (all of them when ``layers`` is ``None``).

    Raises ``ValueError`` naming any requested name that is not a linear/conv layer of ``model``.
    """
    named = {name: m for name, m in model.named_modules() if layer_family(m) in ("linear", "conv")}
    if layers is None:
        return named
    unknown = [name for name in layers if name not in named]
    if unknown:
        raise ValueError(f"lsuv layers: not linear/conv layers of {type(model).__name__}: {unknown}")
    return {name: named[name] for name in dict.fromkeys(layers)}


def _forward_order(model: nn.Module, batch: Any, candidates: dict[str, nn.Module]) -> list[str]:
    """The names in ``candidates`` in the order of their first forward call, from one (no-grad) pass.

    The pass stops as soon as every candidate has been called at least once.
    """
    order: list[str] = []
    seen: set[str] = set()

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name not in seen:
                seen.add(name)
                order.append(name)
                if len(seen) == len(candidates):
                    raise _Captured

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in candidates.items()]
    try:
        _call(model, batch)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return order


def _output_std(model: nn.Module, batch: Any, module: nn.Module, name: str) -> float:
    """The std of ``module``'s output at its first call in a forward pass that stops right after it.

    If the model swallows the private exception, the pass runs to the end and the captured value is used.
    """
    captured: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        if not captured:
            captured.append(output.detach())
            raise _Captured

    handle = module.register_forward_hook(hook)
    try:
        _call(model, batch)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"lsuv: layer {name!r} was not called in this forward pass (it was in the first one)")
    out = captured[0]
    if out.numel() < 2:
        return math.nan
    return float(out.float().std())


def _dead_reason(std: float, eps: float) -> str | None:
    """Why an output std cannot be rescaled to the target, or ``None`` if it can."""
    if not math.isfinite(std):
        return f"output std {std} (non-finite output)"
    if std < eps:
        return f"output std {std:.3g} < eps {eps:g} (dead layer)"
    return None


def _lsuv_layer(model: nn.Module, batch: Any, name: str, module: nn.Module, *, target_std: float, tol: float,
                max_iter: int, eps: float) -> tuple[LsuvLayerResult, int]:
    """Rescale one layer's weight until its output std is within ``tol`` of ``target_std``.

    Each step multiplies the weight by ``target_std / std`` (the paper's ``W / sqrt(Var)``, generalized to any
    target) and re-measures. Returns the result and the number of forward passes run.
    """
    weight = module.weight
    std = _output_std(model, batch, module, name)
    passes, iterations, before = 1, 0, std
    if not bool(torch.any(weight != 0)):
        return LsuvLayerResult(name, 0, before, before, False, "weight is all zeros (dead layer)"), passes
    reason = _dead_reason(std, eps)
    while reason is None and abs(std - target_std) >= tol and iterations < max_iter:
        with torch.no_grad():
            weight.mul_(target_std / std)
        iterations += 1
        previous, std = std, _output_std(model, batch, module, name)
        passes += 1
        reason = _dead_reason(std, eps)
        if reason is None and abs(std - previous) <= _NO_EFFECT_RTOL * previous:
            reason = "output std does not change with the weight scale (constant input, only the bias shows)"
    converged = reason is None and abs(std - target_std) < tol
    return LsuvLayerResult(name, iterations, before, std, converged, reason), passes


def lsuv(model: nn.Module, batch: Any, *, target_std: float = 1.0, tol: float = 0.1, max_iter: int = 10,
         layers: Sequence[str] | None = None, eps: float = 1e-8) -> LsuvReport:
    """Rescale each linear/conv weight of ``model``, in forward order, so its output std is ``target_std``.

    ``batch``: the model's input (a tensor, or a tuple of positional inputs), on the model's device.
    ``layers``: qualified names of the layers to rescale (others are left untouched but still run);
    ``None`` means every ``nn.Linear``/``nn.Conv1d/2d/3d`` (subclasses included). A requested layer that the
    forward pass never calls is reported with ``skipped`` set and NaN stds.
    The weights change in place (under ``torch.no_grad``); biases, buffers and training flags do not
    (see the module docstring for the eval-mode decision).

    Raises ``ValueError`` for bad arguments or names that are not linear/conv layers of the model;
    errors of the model's own forward pass propagate.
    """
    if not (target_std > 0 and math.isfinite(target_std)):
        raise ValueError(f"lsuv target_std: must be a positive number, got {target_std!r}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"lsuv tol: must be a positive number, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"lsuv max_iter: must be an integer >= 1, got {max_iter!r}")
    candidates = _candidate_layers(model, layers)
    flags = [(m, m.training) for m in model.modules()]
    results: list[LsuvLayerResult] = []
    order: list[str] = []
    passes = 0
    try:
        model.eval()
        with torch.no_grad():
            if candidates:
                order = _forward_order(model, batch, candidates)
                passes += 1
            for name in order:
                result, n = _lsuv_layer(model, batch, name, candidates[name], target_std=target_std, tol=tol,
                                        max_iter=max_iter, eps=eps)
                results.append(result)
                passes += n
    finally:
        for module, flag in flags:
            module.training = flag
    for name in candidates:
        if name not in order:
            results.append(LsuvLayerResult(name, 0, math.nan, math.nan, False, "not called in the forward pass"))
    return LsuvReport(results, passes)
