"""LSUV: every layer's output std lands within tol of the target, in forward order, touching only weights."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from initsearch.init.lsuv import LsuvReport, lsuv
from tests.conftest import plain_mlp

mlp = partial(plain_mlp, depth=20, act=nn.Tanh)


def cnn() -> nn.Sequential:
    """5 conv layers with ReLU and max-pooling, then a linear head."""
    chans = [3, 16, 16, 32, 32, 32]
    mods: list[nn.Module] = []
    for i in range(5):
        mods += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU()]
        if i in (1, 3):
            mods.append(nn.MaxPool2d(2))
    mods += [nn.Flatten(), nn.Linear(32 * 4 * 4, 10)]
    return nn.Sequential(*mods)


def output_stds(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Each linear/conv layer's output std, measured independently of the lsuv module with our own hooks."""
    stds: dict[str, float] = {}

    def hook_for(name: str):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            stds.setdefault(name, out.std().item())

        return hook

    hooks = [m.register_forward_hook(hook_for(name))
             for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(was)
    for h in hooks:
        h.remove()
    return stds


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def passes_expected(report: LsuvReport) -> int:
    """One pass for the forward order, then per layer one measurement plus one per rescale."""
    return 1 + sum(1 + r.iterations for r in report.layers)


@pytest.mark.parametrize("target", [1.0, 0.5])
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_deep_mlp_every_layer_within_tol(act, target):
    torch.manual_seed(0)
    model = mlp(act=act)
    x = torch.randn(256, 20)
    before = output_stds(model, x)
    assert max(abs(s - target) for s in before.values()) > 0.1  # PyTorch's default init is off target
    report = lsuv(model, x, target_std=target, tol=0.1)
    after = output_stds(model, x)
    assert len(after) == 20
    assert all(abs(s - target) < 0.1 for s in after.values()), after
    assert [r.name for r in report.layers] == list(after)
    assert all(r.converged and r.skipped is None for r in report.layers)
    assert all(r.std_after == pytest.approx(after[r.name], rel=1e-5) for r in report.layers)
    assert all(r.std_before == pytest.approx(before[r.name], rel=1e-5) for r in report.layers[:1])
    assert report.forward_passes == passes_expected(report)


@pytest.mark.parametrize("target", [1.0, 0.5])
def test_cnn_every_layer_within_tol(target):
    torch.manual_seed(1)
    model = cnn()
    x = torch.randn(32, 3, 16, 16)
    report = lsuv(model, x, target_std=target, tol=0.05)
    after = output_stds(model, x)
    assert len(after) == 6 and len(report.layers) == 6
    assert all(abs(s - target) < 0.05 for s in after.values()), after
    assert report.forward_passes == passes_expected(report)


def test_only_the_requested_layers_change():
    torch.manual_seed(2)
    model = mlp(depth=6)
    x = torch.randn(128, 20)
    before = snapshot(model)
    report = lsuv(model, x, layers=["8", "2"])
    after = snapshot(model)
    assert [r.name for r in report.layers] == ["2", "8"]  # forward order, not the order given
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"2.weight", "8.weight"}
    stds = output_stds(model, x)
    assert abs(stds["2"] - 1) < 0.1 and abs(stds["8"] - 1) < 0.1


def test_unknown_layer_name_is_refused_and_nothing_changes():
    model = mlp(depth=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match="nope"):
        lsuv(model, torch.randn(8, 20), layers=["0", "nope"])
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in before.items())


def test_zero_weight_layer_is_skipped_without_nans():
    torch.manual_seed(3)
    model = mlp(depth=5)
    with torch.no_grad():
        model[4].weight.zero_()
    x = torch.randn(64, 20)
    report = lsuv(model, x)
    by_name = {r.name: r for r in report.layers}
    dead = by_name["4"]
    assert dead.skipped and "dead" in dead.skipped and dead.iterations == 0 and not dead.converged
    assert torch.all(model[4].weight == 0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(x)).all()
    assert all(r.skipped is None for r in report.layers if r.name != "4")


@pytest.mark.parametrize("bias, phrase", [(0.0, "dead layer"), (0.5, "does not change")])
def test_layer_with_constant_input_is_left_alone(bias, phrase):
    """A ReLU that is always off feeds layer 2 zeros: its output is its bias, which no weight scale moves."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias.fill_(-1e3)
        model[2].bias.copy_(torch.linspace(-bias, bias, 4))
    w_before = model[2].weight.detach().clone()
    report = lsuv(model, torch.randn(32, 8))
    second = report.layers[1]
    assert second.name == "2" and second.skipped and phrase in second.skipped
    assert second.iterations <= 1 and not second.converged
    assert torch.isfinite(model[2].weight).all()
    assert torch.allclose(model[2].weight, w_before * (model[2].weight[0, 0] / w_before[0, 0]))


class Reversed(nn.Module):
    """Registers its layers in the reverse of the order forward calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(32, 32)
        self.middle = nn.Linear(32, 32)
        self.first = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


def test_layers_visited_in_forward_order_not_registration_order():
    torch.manual_seed(4)
    model = Reversed()
    with torch.no_grad():
        model.first.weight.mul_(10)  # saturates tanh: fixing `first` last would undo the others
    x = torch.randn(128, 16)
    report = lsuv(model, x, max_iter=20, tol=0.02)
    assert [r.name for r in report.layers] == ["first", "middle", "last"]
    stds = output_stds(model, x)
    assert all(abs(s - 1) < 0.02 for s in stds.values()), stds


def test_measurement_passes_stop_after_the_measured_layer():
    torch.manual_seed(5)
    model = mlp(depth=4)
    calls = {"n": 0}
    model[6].register_forward_hook(lambda m, i, o: calls.__setitem__("n", calls["n"] + 1))
    report = lsuv(model, torch.randn(64, 20))
    last = report.layers[-1]
    assert last.name == "6"
    assert calls["n"] == 1 + 1 + last.iterations  # order pass + its own passes, none for earlier layers


def test_biases_untouched():
    torch.manual_seed(6)
    model = cnn()
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    lsuv(model, torch.randn(16, 3, 16, 16))
    assert all(torch.equal(p, biases[n]) for n, p in model.named_parameters() if n.endswith("bias"))


@pytest.mark.parametrize("train", [True, False])
def test_training_flags_restored_and_dropout_off_during_passes(train):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(20, 64), nn.Dropout(0.5), nn.ReLU(), nn.Linear(64, 64), nn.Dropout(0.5),
                          nn.ReLU(), nn.Linear(64, 5))
    model.train(train)
    model[4].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    x = torch.randn(256, 20)
    report = lsuv(model, x, tol=0.01)
    assert [m.training for m in model.modules()] == flags
    stds = output_stds(model, x)  # measured in eval mode: the mode LSUV measured in
    assert all(r.converged for r in report.layers)
    assert all(abs(s - 1) < 0.01 for s in stds.values())


def test_batchnorm_running_stats_untouched():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    lsuv(model, torch.randn(8, 3, 10, 10))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())
    assert model.training


def test_max_iter_one_reports_one_iteration():
    torch.manual_seed(8)
    model = mlp(depth=6)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(3)
    report = lsuv(model, torch.randn(64, 20), max_iter=1, tol=1e-4)
    assert [r.iterations for r in report.layers] == [1] * 6
    assert report.forward_passes == 1 + 6 * 2


def test_tuple_batch_and_already_on_target():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(4, 8)

        def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(z)

    torch.manual_seed(9)
    model = Two()
    batch = (torch.randn(64, 4), torch.randn(64, 4))
    first = lsuv(model, batch, tol=0.05)
    second = lsuv(model, batch, tol=0.05)
    assert [r.name for r in first.layers] == ["a", "b"]
    assert all(r.iterations == 0 and r.converged for r in second.layers)
    assert second.forward_passes == 3


@pytest.mark.parametrize("kwargs", [{"target_std": 0}, {"tol": -1}, {"max_iter": 0}, {"target_std": math.inf}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        lsuv(mlp(depth=2), torch.randn(4, 20), **kwargs)
