"""The init schemes: name -> a small in-place function of (weight, gain, params).

(skeleton: the registry table below is final; the functions are being written)
"""
from __future__ import annotations

from dataclasses import dataclass

WEIGHTED = frozenset({"linear", "conv"})
ALL_FAMILIES = frozenset({"linear", "conv", "norm"})


@dataclass(frozen=True)
class SchemeSpec:
    """What a scheme accepts: the layer families it applies to, its parameters, its default gain.

    ``params`` lists the policy fields besides ``scale``/``bias``/``lsuv`` it reads (a policy that sets any
    other is refused); ``required`` those that must be given. ``default_gain`` is ``None`` for schemes
    without a gain, a number, or ``"auto"`` (from the following activation).
    """

    name: str
    families: frozenset[str]
    params: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    default_gain: float | str | None = None


def _spec(name, families=WEIGHTED, params=(), required=(), default_gain=None) -> SchemeSpec:
    return SchemeSpec(name, frozenset(families), frozenset(params), frozenset(required), default_gain)


SCHEME_SPECS: dict[str, SchemeSpec] = {
    s.name: s
    for s in (
        _spec("keep", ALL_FAMILIES),
        _spec("pytorch_default"),
        _spec("zeros", ALL_FAMILIES),
        _spec("constant", ALL_FAMILIES, params=("value",), required=("value",)),
        _spec("normal", params=("std",), required=("std",)),
        _spec("uniform", params=("a",), required=("a",)),
        _spec("trunc_normal", params=("std",), required=("std",)),
        _spec("xavier_normal", params=("gain",), default_gain=1.0),
        _spec("xavier_uniform", params=("gain",), default_gain=1.0),
        _spec("lecun_normal", params=("gain", "mode"), default_gain=1.0),
        _spec("lecun_uniform", params=("gain", "mode"), default_gain=1.0),
        _spec("kaiming_normal", params=("gain", "mode"), default_gain="auto"),
        _spec("kaiming_uniform", params=("gain", "mode"), default_gain="auto"),
        _spec("orthogonal", params=("gain",), default_gain=1.0),
        _spec("identity", params=("gain",), default_gain=1.0),
        _spec("delta_orthogonal", frozenset({"conv"}), params=("gain",), default_gain=1.0),
    )
}
SCHEME_NAMES: tuple[str, ...] = tuple(SCHEME_SPECS)
