"""Tests for initsearch.init.policy: the policy file format version 1 (policy-format.md)."""
from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from initsearch.errors import PolicyError
from initsearch.init.activations import ACTIVATIONS
from initsearch.init.layers import LayerInfo
from initsearch.init.policy import (
    INIT_KEYS,
    MAX_BYTES,
    MAX_DEPTH,
    InitPolicy,
    InitSpec,
    LsuvSettings,
    Rule,
    load_policy,
    plan,
    save_policy,
)
from initsearch.init.schemes import BIAS_OPTIONS, FAN_MODES, SCHEME_NAMES, SCHEME_SPECS

# The example of policy-format.md, verbatim.
DOC_EXAMPLE = {
    "format": "initsearch-policy",
    "version": 1,
    "rules": [
        {"layer": "net.0", "scheme": "kaiming_normal", "mode": "fan_in", "scale": 1.12, "bias": "zeros"},
        {"layer": "net.*", "activation": "tanh", "scheme": "xavier_uniform", "gain": "auto"},
        {"position": "last", "scheme": "zeros"},
        {"type": "conv", "position": "hidden", "scheme": "delta_orthogonal", "gain": 1.0, "lsuv": False},
    ],
    "default": {"scheme": "keep"},
    "lsuv": {"enabled": True, "target_std": 1.0, "tol": 0.1, "max_iter": 10},
    "provenance": {"study": "cifar_cnn", "trial": 37, "metric": "auc_loss", "score": 0.412,
                   "created": "2026-11-29T10:00:00Z", "initsearch": "0.1.0", "torch": "2.13.0"},
}


def layer(name, type_="Linear", family="linear", activation="relu", position="hidden", param=None):
    """A LayerInfo with small made-up fans (matching reads only name/type/family/activation/position)."""
    norm = family == "norm"
    return LayerInfo(name=name, type=type_, family=family, fan_in=None if norm else 4,
                     fan_out=None if norm else 4, activation=activation, activation_param=param,
                     position=None if norm else position, index=0, weight_shape=(4,) if norm else (4, 4))


def policy_of(*rules, **top):
    """A policy dict with these rule dicts."""
    return {"format": "initsearch-policy", "version": 1, "rules": list(rules), **top}


def errors_of(data) -> str:
    """The message of the PolicyError that from_dict raises for ``data``."""
    with pytest.raises(PolicyError) as info:
        InitPolicy.from_dict(data)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- the example


def test_doc_example_loads_with_its_values():
    p = InitPolicy.from_dict(DOC_EXAMPLE)
    assert len(p.rules) == 4
    assert p.rules[0] == Rule(InitSpec("kaiming_normal", scale=1.12), layer="net.0")
    assert p.rules[1].init.gain == "auto" and p.rules[1].activation == "tanh"
    assert p.rules[3] == Rule(InitSpec("delta_orthogonal", gain=1.0, lsuv=False), type="conv", position="hidden")
    assert p.default == InitSpec("keep")
    assert p.lsuv == LsuvSettings()
    assert p.provenance["trial"] == 37


def test_doc_example_round_trips_and_is_not_mutated():
    original = copy.deepcopy(DOC_EXAMPLE)
    p = InitPolicy.from_dict(DOC_EXAMPLE)
    assert DOC_EXAMPLE == original
    assert InitPolicy.from_dict(p.to_dict()) == p
    assert InitPolicy.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_to_dict_writes_selectors_then_scheme_then_non_default_fields():
    d = InitPolicy.from_dict(DOC_EXAMPLE).to_dict()
    assert list(d) == ["format", "version", "rules", "default", "lsuv", "provenance"]
    assert d["rules"][0] == {"layer": "net.0", "scheme": "kaiming_normal", "scale": 1.12}
    assert list(d["rules"][3]) == ["type", "position", "scheme", "gain", "lsuv"]
    assert d["default"] == {"scheme": "keep"}
    minimal = InitPolicy(rules=()).to_dict()
    assert minimal == {"format": "initsearch-policy", "version": 1, "rules": [], "default": {"scheme": "keep"}}


def test_absent_sections_take_defaults_and_present_lsuv_fills_defaults():
    p = InitPolicy.from_dict(policy_of())
    assert p.default == InitSpec("keep") and p.lsuv is None and p.provenance is None
    q = InitPolicy.from_dict(policy_of(lsuv={"tol": 0.5}))
    assert q.lsuv == LsuvSettings(enabled=True, target_std=1.0, tol=0.5, max_iter=10)


def test_file_round_trip_is_exact_and_atomic(tmp_path):
    p = InitPolicy.from_dict(DOC_EXAMPLE)
    target = save_policy(p, tmp_path / "sub" / "policy.json")
    text = target.read_text(encoding="utf-8")
    assert text == json.dumps(p.to_dict(), indent=2, ensure_ascii=False) + "\n"
    assert load_policy(target) == p
    assert load_policy(str(target)) == p
    assert sorted(x.name for x in target.parent.iterdir()) == ["policy.json"]  # no temp file left
    # A refused save leaves the existing file as it was.
    with pytest.raises(PolicyError):
        save_policy({**DOC_EXAMPLE, "version": 3}, target)
    assert target.read_text(encoding="utf-8") == text
    assert sorted(x.name for x in target.parent.iterdir()) == ["policy.json"]


def test_save_accepts_a_dict_and_load_accepts_dict_and_policy(tmp_path):
    path = save_policy(DOC_EXAMPLE, tmp_path / "p.json")
    p = load_policy(path)
    assert load_policy(DOC_EXAMPLE) == p
    assert load_policy(p) is p


def test_non_ascii_text_round_trips(tmp_path):
    p = InitPolicy(rules=(Rule(InitSpec("zeros"), layer="blöck.*"),), provenance={"note": "größe ✓"})
    assert load_policy(save_policy(p, tmp_path / "p.json")) == p


# ------------------------------------------------------------------------------------------------ matching


def test_first_matching_rule_wins_and_default_when_none():
    p = InitPolicy.from_dict(policy_of(
        {"layer": "net.0", "scheme": "zeros"},
        {"layer": "net.*", "scheme": "orthogonal"},
        {"scheme": "kaiming_normal"},
        default={"scheme": "xavier_normal"},
    ))
    assert p.resolve(layer("net.0")) == (0, InitSpec("zeros"))
    assert p.resolve(layer("net.2")) == (1, InitSpec("orthogonal"))
    assert p.resolve(layer("head")) == (2, InitSpec("kaiming_normal"))
    q = InitPolicy.from_dict(policy_of({"layer": "net.*", "scheme": "zeros"}, default={"scheme": "xavier_normal"}))
    assert q.resolve(layer("head")) == (None, InitSpec("xavier_normal"))


def test_layer_selector_exact_and_glob():
    exact = Rule(InitSpec("zeros"), layer="blocks.1.conv")
    assert exact.matches(layer("blocks.1.conv"))
    assert not exact.matches(layer("blocks.10.conv"))
    glob = Rule(InitSpec("zeros"), layer="blocks.*.conv")
    assert glob.matches(layer("blocks.1.conv")) and glob.matches(layer("blocks.10.conv"))
    assert not glob.matches(layer("blocks.1.bn"))
    assert not Rule(InitSpec("zeros"), layer="Blocks.*").matches(layer("blocks.1"))  # case-sensitive
    assert Rule(InitSpec("zeros"), layer="fc[12]").matches(layer("fc2"))
    assert Rule(InitSpec("zeros"), layer="fc?").matches(layer("fc3"))


def test_type_selector_class_name_or_family():
    conv = layer("c", "Conv2d", "conv")
    fc = layer("f", "Linear", "linear")
    assert Rule(InitSpec("zeros"), type="Conv2d").matches(conv)
    assert not Rule(InitSpec("zeros"), type="Conv1d").matches(conv)
    assert Rule(InitSpec("zeros"), type="conv").matches(conv)
    assert not Rule(InitSpec("zeros"), type="conv").matches(fc)
    assert Rule(InitSpec("zeros"), type="linear").matches(fc)
    assert Rule(InitSpec("zeros"), type="Linear").matches(fc)


def test_activation_and_position_selectors_and_all_must_match():
    a = layer("a", activation="tanh", position="first")
    b = layer("b", activation="relu", position="last")
    r = Rule(InitSpec("zeros"), activation="tanh")
    assert r.matches(a) and not r.matches(b)
    r = Rule(InitSpec("zeros"), position="last")
    assert r.matches(b) and not r.matches(a)
    both = Rule(InitSpec("zeros"), activation="tanh", position="last")
    assert not both.matches(a) and not both.matches(b)
    assert Rule(InitSpec("zeros")).matches(a)  # no selector: every layer


def test_norm_layers_are_skipped_by_generic_rules_and_default():
    bn = layer("bn", "BatchNorm2d", "norm")
    generic = InitPolicy.from_dict(policy_of({"scheme": "zeros"}, {"layer": "b*", "scheme": "zeros"},
                                             default={"scheme": "zeros"}))
    assert generic.resolve(bn) == (None, InitSpec("keep"))
    for rule in ({"type": "norm", "scheme": "constant", "value": 0.5},
                 {"type": "BatchNorm2d", "scheme": "constant", "value": 0.5},
                 {"layer": "bn", "scheme": "constant", "value": 0.5}):
        p = InitPolicy.from_dict(policy_of({"scheme": "zeros", "type": "conv"}, rule))
        assert p.resolve(bn) == (1, InitSpec("constant", value=0.5)), rule
    assert not Rule(InitSpec("zeros"), type="LayerNorm").matches(bn)


# --------------------------------------------------------------------------------------------- plan()


def _net():
    return [layer("conv", "Conv2d", "conv", position="first"), layer("bn", "BatchNorm2d", "norm"),
            layer("fc", "Linear", "linear", position="last")]


def test_plan_gives_one_decision_per_layer():
    p = InitPolicy.from_dict(policy_of({"type": "conv", "scheme": "delta_orthogonal"}, {"scheme": "xavier_normal"}))
    decisions = plan(p, _net())
    assert [(lay.name, i, s.scheme) for lay, i, s in decisions] == [
        ("conv", 0, "delta_orthogonal"), ("bn", None, "keep"), ("fc", 1, "xavier_normal")]


def test_plan_strict_refuses_an_exact_name_that_matches_nothing():
    p = InitPolicy.from_dict(policy_of({"layer": "fc", "scheme": "zeros"}, {"layer": "conv2", "scheme": "zeros"}))
    with pytest.raises(PolicyError) as info:
        plan(p, _net())
    message = str(info.value)
    assert "rules[1].layer" in message and "'conv2'" in message and "strict=False" in message
    decisions = plan(p, _net(), strict=False)
    assert [i for _, i, _ in decisions] == [None, None, 0]


def test_plan_strict_lets_a_glob_match_nothing():
    p = InitPolicy.from_dict(policy_of({"layer": "head.*", "scheme": "zeros"}))
    assert [i for _, i, _ in plan(p, _net())] == [None, None, None]


def test_plan_refuses_a_scheme_that_does_not_fit_the_layer_family():
    p = InitPolicy.from_dict(policy_of({"scheme": "delta_orthogonal"}))
    with pytest.raises(PolicyError) as info:
        plan(p, _net())
    message = str(info.value)
    assert "rules[0].scheme" in message and "delta_orthogonal" in message and "'fc'" in message
    p = InitPolicy.from_dict(policy_of(default={"scheme": "delta_orthogonal"}))
    with pytest.raises(PolicyError, match=r"default\.scheme.*'fc'"):
        plan(p, _net())
    p = InitPolicy.from_dict(policy_of({"type": "norm", "scheme": "xavier_normal"}))
    with pytest.raises(PolicyError, match=r"rules\[0\]\.scheme.*xavier_normal.*'bn'"):
        plan(p, _net())


def test_plan_accepts_a_policy_dict():
    assert len(plan(DOC_EXAMPLE | {"rules": []}, _net())) == 3


# ------------------------------------------------------------------------------------------------ gains


def test_resolved_gain_default_auto_and_number():
    assert InitSpec("kaiming_normal").resolved_gain("relu", None) == pytest.approx(math.sqrt(2))
    assert InitSpec("kaiming_uniform").resolved_gain("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04))
    assert InitSpec("xavier_normal").resolved_gain("tanh", None) == 1.0
    assert InitSpec("xavier_normal", gain="auto").resolved_gain("tanh", None) == pytest.approx(5 / 3)
    assert InitSpec("orthogonal", gain=0.5).resolved_gain("relu", None) == 0.5
    assert InitSpec("normal", std=0.02).resolved_gain("relu", None) == 1.0


# ------------------------------------------------------------------------------------------- bad policies


def _with_rule(**fields):
    return policy_of({"scheme": "kaiming_normal", **fields})


BAD_DICTS = [
    ("wrong format", {**policy_of(), "format": "torch-init"}, "format: must be 'initsearch-policy'"),
    ("missing format", {"version": 1, "rules": []}, "format: required"),
    ("version 3", {**policy_of(), "version": 3}, "version: this build reads versions 1 and 2, got 3"),
    ("version string", {**policy_of(), "version": "1"}, "version: must be the integer 1 or 2, got '1'"),
    ("version bool", {**policy_of(), "version": True}, "version: must be the integer 1 or 2, got True"),
    ("unknown top key", {**policy_of(), "rule": []}, "rule: unknown key (known: format"),
    ("rules missing", {"format": "initsearch-policy", "version": 1}, "rules: required"),
    ("rules not a list", {**policy_of(), "rules": {"scheme": "zeros"}}, "rules: must be a list"),
    ("rule not an object", policy_of("zeros"), "rules[0]: must be an object"),
    ("unknown rule key", policy_of({"schme": "zeros"}), "rules[0].schme: unknown key"),
    ("no scheme", policy_of({"layer": "fc"}), "rules[0].scheme: required"),
    ("unknown scheme", policy_of({"scheme": "he"}), "rules[0].scheme: unknown scheme 'he' (known: keep"),
    ("negative scale", _with_rule(scale=-1), "rules[0].scale: must be in (0, 100], got -1"),
    ("huge scale", _with_rule(scale=1e9), "rules[0].scale: must be in (0, 100], got 1000000000.0"),
    ("infinite scale", _with_rule(scale=float("inf")), "rules[0].scale"),
    ("bool scale", _with_rule(scale=True), "rules[0].scale: must be a finite number in (0, 100], got True"),
    ("string scale", _with_rule(scale="2"), "rules[0].scale"),
    ("gain zero", _with_rule(gain=0), "rules[0].gain"),
    ("gain big", _with_rule(gain="big"), "rules[0].gain: must be \"auto\" or a number in (0, 100], got 'big'"),
    ("gain null", _with_rule(gain=None), "rules[0].gain"),
    ("bad mode", _with_rule(mode="fan_avg"), "rules[0].mode: must be one of fan_in, fan_out, got 'fan_avg'"),
    ("std missing", policy_of({"scheme": "normal"}), "rules[0].std: required by scheme 'normal'"),
    ("std to xavier", policy_of({"scheme": "xavier_normal", "std": 0.1}),
     "rules[0].std: not accepted by scheme 'xavier_normal'"),
    ("mode to normal", policy_of({"scheme": "normal", "std": 0.1, "mode": "fan_in"}), "rules[0].mode: not accepted"),
    ("gain to zeros", policy_of({"scheme": "zeros", "gain": 1.0}), "rules[0].gain: not accepted by scheme 'zeros'"),
    ("std zero", policy_of({"scheme": "normal", "std": 0}), "rules[0].std: must be in (0, 100], got 0"),
    ("a bool", policy_of({"scheme": "uniform", "a": False}), "rules[0].a"),
    ("value too big", policy_of({"scheme": "constant", "value": 1e5}), "rules[0].value"),
    ("bias word", _with_rule(bias="random"), "rules[0].bias: must be one of zeros, keep, pytorch_default"),
    ("bias bool", _with_rule(bias=False), "rules[0].bias"),
    ("rule lsuv not bool", _with_rule(lsuv=0), "rules[0].lsuv: must be true or false, got 0"),
    ("empty layer", _with_rule(layer=""), "rules[0].layer"),
    ("layer not str", _with_rule(layer=3), "rules[0].layer"),
    ("type not identifier", _with_rule(type="conv 2d"), "rules[0].type"),
    ("unknown activation", _with_rule(activation="swish"), "rules[0].activation: must be one of relu"),
    ("bad position", _with_rule(position="middle"), "rules[0].position: must be one of first, hidden, last"),
    ("default not object", policy_of(default="keep"), "default: must be an object"),
    ("selector in default", policy_of(default={"scheme": "keep", "layer": "fc"}), "default.layer: selectors"),
    ("unknown default key", policy_of(default={"scheme": "keep", "scal": 2}), "default.scal: unknown key"),
    ("bad default value", policy_of(default={"scheme": "xavier_normal", "gain": -1}), "default.gain"),
    ("lsuv not object", policy_of(lsuv=True), "lsuv: must be an object"),
    ("lsuv unknown key", policy_of(lsuv={"iters": 3}), "lsuv.iters: unknown key"),
    ("lsuv tol zero", policy_of(lsuv={"tol": 0}), "lsuv.tol: must be in (0, 10], got 0"),
    ("lsuv target big", policy_of(lsuv={"target_std": 101}), "lsuv.target_std"),
    ("lsuv max_iter float", policy_of(lsuv={"max_iter": 10.0}), "lsuv.max_iter: must be an integer in [1, 1000]"),
    ("lsuv max_iter bool", policy_of(lsuv={"max_iter": True}), "lsuv.max_iter"),
    ("lsuv enabled int", policy_of(lsuv={"enabled": 1}), "lsuv.enabled"),
    ("provenance not object", policy_of(provenance=["study"]), "provenance: must be an object"),
    ("provenance nan", policy_of(provenance={"score": float("nan")}), "provenance.score"),
    ("provenance object", policy_of(provenance={"when": object()}), "provenance.when"),
    ("top not object", ["format"], "policy: must be an object"),
]


@pytest.mark.parametrize("data, expected", [case[1:] for case in BAD_DICTS], ids=[case[0] for case in BAD_DICTS])
def test_bad_policy_dicts_name_the_field(data, expected):
    assert expected in errors_of(data)


def test_error_is_a_value_error_and_suggests_the_known_key():
    message = errors_of(policy_of({"schme": "zeros"}))
    assert "did you mean 'scheme'" in message
    assert issubclass(PolicyError, ValueError)


def test_deep_provenance_dict_is_refused_without_recursion_error():
    deep: dict = {}
    node = deep
    for _ in range(10_000):
        node["x"] = {}
        node = node["x"]
    assert "nested deeper than 64" in errors_of(policy_of(provenance=deep))
    cyclic: dict = {}
    cyclic["self"] = cyclic
    assert "nested deeper" in errors_of(policy_of(provenance=cyclic))


def test_constructors_validate_too():
    with pytest.raises(PolicyError, match=r"InitSpec\.std: required"):
        InitSpec("normal")
    with pytest.raises(PolicyError, match=r"InitSpec\.std: not accepted by scheme 'xavier_normal'"):
        InitSpec("xavier_normal", std=0.1)
    with pytest.raises(PolicyError, match=r"InitSpec\.scale"):
        InitSpec("kaiming_normal", scale=True)
    with pytest.raises(PolicyError, match=r"Rule\.position"):
        Rule(InitSpec("zeros"), position="middle")
    with pytest.raises(PolicyError, match=r"InitPolicy\.rules\[0\]"):
        InitPolicy(rules=[{"scheme": "zeros"}])
    with pytest.raises(PolicyError, match=r"LsuvSettings\.max_iter"):
        LsuvSettings(max_iter=0)
    spec = InitSpec("normal", std=1)
    assert isinstance(spec.std, float) and spec == InitSpec("normal", std=1.0)
    assert InitPolicy(rules=[Rule(spec)]).rules == (Rule(spec),)


def test_with_provenance_merges_validates_and_keeps_the_original():
    p = InitPolicy.from_dict(DOC_EXAMPLE)
    q = p.with_provenance(trial=38, note="rerun")
    assert q.provenance["trial"] == 38 and q.provenance["study"] == "cifar_cnn" and q.provenance["note"] == "rerun"
    assert p.provenance["trial"] == 37 and q.rules == p.rules
    with pytest.raises(PolicyError, match=r"provenance\.score"):
        p.with_provenance(score=float("inf"))
    with pytest.raises(TypeError):
        q.provenance["trial"] = 1  # read-only


# ------------------------------------------------------------------------------------------- bad files


def _write(tmp_path, content: str | bytes):
    path = tmp_path / "policy.json"
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _load_error(path) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return str(info.value)


def test_file_not_json_gives_line_and_column(tmp_path):
    path = _write(tmp_path, '{\n  "format": "initsearch-policy",\n  "version": ,\n}')
    message = _load_error(path)
    assert str(path) in message and "not valid JSON" in message and "line 3, column 14" in message


def test_an_unterminated_string_says_where_it_starts_once(tmp_path):
    path = _write(tmp_path, '{"format": "initsearch-policy", "version": 1, "rules": [{"layer": "fc')
    assert _load_error(path) == f"{path}: not valid JSON: Unterminated string starting at line 1, column 67"


def test_file_not_utf8(tmp_path):
    path = _write(tmp_path, b'{"format": "initsearch-policy", "version": 1, "rules": [], "provenance": {"x": "\xff"}}')
    assert "not UTF-8" in _load_error(path)


def test_file_over_10_mb_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.json"
    with open(path, "wb") as handle:
        handle.truncate(MAX_BYTES + 1)  # sparse: costs no disk, and would not be JSON if read
    message = _load_error(path)
    assert "larger than" in message and str(MAX_BYTES + 1) in message


def test_file_nested_10000_deep_is_refused(tmp_path):
    text = '{"format": "initsearch-policy", "version": 1, "rules": [], "provenance": {"x": ' + "[" * 10_000 + "]" * 10_000 + "}}"
    assert "nested deeper than 64" in _load_error(_write(tmp_path, text))


def test_file_depth_limit_boundary(tmp_path):
    def nested(levels: int) -> str:  # total depth: top object + provenance object + lists
        inner = "[" * (levels - 2) + "]" * (levels - 2)
        return '{"format": "initsearch-policy", "version": 1, "rules": [], "provenance": {"x": ' + inner + "}}"
    assert load_policy(_write(tmp_path, nested(MAX_DEPTH))).provenance["x"] is not None
    assert "nested deeper" in _load_error(_write(tmp_path, nested(MAX_DEPTH + 1)))
    # Brackets inside strings do not count.
    assert load_policy(_write(tmp_path, json.dumps(policy_of(provenance={"s": "[" * 100})))).provenance["s"] == "[" * 100


def test_file_nan_and_infinity_literals_are_refused_with_the_field(tmp_path):
    text = '{"format": "initsearch-policy", "version": 1, "rules": [{"scheme": "kaiming_normal", "scale": NaN}]}'
    message = _load_error(_write(tmp_path, text))
    assert "rules[0].scale" in message and "NaN" in message
    text = '{"format": "initsearch-policy", "version": 1, "rules": [], "provenance": {"score": -Infinity}}'
    message = _load_error(_write(tmp_path, text))
    assert "provenance.score" in message and "-Infinity" in message


def test_file_errors_carry_the_path_and_the_field(tmp_path):
    path = _write(tmp_path, json.dumps(_with_rule(scale=-1)))
    message = _load_error(path)
    assert message.startswith(str(path)) and "rules[0].scale: must be in (0, 100], got -1" in message
    assert "version: this build reads versions 1 and 2, got 3" in _load_error(_write(tmp_path, json.dumps({**policy_of(), "version": 3})))


def test_file_misc_refusals(tmp_path):
    assert "not found" in _load_error(tmp_path / "missing.json")
    assert "top level must be a JSON object" in _load_error(_write(tmp_path, "[1, 2]"))
    assert "duplicate key 'scale'" in _load_error(
        _write(tmp_path, '{"format": "initsearch-policy", "version": 1, "rules": [{"scheme": "zeros", "scale": 1, "scale": 2}]}'))
    assert "not JSON text" in _load_error('{"format": "initsearch-policy"}')
    with pytest.raises(PolicyError):
        load_policy(42)


def test_file_with_utf8_bom_loads(tmp_path):
    path = _write(tmp_path, b"\xef\xbb\xbf" + json.dumps(DOC_EXAMPLE).encode("utf-8"))
    assert load_policy(path) == InitPolicy.from_dict(DOC_EXAMPLE)


# -------------------------------------------------------------------------------------- property test

_POSITIVE = st.one_of(st.floats(min_value=0, max_value=100, exclude_min=True), st.integers(1, 100))
_CONSTANT = st.one_of(st.floats(min_value=-1e4, max_value=1e4), st.integers(-10_000, 10_000))
_FIELD_VALUES = {
    "gain": st.one_of(st.just("auto"), _POSITIVE),
    "scale": _POSITIVE,
    "mode": st.sampled_from(FAN_MODES),
    "std": _POSITIVE,
    "a": _POSITIVE,
    "value": _CONSTANT,
    "bias": st.one_of(st.sampled_from(BIAS_OPTIONS), _CONSTANT),
    "lsuv": st.booleans(),
}
_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                       st.text(max_size=6))
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                     max_leaves=8)


@st.composite
def init_dicts(draw):
    """The init fields of a valid rule or default: a scheme, its required params, some optional fields."""
    scheme = draw(st.sampled_from(SCHEME_NAMES))
    spec = SCHEME_SPECS[scheme]
    out = {"scheme": scheme}
    for key in INIT_KEYS[1:]:
        if key not in spec.params and key not in ("scale", "bias", "lsuv"):
            continue
        if key in spec.required or draw(st.booleans()):
            out[key] = draw(_FIELD_VALUES[key])
    return out


@st.composite
def rule_dicts(draw):
    """A valid rule: any subset of selectors plus init fields."""
    selectors = {
        "layer": st.text(alphabet="abc.0123*?_", min_size=1, max_size=8),
        "type": st.sampled_from(["Linear", "Conv2d", "BatchNorm2d", "linear", "conv", "norm", "MyLayer"]),
        "activation": st.sampled_from(ACTIVATIONS),
        "position": st.sampled_from(["first", "hidden", "last"]),
    }
    out = {key: draw(strategy) for key, strategy in selectors.items() if draw(st.booleans())}
    return {**out, **draw(init_dicts())}


@st.composite
def policy_dicts(draw):
    """A valid policy dict with optional default, lsuv and provenance sections."""
    data = policy_of(*draw(st.lists(rule_dicts(), max_size=5)))
    if draw(st.booleans()):
        data["default"] = draw(init_dicts())
    if draw(st.booleans()):
        lsuv = {"enabled": st.booleans(), "target_std": _POSITIVE,
                "tol": st.floats(min_value=0, max_value=10, exclude_min=True), "max_iter": st.integers(1, 1000)}
        data["lsuv"] = {key: draw(strategy) for key, strategy in lsuv.items() if draw(st.booleans())}
    if draw(st.booleans()):
        data["provenance"] = draw(st.dictionaries(st.text(max_size=6), _JSON, max_size=4))
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_dicts())
def test_random_valid_policies_round_trip(data):
    p = InitPolicy.from_dict(data)
    d = p.to_dict()
    assert InitPolicy.from_dict(d) == p
    text = json.dumps(d, indent=2, ensure_ascii=False, allow_nan=False)
    assert InitPolicy.from_dict(json.loads(text)) == p
    assert InitPolicy.from_dict(d).to_dict() == d
