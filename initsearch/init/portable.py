"""Portable policies: a per-layer policy rewritten with role selectors, so it applies to deeper or wider
variants of the network it was found on.

A layer's role is what stays the same when the network grows: ``first`` or ``last`` by position, else a
residual branch end or a hidden layer, each by family (linear/conv) and following activation; norm layers
form one role. When every layer of each role got the same init, one rule per role reproduces the policy
exactly on the original network (checked) and gives a deeper network's extra layers the init their role
got. When a role's layers differ, the policy is not portable and ``PortableResult.differing`` says which
role and how.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from initsearch.init.layers import LayerInfo
from initsearch.init.policy import InitPolicy, InitSpec, Rule, plan


@dataclass(frozen=True)
class PortableResult:
    """The role-based policy (``None`` when some role's layers got different inits), and one line per such
    role naming it and two of its layers with their inits."""

    policy: InitPolicy | None
    differing: tuple[str, ...]


def layer_role(layer: LayerInfo) -> tuple[str, dict[str, str]]:
    """The role's name (e.g. ``hidden conv relu``) and the rule selectors that select it."""
    if layer.family == "norm":
        return "norm", {"type": "norm"}
    if layer.position in ("first", "last"):
        return layer.position, {"position": layer.position}
    position = "branch_last" if layer.branch_last else "hidden"
    return (f"{position} {layer.family} {layer.activation}",
            {"position": position, "type": layer.family, "activation": layer.activation})


def _show(spec: InitSpec) -> str:
    return ", ".join(f"{k} {v}" for k, v in spec.to_dict().items())


_ORDER = {"norm": 0, "first": 1, "last": 2, "branch_last": 3, "hidden": 4}  # branch ends are also hidden


def portable_policy(policy: InitPolicy, layers: Sequence[LayerInfo]) -> PortableResult:
    """``policy`` as role rules, resolved on ``layers`` (the network it was found on, from discovery).

    Keeps the policy's LSUV settings, checkpoints and provenance; norm layers left as they are need no rule.
    """
    roles: dict[str, tuple[dict[str, str], list[tuple[str, InitSpec]]]] = {}
    for layer, _, spec in plan(policy, layers):
        name, selectors = layer_role(layer)
        roles.setdefault(name, (selectors, []))[1].append((layer.name, spec))
    differing, rules = [], []
    for name in sorted(roles, key=lambda n: _ORDER[n.split()[0]]):
        selectors, members = roles[name]
        distinct: dict[InitSpec, str] = {}
        for layer_name, spec in members:
            distinct.setdefault(spec, layer_name)
        if len(distinct) > 1:
            shown = "; ".join(f"{layer_name}: {_show(spec)}" for spec, layer_name in list(distinct.items())[:2])
            differing.append(f"the {name} layers got {len(distinct)} different inits ({shown})")
        elif not (name == "norm" and members[0][1].scheme == "keep"):
            rules.append(Rule(init=members[0][1], **selectors))
    if differing:
        return PortableResult(None, tuple(differing))
    portable = replace(policy, rules=tuple(rules), default=InitSpec("keep"))
    before = [(layer.name, spec) for layer, _, spec in plan(policy, layers)]
    after = [(layer.name, spec) for layer, _, spec in plan(portable, layers)]
    if before != after:  # cannot happen with the rule order above; a wrong file is worse than none
        raise AssertionError(f"the role-based policy differs from the original on {_first_difference(before, after)}")
    return PortableResult(portable, ())


def _first_difference(before: list[tuple[str, Any]], after: list[tuple[str, Any]]) -> str:
    return next((b[0] for b, a in zip(before, after) if b != a), "the layer list")
