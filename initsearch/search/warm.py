"""Warm starts: earlier winners as this study's first searched trials.

``warm_start=[FILE_OR_STUDY, ...]`` names policy files or studies in this study's storage (their best trial's
policy). Each is resolved on this study's proxy (its rules, role selectors included, decide what each layer
gets), turned into this space's trial parameters (``SearchSpace.params_for``), checked by sampling those
parameters again and comparing layer by layer, and enqueued once. A source that does not exist is a
``ConfigError`` before the study is touched; a policy this space cannot express is skipped with one line.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from initsearch.errors import ConfigError, InitSearchError, first_line
from initsearch.init.layers import LayerInfo
from initsearch.init.policy import CHECKPOINT, InitPolicy, InitSpec, load_policy, plan, unmatched_names
from initsearch.search.outcome import score_direction, trial_score
from initsearch.search.space import Pretrained, SearchSpace

log = logging.getLogger("initsearch")


@dataclass(frozen=True)
class WarmStart:
    """One source that fits: where it came from and the trial parameters that reproduce it here."""

    source: str
    params: dict[str, Any]


def source_policy(item: str, storage: optuna.storages.BaseStorage, index: int) -> tuple[str, InitPolicy | None]:
    """(a label for messages, the policy) of one ``warm_start`` entry: a policy file, else a study name in
    ``storage`` (its best complete trial's policy; ``None`` when it has none). ``ConfigError`` if neither."""
    key = f"warm_start[{index}]"
    if not isinstance(item, str) or not item:
        raise ConfigError(f"{key}: must be a policy file or a study name, got {item!r}")
    if Path(item).is_file():
        try:
            return item, load_policy(item)
        except InitSearchError as exc:
            raise ConfigError(f"{key}: {first_line(exc)}") from None
    names = optuna.get_all_study_names(storage)
    if item not in names:
        raise ConfigError(f"{key}: {item!r} is neither a policy file nor a study in this storage "
                          f"(studies: {', '.join(sorted(names)) or 'none'})")
    study = optuna.load_study(study_name=item, storage=storage)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if trial_score(t) is not None and math.isfinite(trial_score(t)) and t.user_attrs.get("policy")]
    if not complete:
        return f"study {item}", None
    maximize = score_direction(study) == "maximize"  # a multi-objective study: its best score
    best = (max if maximize else min)(complete, key=trial_score)
    return f"study {item} trial {best.number}", InitPolicy.from_dict(best.user_attrs["policy"])


def _effect(spec: InitSpec, layer: LayerInfo, policy: InitPolicy) -> tuple:
    """What an init does to a layer, with equivalent spellings made equal (an explicit gain equal to the
    scheme's default, scales that differ by the 6 decimals ``sample`` keeps, the checkpoint by its hash)."""
    gain = None if spec.scheme in ("keep", "zeros", CHECKPOINT) else round(spec.resolved_gain(layer.activation, layer.activation_param), 9)
    source = policy.checkpoints[spec.checkpoint].sha256 if spec.scheme == CHECKPOINT else None
    return (spec.scheme, gain, spec.mode, spec.std, spec.a, spec.value, spec.bias, spec.key, source,
            round(math.log2(spec.scale), 5))


def adapt(policy: InitPolicy, space: SearchSpace, layers: Sequence[LayerInfo],
          pretrained: Pretrained | None) -> dict[str, Any]:
    """This space's parameters for ``policy`` on ``layers``; ``ValueError`` saying why it does not fit, led by
    the rules that name a layer this model does not have (the likely cause: they match nothing here)."""
    try:
        return _params_that_reproduce(policy, space, layers, pretrained)
    except ValueError as exc:
        names = [layer.name for layer in layers]
        missing = unmatched_names(policy, names)
        if not missing:
            raise
        shown_rules = [f"rules[{index}].layer {name!r}" for index, name in missing[:3]]
        rules = " and ".join(shown_rules) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"{rules} {'matches' if len(missing) == 1 else 'match'} no layer of this model (its "
                         f"layers: {shown}); without {'it' if len(missing) == 1 else 'them'}, {exc}") from None


def _params_that_reproduce(policy: InitPolicy, space: SearchSpace, layers: Sequence[LayerInfo],
                           pretrained: Pretrained | None) -> dict[str, Any]:
    try:
        params = space.params_for(policy, layers, pretrained)
    except InitSearchError as exc:  # a scheme that does not fit a layer of this model
        raise ValueError(first_line(exc)) from None
    again = space.sample(optuna.trial.FixedTrial(params), layers, pretrained)
    wanted = {layer.name: spec for layer, _, spec in plan(policy, layers, strict=False)}
    for layer, _, spec in plan(again, layers, strict=False):
        if layer.family == "norm":
            continue
        if _effect(spec, layer, again) != _effect(wanted[layer.name], layer, policy):
            raise ValueError(f"layer {layer.name} would get {spec.to_dict()} here instead of {wanted[layer.name].to_dict()}")
    return params


def warm_starts(items: Sequence[str], storage: optuna.storages.BaseStorage, space: SearchSpace,
                layers: Sequence[LayerInfo], pretrained: Pretrained | None) -> list[WarmStart]:
    """The ``warm_start`` entries that fit this study, in order; each one that does not is logged in one
    line and left out. Reads only: nothing is written to any study."""
    out = []
    for index, item in enumerate(items):
        label, policy = source_policy(item, storage, index)
        if policy is None:
            log.warning("warm start %s skipped: it has no complete trial", label)
            continue
        try:
            out.append(WarmStart(label, adapt(policy, space, layers, pretrained)))
        except ValueError as exc:
            log.warning("warm start %s skipped: %s", label, exc)
    return out


def enqueue_warm_starts(study: optuna.Study, starts: Sequence[WarmStart]) -> list[str]:
    """Enqueue the warm starts this study has not seen yet (a resume does not add them again)."""
    seen = {t.user_attrs.get("warm_start") for t in study.get_trials(deepcopy=False)}
    added = [start for start in starts if start.source not in seen]
    for start in added:
        study.enqueue_trial(start.params, user_attrs={"warm_start": start.source})
    return [start.source for start in added]


def describe_network(layers: Sequence[LayerInfo]) -> dict[str, str]:
    """What earlier winners are found by: the depth (linear and conv layers), the activation mix and the layer
    types, with counts (``{"depth": "4", "activations": "linear:1,relu:3", "layer_types": "Linear:4"}``)."""
    weighted = [layer for layer in layers if layer.family in ("linear", "conv")]

    def mix(values: list[str]) -> str:
        return ",".join(f"{value}:{values.count(value)}" for value in sorted(set(values)))

    return {"depth": str(len(weighted)), "activations": mix([layer.activation for layer in weighted]),
            "layer_types": mix([layer.type for layer in layers])}
