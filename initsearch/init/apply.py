"""Apply an init policy to a model: validate everything first, then write, then (optionally) LSUV.

``apply_policy`` never leaves a model half-initialized: the policy is checked against the discovered layers,
every new weight is computed into a copy, and only when all of them succeeded are they written; if LSUV or a
write fails, the touched parameters are restored from a snapshot before the error propagates. Layers of the
``checkpoint`` scheme (policy version 2) get their tensors from the named files, which are hash-checked,
read and matched by key and shape in that first step too.
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
from initsearch.init.checkpoints import read_state_dict
from initsearch.init.layers import LayerDiscovery, LayerInfo, discover_layers
from initsearch.init.lsuv import LsuvReport, lsuv
from initsearch.init.policy import CHECKPOINT, InitPolicy, InitSpec, load_policy, plan
from initsearch.init.schemes import SCHEME_SPECS, init_bias, init_weight
from initsearch.init.seeding import seeded


@dataclass
class LayerApplyReport:
    """What happened to one layer: the rule that matched (``None`` = the policy's default), the scheme and
    its resolved gain, and the weight std before and after (after LSUV, when it ran). ``source``: for the
    checkpoint scheme, ``"<checkpoint name>:<key>"`` the tensors were copied from."""

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
    source: str | None = None


@dataclass
class ApplyReport:
    """The result of ``apply_policy``: one entry per discovered layer, in forward order. ``checkpoint_files``:
    per checkpoint name used, the file its tensors were read from."""

    layers: list[LayerApplyReport]
    discovery_method: str
    seed: int | None
    lsuv: LsuvReport | None = None
    notes: list[str] = field(default_factory=list)
    checkpoint_files: dict[str, str] = field(default_factory=dict)

    def from_checkpoint(self) -> dict[str, list[str]]:
        """Per checkpoint file, the layers whose tensors came from it (in forward order)."""
        out: dict[str, list[str]] = {}
        for r in self.layers:
            if r.source is not None:
                out.setdefault(self.checkpoint_files[r.source.split(":", 1)[0]], []).append(r.name)
        return out

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
        sources = [f"from {file}: {', '.join(names)}" for file, names in self.from_checkpoint().items()]
        return "\n".join(lines + sources + self.notes)


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


def _checkpoint_tensors(module: nn.Module, layer: LayerInfo, spec: InitSpec, where: str, name: str,
                        state: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter or buffer, new value) pairs for a layer of the checkpoint scheme, every key and shape checked.

    The weight is copied (times ``scale``); the bias too when ``bias`` is ``checkpoint`` (other bias options
    are left to ``_new_bias``); a norm layer also gets its running statistics. Raises ``PolicyError``
    naming the rule, the layer and the key.
    """
    key = spec.key or layer.name
    wanted = [("weight", True)]
    if spec.bias == CHECKPOINT and getattr(module, "bias", None) is not None:
        wanted.append(("bias", True))
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(module, buffer, None) is not None:
            wanted.append((buffer, buffer != "num_batches_tracked"))
    writes = []
    for attr, required in wanted:
        target = getattr(module, attr)
        entry = f"{key}.{attr}"
        if entry not in state:
            if not required:
                continue
            close = [k for k in state if k.endswith(f".{attr}")][:6]
            hint = f" (it has e.g. {', '.join(close)})" if close else ""
            field_ = "key" if spec.key is not None else "checkpoint"
            raise PolicyError(f"{where}.{field_}: layer {layer.name!r} needs {entry!r}, which {name} does not have{hint}")
        tensor = state[entry]
        if tuple(tensor.shape) != tuple(target.shape):
            raise PolicyError(f"{where}: layer {layer.name!r} {attr} {tuple(target.shape)} vs {entry!r} "
                              f"{tuple(tensor.shape)} in {name}")
        value = tensor.detach().to(device=target.device, dtype=target.dtype).clone()
        if attr == "weight" and spec.scale != 1.0:
            value.mul_(spec.scale)
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise PolicyError(f"{where}: {entry!r} in {name} holds non-finite values")
        writes.append((target, value))
    return writes


def _in_file(policy: InitPolicy, message: str) -> str:
    """``message`` about a field of the policy, prefixed with the file it was read from (if it was)."""
    return message if policy.source is None else f"{policy.source}: {message}"


def _read_checkpoints(policy: InitPolicy, decisions) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """The state dicts of the checkpoints the planned layers use, and each one's file path."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    files: dict[str, str] = {}
    for _, _, spec in decisions:
        if spec.scheme == CHECKPOINT and spec.checkpoint not in states:
            path = policy.checkpoint_path(spec.checkpoint)
            states[spec.checkpoint] = read_state_dict(path, policy.checkpoints[spec.checkpoint].sha256,
                                                      f"checkpoints.{spec.checkpoint}")
            files[spec.checkpoint] = str(path)
    return states, files


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
        raise PolicyError(_in_file(policy, "lsuv.enabled: LSUV needs an example batch; pass example_batch=... "
                                           "(the model's input)"))
    discovery = _discover(model, inputs) if layers is None else _check_layers(model, layers)
    try:
        decisions = plan(policy, discovery.layers, strict=strict)
    except PolicyError as err:
        raise PolicyError(_in_file(policy, str(err))) from None
    modules = dict(model.named_modules())
    states, files = _read_checkpoints(policy, decisions)

    # 1. compute everything into copies (any error leaves the model untouched)
    reports: list[LayerApplyReport] = []
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []
    lsuv_layers: list[str] = []
    with seeded(seed, model):
        for layer, rule, spec in decisions:
            module = modules[layer.name]
            where = "default" if rule is None else f"rules[{rule}]"
            before = _weight_std(module.weight)
            gain, source = None, None
            if spec.scheme == CHECKPOINT:
                writes.extend(_checkpoint_tensors(module, layer, spec, where, spec.checkpoint, states[spec.checkpoint]))
                source = f"{spec.checkpoint}:{spec.key or layer.name}"
            elif spec.scheme != "keep" or spec.scale != 1.0:
                new_w, gain = _new_weight(module, layer, spec, _in_file(policy, where))
                writes.append((module.weight, new_w))
            new_b = None if spec.bias == CHECKPOINT else _new_bias(module, layer, spec)
            if new_b is not None:
                writes.append((module.bias, new_b))
            if spec.lsuv and layer.family in ("linear", "conv"):
                lsuv_layers.append(layer.name)
            reports.append(
                LayerApplyReport(layer.name, layer.type, layer.activation, rule, spec.scheme, gain, spec.scale, before,
                                 math.nan, source=source)
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
    return ApplyReport(reports, discovery.method, seed, lsuv_report, notes, files)


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

