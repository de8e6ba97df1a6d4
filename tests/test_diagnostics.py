"""Signal diagnostics at init: per-layer stds and gradients, the gradient quotient, the degenerate pre-screen."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from initsearch.init.diagnostics import LayerSignal, SignalReport, gradient_quotient, is_degenerate, signal_report
from tests.conftest import plain_mlp

mlp = partial(plain_mlp, depth=10, act=nn.ReLU)


def kaiming(model: nn.Module, factor: float = 1.0) -> nn.Module:
    """He init (ReLU gain) times ``factor``, zero biases."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.weight.mul_(factor)
                nn.init.zeros_(m.bias)
    return model


def scale_weights(model: nn.Module, factor: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(factor)


def batch(n: int = 256, d: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_healthy_kaiming_mlp():
    torch.manual_seed(0)
    model = kaiming(mlp())
    x, y = batch()
    report = signal_report(model, x, y)
    assert [s.name for s in report.layers] == [str(2 * i) for i in range(10)]
    assert all(0.5 < s.output_std < 3 for s in report.layers)
    assert all(math.isfinite(s.grad_norm) and s.grad_norm > 0 for s in report.layers)
    assert report.layers[0].weight_std == pytest.approx(model[0].weight.std().item())
    assert report.loss == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)
    assert is_degenerate(report) is None


def test_values_match_a_direct_computation():
    torch.manual_seed(1)
    model = mlp(depth=3)
    x, y = batch(64)
    report = signal_report(model, x, y)
    h = model[0](x)
    assert report.layers[0].output_std == pytest.approx(h.std().item(), rel=1e-5)
    assert report.layers[0].output_mean == pytest.approx(h.mean().item(), rel=1e-4, abs=1e-6)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert [s.grad_norm for s in report.layers] == pytest.approx(
        [model[i].weight.grad.norm().item() for i in (0, 2, 4)], rel=1e-5)


def test_tiny_weights_decay_and_are_flagged():
    torch.manual_seed(2)
    model = kaiming(mlp(), factor=0.01)
    x, y = batch()
    report = signal_report(model, x, y)
    stds = [s.output_std for s in report.layers]
    assert all(b < a for a, b in zip(stds, stds[1:]))
    assert stds[-1] < 1e-10
    reason = is_degenerate(report)
    assert reason is not None and "vanishing" in reason and "'2'" in reason  # layer 0 is 0.01: still allowed


def test_exploding_and_non_finite_are_flagged():
    torch.manual_seed(3)
    x, y = batch(64)
    big = kaiming(mlp(depth=6), factor=10.0)
    assert "exploding" in is_degenerate(signal_report(big, x, y))
    broken = kaiming(mlp(depth=3))
    with torch.no_grad():
        broken[2].weight[0, 0] = math.nan
    reason = is_degenerate(signal_report(broken, x, y))
    assert reason is not None and "nan" in reason.lower()


def test_zero_initialized_last_layer_is_not_degenerate():
    """Fixup/ZerO-style: the zero last layer blocks gradients below it by design."""
    torch.manual_seed(4)
    model = kaiming(mlp(depth=5))
    with torch.no_grad():
        model[8].weight.zero_()
    report = signal_report(model, *batch(64))
    assert report.layers[-1].weight_std == 0 and report.layers[0].grad_norm == 0
    assert report.layers[-1].grad_norm > 0
    assert is_degenerate(report) is None
    with torch.no_grad():
        model[2].weight.zero_()  # a zero hidden layer: the layers after it see a constant input
    assert "vanishing" in is_degenerate(signal_report(model, *batch(64)))


def test_grads_flags_buffers_and_rng_left_as_they_were():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    model[4].weight.grad = torch.ones_like(model[4].weight)
    model[0].bias.requires_grad_(False)
    model[4].weight.requires_grad_(False)  # frozen weights are still measured
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    x, y = batch(64)
    report = signal_report(model, x, y)
    gq = gradient_quotient(model, x, y)
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert torch.equal(model[4].weight.grad, torch.ones_like(model[4].weight))
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True, False, True]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert report.layers[1].grad_norm > 0 and math.isfinite(gq)


def test_forward_order_and_conv_layers():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8 * 4 * 4, 10)
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))

    torch.manual_seed(6)
    report = signal_report(Net(), torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    assert [s.name for s in report.layers] == ["conv", "head"]
    assert all(s.grad_norm > 0 for s in report.layers)


def test_summary_and_rows():
    report = SignalReport([LayerSignal("a", 2.0, 0.1, 0.5, 0.3), LayerSignal("b", 0.5, 0.0, 0.0, 0.2),
                           LayerSignal("c", 1.0, 0.0, 2.0, 0.1)], loss=2.3)
    s = report.summary()
    assert s["output_std_min"] == 0.5 and s["output_std_max"] == 2.0 and s["output_std_last"] == 1.0
    assert s["grad_norm_min"] == 0.0 and s["grad_norm_max"] == 2.0
    assert s["grad_ratio"] == 4.0  # the zero gradient is left out of the ratio
    assert s["loss"] == 2.3
    assert report.to_rows()[1] == {"name": "b", "output_std": 0.5, "output_mean": 0.0, "grad_norm": 0.0,
                                   "weight_std": 0.2}
    assert math.isnan(SignalReport([], 1.0).summary()["grad_ratio"])
    assert is_degenerate(SignalReport([], math.inf)) is not None


def gq_by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """GQ from the full Hessian of the loss over the flattened >= 2-dim parameters."""
    params = [p for p in model.parameters() if p.dim() >= 2]
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params]).double()

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        chunks, i = [], 0
        for s in shapes:
            n = math.prod(s)
            chunks.append(flat[i:i + n].reshape(s))
            i += n
        h = torch.tanh(F.linear(x.double(), chunks[0], model[0].bias.double()))
        return F.cross_entropy(F.linear(h, chunks[1], model[2].bias.double()), y)

    g = torch.autograd.functional.jacobian(loss_of, flat0)
    hess = torch.autograd.functional.hessian(loss_of, flat0)
    sign = torch.where(g >= 0, 1.0, -1.0).double()
    return ((g - hess @ g) / (g + eps * sign) - 1).abs().mean().item()


def test_gradient_quotient_matches_the_formula():
    torch.manual_seed(7)
    model = mlp(depth=2, width=6, act=nn.Tanh, d_in=4).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 10, (16,))
    assert gradient_quotient(model, x, y) == pytest.approx(gq_by_hand(model, x, y, 1e-5), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_quotient_higher_for_oversized_weights(seed):
    torch.manual_seed(seed)
    model = mlp(depth=6, act=nn.Tanh)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("tanh"))
    x, y = batch(128, seed=seed)
    good = gradient_quotient(model, x, y)
    scale_weights(model, 10.0)
    bad = gradient_quotient(model, x, y)
    assert math.isfinite(good) and good >= 0
    assert bad > 100 * good


def test_gradient_quotient_needs_a_weight_matrix():
    model = nn.Sequential(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="2 dimensions"):
        gradient_quotient(model, torch.randn(8, 4), torch.randint(0, 4, (8,)))
