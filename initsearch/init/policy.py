"""The init policy file, format versions 1 and 2: typed dataclasses, JSON read/write, validation, matching.

The contract is docs/policy-format.md. A policy is data only: nothing read from a file is
executed, imported or unpickled; every value is checked against a fixed schema and every problem raises one
``PolicyError`` whose message starts with the field path and names the value, e.g.
``rules[2].scale: must be in (0, 100], got -1``.

Decisions this module takes where the format document is silent:

- **Norm layers are opt-in.** A layer of the ``norm`` family is touched only by a rule that names it: the
  rule's ``type`` is ``"norm"`` or the layer's class name (``BatchNorm2d``...), or its ``layer`` equals the
  layer's exact name. Every other rule (a rule with no selector, a glob, a position or activation selector)
  and ``default`` skip norm layers, which then resolve to ``InitSpec("keep")`` with rule index ``None``.
  Reason: a role-based rule such as ``{"scheme": "kaiming_normal"}`` is written for weighted layers, and
  norm layers accept only keep/zeros/constant, so letting generic rules reach them would make nearly every
  policy fail on any model with BatchNorm.
- **Globs** use ``fnmatch.fnmatchcase`` on the qualified module name: case-sensitive, and ``*`` also
  crosses dots (``net.*`` matches ``net.0`` and ``net.0.conv``). A ``layer`` without any of ``*?[`` is an
  exact name; with ``strict`` (the default) ``plan`` refuses one that names no discovered layer.
- **First match wins**; a rule with no selector matches every (non-norm) layer.
- **No nulls.** JSON ``null`` is refused for every field (absent means default); the documented format
  has none, and ``to_dict`` never writes one.
- **Numbers.** Integers are accepted wherever a real number goes and stored as ``float`` (``bool`` is not
  a number). ``max_iter`` and ``version`` must be integers. A fixed ``gain`` equal to the scheme's default
  is kept as given (``gain: 1.0`` is not folded into "unset"), so the round trip is exact.
- **Files.** A UTF-8 byte-order mark is tolerated; duplicate keys in one JSON object are refused (like
  unknown keys, they are usually mistakes); NaN/Infinity literals are refused with the field path where
  they appear. ``save_policy`` creates missing parent folders and refuses to write a file that
  ``load_policy`` would refuse as oversize.
- **Version 2** adds ``position: "branch_last"`` (layers that end a residual branch), the ``checkpoints`` map
  and the ``checkpoint`` scheme (weights copied from a file,
  read by ``init.checkpoints``). A policy is written as version 1 unless it uses them, so every version 1
  file round-trips unchanged; a version 1 file that uses them is refused and told to say version 2. The
  ``checkpoint`` scheme has its own defaults: ``bias`` ``"checkpoint"`` (copied from the file) and ``lsuv``
  false (a copied weight keeps its scale unless its rule asks for LSUV).
- **Fields a scheme does not read** (``std`` on ``xavier_normal``, ``mode`` on ``normal``) are refused in a
  file even at their default value; a directly constructed ``InitSpec`` is checked the same way for every
  field that differs from its default.
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import math
import os
import pathlib
import re
import stat
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, NoReturn

from initsearch.errors import PolicyError, is_finite_number
from initsearch.init.activations import ACTIVATIONS, activation_gain
from initsearch.init.layers import LayerInfo
from initsearch.init.schemes import ALL_FAMILIES, BIAS_OPTIONS, FAN_MODES, SCHEME_NAMES, SCHEME_SPECS

__all__ = [
    "FORMAT",
    "VERSION",
    "MAX_BYTES",
    "MAX_DEPTH",
    "VERSIONS",
    "CHECKPOINT",
    "CheckpointRef",
    "InitSpec",
    "Rule",
    "LsuvSettings",
    "InitPolicy",
    "load_policy",
    "save_policy",
    "plan",
]

FORMAT = "initsearch-policy"
VERSION = 1  # what a policy that uses no version 2 feature is written as
VERSIONS: tuple[int, ...] = (1, 2)  # what this build reads
CHECKPOINT = "checkpoint"  # the version 2 scheme: weights copied from a file of ``checkpoints``
POLICY_SCHEMES: tuple[str, ...] = (*SCHEME_NAMES, CHECKPOINT)
CHECKPOINT_PARAMS = frozenset({"checkpoint", "key"})
MAX_BYTES = 10 * 1024 * 1024
MAX_DEPTH = 64

POSITIONS: tuple[str, ...] = ("first", "hidden", "last", "branch_last")  # branch_last: version 2
FAMILIES: tuple[str, ...] = ("linear", "conv", "norm")
GLOB_CHARS = frozenset("*?[")
MAX_POSITIVE = 100.0  # upper bound of gain, scale, std, a, lsuv.target_std
MAX_CONSTANT = 1e4  # bound on |value| and |bias|
MAX_TOL = 10.0
MAX_ITER_BOUND = 1000

SELECTOR_KEYS: tuple[str, ...] = ("layer", "type", "activation", "position")
INIT_KEYS: tuple[str, ...] = ("scheme", "gain", "scale", "mode", "std", "a", "value", "bias", "lsuv", "checkpoint", "key")
COMMON_INIT_KEYS = frozenset({"scale", "bias", "lsuv"})  # accepted by every scheme
TOP_KEYS: tuple[str, ...] = ("format", "version", "checkpoints", "rules", "default", "lsuv", "provenance")
CHECKPOINT_KEYS: tuple[str, ...] = ("path", "sha256")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
LSUV_KEYS: tuple[str, ...] = ("enabled", "target_std", "tol", "max_iter")


# ----------------------------------------------------------------------------------------------------------
# Messages and small value checks. Each check takes the value and its field path, raises PolicyError or
# returns the normalized value.
# ----------------------------------------------------------------------------------------------------------


def _fail(path: str, message: str) -> NoReturn:
    """Raise the one ``PolicyError`` of this module's shape: ``<field path>: <message>``."""
    raise PolicyError(f"{path}: {message}")


def _show(value: Any) -> str:
    """``repr`` of a value for a message, cut to 80 characters (a huge int or list stays readable)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _join(path: str, key: str) -> str:
    """The path of ``key`` inside the object at ``path`` (the top level has the empty path)."""
    return f"{path}.{key}" if path else key


def _interval(low: float, high: float, include_low: bool) -> str:
    """An interval as text, e.g. ``(0, 100]``."""
    return f"{'[' if include_low else '('}{low:g}, {high:g}]"


def _utf8_ok(text: str) -> bool:
    """False for strings with lone surrogates, which cannot be written to a UTF-8 file."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _number_in(value: Any, path: str, low: float, high: float, *, include_low: bool = False) -> float:
    """A finite real number in (low, high] (or [low, high]), returned as float."""
    interval = _interval(low, high, include_low)
    if not is_finite_number(value):
        _fail(path, f"must be a finite number in {interval}, got {_show(value)}")
    above_low = value >= low if include_low else value > low
    if not (above_low and value <= high):
        _fail(path, f"must be in {interval}, got {_show(value)}")
    return float(value)


def _choice(value: Any, path: str, options: Sequence[str], what: str = "one of") -> str:
    """A string among ``options``."""
    if not isinstance(value, str) or value not in options:
        _fail(path, f"must be {what} {', '.join(options)}, got {_show(value)}")
    return value


def _boolean(value: Any, path: str) -> bool:
    """A JSON boolean (``true``/``false``), not 0/1."""
    if not isinstance(value, bool):
        _fail(path, f"must be true or false, got {_show(value)}")
    return value


def _check_scheme(value: Any, path: str) -> str:
    """A known scheme name (``checkpoint`` included); the message lists the known ones."""
    if not isinstance(value, str) or value not in POLICY_SCHEMES:
        _fail(path, f"unknown scheme {_show(value)} (known: {', '.join(POLICY_SCHEMES)})")
    return value


def _scheme_params(scheme: str) -> tuple[frozenset[str], frozenset[str]]:
    """The parameters a scheme reads and those it requires (``checkpoint`` is not in ``SCHEME_SPECS``)."""
    if scheme == CHECKPOINT:
        return CHECKPOINT_PARAMS, frozenset({"checkpoint"})
    spec = SCHEME_SPECS[scheme]
    return spec.params, spec.required


def scheme_families(scheme: str) -> frozenset[str]:
    """The layer families a scheme of a policy fits (a checkpoint fits any layer whose shape matches)."""
    return ALL_FAMILIES if scheme == CHECKPOINT else SCHEME_SPECS[scheme].families


def _check_name(value: Any, path: str) -> str:
    """A checkpoint name or key: a non-empty string."""
    if not isinstance(value, str) or not value or not _utf8_ok(value):
        _fail(path, f"must be a non-empty string, got {_show(value)}")
    return value


def _check_gain(value: Any, path: str) -> float | str:
    """``"auto"`` or a positive number <= 100."""
    if value == "auto" and isinstance(value, str):
        return value
    if not is_finite_number(value) or not 0 < value <= MAX_POSITIVE:
        _fail(path, f'must be "auto" or a number in (0, {MAX_POSITIVE:g}], got {_show(value)}')
    return float(value)


def _check_positive(value: Any, path: str) -> float:
    """A number in (0, 100]: scale, std, a."""
    return _number_in(value, path, 0.0, MAX_POSITIVE)


def _check_constant(value: Any, path: str) -> float:
    """A finite number with |value| <= 1e4 (the ``constant`` scheme's value)."""
    return _number_in(value, path, -MAX_CONSTANT, MAX_CONSTANT, include_low=True)


def _check_bias(value: Any, path: str) -> str | float:
    """``zeros``/``keep``/``pytorch_default`` or a finite number with |b| <= 1e4."""
    if isinstance(value, str) and value in BIAS_OPTIONS:
        return value
    if not is_finite_number(value) or not -MAX_CONSTANT <= value <= MAX_CONSTANT:
        _fail(path, f"must be one of {', '.join(BIAS_OPTIONS)} or a number in [-{MAX_CONSTANT:g}, "
                    f"{MAX_CONSTANT:g}], got {_show(value)}")
    return float(value)


def _check_mode(value: Any, path: str) -> str:
    """``fan_in`` or ``fan_out``."""
    return _choice(value, path, FAN_MODES)


_INIT_CHECKS = {
    "gain": _check_gain,
    "scale": _check_positive,
    "mode": _check_mode,
    "std": _check_positive,
    "a": _check_positive,
    "value": _check_constant,
    "bias": _check_bias,
    "lsuv": _boolean,
    "checkpoint": _check_name,
    "key": _check_name,
}


def _check_layer_selector(value: Any, path: str) -> str:
    """A non-empty string: an exact qualified module name or a shell glob."""
    if not isinstance(value, str) or not value or not _utf8_ok(value):
        _fail(path, f"must be a non-empty module name or glob, got {_show(value)}")
    return value


def _check_type_selector(value: Any, path: str) -> str:
    """An identifier-like string: a class name (``Conv2d``) or a family (``linear``, ``conv``, ``norm``)."""
    if not isinstance(value, str) or not value.isidentifier():
        _fail(path, f"must be a class name (e.g. 'Conv2d') or a family ({', '.join(FAMILIES)}), got {_show(value)}")
    return value


def _check_activation_selector(value: Any, path: str) -> str:
    """One of ``activations.ACTIVATIONS``."""
    return _choice(value, path, ACTIVATIONS)


def _check_position_selector(value: Any, path: str) -> str:
    """``first``, ``hidden``, ``last``, or (version 2) ``branch_last``."""
    return _choice(value, path, POSITIONS)


_SELECTOR_CHECKS = {
    "layer": _check_layer_selector,
    "type": _check_type_selector,
    "activation": _check_activation_selector,
    "position": _check_position_selector,
}


def _check_max_iter(value: Any, path: str) -> int:
    """An integer (not bool, not float) in [1, 1000]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ITER_BOUND:
        _fail(path, f"must be an integer in [1, {MAX_ITER_BOUND}], got {_show(value)}")
    return int(value)


_LSUV_CHECKS = {
    "enabled": _boolean,
    "target_std": _check_positive,
    "tol": lambda value, path: _number_in(value, path, 0.0, MAX_TOL),
    "max_iter": _check_max_iter,
}


def _check_keys(obj: Mapping, path: str, known: Sequence[str]) -> None:
    """Refuse non-string keys and keys not in ``known`` (with a did-you-mean suggestion)."""
    for key in obj:
        if not isinstance(key, str):
            _fail(path or "policy", f"keys must be strings, got {_show(key)}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            _fail(_join(path, key), f"unknown key (known: {', '.join(known)}){hint}")


def _require_mapping(value: Any, path: str) -> Mapping:
    """The value as a mapping (a JSON object), else an error naming its type."""
    if not isinstance(value, Mapping):
        _fail(path, f"must be an object, got {type(value).__name__} {_show(value)}")
    return value


def _is_sequence(value: Any) -> bool:
    """True for a list-like value (a JSON array); strings and bytes are not."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


# ----------------------------------------------------------------------------------------------------------
# Init fields: one function shared by the file reader and the dataclass constructors.
# ----------------------------------------------------------------------------------------------------------


def _validate_init(given: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Check ``scheme`` and the init fields that are set; return them normalized (numbers as float).

    ``given`` holds ``scheme`` and only the fields that were set (in a file: present; in a constructor:
    different from the default). A field the scheme does not read is refused (``scale``, ``bias``,
    ``lsuv`` are read by all); a parameter the scheme requires must be set.
    """
    if "scheme" not in given:
        _fail(_join(path, "scheme"), f"required (known: {', '.join(POLICY_SCHEMES)})")
    scheme = _check_scheme(given["scheme"], _join(path, "scheme"))
    params, required = _scheme_params(scheme)
    accepted = params | COMMON_INIT_KEYS
    normalized: dict[str, Any] = {"scheme": scheme}
    for key in INIT_KEYS[1:]:
        if key not in given:
            continue
        if key not in accepted:
            readable = ", ".join(k for k in INIT_KEYS[1:] if k in accepted)
            _fail(_join(path, key), f"not accepted by scheme {scheme!r} (it accepts: {readable}), got {_show(given[key])}")
        if key == "bias" and scheme == CHECKPOINT and given[key] == CHECKPOINT:
            normalized[key] = CHECKPOINT
            continue
        normalized[key] = _INIT_CHECKS[key](given[key], _join(path, key))
    for key in sorted(required):
        if key not in normalized:
            _fail(_join(path, key), f"required by scheme {scheme!r}, missing")
    return normalized


def _is_default(value: Any, default: Any) -> bool:
    """Whether a field holds its default: same type and equal (so ``True`` is not taken for ``1.0``)."""
    return value is default or (type(value) is type(default) and value == default)


# ----------------------------------------------------------------------------------------------------------
# Provenance: free-form JSON, deep-copied iteratively (no recursion, depth bounded, cycles refused).
# ----------------------------------------------------------------------------------------------------------


class _NonFinite:
    """What a NaN/Infinity literal parses to, so validation can refuse it with its field path."""

    def __init__(self, literal: str) -> None:
        self.literal = literal

    def __repr__(self) -> str:
        return self.literal


def _json_copy(value: Any, path: str, base_depth: int) -> Any:
    """A deep copy of a JSON-like value into dict/list/str/int/float/bool/None.

    Tuples become lists, Mapping subclasses dicts. Refuses non-string keys, non-finite floats, strings
    that cannot be UTF-8 encoded, other types, and containers nested deeper than ``MAX_DEPTH`` counting
    ``base_depth`` enclosing objects (which also stops self-referencing structures). Iterative: a deep value
    cannot raise ``RecursionError``.
    """
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, str, int]] = [(value, root, 0, path, base_depth)]
    while stack:
        src, parent, slot, where, depth = stack.pop()
        if isinstance(src, Mapping) or _is_sequence(src):
            depth += 1
            if depth > MAX_DEPTH:
                _fail(where, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(src, Mapping):
            copy: Any = {}
            for key, item in src.items():
                if not isinstance(key, str) or not _utf8_ok(key):
                    _fail(where, f"keys must be strings, got {_show(key)}")
                copy[key] = None
                stack.append((item, copy, key, f"{where}.{key}", depth))
        elif _is_sequence(src):
            copy = [None] * len(src)
            for i, item in enumerate(src):
                stack.append((item, copy, i, f"{where}[{i}]", depth))
        elif src is None or isinstance(src, bool):
            copy = src
        elif isinstance(src, str):
            if not _utf8_ok(src):
                _fail(where, f"must be UTF-8 encodable text, got {_show(src)}")
            copy = str(src)
        elif isinstance(src, int):
            copy = int(src)
        elif isinstance(src, float) and math.isfinite(src):
            copy = float(src)
        elif isinstance(src, (float, _NonFinite)):
            _fail(where, f"NaN and Infinity are not allowed (JSON has no such numbers), got {_show(src)}")
        else:
            _fail(where, f"must be a JSON value (object, array, string, number, bool, null), got {type(src).__name__}")
        parent[slot] = copy
    return root[0]


def _check_provenance(value: Any, path: str) -> Mapping[str, Any]:
    """A free-form JSON object, copied and wrapped read-only (nested values are plain copies)."""
    _require_mapping(value, path)
    return MappingProxyType(_json_copy(value, path, base_depth=1))


def _thaw(value: Any) -> Any:
    """A plain ``dict``/``list`` deep copy of validated provenance (for ``to_dict``)."""
    return _json_copy(value, "provenance", base_depth=1)


# ----------------------------------------------------------------------------------------------------------
# The dataclasses.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitSpec:
    """The init fields of a rule or of ``default``: a scheme and its parameters (see policy-format.md).

    ``gain``: ``None`` = the scheme's default gain, ``"auto"`` = the gain of the layer's activation, or a
    number in (0, 100]. ``scale`` multiplies the result. ``mode`` (kaiming, lecun), ``std``
    (normal, trunc_normal), ``a`` (uniform bound), ``value`` (constant) are the schemes' parameters.
    ``bias``: ``zeros``, ``keep``, ``pytorch_default`` or a number. ``lsuv=False`` excludes the layer from
    the LSUV pass. ``checkpoint``/``key`` (scheme ``checkpoint`` only): the named file of the policy's
    ``checkpoints`` and the layer's name in it. ``bias`` and ``lsuv`` left at ``None`` take the scheme's
    default (``zeros``/true; ``checkpoint``/false for the checkpoint scheme). Construction validates;
    integers are stored as floats.
    """

    scheme: str
    gain: float | str | None = None
    scale: float = 1.0
    mode: str = "fan_in"
    std: float | None = None
    a: float | None = None
    value: float | None = None
    bias: str | float | None = None
    lsuv: bool | None = None
    checkpoint: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        defaults = _field_defaults(self.scheme)
        given = {"scheme": self.scheme}
        for f in fields(self)[1:]:
            current = getattr(self, f.name)
            if current is not None and not _is_default(current, defaults[f.name]):
                given[f.name] = current
        normalized = _validate_init(given, "InitSpec")
        for f in fields(self)[1:]:
            object.__setattr__(self, f.name, normalized.get(f.name, defaults[f.name]))

    def resolved_gain(self, activation: str, activation_param: float | None = None) -> float:
        """The gain as a number for a layer followed by ``activation``.

        A number is itself; ``"auto"`` is ``activation_gain(activation, activation_param)`` (torch's
        ``calculate_gain``, or the second-moment-preserving gain for gelu/silu/elu); ``None`` is the
        scheme's default gain (which may itself be ``"auto"``, as for kaiming), or 1.0 for schemes
        without a gain.
        """
        if self.scheme == CHECKPOINT:
            return 1.0
        gain = self.gain if self.gain is not None else SCHEME_SPECS[self.scheme].default_gain
        if gain is None:
            return 1.0
        if gain == "auto":
            return activation_gain(activation, activation_param)
        return float(gain)

    def to_dict(self) -> dict[str, Any]:
        """``{"scheme": ...}`` followed by the fields that differ from the scheme's defaults, in field order."""
        defaults = _field_defaults(self.scheme)
        out: dict[str, Any] = {"scheme": self.scheme}
        for f in fields(self)[1:]:
            current = getattr(self, f.name)
            if not _is_default(current, defaults[f.name]):
                out[f.name] = current
        return out


def _field_defaults(scheme: Any) -> dict[str, Any]:
    """Each init field's default for ``scheme``: the dataclass defaults, except ``bias`` (``zeros``, or
    ``checkpoint`` for the checkpoint scheme) and ``lsuv`` (true, or false for the checkpoint scheme)."""
    from_file = scheme == CHECKPOINT
    out = {f.name: f.default for f in fields(InitSpec)[1:]}
    out["bias"] = CHECKPOINT if from_file else "zeros"
    out["lsuv"] = not from_file
    return out


KEEP = InitSpec("keep")


def _name_matches(pattern: str, name: str) -> bool:
    """Exact equality, or a shell-glob match (``fnmatchcase``: case-sensitive, ``*`` crosses dots)."""
    return pattern == name or fnmatch.fnmatchcase(name, pattern)


def _is_exact_name(pattern: str) -> bool:
    """A ``layer`` selector without glob characters (``*``, ``?``, ``[``) names one module exactly."""
    return not (GLOB_CHARS & set(pattern))


@dataclass(frozen=True)
class Rule:
    """One policy rule: selectors (all optional; all that are set must match) and the init to apply.

    ``layer``: qualified module name, exact or shell glob. ``type``: class name (``Conv2d``) or family
    (``linear``/``conv``/``norm``). ``activation``: the layer's following nonlinearity. ``position``:
    ``first``/``hidden``/``last`` by forward order, or ``branch_last`` (version 2): a layer that ends a
    residual branch. Norm layers match only rules that name them (see the module docstring).
    """

    init: InitSpec
    layer: str | None = None
    type: str | None = None
    activation: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.init, InitSpec):
            _fail("Rule.init", f"must be an InitSpec, got {type(self.init).__name__}")
        for key in SELECTOR_KEYS:
            value = getattr(self, key)
            if value is not None:
                _SELECTOR_CHECKS[key](value, f"Rule.{key}")

    def names_norm_layer(self, layer: LayerInfo) -> bool:
        """Whether this rule names ``layer`` explicitly: by a ``type`` selector or by its exact name.

        Used for norm layers, which only such rules touch; ``type`` is "named" because a type selector
        that matches a norm layer is ``"norm"`` or the layer's own (norm) class name.
        """
        return self.type is not None or self.layer == layer.name

    def matches(self, layer: LayerInfo) -> bool:
        """Whether every selector that is set matches ``layer`` (and, for a norm layer, the rule names it)."""
        if self.layer is not None and not _name_matches(self.layer, layer.name):
            return False
        if self.type is not None and self.type not in (layer.type, layer.family):
            return False
        if self.activation is not None and self.activation != layer.activation:
            return False
        if self.position == "branch_last":
            if not layer.branch_last:
                return False
        elif self.position is not None and self.position != layer.position:
            return False
        return layer.family != "norm" or self.names_norm_layer(layer)

    def to_dict(self) -> dict[str, Any]:
        """The selectors that are set (layer, type, activation, position), then the init fields."""
        out: dict[str, Any] = {key: getattr(self, key) for key in SELECTOR_KEYS if getattr(self, key) is not None}
        out.update(self.init.to_dict())
        return out


@dataclass(frozen=True)
class LsuvSettings:
    """The ``lsuv`` section: rescale each layer until |output std - target_std| < tol, max_iter passes."""

    enabled: bool = True
    target_std: float = 1.0
    tol: float = 0.1
    max_iter: int = 10

    def __post_init__(self) -> None:
        for key in LSUV_KEYS:
            object.__setattr__(self, key, _LSUV_CHECKS[key](getattr(self, key), f"LsuvSettings.{key}"))

    def to_dict(self) -> dict[str, Any]:
        """All four fields (the section is written out in full so a reader sees the values used)."""
        return {key: getattr(self, key) for key in LSUV_KEYS}


def _parse_rule(obj: Any, path: str) -> Rule:
    """One element of ``rules``: an object of selector and init keys."""
    obj = _require_mapping(obj, path)
    _check_keys(obj, path, SELECTOR_KEYS + INIT_KEYS)
    selectors = {key: _SELECTOR_CHECKS[key](obj[key], _join(path, key)) for key in SELECTOR_KEYS if key in obj}
    init = _validate_init({key: obj[key] for key in INIT_KEYS if key in obj}, path)
    return Rule(init=InitSpec(**init), **selectors)


def _parse_default(obj: Any, path: str = "default") -> InitSpec:
    """The ``default`` object: init keys only."""
    obj = _require_mapping(obj, path)
    for key in obj:
        if isinstance(key, str) and key in SELECTOR_KEYS:
            _fail(_join(path, key), f"selectors are not allowed in default (known: {', '.join(INIT_KEYS)})")
    _check_keys(obj, path, INIT_KEYS)
    return InitSpec(**_validate_init(obj, path))


def _parse_lsuv(obj: Any, path: str = "lsuv") -> LsuvSettings:
    """The ``lsuv`` section; absent keys take ``LsuvSettings``' defaults."""
    obj = _require_mapping(obj, path)
    _check_keys(obj, path, LSUV_KEYS)
    return LsuvSettings(**{key: _LSUV_CHECKS[key](obj[key], _join(path, key)) for key in LSUV_KEYS if key in obj})


def _check_format_and_version(top: Mapping) -> int:
    """``format`` must be ``initsearch-policy``; ``version`` 1 or 2 (a newer one is refused by name)."""
    if "format" not in top:
        _fail("format", f"required, must be {FORMAT!r}")
    if not isinstance(top["format"], str) or top["format"] != FORMAT:
        _fail("format", f"must be {FORMAT!r}, got {_show(top['format'])}")
    readable = " and ".join(str(v) for v in VERSIONS)
    if "version" not in top:
        _fail("version", f"required (this build reads versions {readable})")
    version = top["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        _fail("version", f"must be the integer 1 or 2, got {_show(version)}")
    if version not in VERSIONS:
        newer = "; the file was written by a newer initsearch" if version > max(VERSIONS) else ""
        _fail("version", f"this build reads versions {readable}, got {_show(version)}{newer}")
    return version


@dataclass(frozen=True)
class CheckpointRef:
    """One entry of ``checkpoints``: a weight file (relative to the policy file's folder, or absolute) and
    the sha256 of its bytes (stored in lower case), checked before the file is read."""

    path: str
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path or not _utf8_ok(self.path):
            _fail("CheckpointRef.path", f"must be a non-empty path, got {_show(self.path)}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            _fail("CheckpointRef.sha256", f"must be 64 hexadecimal digits, got {_show(self.sha256)}")
        object.__setattr__(self, "sha256", self.sha256.lower())

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}


def _parse_checkpoints(obj: Any, path: str = "checkpoints") -> dict[str, CheckpointRef]:
    """The ``checkpoints`` map: name -> ``{"path", "sha256"}``, both required."""
    obj = _require_mapping(obj, path)
    out: dict[str, CheckpointRef] = {}
    for name, entry in obj.items():
        where = _join(path, _check_name(name, path + " name"))
        entry = _require_mapping(entry, where)
        _check_keys(entry, where, CHECKPOINT_KEYS)
        for key in CHECKPOINT_KEYS:
            if key not in entry:
                _fail(_join(where, key), "required" + (" (the sha256 of the file's bytes)" if key == "sha256" else ""))
        if not isinstance(entry["path"], str) or not entry["path"] or not _utf8_ok(entry["path"]):
            _fail(_join(where, "path"), f"must be a non-empty path, got {_show(entry['path'])}")
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            _fail(_join(where, "sha256"), f"must be 64 hexadecimal digits, got {_show(entry['sha256'])}")
        out[name] = CheckpointRef(entry["path"], entry["sha256"])
    return out


def _check_references(rules: Sequence[Rule], default: InitSpec, checkpoints: Mapping[str, CheckpointRef],
                      prefix: str = "") -> None:
    """Every ``checkpoint`` a rule or ``default`` names must be a key of ``checkpoints``."""
    specs = [(f"{prefix}rules[{i}]", rule.init) for i, rule in enumerate(rules)] + [(f"{prefix}default", default)]
    for where, spec in specs:
        if spec.scheme == CHECKPOINT and spec.checkpoint not in checkpoints:
            known = ", ".join(checkpoints) if checkpoints else "none; add a top-level checkpoints map"
            _fail(f"{where}.checkpoint", f"unknown checkpoint {spec.checkpoint!r} (declared: {known})")


@dataclass(frozen=True)
class InitPolicy:
    """A whole policy: ordered rules (first match wins), the default init, LSUV settings, provenance.

    ``lsuv=None`` means the section is absent (LSUV off). ``provenance`` is free-form JSON for humans and
    tools, stored as a read-only mapping of plain copies; compared by ``==`` but left out of the hash.
    Construction validates; ``rules`` may be given as any sequence and is stored as a tuple.
    ``checkpoints`` (version 2): name -> ``CheckpointRef``, the files ``checkpoint`` rules copy from;
    ``base_dir``: the folder relative paths are read from (``load_policy`` sets the policy file's folder;
    ``None`` means the working directory), not part of the file nor of equality; ``source``: the file it was
    read from (``load_policy`` sets it), which ``apply_policy``'s errors name first, as the file's own do.
    """

    rules: tuple[Rule, ...]
    default: InitSpec = KEEP
    lsuv: LsuvSettings | None = None
    provenance: Mapping[str, Any] | None = field(default=None, hash=False)
    checkpoints: Mapping[str, CheckpointRef] = field(default_factory=dict, hash=False)
    base_dir: str | None = field(default=None, compare=False, hash=False)
    source: str | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not _is_sequence(self.rules):
            _fail("InitPolicy.rules", f"must be a sequence of Rule, got {type(self.rules).__name__}")
        rules = tuple(self.rules)
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                _fail(f"InitPolicy.rules[{i}]", f"must be a Rule, got {type(rule).__name__}")
        object.__setattr__(self, "rules", rules)
        if not isinstance(self.default, InitSpec):
            _fail("InitPolicy.default", f"must be an InitSpec, got {type(self.default).__name__}")
        if self.lsuv is not None and not isinstance(self.lsuv, LsuvSettings):
            _fail("InitPolicy.lsuv", f"must be LsuvSettings or None, got {type(self.lsuv).__name__}")
        if self.provenance is not None:
            object.__setattr__(self, "provenance", _check_provenance(self.provenance, "InitPolicy.provenance"))
        checkpoints = _require_mapping(self.checkpoints, "InitPolicy.checkpoints")
        for name, ref in checkpoints.items():
            _check_name(name, "InitPolicy.checkpoints name")
            if not isinstance(ref, CheckpointRef):
                _fail(f"InitPolicy.checkpoints.{name}", f"must be a CheckpointRef, got {type(ref).__name__}")
        object.__setattr__(self, "checkpoints", dict(checkpoints))  # a plain dict: policies are pickled
        _check_references(rules, self.default, self.checkpoints, "InitPolicy.")

    @property
    def version(self) -> int:
        """The format version this policy is written as: 2 when it uses checkpoints, else 1."""
        uses_files = bool(self.checkpoints) or any(s.scheme == CHECKPOINT for s in self._specs())
        uses_branches = any(rule.position == "branch_last" for rule in self.rules)
        return 2 if uses_files or uses_branches else VERSION

    def _specs(self) -> list[InitSpec]:
        return [rule.init for rule in self.rules] + [self.default]

    def checkpoint_path(self, name: str) -> pathlib.Path:
        """Where the file of checkpoint ``name`` is: its path, relative to ``base_dir`` unless absolute."""
        path = pathlib.Path(self.checkpoints[name].path)
        return path if path.is_absolute() or self.base_dir is None else pathlib.Path(self.base_dir) / path

    @classmethod
    def from_dict(cls, data: Any) -> InitPolicy:
        """Validate a decoded policy (a JSON object as a mapping) and build it; ``PolicyError`` on any problem.

        Checks, in order: top level an object, ``format``, ``version`` (before unknown keys, so a newer
        file gets the version message), unknown top-level keys, ``rules``, ``default``, ``lsuv``,
        ``provenance``.
        """
        top = _require_mapping(data, "policy")
        version = _check_format_and_version(top)
        _check_keys(top, "", TOP_KEYS)
        if "checkpoints" in top and version < 2:
            _fail("checkpoints", 'a version 2 feature; the file says "version": 1, write "version": 2')
        checkpoints = _parse_checkpoints(top["checkpoints"]) if "checkpoints" in top else {}
        if "rules" not in top:
            _fail("rules", "required (a list of rule objects; it may be empty)")
        if not _is_sequence(top["rules"]):
            _fail("rules", f"must be a list, got {type(top['rules']).__name__} {_show(top['rules'])}")
        rules = tuple(_parse_rule(obj, f"rules[{i}]") for i, obj in enumerate(top["rules"]))
        default = _parse_default(top["default"]) if "default" in top else KEEP
        if version < 2:
            for i, rule in enumerate(rules):
                if rule.position == "branch_last":
                    _fail(f"rules[{i}].position", 'branch_last is a version 2 feature; the file says "version": 1, '
                                                  'write "version": 2')
            for where, spec in [(f"rules[{i}]", r.init) for i, r in enumerate(rules)] + [("default", default)]:
                if spec.scheme == CHECKPOINT:
                    _fail(f"{where}.scheme", 'checkpoint is a version 2 feature; the file says "version": 1, '
                                             'write "version": 2')
        _check_references(rules, default, checkpoints)
        lsuv = _parse_lsuv(top["lsuv"]) if "lsuv" in top else None
        provenance = _check_provenance(top["provenance"], "provenance") if "provenance" in top else None
        return cls(rules=rules, default=default, lsuv=lsuv, provenance=provenance, checkpoints=checkpoints)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``InitPolicy.from_dict(p.to_dict()) == p``."""
        out: dict[str, Any] = {"format": FORMAT, "version": self.version}
        if self.checkpoints:
            out["checkpoints"] = {name: ref.to_dict() for name, ref in self.checkpoints.items()}
        out["rules"] = [rule.to_dict() for rule in self.rules]
        out["default"] = self.default.to_dict()
        if self.lsuv is not None:
            out["lsuv"] = self.lsuv.to_dict()
        if self.provenance is not None:
            out["provenance"] = _thaw(self.provenance)
        return out

    def resolve(self, layer: LayerInfo) -> tuple[int | None, InitSpec]:
        """The first matching rule's index and init; ``(None, default)`` if none matches.

        A norm layer that no rule names resolves to ``(None, InitSpec("keep"))``, not to ``default``.
        """
        for index, rule in enumerate(self.rules):
            if rule.matches(layer):
                return index, rule.init
        if layer.family == "norm":
            return None, KEEP
        return None, self.default

    def with_provenance(self, **fields_: Any) -> InitPolicy:
        """A copy whose provenance is the current one updated with ``fields_`` (validated as JSON)."""
        merged = dict(self.provenance or {})
        merged.update(fields_)
        return replace(self, provenance=merged)


# ----------------------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------------------

# A JSON string (with escapes) or one bracket; strings are skipped so brackets inside them do not count.
_DEPTH_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def _too_deep_at(text: str) -> int | None:
    """The offset where bracket nesting first exceeds ``MAX_DEPTH``, or ``None`` (an iterative scan)."""
    depth = 0
    for token in _DEPTH_TOKEN.finditer(text):
        char = token.group()[0]
        if char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return token.start()
        elif char in "]}":
            depth -= 1
    return None


def _read_text(path: pathlib.Path) -> str:
    """The file's text: it must exist, be at most ``MAX_BYTES`` (checked before reading) and be UTF-8."""
    try:
        info = path.stat()
    except FileNotFoundError:
        _fail(str(path), "policy file not found")
    except OSError as err:
        _fail(str(path), f"cannot read the policy file: {err.strerror}")
    if stat.S_ISDIR(info.st_mode):
        _fail(str(path), "is a directory, not a policy file")
    if info.st_size > MAX_BYTES:
        _fail(str(path), f"file is larger than {MAX_BYTES} bytes (10 MB), got {info.st_size} bytes")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as err:
        _fail(str(path), f"cannot read the policy file: {err.strerror}")
    if len(raw) > MAX_BYTES:
        _fail(str(path), f"file is larger than {MAX_BYTES} bytes (10 MB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        _fail(str(path), f"not UTF-8 text: byte {raw[err.start]:#04x} at offset {err.start}")
    return text.removeprefix("\ufeff")


def _refuse_constant(literal: str) -> _NonFinite:
    """``parse_constant`` hook: NaN/Infinity become markers that validation refuses with their field path."""
    return _NonFinite(literal)


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: refuse an object that repeats a key (the later value would silently win)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PolicyError(f"duplicate key {key!r} in one object")
        out[key] = value
    return out


def _line_col(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of a character offset."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _parse_json(text: str, where: str) -> Any:
    """Decode JSON text: depth checked first (no recursion limit reached), errors with line and column."""
    deep = _too_deep_at(text)
    if deep is not None:
        line, col = _line_col(text, deep)
        _fail(where, f"nested deeper than {MAX_DEPTH} levels (at line {line}, column {col})")
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_pairs_without_duplicates)
    except json.JSONDecodeError as err:  # some messages end in "at" themselves ("Unterminated string starting at")
        _fail(where, f"not valid JSON: {err.msg.removesuffix(' at')} at line {err.lineno}, column {err.colno}")
    except PolicyError as err:
        _fail(where, str(err))
    except RecursionError:  # defensive: the scan above should make this unreachable
        _fail(where, f"nested deeper than {MAX_DEPTH} levels")


def _exists(path: pathlib.Path) -> bool:
    """``path.exists()`` that answers False instead of raising (e.g. for a name too long to be a path)."""
    try:
        return path.exists()
    except OSError:
        return False


def load_policy(source: str | os.PathLike | Mapping | InitPolicy) -> InitPolicy:
    """A validated ``InitPolicy`` from a file path, a decoded dict, or an ``InitPolicy`` (returned as is).

    A string is always a path, never JSON text. Errors from a file are prefixed with its path, e.g.
    ``policy.json: rules[2].scale: must be in (0, 100], got -1``.
    """
    if isinstance(source, InitPolicy):
        return source
    if isinstance(source, Mapping):
        return InitPolicy.from_dict(source)
    if not isinstance(source, (str, os.PathLike)):
        _fail("policy", f"expected a path, a dict or an InitPolicy, got {type(source).__name__}")
    path = pathlib.Path(source)
    if isinstance(source, str) and source.lstrip().startswith("{") and not _exists(path):
        _fail("source", "load_policy takes a path, not JSON text; use InitPolicy.from_dict(json.loads(text))")
    text = _read_text(path)
    data = _parse_json(text, str(path))
    if not isinstance(data, dict):
        _fail(str(path), f"top level must be a JSON object, got {type(data).__name__}")
    try:
        policy = InitPolicy.from_dict(data)
    except PolicyError as err:
        raise PolicyError(f"{path}: {err}") from None
    return replace(policy, base_dir=str(path.resolve().parent), source=str(path))


def save_policy(policy: InitPolicy | Mapping, path: str | os.PathLike) -> pathlib.Path:
    """Write a policy as UTF-8 JSON (indent 2, trailing newline), atomically; return the path.

    A mapping is validated first. The text goes to a temporary file in the target's folder, is flushed
    and fsynced, then ``os.replace``-d over the target, so a reader never sees a half-written file.
    Missing parent folders are created. A policy whose text would exceed ``MAX_BYTES`` is refused.
    """
    if not isinstance(policy, InitPolicy):
        if not isinstance(policy, Mapping):
            _fail("policy", f"expected an InitPolicy or a dict, got {type(policy).__name__}")
        policy = InitPolicy.from_dict(policy)
    text = json.dumps(policy.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    data = text.encode("utf-8")
    if len(data) > MAX_BYTES:
        _fail("policy", f"serialized size {len(data)} bytes exceeds {MAX_BYTES} bytes (10 MB)")
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


# ----------------------------------------------------------------------------------------------------------
# Planning: the per-layer decision for a discovered model, checked before anything is written.
# ----------------------------------------------------------------------------------------------------------


# how a rule that matches no layer is answered (``validate`` has no strict=False, and says its own)
UNMATCHED_RULE_HINT = "fix the name, or pass strict=False to allow rules that match nothing"


def unmatched_names(policy: InitPolicy, names: Sequence[str]) -> list[tuple[int, str]]:
    """``(rule index, layer)`` of each rule whose ``layer`` is an exact name (no glob characters) that is none
    of ``names``: a rule written for another model, which matches nothing here."""
    known = set(names)
    return [(index, rule.layer) for index, rule in enumerate(policy.rules)
            if rule.layer is not None and _is_exact_name(rule.layer) and rule.layer not in known]


def _check_exact_names(policy: InitPolicy, names: Sequence[str]) -> None:
    """Refuse a rule whose ``layer`` is an exact name (no glob characters) that names no discovered layer."""
    missing = unmatched_names(policy, names)
    if not missing:
        return
    index, name = missing[0]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; close: {', '.join(close)}" if close else ""
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    _fail(
        f"rules[{index}].layer",
        f"{name!r} matches no layer of the model (layers: {shown}){hint}; {UNMATCHED_RULE_HINT}",
    )


def _check_fits(layer: LayerInfo, index: int | None, spec: InitSpec) -> None:
    """Refuse a scheme whose families do not include the layer's (delta_orthogonal on a Linear...)."""
    families = scheme_families(spec.scheme)
    if layer.family in families:
        return
    where = f"rules[{index}].scheme" if index is not None else "default.scheme"
    _fail(
        where,
        f"{spec.scheme!r} does not fit layer {layer.name!r} ({layer.type}, {layer.family} family); "
        f"it fits: {', '.join(sorted(families))}",
    )


def plan(
    policy: InitPolicy, layers: Sequence[LayerInfo], *, strict: bool = True
) -> list[tuple[LayerInfo, int | None, InitSpec]]:
    """Per discovered layer, in the given order: ``(layer, rule index or None, InitSpec)``.

    Checks before anything is written: with ``strict``, every exact-name ``layer`` selector must name a
    discovered layer; every resolved scheme must fit its layer's family. Norm layers not named by a rule
    get ``(None, InitSpec("keep"))``. ``policy`` may also be anything ``load_policy`` takes.
    """
    policy = load_policy(policy)
    layers = list(layers)
    if strict:
        _check_exact_names(policy, [layer.name for layer in layers])
    decisions: list[tuple[LayerInfo, int | None, InitSpec]] = []
    for layer in layers:
        index, spec = policy.resolve(layer)
        _check_fits(layer, index, spec)
        decisions.append((layer, index, spec))
    return decisions
