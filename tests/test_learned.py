"""GradInit and MetaInit (initsearch.contenders.learned): they repair deliberately bad inits, count their
passes, respect their bounds, and turn into ordinary policies that reproduce the weights they wrote."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from initsearch.contenders.baselines import baseline_policy
from initsearch.contenders.learned import (
    LearnedInitResult,
    gq_tensor,
    gradinit,
    learned_base_policy,
    learned_policy,
    metainit,
    one_step_loss,
    run_learned_baseline,
)
from initsearch.contenders.names import LEARNED_BASELINES, learned_method
from initsearch.errors import ConfigError, PolicyError
from initsearch.init.apply import apply_policy
from initsearch.init.diagnostics import gradient_quotient
from initsearch.init.layers import discover_layers
from initsearch.init.policy import InitPolicy
from initsearch.proxy.models import MLP
from initsearch.proxy.train import TrainConfig, train_run
from tests.conftest import TensorData

N_IN, N_CLASSES = 16, 4


def make_data(n: int = 1024) -> TensorData:
    """A learnable problem: the class is the argmax of a fixed random linear map of Gaussian inputs, plus
    a little noise (a linear model reaches ~90%, chance is 25%)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, N_IN, generator=g)
    teacher = torch.randn(N_IN, N_CLASSES, generator=g)
    y = (x @ teacher + 0.3 * torch.randn(n, N_CLASSES, generator=g)).argmax(1)
    split = 3 * n // 4
    return TensorData(x[:split], y[:split], x[split:], y[split:], N_CLASSES, (N_IN,))


DATA = make_data()
TRAIN = TrainConfig(steps=150, batch_size=64, lr=0.05, momentum=0.9, eval_every=50, divergence_factor=10.0)


def he_policy(factor: float = 1.0) -> InitPolicy:
    default = {"scheme": "kaiming_normal", "gain": "auto"}
    if factor != 1.0:
        default["scale"] = factor
    return InitPolicy.from_dict({"format": "initsearch-policy", "version": 1, "rules": [], "default": default})


def fresh(seed: int = 0, **kw) -> MLP:
    """A 6-layer ReLU MLP (5 hidden layers of 32), built under ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP((N_IN,), N_CLASSES, depth=kw.pop("depth", 6), width=kw.pop("width", 32), **kw)


def bad_net(factor: float, seed: int = 0, **kw) -> MLP:
    """He init with every weight multiplied by ``factor`` (x0.1: the signal vanishes, x10: it explodes
    by 10^6 over the six layers)."""
    model = fresh(seed, **kw)
    apply_policy(model, he_policy(factor), seed=seed)
    return model


def late_loss(curve) -> float:
    return float(np.mean(curve.train_loss[-10:]))


def early_loss(curve) -> float:
    return float(np.mean(curve.train_loss[:5]))


def random_batch_gq(model) -> float:
    """GQ (measured by initsearch.init.diagnostics) on one fixed random batch, as MetaInit sees its data."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(128, N_IN, generator=g)
    y = torch.randint(0, N_CLASSES, (128,), generator=g)
    return gradient_quotient(model, x, y)


BAD_CURVES: dict[float, object] = {}


def bad_start_curve(factor: float):
    """The training curve of the bad init without any learned init (computed once per factor)."""
    if factor not in BAD_CURVES:
        BAD_CURVES[factor] = train_run(bad_net(factor), DATA, TRAIN, seed=0)
    return BAD_CURVES[factor]


# ---- the bad starts are really bad ----------------------------------------------------------------------------------
def test_bad_starts_do_not_train():
    small, large = bad_start_curve(0.1), bad_start_curve(10.0)
    assert late_loss(small) > 0.9 * math.log(N_CLASSES)  # stuck near chance
    assert large.diverged


# ---- GradInit -------------------------------------------------------------------------------------------------------
def test_gradinit_rescues_a_too_small_init():
    model = bad_net(0.1)
    before = one_step_loss(model, DATA.x_train, DATA.y_train, draws=16)
    result = gradinit(model, DATA.x_train, DATA.y_train, iterations=100, lr=0.1)
    after = one_step_loss(model, DATA.x_train, DATA.y_train, draws=16)
    assert after < before
    assert np.mean(result.history[-10:]) < np.mean(result.history[:10])
    weights = [v for k, v in result.scales.items() if not k.endswith(".bias")]
    assert len(weights) == 6 and min(weights) > 2.0  # every layer was scaled up
    curve = train_run(model, DATA, TRAIN, seed=0)
    assert not curve.diverged
    assert late_loss(curve) < 0.5 * early_loss(curve)
    assert late_loss(curve) < 0.5 * late_loss(bad_start_curve(0.1))


def test_gradinit_tames_an_exploding_init():
    model = bad_net(10.0)
    result = gradinit(model, DATA.x_train, DATA.y_train)  # defaults: 100 iterations, lr 0.01
    assert result.history[0] > 1e3  # the one-step loss of the exploding net
    assert np.mean(result.history[-10:]) < 2.0
    assert result.details["gradient_norm_steps"] > 0  # the gradient-norm constraint did the shrinking
    assert max(v for k, v in result.scales.items() if not k.endswith(".bias")) < 0.5
    curve = train_run(model, DATA, TRAIN, seed=0)
    assert not curve.diverged  # the bad start diverges (test_bad_starts_do_not_train)
    assert late_loss(curve) < 0.5 * early_loss(curve)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradinit_counts_its_passes(optimizer):
    iterations = 25
    result = gradinit(bad_net(10.0), DATA.x_train, DATA.y_train, iterations=iterations, lr=0.1, optimizer=optimizer)
    constrained = result.details["gradient_norm_steps"]
    assert 0 < constrained < iterations  # both branches ran
    per_step = 4 if optimizer == "sgd" else 2
    assert result.forward_passes == 2 * iterations
    assert result.backward_passes == per_step * (iterations - constrained) + 3 * constrained
    assert len(result.history) == iterations and all(math.isfinite(h) for h in result.history)
    assert result.details["norm"] == ("l2" if optimizer == "sgd" else "l1")
    assert result.seconds > 0


def test_gradinit_respects_min_scale_and_writes_base_times_scale():
    model = bad_net(10.0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = gradinit(model, DATA.x_train, DATA.y_train, iterations=60, lr=0.1, min_scale=0.3)
    weights = {k: v for k, v in result.scales.items() if not k.endswith(".bias")}
    assert min(weights.values()) >= 0.3
    assert min(weights.values()) == pytest.approx(0.3)  # it pushed against the bound
    for name, scale in weights.items():
        assert torch.allclose(model.get_submodule(name).weight, base[f"{name}.weight"] * scale)
    for name in weights:  # zero biases stay zero, and their scale never moves
        assert result.scales[f"{name}.bias"] == 1.0
        assert torch.count_nonzero(model.get_submodule(name).bias) == 0


def test_gradinit_is_deterministic_with_a_seed():
    runs = [gradinit(bad_net(0.1), DATA.x_train, DATA.y_train, iterations=15, lr=0.1, seed=s) for s in (3, 3, 4)]
    assert runs[0].scales == runs[1].scales and runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history


def test_gradinit_leaves_batchnorm_dropout_and_grads_alone():
    model = bad_net(1.0, norm="batch", dropout=0.5)
    model.eval()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = gradinit(model, DATA.x_train, DATA.y_train, iterations=10, lr=0.05, seed=0)
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(p.grad is None and p.requires_grad == flags[n] for n, p in model.named_parameters())
    assert "norm1" in result.scales and "norm1.bias" in result.scales  # BN weight and bias are scaled too
    # dropout is off while GradInit runs: the same seed gives the same history whatever the global RNG holds
    torch.manual_seed(999)
    again = gradinit(bad_net(1.0, norm="batch", dropout=0.5), DATA.x_train, DATA.y_train, iterations=10, lr=0.05)
    assert again.history == result.history


def test_gradinit_refuses_bad_arguments():
    model = fresh()
    with pytest.raises(ValueError, match="iterations"):
        gradinit(model, DATA.x_train, DATA.y_train, iterations=0)
    with pytest.raises(ValueError, match="optimizer"):
        gradinit(model, DATA.x_train, DATA.y_train, optimizer="rmsprop")
    with pytest.raises(ValueError, match="min_scale"):
        gradinit(model, DATA.x_train, DATA.y_train, min_scale=0.0)
    with pytest.raises(ValueError, match="y:"):
        gradinit(model, DATA.x_train, DATA.y_train[:5])


# ---- MetaInit -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [0.1, 10.0])
def test_metainit_lowers_the_gradient_quotient_and_the_net_trains(factor):
    model = bad_net(factor)
    before = random_batch_gq(model)
    result = metainit(model, DATA.x_train[:128], steps=100)
    after = random_batch_gq(model)
    assert after < 0.7 * before
    assert np.mean(result.history[-10:]) < 0.7 * result.history[0]
    curve = train_run(model, DATA, TRAIN, seed=0)
    assert not curve.diverged
    assert late_loss(curve) < 0.5 * early_loss(curve)
    if factor == 0.1:
        assert late_loss(curve) < 0.5 * late_loss(bad_start_curve(0.1))


def test_metainit_counts_passes_tunes_only_weights_and_respects_bounds():
    model = bad_net(10.0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = metainit(model, DATA.x_train[:64], steps=20, min_scale=0.9)
    assert result.forward_passes == 20 and result.backward_passes == 6 * 20 and len(result.history) == 20
    assert set(result.scales) == {"fc1", "fc2", "fc3", "fc4", "fc5", "out"}  # weights only, no biases
    assert min(result.scales.values()) == pytest.approx(0.9)  # the x10 net is pushed down to the bound
    for name, scale in result.scales.items():
        assert scale >= 0.9
        assert torch.allclose(model.get_submodule(name).weight, base[f"{name}.weight"] * scale)
        assert torch.equal(model.get_submodule(name).bias, base[f"{name}.bias"])
    assert all(p.grad is None for p in model.parameters())


def test_metainit_is_deterministic_with_a_seed():
    runs = [metainit(bad_net(0.1), DATA.x_train[:64], steps=8, seed=s) for s in (1, 1, 2)]
    assert runs[0].scales == runs[1].scales and runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history


def test_metainit_with_the_given_batch_and_bad_arguments():
    model = bad_net(0.1)
    result = metainit(model, DATA.x_train[:64], DATA.y_train[:64], steps=5, random_batch=False)
    assert len(result.history) == 5 and result.details["random_batch"] is False
    with pytest.raises(ValueError, match="y:"):
        metainit(model, DATA.x_train[:64], None, steps=5, random_batch=False)
    with pytest.raises(ValueError, match="momentum"):
        metainit(model, DATA.x_train[:64], momentum=1.0)
    with pytest.raises(ValueError, match="floating-point"):
        metainit(model, torch.zeros(4, N_IN, dtype=torch.long))


def test_gq_tensor_matches_the_diagnostic():
    model = bad_net(1.0, depth=3, width=16)
    x, y = DATA.x_train[:32], DATA.y_train[:32]
    weights = [p for p in model.parameters() if p.dim() >= 2]
    value = gq_tensor(F.cross_entropy(model(x), y), weights, create_graph=False)
    assert float(value.detach()) == pytest.approx(gradient_quotient(model, x, y), rel=1e-4)
    for p in model.parameters():
        p.grad = None


# ---- the result as a policy ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LEARNED_BASELINES)
def test_learned_policy_round_trips_and_reproduces_the_weights(name):
    seed = 7
    model = fresh(seed)
    policy, result = run_learned_baseline(name, model, DATA.x_train, DATA.y_train, seed=seed,
                                          options={"iterations": 15} if learned_method(name) == "gradinit" else {"steps": 10})
    assert isinstance(result, LearnedInitResult) and result.method == learned_method(name)
    assert any(abs(v - 1.0) > 1e-3 for v in result.scales.values())  # the method did change the scales
    data = json.loads(json.dumps(policy.to_dict()))
    again = InitPolicy.from_dict(data)
    assert again == policy and again.to_dict() == policy.to_dict()
    assert data["provenance"]["method"] == learned_method(name)
    assert data["provenance"]["backward_passes"] == result.backward_passes
    for rule in data["rules"]:
        assert rule["scheme"] == "kaiming_normal"
        assert rule["scale"] == pytest.approx(result.scales[rule["layer"]])
    replay = fresh(seed)
    apply_policy(replay, again, example_batch=DATA.x_train[:8], seed=seed)
    for (n, p), (_, q) in zip(model.named_parameters(), replay.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), n


def test_learned_policy_writes_norm_layers_only_when_rescaled():
    model = fresh(1, norm="batch")
    policy, result = run_learned_baseline("gradinit", model, DATA.x_train, DATA.y_train, seed=1,
                                          options={"iterations": 10, "lr": 0.1})
    norm_rules = [r for r in policy.to_dict()["rules"] if r["layer"].startswith("norm")]
    assert norm_rules and all(r["scheme"] == "keep" for r in norm_rules)
    replay = fresh(1, norm="batch")
    apply_policy(replay, policy, example_batch=DATA.x_train[:8], seed=1)
    for (n, p), (_, q) in zip(model.named_parameters(), replay.named_parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), n


def test_learned_policy_refuses_what_a_policy_cannot_say():
    model = fresh()
    layers = discover_layers(model, DATA.x_train[:4]).layers
    result = LearnedInitResult("gradinit", {"fc1": 2.0, "fc1.bias": 3.0}, 1, 1, [1.0], 0.0)
    random_bias = InitPolicy.from_dict({"format": "initsearch-policy", "version": 1, "rules": [],
                                        "default": {"scheme": "kaiming_normal", "bias": "pytorch_default"}})
    with pytest.raises(PolicyError, match="fc1.bias"):
        learned_policy(random_bias, result, layers)
    constant_bias = InitPolicy.from_dict({"format": "initsearch-policy", "version": 1, "rules": [],
                                          "default": {"scheme": "kaiming_normal", "bias": 0.5}})
    rule = learned_policy(constant_bias, result, layers).to_dict()["rules"][0]
    assert rule == {"layer": "fc1", "scheme": "kaiming_normal", "scale": 2.0, "bias": 1.5}
    with pytest.raises(PolicyError, match="lsuv"):
        learned_policy(baseline_policy("lsuv"), result, layers)
    stray = LearnedInitResult("metainit", {"not_a_layer": 0.5}, 1, 1, [1.0], 0.0)
    with pytest.raises(PolicyError, match="not_a_layer"):
        learned_policy(he_policy(), stray, layers)
    huge = LearnedInitResult("metainit", {"fc1": 100.0}, 1, 1, [1.0], 0.0)
    scaled_base = InitPolicy.from_dict({"format": "initsearch-policy", "version": 1, "rules": [],
                                        "default": {"scheme": "kaiming_normal", "scale": 2.0}})
    assert learned_policy(scaled_base, huge, layers).to_dict()["rules"][0]["scale"] == 100.0  # clipped into (0, 100]


def test_base_policy_is_the_he_baseline_and_names_are_checked():
    for name in LEARNED_BASELINES:
        assert learned_base_policy(name) == baseline_policy("he")
    with pytest.raises(ConfigError, match="gradinitt"):
        run_learned_baseline("gradinitt", fresh(), DATA.x_train, DATA.y_train, seed=0)
