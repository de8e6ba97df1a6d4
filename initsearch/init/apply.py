"""Apply an init policy to a model: validate everything first, then write, then (optionally) LSUV.

``apply_policy`` never leaves a model half-initialized: the policy is checked against the discovered layers,
every new weight is computed into a copy, and only when all of them succeeded are they written; if LSUV or a
write fails, the touched parameters are restored from a snapshot before the error propagates.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from initsearch.errors import PolicyError
from initsearch.init.layers import LayerDiscovery, LayerInfo, discover_layers
from initsearch.init.lsuv import LsuvReport, lsuv
from initsearch.init.policy import InitPolicy, InitSpec, load_policy, plan
from initsearch.init.schemes import SCHEME_SPECS, init_bias, init_weight
from initsearch.init.seeding import seeded


@dataclass
class LayerApplyReport:
    """What happened to one layer: the rule that matched (``None`` = the policy's default), the scheme and
    its resolved gain, and the weight std before and after (after LSUV, when it ran)."""

    name: str
    type: str
    activation: str
    rule: int | None
    scheme: str
    gain: float | None
    scale: float
    std_before: float
    std_after: float
    lsuv_iterations: int | None = None
    lsuv_skipped: str | None = None


@dataclass
class ApplyReport:
    """The result of ``apply_policy``: one entry per discovered layer, in forward order."""

    layers: list[LayerApplyReport]
    discovery_method: str
    seed: int | None
    lsuv: LsuvReport | None = None
    notes: list[str] = field(default_factory=list)

    def to_rows(self) -> list[dict[str, Any]]:
        return [asdict(layer) for layer in self.layers]

    def __str__(self) -> str:
        head = f"{'layer':<28} {'rule':>5} {'scheme':<18} {'gain':>6} {'scale':>6} {'std before':>11} {'std after':>10} lsuv"
        lines = [head]
        for r in self.layers:
            rule = "dflt" if r.rule is None else str(r.rule)
            gain = "" if r.gain is None else f"{r.gain:.3f}"
            lsuv_note = "" if r.lsuv_iterations is None else f"{r.lsuv_iterations} it"
            if r.lsuv_skipped:
                lsuv_note = f"skipped ({r.lsuv_skipped})"
            lines.append(
                f"{r.name:<28} {rule:>5} {r.scheme:<18} {gain:>6} {r.scale:>6.3g} {r.std_before:>11.4g} {r.std_after:>10.4g} {lsuv_note}"
            )
        return "\n".join(lines + self.notes)


def _as_inputs(example_batch: Any) -> tuple | None:
    if example_batch is None:
        return None
    return tuple(example_batch) if isinstance(example_batch, (tuple, list)) else (example_batch,)


def _weight_std(t: torch.Tensor) -> float:
    return float(t.detach().float().std()) if t.numel() > 1 else 0.0


def _groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1) or 1)


def _new_weight(module: nn.Module, layer: LayerInfo, spec: InitSpec, where: str) -> tuple[torch.Tensor, float | None]:
    """Compute the layer's new weight into a copy; raise PolicyError naming ``where`` on failure."""
    weight = module.weight.detach().clone()
    scheme = SCHEME_SPECS[spec.scheme]
    gain = spec.resolved_gain(layer.activation, layer.activation_param) if "gain" in scheme.params else None
    try:
        init_weight(
            weight,
            spec.scheme,
            gain=1.0 if gain is None else gain,
            mode=spec.mode,
            std=spec.std,
            a=spec.a,
            value=spec.value,
            groups=_groups(module),
        )
    except ValueError as exc:
        raise PolicyError(f"{where}.scheme: {spec.scheme!r} cannot initialize layer {layer.name!r}: {exc}") from None
    if spec.scale != 1.0:
        weight.mul_(spec.scale)
    if not torch.isfinite(weight).all():
        raise PolicyError(f"{where}.scale: layer {layer.name!r} would get non-finite weights (scale {spec.scale})")
    return weight, gain


def _new_bias(module: nn.Module, layer: LayerInfo, spec: InitSpec) -> torch.Tensor | None:
    """The layer's new bias, or None to leave it. ``keep`` leaves the bias too, unless ``bias`` asks for
    something other than the default zeros."""
    bias = getattr(module, "bias", None)
    if bias is None or spec.bias == "keep" or (spec.scheme == "keep" and spec.bias == "zeros"):
        return None
    new = bias.detach().clone()
    init_bias(new, spec.bias, fan_in=layer.fan_in or 1)
    return new


def apply_policy(
    model: nn.Module,
    policy: InitPolicy | Mapping[str, Any] | str | os.PathLike,
    example_batch: Any = None,
    seed: int | None = None,
    strict: bool = True,
    *,
    layers: LayerDiscovery | None = None,
) -> ApplyReport:
    """Initialize ``model`` in place as ``policy`` says and return a per-layer report.

    ``policy``: a path to a policy JSON file, a dict in that format, or an ``InitPolicy``.
    ``example_batch``: the model's input (a tensor, or a tuple of positional inputs); needed for LSUV and for
    models torch.fx cannot trace. ``seed``: the same seed gives bit-identical weights (the caller's RNG state
    is left untouched). ``strict``: a rule with an exact ``layer`` name that matches no layer is an error.
    ``layers``: the ``discover_layers`` result of a model of this same architecture, to skip tracing the model
    again (a study initializes hundreds of fresh copies of one proxy); each layer must be in ``model`` with
    the same type and weight shape.

    Raises ``PolicyError`` (a ``ValueError``) naming the field and value, with the model left untouched.
    """
    policy = load_policy(policy)
    inputs = _as_inputs(example_batch)
    use_lsuv = policy.lsuv is not None and policy.lsuv.enabled
    if use_lsuv and inputs is None:
        raise PolicyError("lsuv.enabled: LSUV needs an example batch; pass example_batch=... (the model's input)")
    discovery = _discover(model, inputs) if layers is None else _check_layers(model, layers)
    decisions = plan(policy, discovery.layers, strict=strict)
    modules = dict(model.named_modules())

    # 1. compute everything into copies (any error leaves the model untouched)
    reports: list[LayerApplyReport] = []
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []
    lsuv_layers: list[str] = []
    with seeded(seed, model):
        for layer, rule, spec in decisions:
            module = modules[layer.name]
            where = "default" if rule is None else f"rules[{rule}]"
            before = _weight_std(module.weight)
            gain = None
            if spec.scheme != "keep" or spec.scale != 1.0:
                new_w, gain = _new_weight(module, layer, spec, where)
                writes.append((module.weight, new_w))
            new_b = _new_bias(module, layer, spec)
            if new_b is not None:
                writes.append((module.bias, new_b))
            if spec.lsuv and layer.family in ("linear", "conv"):
                lsuv_layers.append(layer.name)
            reports.append(
                LayerApplyReport(layer.name, layer.type, layer.activation, rule, spec.scheme, gain, spec.scale, before, math.nan)
            )

        # 2. write, then LSUV; restore the snapshot if anything fails
        snapshot = [(param, param.detach().clone()) for param, _ in writes]
        try:
            with torch.no_grad():
                for param, new in writes:
                    param.copy_(new)
            lsuv_report = None
            if use_lsuv:
                s = policy.lsuv
                lsuv_report = lsuv(model, inputs, target_std=s.target_std, tol=s.tol, max_iter=s.max_iter, layers=lsuv_layers)
        except BaseException:
            with torch.no_grad():
                for param, old in snapshot:
                    param.copy_(old)
            raise

    by_name = {r.name: r for r in lsuv_report.layers} if lsuv_report else {}
    for r in reports:
        r.std_after = _weight_std(modules[r.name].weight)
        if r.name in by_name:
            r.lsuv_iterations = by_name[r.name].iterations
            r.lsuv_skipped = by_name[r.name].skipped
    notes = [f"LSUV left {r.name} alone: {r.lsuv_skipped}" for r in reports if r.lsuv_skipped]
    return ApplyReport(reports, discovery.method, seed, lsuv_report, notes)


def _check_layers(model: nn.Module, layers: LayerDiscovery) -> LayerDiscovery:
    """``layers`` given by the caller, checked against ``model``: same names, module types and weight shapes."""
    modules = dict(model.named_modules())
    for layer in layers:
        module = modules.get(layer.name)
        weight = getattr(module, "weight", None)
        if module is None or type(module).__name__ != layer.type or weight is None \
                or tuple(weight.shape) != tuple(layer.weight_shape):
            found = "no such module" if module is None else f"{type(module).__name__} with weight " \
                f"{None if weight is None else tuple(weight.shape)}"
            raise PolicyError(f"layers: layer {layer.name!r} ({layer.type}, weight {tuple(layer.weight_shape)}) does not "
                              f"match the model ({found}); pass the discovery of a model of the same architecture")
    return layers


def _discover(model: nn.Module, inputs: tuple | None) -> LayerDiscovery:
    try:
        return discover_layers(model, inputs)
    except PolicyError:
        raise
    except Exception as exc:  # a model we cannot trace and have no input for, or a model that fails on the input
        raise PolicyError(f"example_batch: could not discover the model's layers ({type(exc).__name__}: {exc})") from exc

