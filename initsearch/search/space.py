"""Search spaces: an Optuna trial and a proxy's layers -> an ``InitPolicy``.

Spaces (``conf/search_space/``):

- ``hybrid`` (default): per linear/conv layer, a scheme among those that fit the activation after it;
- ``grouped``: one choice per role (first / residual branch ends / hidden by type and activation / last),
  written as role selectors so the policy transfers to deeper or wider variants of the model;
- ``free``: any scheme per layer;
- ``scales_only``: one base scheme, searched per-layer multipliers (the GradInit idea);
- ``joint``: the network's shape (``arch``, under ``arch.max_params``): the MLP's depth and width, or for a
  CNN study the number of conv stages and their channels; activation, norm and residual skips for both;
  together with a ``grouped`` (role) init policy for the network drawn.

Scale multipliers compound over depth (1.05 on each of 48 layers is x10), so every space puts the
signal-preserving point where a sampler hits it easily: each trial first draws ``rescale``; when it is off,
every multiplier is exactly 1 (the variance-preserving scheme as published); when LSUV is on, no multiplier
is searched at all (LSUV sets the scale). Only when ``rescale`` is on does each unit draw ``log2_scale`` in
``scale_log2`` (uniform in the exponent, so x0.5 and x2 are equally likely).

With pre-trained weights (``Pretrained``), every unit whose layers all fit the file may also draw
``checkpoint``: its layers are copied from the file (bias included; times the unit's scale when ``rescale``
is on), and norm layers always are, so a fresh layer's neighbours keep their trained statistics.

Every textbook baseline is a point of the shipped ``hybrid`` and ``grouped`` spaces (their scheme lists hold
each baseline's scheme for every activation, and ``gain: textbook`` gives each scheme the gain its baseline
uses), so a search can match any baseline and only add to them. Residual branch ends (``branch_last``)
may also draw ``zeros`` (Fixup, Zhang et al. 2019; SkipInit, De & Smith 2020: each block starts as its
shortcut), and identity for square and widening layers.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from initsearch.errors import ConfigError, is_finite_number
from initsearch.init.activations import ACTIVATIONS
from initsearch.init.layers import LayerInfo
from initsearch.init.policy import CHECKPOINT, CheckpointRef, InitPolicy, LsuvSettings, plan
from initsearch.init.schemes import SCHEME_SPECS

SPACES = ("hybrid", "grouped", "free", "scales_only", "joint")
JOINT_TARGETS = {"mlp": "initsearch.proxy.models.JointMLP", "cnn": "initsearch.proxy.models.JointCNN"}
JOINT_TARGET = JOINT_TARGETS["mlp"]  # what a joint trial builds (and best_model.yaml names) for an MLP study
ARCH_NORMS = ("none", "batch", "layer")
CONV_MODELS = ("cnn", "rescnn")  # built-in models whose joint study draws a JointCNN
TEXTBOOK = "textbook"  # search_space.gain: each scheme's gain as the textbook baseline using it sets it


def textbook_gain(scheme: str, lsuv: bool) -> float | str:
    """The gain ``gain: textbook`` writes for ``scheme``: the activation's (``"auto"``) for the schemes whose
    papers scale by it (He et al. 2015; Saxe et al. 2014 for orthogonal, as the ``orthogonal`` baseline;
    Xiao et al. 2018's critical delta-orthogonal), 1 for Xavier, LeCun and identity (as published); with
    LSUV on, orthogonal gets 1 (Mishkin & Matas 2016's pre-init; LSUV sets the scale anyway)."""
    if scheme == "orthogonal":
        return 1.0 if lsuv else "auto"
    default = SCHEME_SPECS[scheme].default_gain
    return "auto" if scheme == "delta_orthogonal" else default


@dataclass(frozen=True)
class ArchSpace:
    """The architectures a joint search draws from, and the size budget (``None``: no budget).

    ``network`` is ``mlp`` (``JointMLP``: ``depth`` Linear layers of ``width``) or ``cnn`` (``JointCNN``:
    ``stages`` convs of ``channels``); ``activation``, ``norm`` and ``residual`` serve both."""

    depth: tuple[int, ...]
    width: tuple[int, ...]
    activation: tuple[str, ...]
    norm: tuple[str, ...]
    residual: tuple[bool, ...]
    max_params: int | None = None
    stages: tuple[int, ...] = (1, 2, 3, 4)  # the defaults of conf/search_space/joint.yaml
    channels: tuple[int, ...] = (8, 16, 32, 64)
    network: str = "mlp"

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """One architecture as a model config (``arch:depth``... are the trial's parameters)."""
        pick = SearchSpace._categorical
        if self.network == "cnn":
            shape = {"stages": pick(trial, "arch:stages", self.stages), "channels": pick(trial, "arch:channels", self.channels)}
        else:
            shape = {"depth": pick(trial, "arch:depth", self.depth), "width": pick(trial, "arch:width", self.width)}
        norm = pick(trial, "arch:norm", self.norm)
        return {"_target_": JOINT_TARGETS[self.network], **shape, "activation": pick(trial, "arch:activation", self.activation),
                "norm": None if norm == "none" else norm, "residual": pick(trial, "arch:residual", self.residual)}

    def smallest(self) -> dict[str, Any]:
        """The architecture with the fewest parameters (shallowest, narrowest, no norm): the budget's floor."""
        norm = "none" if "none" in self.norm else "layer" if "layer" in self.norm else "batch"
        shape = ({"stages": min(self.stages), "channels": min(self.channels)} if self.network == "cnn"
                 else {"depth": min(self.depth), "width": min(self.width)})
        return {"_target_": JOINT_TARGETS[self.network], **shape, "activation": self.activation[0],
                "norm": None if norm == "none" else norm, "residual": False}

    def describe_smallest(self) -> str:
        """The smallest architecture in words, for the budget's error line."""
        if self.network == "cnn":
            return f"{min(self.stages)} conv stage(s) of {min(self.channels)} channels"
        return f"depth {min(self.depth)}, width {min(self.width)}"


def _choices(cfg: Mapping[str, Any], key: str, check) -> tuple:
    """``arch.<key>``: a non-empty list whose items pass ``check`` (a predicate)."""
    values = cfg.get(key)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values or not all(map(check, values)):
        raise ConfigError(f"arch.{key}: must be a non-empty list of valid values, got {values!r}")
    return tuple(values)


def arch_from_config(cfg: Any) -> ArchSpace:
    """Validate ``arch`` (the joint space's architectures); ``ConfigError`` names the bad key."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"arch: search_space=joint needs the arch section (depth, width, ...), got {cfg!r}")
    known = ("max_params", "depth", "width", "stages", "channels", "activation", "norm", "residual")
    for key in cfg:
        if key not in known:
            raise ConfigError(f"arch.{key}: unknown key (known: {', '.join(known)})")
    whole = lambda low: lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    max_params = cfg.get("max_params")
    if max_params is not None and not whole(1)(max_params):
        raise ConfigError(f"arch.max_params: must be a whole number >= 1 or null, got {max_params!r}")
    return ArchSpace(
        depth=_choices(cfg, "depth", whole(2)), width=_choices(cfg, "width", whole(1)),
        activation=_choices(cfg, "activation", lambda v: v in ACTIVATIONS),
        norm=_choices(cfg, "norm", lambda v: v in ARCH_NORMS), residual=_choices(cfg, "residual", lambda v: isinstance(v, bool)),
        max_params=max_params,
        stages=_choices(cfg, "stages", whole(1)) if "stages" in cfg else ArchSpace.stages,
        channels=_choices(cfg, "channels", whole(1)) if "channels" in cfg else ArchSpace.channels)

SEARCHED_BIAS = ("zeros", "pytorch_default")  # the bias inits a trial may draw
PRETRAINED = "pretrained"  # the checkpoint's name in sampled policies (the baselines use the same)


@dataclass(frozen=True)
class Pretrained:
    """A study's pre-trained weights: the file, and the proxy's layers that fit it (by name and shape)."""

    weights: CheckpointRef
    layers: frozenset[str]


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space. ``schemes`` maps an activation name (or ``any``) to candidate schemes."""

    name: str
    schemes: Mapping[str, tuple[str, ...]]
    gain: float | str
    scale_log2: tuple[float, float]
    bias: tuple[str, ...]
    lsuv: tuple[bool, ...]
    base: str | None = None
    arch: ArchSpace | None = None  # the joint space's architectures

    # ---- what a layer may get -------------------------------------------------------------------------
    def choices(self, layer: LayerInfo) -> list[str]:
        """The schemes a layer may get: those listed for its activation that fit its family and shape."""
        if self.name == "scales_only":
            return [self.base] if _fits(self.base, layer) else []
        listed = self.schemes.get("any") or self.schemes.get(layer.activation) or self.schemes.get("linear", ())
        if self.name == "joint" and layer.position in ("first", "last"):
            # whether the first/last layer is square depends on the drawn width; each parameter's choices
            # must stay the same in every trial (Optuna), so identity is left to the hidden layers
            listed = [s for s in listed if s != "identity"]
        return [s for s in listed if _fits(s, layer)]

    # ---- sampling ---------------------------------------------------------------------------------------
    def sample(self, trial: optuna.Trial, layers: Sequence[LayerInfo], pretrained: Pretrained | None = None) -> InitPolicy:
        """Draw one policy for ``layers`` (a proxy's discovery) from ``trial``; with ``pretrained``, a unit
        whose layers all fit the file may draw ``checkpoint`` beside the fresh schemes."""
        weighted = [layer for layer in layers if layer.family in ("linear", "conv")]
        lsuv = self._categorical(trial, "lsuv", self.lsuv)
        bias = self._categorical(trial, "bias", self.bias)
        lo, hi = self.scale_log2
        rescale = (not lsuv) and hi > lo and self._categorical(trial, "rescale", (False, True))
        rules = []
        for unit, selectors, members in self._units(weighted):
            options = _common(self.choices(m) for m in members)
            if pretrained is not None and all(m.name in pretrained.layers for m in members):
                options.append(CHECKPOINT)
            if not options:
                raise ConfigError(f"search_space.schemes: no candidate scheme fits {unit} (layers {[m.name for m in members]})")
            scheme = self._categorical(trial, f"scheme:{unit}", tuple(options))
            rule: dict[str, Any] = dict(selectors)
            rule["scheme"] = scheme
            if scheme == CHECKPOINT:
                rule["checkpoint"] = PRETRAINED
            elif "gain" in SCHEME_SPECS[scheme].params:
                rule["gain"] = textbook_gain(scheme, lsuv) if self.gain == TEXTBOOK else self.gain
            if rescale and scheme != "zeros":
                rule["scale"] = round(2.0 ** trial.suggest_float(f"log2_scale:{unit}", lo, hi), 6)
            if scheme != CHECKPOINT:
                rule["bias"] = bias
            rules.append(rule)
        version = 2 if any(rule.get("position") == "branch_last" for rule in rules) else 1
        data: dict[str, Any] = {"format": "initsearch-policy", "version": version, "rules": rules, "default": {"scheme": "keep"}}
        if pretrained is not None:
            rules[:0] = _pretrained_norm_rules(layers, pretrained)
            if any(rule["scheme"] == CHECKPOINT for rule in rules):
                data.update(version=2, checkpoints={PRETRAINED: pretrained.weights.to_dict()})
        if lsuv:
            data["lsuv"] = LsuvSettings().to_dict()
        return InitPolicy.from_dict(data)

    def params_for(self, policy: InitPolicy, layers: Sequence[LayerInfo], pretrained: Pretrained | None = None) -> dict[str, Any]:
        """The trial parameters under which ``sample`` draws what ``policy`` does to ``layers`` (the inverse of
        ``sample``, for warm starts). The policy's rules are resolved on these layers, so a policy written with
        role selectors adapts to this model. Raises ``ValueError`` saying why when the space cannot express it.
        """
        weighted = [layer for layer in layers if layer.family in ("linear", "conv")]
        decided = {layer.name: spec for layer, _, spec in plan(policy, layers, strict=False)}
        params: dict[str, Any] = {}
        lsuv = policy.lsuv is not None and policy.lsuv.enabled
        if lsuv not in self.lsuv:
            raise ValueError(f"LSUV is {'on' if lsuv else 'off'}; this space searches lsuv in {list(self.lsuv)}")
        if lsuv and policy.lsuv != LsuvSettings():
            raise ValueError(f"its LSUV settings {policy.lsuv.to_dict()} are not this space's {LsuvSettings().to_dict()}")
        if len(self.lsuv) > 1:
            params["lsuv"] = lsuv
        biases = {decided[layer.name].bias for layer in weighted if decided[layer.name].scheme != CHECKPOINT}
        if len(biases) > 1:
            raise ValueError(f"its layers get different bias inits {sorted(map(str, biases))}; this space draws one for all")
        if not biases <= set(self.bias):
            raise ValueError(f"its bias init {biases.pop()!r} is not among this space's {list(self.bias)}")
        if len(self.bias) > 1:
            params["bias"] = biases.pop() if biases else self.bias[0]
        lo, hi = self.scale_log2
        rescale = any(decided[layer.name].scale != 1.0 for layer in weighted)
        if rescale and (lsuv or not hi > lo):
            raise ValueError("it scales layers, and this space searches no scale" + (" with LSUV on" if lsuv else ""))
        if not lsuv and hi > lo:
            params["rescale"] = rescale
        for unit, _, members in self._units(weighted):
            specs = {decided[m.name] for m in members}
            if len(specs) > 1:
                raise ValueError(f"the layers of {unit} get different inits, and this space gives them one")
            spec = specs.pop()
            options = _common(self.choices(m) for m in members)
            if pretrained is not None and all(m.name in pretrained.layers for m in members):
                options.append(CHECKPOINT)
            if spec.scheme not in options:
                raise ValueError(f"{unit} gets {spec.scheme!r}, not among this space's choices ({', '.join(options)})")
            if len(options) > 1:
                params[f"scheme:{unit}"] = spec.scheme
            if rescale and spec.scheme != "zeros":
                exponent = math.log2(spec.scale)
                if not lo <= exponent <= hi:
                    raise ValueError(f"{unit} has scale {spec.scale:g}, outside this space's 2^[{lo:g}, {hi:g}]")
                params[f"log2_scale:{unit}"] = exponent
        return params

    def _units(self, weighted: Sequence[LayerInfo]) -> list[tuple[str, dict[str, str], list[LayerInfo]]]:
        """(parameter suffix, rule selectors, member layers) per searched unit: a layer, or a role. Residual
        branch ends are a role of their own in ``grouped``, whose rules come before the hidden layers' (a
        branch end is also hidden, and the first matching rule wins)."""
        if self.name not in ("grouped", "joint"):  # joint: layer names change with depth, roles do not
            return [(layer.name, {"layer": layer.name}, [layer]) for layer in weighted]
        groups: dict[str, tuple[dict[str, str], list[LayerInfo]]] = {}
        for layer in weighted:
            if layer.position in ("first", "last"):
                key, sel = layer.position, {"position": layer.position}
                if self.name == "joint":  # its choices depend on the activation, which a joint trial draws
                    key = f"{layer.position}_{layer.activation}"
            elif layer.branch_last and self.name == "grouped":
                key = f"branch_last_{layer.family}_{layer.activation}"
                sel = {"position": "branch_last", "type": layer.family, "activation": layer.activation}
            else:
                key = f"hidden_{layer.family}_{layer.activation}"
                sel = {"position": "hidden", "type": layer.family, "activation": layer.activation}
            groups.setdefault(key, (sel, []))[1].append(layer)
        rank = {"first": 0, "branch": 1, "hidden": 2, "last": 3}
        order = sorted(groups, key=lambda k: rank[k.split("_")[0]])
        return [(k, groups[k][0], groups[k][1]) for k in order]

    @staticmethod
    def _categorical(trial: optuna.Trial, name: str, options: Sequence[Any]) -> Any:
        return options[0] if len(options) == 1 else trial.suggest_categorical(name, list(options))


def _pretrained_norm_rules(layers: Sequence[LayerInfo], pretrained: Pretrained) -> list[dict[str, Any]]:
    """Rules copying the norm layers that fit the file: one ``type: norm`` rule when all do, else one per name."""
    norms = [layer.name for layer in layers if layer.family == "norm"]
    fitting = [name for name in norms if name in pretrained.layers]
    if fitting and len(fitting) == len(norms):
        return [{"type": "norm", "scheme": CHECKPOINT, "checkpoint": PRETRAINED}]
    return [{"layer": name, "scheme": CHECKPOINT, "checkpoint": PRETRAINED} for name in fitting]


def _fits(scheme: str | None, layer: LayerInfo) -> bool:
    """Whether ``scheme`` can initialize ``layer``: its family fits, identity only for square and widening
    layers (out >= in: each input channel copied once; a narrowing one would drop inputs), zeros only for the
    last layer or a residual branch end (a zero layer elsewhere blocks every gradient below it; a zero branch
    end leaves the skip path, Fixup/SkipInit)."""
    if scheme is None or layer.family not in SCHEME_SPECS[scheme].families:
        return False
    out_features, in_features = layer.weight_shape[0], layer.weight_shape[1]
    if scheme == "identity" and out_features < in_features:
        return False
    if scheme == "zeros" and not (layer.position == "last" or layer.branch_last):
        return False
    return True


def _common(option_lists) -> list[str]:
    lists = list(option_lists)
    return [s for s in lists[0] if all(s in other for other in lists[1:])] if lists else []


# ---- building a space from its config --------------------------------------------------------------------
def space_from_config(cfg: Mapping[str, Any], arch: Any = None) -> SearchSpace:
    """Validate ``search_space`` (and, for ``joint``, ``arch``) and build it; ``ConfigError`` names the bad key."""
    name = cfg.get("name")
    if name not in SPACES:
        raise ConfigError(f"search_space.name: unknown space {name!r}; expected one of {', '.join(SPACES)}")
    schemes: dict[str, tuple[str, ...]] = {}
    for act, names in dict(cfg.get("schemes") or {}).items():
        if act != "any" and act not in ACTIVATIONS:
            raise ConfigError(f"search_space.schemes.{act}: unknown activation; expected one of {', '.join(ACTIVATIONS)} or any")
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ConfigError(f"search_space.schemes.{act}: must be a non-empty list of scheme names, got {names!r}")
        for i, s in enumerate(names):
            _check_scheme(s, f"search_space.schemes.{act}[{i}]")
        schemes[act] = tuple(names)
    base = cfg.get("base")
    if name == "scales_only":
        _check_scheme(base, "search_space.base")
    elif not schemes:
        raise ConfigError("search_space.schemes: must list candidate schemes")
    gain = cfg.get("gain", "auto")
    if gain not in ("auto", TEXTBOOK) and not (is_finite_number(gain) and 0 < gain <= 100):
        raise ConfigError(f"search_space.gain: must be 'auto', 'textbook' or a number in (0, 100], got {gain!r}")
    scale = cfg.get("scale_log2", (0.0, 0.0))
    if not (isinstance(scale, Sequence) and len(scale) == 2 and all(is_finite_number(v) for v in scale)
            and -10 <= scale[0] <= scale[1] <= 10):
        raise ConfigError(f"search_space.scale_log2: must be [low, high] with -10 <= low <= high <= 10, got {scale!r}")
    bias = tuple(cfg.get("bias", ("zeros",)))
    if not bias or any(b not in SEARCHED_BIAS for b in bias):
        raise ConfigError(f"search_space.bias: must be a non-empty list of {', '.join(SEARCHED_BIAS)}, got {list(bias)!r}")
    lsuv = tuple(cfg.get("lsuv", (False,)))
    if not lsuv or any(not isinstance(v, bool) for v in lsuv):
        raise ConfigError(f"search_space.lsuv: must be a non-empty list of true/false, got {list(lsuv)!r}")
    arch_space = arch_from_config(arch) if name == "joint" else None
    return SearchSpace(name, schemes, gain, (float(scale[0]), float(scale[1])), bias, lsuv, base, arch_space)


def _check_scheme(s: Any, key: str) -> None:
    if s not in SCHEME_SPECS or s == "keep":
        known = ", ".join(n for n in SCHEME_SPECS if n != "keep")
        raise ConfigError(f"{key}: unknown scheme {s!r}; expected one of {known}")


