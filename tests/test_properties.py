"""Property tests (issue 7): reading a policy never fails with anything but ``PolicyError``, whatever the
JSON (or bytes) holds; ``apply_policy`` on randomly built small MLPs and CNNs with random valid policies
either initializes every weight to a finite value, or refuses with ``PolicyError`` and leaves the model
exactly as it was (no half-applied model)."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from initsearch.errors import PolicyError
from initsearch.init.activations import ACTIVATIONS
from initsearch.init.apply import apply_policy
from initsearch.init.policy import InitPolicy, load_policy
from initsearch.proxy.models import build_model
from tests.test_policy import init_dicts, policy_dicts


@pytest.fixture(autouse=True)
def _no_flush_denormal():
    """Subnormal floats as IEEE says (hypothesis checks the floats it draws, subnormals included), whatever
    code that ran before in this process left set (a study flushes them to zero while it runs)."""
    torch.set_flush_denormal(False)
    yield


SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keys the parser knows (so random objects reach its deeper checks), and a few it does not.
KEYS = ["format", "version", "rules", "default", "lsuv", "provenance", "layer", "type", "activation", "position",
        "scheme", "gain", "scale", "mode", "std", "a", "value", "bias", "enabled", "target_std", "tol", "max_iter",
        "extra"]
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**400),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]),
    st.text(max_size=8), st.sampled_from(["initsearch-policy", "kaiming_normal", "auto", "fan_in", "zeros", "net.*"]),
)
JSONISH = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), inner, max_size=5)),
    max_leaves=20,
)


def _parse(value: Any) -> InitPolicy | None:
    """``InitPolicy.from_dict`` and ``load_policy`` on the same value; both agree on success or PolicyError."""
    try:
        direct = InitPolicy.from_dict(value)
    except PolicyError:
        direct = None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.json"
        path.write_text(json.dumps(value), encoding="utf-8")  # NaN/Infinity written as such: refused on reading
        try:
            from_file = load_policy(path)
        except PolicyError:
            from_file = None
    if direct is not None and from_file is not None:
        assert from_file == direct
    return direct


@SETTINGS
@given(JSONISH)
def test_any_json_value_parses_or_raises_policy_error(value):
    _parse(value)  # anything else (TypeError, RecursionError, OverflowError...) fails the test


@SETTINGS
@given(policy_dicts(), st.data())
def test_a_valid_policy_with_one_field_replaced_parses_or_raises_policy_error(policy, data):
    """Start from a valid policy and replace one value at any depth by an arbitrary one."""
    node: Any = policy
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        if isinstance(node[key], (dict, list)) and node[key] and data.draw(st.booleans()):
            node = node[key]
            continue
        node[key] = data.draw(JSONISH)
        break
    _parse(policy)


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_in_a_policy_file_load_or_raise_policy_error(raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.json"
        path.write_bytes(raw)
        try:
            load_policy(path)
        except PolicyError:
            pass


# ---- apply_policy on random models -------------------------------------------------------------------------------
@st.composite
def small_models(draw) -> tuple[torch.nn.Module, torch.Tensor]:
    """A small MLP or CNN (random depth, widths, activations, norms) and an input batch for it."""
    acts = st.sampled_from(ACTIVATIONS)
    if draw(st.booleans()):
        depth = draw(st.integers(1, 4))
        cfg = {"name": "mlp", "depth": depth, "width": draw(st.integers(1, 8)),
               "activation": draw(st.lists(acts, min_size=depth - 1, max_size=depth - 1)),
               "norm": draw(st.sampled_from([None, "batch", "layer"]))}
        shape: tuple[int, ...] = (draw(st.integers(1, 6)),)
    else:
        channels = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
        fc = draw(st.sampled_from([None, 3]))
        cfg = {"name": "cnn", "channels": channels, "kernel_size": draw(st.sampled_from([1, 2, 3])),
               "activation": draw(st.lists(acts, min_size=len(channels) + (fc is not None),
                                           max_size=len(channels) + (fc is not None))),
               "norm": draw(st.sampled_from([None, "batch"])), "fc_width": fc}
        side = draw(st.integers(2, 6))
        shape = (draw(st.integers(1, 3)), side, side)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(draw(st.integers(0, 2**16)))
        model = build_model(cfg, shape, draw(st.integers(1, 4)))
        x = torch.randn(draw(st.integers(2, 8)), *shape)
    return model, x


@st.composite
def policies_for(draw, model: torch.nn.Module) -> dict[str, Any]:
    """A valid policy whose rules name the model's own layers (exactly or by glob), or a layer it lacks,
    or select by type/position/activation; its init fields are any valid ones."""
    names = [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    layer = st.one_of(st.sampled_from(names), st.sampled_from(["*", "fc*", "conv*", "out", "missing_layer"]))
    rules = []
    for _ in range(draw(st.integers(0, 4))):
        rule: dict[str, Any] = {}
        if draw(st.booleans()):
            rule["layer"] = draw(layer)
        if draw(st.booleans()):
            rule["type"] = draw(st.sampled_from(["linear", "conv", "norm", "Linear", "Conv2d"]))
        if draw(st.booleans()):
            rule["position"] = draw(st.sampled_from(["first", "hidden", "last"]))
        rules.append({**rule, **draw(init_dicts())})
    policy: dict[str, Any] = {"format": "initsearch-policy", "version": 1, "rules": rules}
    if draw(st.booleans()):
        policy["default"] = draw(init_dicts())
    if draw(st.booleans()):
        policy["lsuv"] = {"enabled": draw(st.booleans()), "max_iter": draw(st.integers(1, 20))}
    return policy


@SETTINGS
@given(st.data())
def test_apply_policy_is_all_or_nothing_and_leaves_finite_weights(data):
    model, x = data.draw(small_models())
    policy = data.draw(policies_for(model))
    strict = data.draw(st.booleans())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        apply_policy(model, policy, example_batch=x, seed=0, strict=strict)
    except PolicyError as exc:
        event(f"refused: {str(exc).split(':')[0]}")
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "a refused policy changed the model"
        return
    event("applied")
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), f"{name} is not finite after applying {policy}"
