"""Search spaces: every sampled policy is valid for the proxy; the choices fit each layer; baselines."""
from __future__ import annotations

import optuna
import pytest
import torch

from initsearch import apply_policy, discover_layers
from initsearch.contenders.baselines import BASELINE_NAMES, BASELINES, baseline_policy
from initsearch.contenders.names import ALL_BASELINES, LEARNED_BASELINES, PRETRAINED_BASELINES
from initsearch.errors import ConfigError
from initsearch.init.policy import plan
from initsearch.init.schemes import SCHEME_SPECS
from initsearch.proxy.models import build_model
from initsearch.search.space import space_from_config
from tests.conftest import compose_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space(name: str):
    cfg = compose_config([f"search_space={name}"])
    return space_from_config(dict(cfg.search_space))


def _layers(model_cfg, shape=(1, 8, 8)):
    model = build_model(model_cfg, shape, 10)
    return model, discover_layers(model, torch.randn(4, *shape)).layers


MLP = {"name": "mlp", "depth": 5, "width": 32, "activation": ["relu", "tanh", "relu", "relu"]}
CNN = {"name": "cnn", "channels": [8, 8, 16]}


@pytest.mark.parametrize("space", ["hybrid", "grouped", "free", "scales_only"])
@pytest.mark.parametrize("model_cfg", [MLP, CNN])
def test_sampled_policies_apply_cleanly(space, model_cfg):
    s = _space(space)
    model, layers = _layers(model_cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(15):
        trial = study.ask()
        policy = s.sample(trial, layers)
        report = apply_policy(model, policy, example_batch=torch.randn(16, 1, 8, 8), seed=0)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert all(r.rule is not None for r in report.layers)  # every weighted layer is covered by a rule
        study.tell(trial, 0.0)


def test_hybrid_offers_schemes_that_fit_the_activation_and_shape():
    s = _space("hybrid")
    _, layers = _layers(MLP)
    by_name = {layer.name: layer for layer in layers}
    textbook = {"pytorch_default", "xavier_uniform", "lecun_normal", "kaiming_normal", "orthogonal"}  # every baseline's
    assert set(s.choices(by_name["fc2"])) == textbook | {"xavier_normal", "identity"}  # tanh, 32x32
    assert set(s.choices(by_name["fc1"])) == textbook | {"kaiming_uniform"}  # relu, 64 in -> 32 out: narrowing
    assert "zeros" in s.choices(by_name["out"]) and "delta_orthogonal" not in s.choices(by_name["fc3"])
    _, conv_layers = _layers(CNN)
    conv2 = {layer.name: layer for layer in conv_layers}["conv2"]
    assert "delta_orthogonal" in s.choices(conv2) and "identity" in s.choices(conv2)
    conv3 = {layer.name: layer for layer in conv_layers}["conv3"]  # 8 -> 16 channels: widening
    assert "identity" in s.choices(conv3)  # Dirac on its first 8 channels
    assert "zeros" not in s.choices(conv2)


RESCNN = {"name": "rescnn", "channels": [8, 16], "blocks_per_stage": 2}
DEEP_MLP = {"name": "mlp", "depth": 12, "width": 16, "activation": "relu"}


def _layer_specs(policy, layers):
    """What a policy does to each layer, as data: scheme, the gain as a number, scale, mode, bias."""
    return [(layer.name, spec.scheme, spec.resolved_gain(layer.activation, layer.activation_param)
             if "gain" in SCHEME_SPECS[spec.scheme].params else None, spec.scale, spec.mode, spec.bias)
            for layer, _, spec in plan(policy, layers)]


@pytest.mark.parametrize("space", ["hybrid", "grouped"])
@pytest.mark.parametrize("model_cfg", [MLP, CNN, RESCNN, DEEP_MLP], ids=["mlp", "cnn", "rescnn", "deep_mlp"])
def test_every_baseline_is_a_point_of_the_shipped_spaces(space, model_cfg):
    """For each textbook baseline, the parameters ``params_for`` finds make ``sample`` draw the baseline's
    policy: the same init per layer, the same LSUV settings, and the same weights from the same seed."""
    s = _space(space)
    model, layers = _layers(model_cfg)
    batch = torch.randn(32, 1, 8, 8)
    for name in BASELINE_NAMES:
        expected = baseline_policy(name)
        drawn = s.sample(optuna.trial.FixedTrial(s.params_for(expected, layers)), layers)
        assert _layer_specs(drawn, layers) == _layer_specs(expected, layers), name
        assert drawn.lsuv == expected.lsuv, name
        a, b = build_model(model_cfg, (1, 8, 8), 10), build_model(model_cfg, (1, 8, 8), 10)
        apply_policy(a, expected, example_batch=batch, seed=3)
        apply_policy(b, drawn, example_batch=batch, seed=3)
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values())), name


@pytest.mark.parametrize("space", ["hybrid", "grouped"])
def test_residual_branch_ends_may_start_at_zero(space):
    """Fixup/SkipInit: the branch ends of a ResCNN may draw zeros, and only they (with the last layer)."""
    s = _space(space)
    model, layers = _layers(RESCNN)
    ends = [layer for layer in layers if layer.branch_last]
    assert len(ends) == 4 and all("zeros" in s.choices(layer) for layer in ends)
    assert not any("zeros" in s.choices(layer) for layer in layers if not layer.branch_last and layer.position != "last")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_zero = False
    for _ in range(30):
        trial = study.ask()
        policy = s.sample(trial, layers)
        report = apply_policy(model, policy, example_batch=torch.randn(8, 1, 8, 8), seed=0)
        zeroed = {r.name for r in report.layers if r.scheme == "zeros"}
        assert zeroed <= {layer.name for layer in ends} | {"out"}
        seen_zero |= any(layer.name in zeroed for layer in ends)
        if space == "grouped":  # the branch ends are a role, and its rule comes before the hidden layers'
            positions = [r.position for r in policy.rules]
            assert positions.index("branch_last") < positions.index("hidden") and policy.version == 2
        study.tell(trial, 0.0)
    assert seen_zero


def test_rescale_off_or_lsuv_on_gives_exact_unit_scales():
    s = _space("hybrid")
    _, layers = _layers(MLP)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_rescaled = seen_plain = False
    for _ in range(40):
        trial = study.ask()
        policy = s.sample(trial, layers)
        scales = [r.init.scale for r in policy.rules]
        if policy.lsuv is not None or not trial.params.get("rescale"):
            assert all(v == 1.0 for v in scales)
            assert not any(k.startswith("log2_scale") for k in trial.params)
            seen_plain = True
        else:
            assert all(0.5 <= v <= 2.0 for v in scales if v != 1.0)
            seen_rescaled = True
        study.tell(trial, 0.0)
    assert seen_plain and seen_rescaled


def test_grouped_space_is_small_for_deep_nets_and_uses_role_selectors():
    s = _space("grouped")
    _, layers = _layers({"name": "mlp", "depth": 24, "width": 16, "activation": "relu"})
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    policy = s.sample(trial, layers)
    assert len(policy.rules) == 3  # first, hidden relu linear, last
    assert [r.position for r in policy.rules] == ["first", "hidden", "last"]
    assert all(r.layer is None for r in policy.rules)
    assert len([k for k in trial.params if k.startswith("scheme:")]) == 3
    # the same policy transfers to a deeper variant
    deeper, _ = _layers({"name": "mlp", "depth": 40, "width": 16, "activation": "relu"})
    report = apply_policy(deeper, policy, example_batch=torch.randn(8, 1, 8, 8))
    assert len(report.layers) == 40 and all(r.rule is not None for r in report.layers)


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_baselines_are_valid_policies_that_cover_every_layer(name):
    model, _ = _layers(MLP)
    report = apply_policy(model, baseline_policy(name), example_batch=torch.randn(64, 1, 8, 8), seed=0)
    assert all(r.scheme != "keep" for r in report.layers)
    assert (report.lsuv is not None) == (name == "lsuv")


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"name": "nope"}, "search_space.name"),
        ({"schemes": {"relu": ["he_magic"]}}, "search_space.schemes.relu[0]"),
        ({"schemes": {"swish": ["orthogonal"]}}, "search_space.schemes.swish"),
        ({"scale_log2": [2, -2]}, "search_space.scale_log2"),
        ({"bias": ["ones"]}, "search_space.bias"),
        ({"lsuv": ["yes"]}, "search_space.lsuv"),
        ({"gain": -1}, "search_space.gain"),
    ],
)
def test_bad_space_config_names_the_key(patch, key):
    cfg = dict(compose_config([]).search_space)
    cfg.update(patch)
    with pytest.raises(ConfigError) as info:
        space_from_config(cfg)
    assert str(info.value).startswith(key + ":")


def test_the_names_settings_check_are_the_baselines_that_exist():
    assert set(BASELINE_NAMES) == {*BASELINES, "lsuv"}
    assert set(ALL_BASELINES) == {*BASELINE_NAMES, *LEARNED_BASELINES, *PRETRAINED_BASELINES}
    for name in BASELINE_NAMES:
        assert baseline_policy(name).default is not None
