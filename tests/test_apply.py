"""apply_policy: the per-layer report, determinism, LSUV, and never a half-initialized model."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import initsearch
from initsearch import PolicyError, apply_policy


def mlp(depth: int = 4, width: int = 64, act=nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    d_in = 20
    for _ in range(depth - 1):
        layers += [nn.Linear(d_in, width), act()]
        d_in = width
    layers.append(nn.Linear(d_in, 5))
    return nn.Sequential(*layers)


def policy(rules, default=None, lsuv=None) -> dict:
    p = {"format": "initsearch-policy", "version": 1, "rules": rules}
    if default is not None:
        p["default"] = default
    if lsuv is not None:
        p["lsuv"] = lsuv
    return p


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rules_apply_first_match_and_report_each_layer():
    torch.manual_seed(0)
    model = mlp(width=512)
    x = torch.randn(64, 20)
    report = apply_policy(
        model,
        policy(
            [
                {"layer": "1", "scheme": "kaiming_normal", "scale": 2.0, "bias": 0.5},
                {"layer": "*", "activation": "relu", "scheme": "xavier_normal"},
                {"position": "last", "scheme": "zeros"},
            ]
        ),
        example_batch=x,
        seed=0,
    )
    rows = {r.name: r for r in report.layers}
    assert [r.name for r in report.layers] == ["1", "3", "5", "7"]
    assert rows["1"].rule == 0 and rows["3"].rule == 1 and rows["7"].rule == 2
    # kaiming with the relu gain, times the scale: std = 2 * sqrt(2 / 20)
    assert rows["1"].gain == pytest.approx(math.sqrt(2))
    assert model[1].weight.std().item() == pytest.approx(2 * math.sqrt(2 / 20), rel=0.05)
    assert torch.all(model[1].bias == 0.5)
    assert model[3].weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.03)
    assert torch.all(model[3].bias == 0)
    assert torch.all(model[7].weight == 0)
    assert rows["7"].std_after == 0.0 and rows["1"].std_after == pytest.approx(model[1].weight.std().item())


def test_same_seed_gives_bit_identical_weights_and_leaves_the_callers_rng_alone():
    p = policy([], default={"scheme": "orthogonal", "gain": "auto", "bias": "pytorch_default"})
    a, b = mlp(), mlp()
    state = torch.random.get_rng_state()
    apply_policy(a, p, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    apply_policy(b, p, seed=7)
    assert same(snapshot(a), snapshot(b))
    apply_policy(b, p, seed=8)
    assert not same(snapshot(a), snapshot(b))


def test_policy_from_a_file_and_from_an_object(tmp_path):
    p = policy([{"type": "linear", "scheme": "lecun_normal"}])
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(p))
    a, b = mlp(), mlp()
    apply_policy(a, path, seed=1)
    apply_policy(b, initsearch.load_policy(p), seed=1)
    assert same(snapshot(a), snapshot(b))


@pytest.mark.parametrize("rule, message", [
    ({"layer": "l9", "scheme": "orthogonal"}, "rules[0].layer: 'l9' matches no layer of the model"),
    ({"layer": "1", "scheme": "delta_orthogonal"}, "rules[0].scheme: 'delta_orthogonal' does not fit layer '1'"),
])
def test_a_file_that_does_not_fit_the_model_is_named_as_its_other_errors_are(rule, message, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(policy([rule])))
    with pytest.raises(PolicyError) as info:
        apply_policy(mlp(), path, example_batch=torch.randn(4, 20))
    assert str(info.value).startswith(f"{path}: {message}"), info.value
    with pytest.raises(PolicyError) as info:  # a policy that is no file has no file to name
        apply_policy(mlp(), policy([rule]), example_batch=torch.randn(4, 20))
    assert str(info.value).startswith(message), info.value


def test_keep_default_leaves_unmatched_layers_and_their_biases_alone():
    model = mlp()
    before = snapshot(model)
    apply_policy(model, policy([{"layer": "1", "scheme": "zeros"}]))
    after = snapshot(model)
    assert torch.all(after["1.weight"] == 0)
    for k in before:
        if not k.startswith("1."):
            assert torch.equal(before[k], after[k]), k


def test_lsuv_section_normalizes_every_layer_output():
    torch.manual_seed(0)
    model = mlp(depth=10, width=64, act=nn.Tanh)
    x = torch.randn(256, 20)
    report = apply_policy(model, policy([], default={"scheme": "orthogonal"}, lsuv={"enabled": True, "tol": 0.05}), example_batch=x, seed=0)
    assert report.lsuv is not None and all(r.lsuv_iterations is not None for r in report.layers)
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o.std().item())) for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(outs) == 10 and all(abs(s - 1.0) < 0.05 for s in outs)


def test_lsuv_without_a_batch_is_an_error_and_touches_nothing():
    model = mlp()
    before = snapshot(model)
    with pytest.raises(PolicyError, match="lsuv"):
        apply_policy(model, policy([], default={"scheme": "orthogonal"}, lsuv={"enabled": True}))
    assert same(before, snapshot(model))


@pytest.mark.parametrize(
    "bad, field",
    [
        (policy([{"layer": "1", "scheme": "kaiming_normal"}, {"layer": "3", "scheme": "delta_orthogonal"}]), "rules[1]"),
        (policy([{"layer": "1", "scheme": "xavier_normal"}, {"layer": "nope", "scheme": "zeros"}]), "rules[1].layer"),
        (policy([{"layer": "1", "scheme": "normal", "std": -1}]), "rules[0].std"),
        ({"format": "initsearch-policy", "version": 1, "rules": [{"layer": "1", "scheme": "zeros"}], "extra": 1}, "extra"),
    ],
)
def test_bad_policy_raises_naming_the_field_and_leaves_the_model_untouched(bad, field):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(PolicyError) as info:
        apply_policy(model, bad, seed=0)
    assert field in str(info.value)
    assert same(before, snapshot(model))


def test_non_strict_ignores_rules_for_missing_layers():
    model = mlp()
    apply_policy(model, policy([{"layer": "nope", "scheme": "zeros"}, {"layer": "1", "scheme": "zeros"}]), strict=False)
    assert torch.all(model[1].weight == 0)


def test_failure_during_lsuv_restores_the_weights():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 20)
            self.out = nn.Linear(20, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("user model broke")
            return self.out(F.relu(self.fc(x)))

    model = Boom()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="user model broke"):
        apply_policy(model, policy([], default={"scheme": "orthogonal"}, lsuv={"enabled": True}), example_batch=torch.randn(32, 20))
    assert same(before, snapshot(model))


def test_norm_layers_only_touched_by_rules_that_name_them():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
        model[1].bias.fill_(0.25)
    apply_policy(model, policy([{"layer": "*", "scheme": "xavier_normal"}]), example_batch=torch.randn(4, 8))
    assert torch.all(model[1].weight == 3.0) and torch.all(model[1].bias == 0.25)
    apply_policy(model, policy([{"type": "norm", "scheme": "zeros"}]), example_batch=torch.randn(4, 8))
    assert torch.all(model[1].weight == 0) and torch.all(model[1].bias == 0)


def test_grouped_conv_identity_and_delta_orthogonal():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x = torch.relu(self.c1(x))
            x = torch.tanh(self.c2(x))
            return self.head(x.mean((2, 3)))

    net = Net()
    report = apply_policy(
        net,
        policy([{"layer": "c1", "scheme": "identity"}, {"layer": "c2", "scheme": "delta_orthogonal", "gain": "auto"}]),
        example_batch=torch.randn(2, 8, 6, 6),
    )
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(F.conv2d(x, net.c1.weight, padding=1, groups=2), x, atol=1e-6)
    centre = net.c2.weight[:, :, 1, 1]
    assert torch.allclose(centre @ centre.T, (5 / 3) ** 2 * torch.eye(8), atol=1e-4)
    assert {r.name: r.activation for r in report.layers} == {"c1": "relu", "c2": "tanh", "head": "linear"}


def test_given_layers_skip_discovery_with_the_same_result_and_are_checked():
    p = policy([{"position": "hidden", "scheme": "orthogonal"}], default={"scheme": "kaiming_normal"},
               lsuv={"enabled": True})
    x = torch.randn(64, 20)
    layers = initsearch.discover_layers(mlp(), x)
    a, b = mlp(), mlp()
    apply_policy(a, p, example_batch=x, seed=3)
    report = apply_policy(b, p, example_batch=x, seed=3, layers=layers)
    assert same(snapshot(a), snapshot(b))
    assert [r.name for r in report.layers] == [layer.name for layer in layers]
    wider = mlp(width=32)
    before = snapshot(wider)
    with pytest.raises(PolicyError, match=r"^layers: layer '1' .*weight \(64, 20\)"):
        apply_policy(wider, p, example_batch=x, seed=3, layers=layers)
    assert same(snapshot(wider), before)


def test_forked_seed_gives_the_same_weights_as_manual_seed_and_restores_the_cpu_rng():
    from initsearch.init.seeding import forked_seed

    torch.manual_seed(123)
    reference = torch.randn(64)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with forked_seed(123):
        seeded = torch.randn(64)
    assert torch.equal(seeded, reference)
    assert torch.equal(torch.get_rng_state(), state)
    import numpy as np

    with forked_seed(np.int64(123)):  # seeds as torch.manual_seed takes them
        assert torch.equal(torch.randn(64), reference)
