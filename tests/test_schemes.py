"""Tests of initsearch.init.schemes against the formulas of policy-format.md and torch.nn.init."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initsearch.init.schemes import SCHEME_NAMES, SCHEME_SPECS, compute_fans, init_bias, init_weight

SQRT3 = math.sqrt(3.0)
TRUNC_STD_FACTOR = 0.8796  # std of N(0, 1) cut at +-2
REL_TOL = 0.03

# Shapes: Linear (out, in); Conv2d (out, in/groups, kh, kw) incl. a grouped conv's weight and a 1x1 conv;
# Conv1d and Conv3d. Large enough that a sample std is within 3% of its formula with a wide margin.
SHAPES: dict[str, tuple[int, ...]] = {
    "linear_512x256": (512, 256),
    "linear_256x1024": (256, 1024),
    "conv2d_3x3": (64, 32, 3, 3),
    "conv2d_grouped": (64, 16, 3, 3),
    "conv2d_1x1": (256, 128, 1, 1),
    "conv1d": (64, 32, 5),
    "conv3d": (32, 16, 3, 3, 3),
}
SHAPE_IDS = list(SHAPES)
GAINS = [1.0, math.sqrt(2.0), 5.0 / 3.0]


def _fresh(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of NaNs (so an entry a scheme forgets shows up) and a seeded RNG."""
    torch.manual_seed(seed)
    return torch.full(shape, float("nan"))


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    return torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))


def _assert_std(w: torch.Tensor, expected: float) -> None:
    assert torch.isfinite(w).all()
    got = w.std().item()
    assert abs(got - expected) <= REL_TOL * expected, f"std {got:.5g}, expected {expected:.5g}"
    assert abs(w.mean().item()) <= 0.05 * expected


def _assert_uniform_bound(w: torch.Tensor, bound: float) -> None:
    top = w.abs().max().item()
    assert top <= bound * (1 + 1e-6)
    assert top >= 0.99 * bound


def _flat_gram_error(w: torch.Tensor, gain: float) -> float:
    """Max |W W^T - gain^2 I| (rows <= cols) or |W^T W - gain^2 I| (rows > cols) of w flattened to (out, -1)."""
    m = w.reshape(w.shape[0], -1).double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return (gram - gain**2 * torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max().item()


# ---------------------------------------------------------------------------------------------- fans


@pytest.mark.parametrize("shape", [*SHAPES.values(), (10, 3), (8, 4, 2, 5), (6, 1, 4)], ids=str)
def test_compute_fans_matches_torch(shape):
    assert compute_fans(torch.empty(shape)) == _fans(shape)


def test_compute_fans_grouped_conv_uses_in_per_group():
    conv = nn.Conv2d(32, 64, 3, groups=2)
    assert compute_fans(conv.weight) == (16 * 9, 64 * 9)


@pytest.mark.parametrize("shape", [(5,), ()])
def test_compute_fans_refuses_below_two_dims(shape):
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        compute_fans(torch.empty(shape))


def test_every_spec_has_a_function():
    assert set(SCHEME_SPECS) == set(SCHEME_NAMES)
    assert all(callable(SCHEME_SPECS[name].function) for name in SCHEME_NAMES)


# ---------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("key", SHAPE_IDS)
def test_normal(key):
    w = _fresh(SHAPES[key])
    init_weight(w, "normal", std=0.02)
    _assert_std(w, 0.02)


@pytest.mark.parametrize("key", SHAPE_IDS)
def test_uniform(key):
    w = _fresh(SHAPES[key])
    init_weight(w, "uniform", a=0.1)
    _assert_std(w, 0.1 / SQRT3)
    _assert_uniform_bound(w, 0.1)


@pytest.mark.parametrize("key", SHAPE_IDS)
def test_trunc_normal(key):
    w = _fresh(SHAPES[key])
    init_weight(w, "trunc_normal", std=0.5)
    _assert_std(w, 0.5 * TRUNC_STD_FACTOR)
    top = w.abs().max().item()
    assert top <= 1.0 and top >= 0.95  # cut at the absolute value 2 * std = 1.0


@pytest.mark.parametrize("gain", GAINS, ids=["g1", "sqrt2", "5_3"])
@pytest.mark.parametrize("key", SHAPE_IDS)
def test_xavier(key, gain):
    fan_in, fan_out = _fans(SHAPES[key])
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    w = _fresh(SHAPES[key])
    init_weight(w, "xavier_normal", gain=gain)
    _assert_std(w, std)
    w = _fresh(SHAPES[key])
    init_weight(w, "xavier_uniform", gain=gain)
    _assert_std(w, std)
    _assert_uniform_bound(w, SQRT3 * std)


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("key", SHAPE_IDS)
def test_lecun(key, mode):
    fan = _fans(SHAPES[key])[0 if mode == "fan_in" else 1]
    std = 1.0 / math.sqrt(fan)
    w = _fresh(SHAPES[key])
    init_weight(w, "lecun_normal", mode=mode)
    _assert_std(w, std)
    w = _fresh(SHAPES[key])
    init_weight(w, "lecun_uniform", mode=mode)
    _assert_std(w, std)
    _assert_uniform_bound(w, SQRT3 * std)


def test_lecun_gain_scales_std():
    w = _fresh((512, 256))
    init_weight(w, "lecun_normal", gain=2.0)
    _assert_std(w, 2.0 / math.sqrt(256))


@pytest.mark.parametrize("gain", GAINS, ids=["g1", "sqrt2", "5_3"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("key", SHAPE_IDS)
def test_kaiming(key, mode, gain):
    fan = _fans(SHAPES[key])[0 if mode == "fan_in" else 1]
    std = gain / math.sqrt(fan)
    w = _fresh(SHAPES[key])
    init_weight(w, "kaiming_normal", gain=gain, mode=mode)
    _assert_std(w, std)
    w = _fresh(SHAPES[key])
    init_weight(w, "kaiming_uniform", gain=gain, mode=mode)
    _assert_std(w, std)
    _assert_uniform_bound(w, SQRT3 * std)


@pytest.mark.parametrize("key", SHAPE_IDS)
def test_pytorch_default_bound(key):
    fan_in = _fans(SHAPES[key])[0]
    w = _fresh(SHAPES[key])
    init_weight(w, "pytorch_default", gain=3.0)  # gain is not read by this scheme
    _assert_uniform_bound(w, 1.0 / math.sqrt(fan_in))
    _assert_std(w, 1.0 / math.sqrt(3 * fan_in))


# ---------------------------------------------------------------------------------------------- equal to torch


@pytest.mark.parametrize(
    "make", [lambda: nn.Linear(48, 24), lambda: nn.Conv2d(16, 32, 3, groups=4), lambda: nn.Conv1d(4, 8, 5)],
    ids=["linear", "grouped_conv2d", "conv1d"],
)
def test_pytorch_default_weight_and_bias_equal_reset_parameters(make):
    torch.manual_seed(7)
    layer = make()
    w, b = torch.empty_like(layer.weight), torch.empty_like(layer.bias)
    torch.manual_seed(7)
    init_weight(w, "pytorch_default")
    init_bias(b, "pytorch_default", fan_in=compute_fans(w)[0])
    assert torch.equal(w, layer.weight.detach())
    assert torch.equal(b, layer.bias.detach())


@pytest.mark.parametrize(
    ("scheme", "kwargs", "reference"),
    [
        ("xavier_normal", {"gain": 5 / 3}, lambda t: nn.init.xavier_normal_(t, gain=5 / 3)),
        ("xavier_uniform", {"gain": 1.0}, nn.init.xavier_uniform_),
        (
            "kaiming_normal",
            {"gain": math.sqrt(2.0), "mode": "fan_out"},
            lambda t: nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu"),
        ),
        (
            "kaiming_uniform",
            {"gain": math.sqrt(2.0)},
            lambda t: nn.init.kaiming_uniform_(t, mode="fan_in", nonlinearity="relu"),
        ),
        ("lecun_normal", {}, lambda t: nn.init.kaiming_normal_(t, nonlinearity="linear")),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_same_draw_as_torch(scheme, kwargs, reference):
    for shape in [(40, 30), (16, 8, 3, 3)]:
        ours, theirs = _fresh(shape, seed=3), _fresh(shape, seed=3)
        init_weight(ours, scheme, **kwargs)
        torch.manual_seed(3)
        reference(theirs)
        torch.testing.assert_close(ours, theirs)


def test_seed_reproducible_and_parameter_in_place():
    layer = nn.Linear(20, 10)
    before = layer.weight
    torch.manual_seed(1)
    init_weight(layer.weight, "orthogonal")
    first = layer.weight.detach().clone()
    torch.manual_seed(1)
    init_weight(layer.weight, "orthogonal")
    assert layer.weight is before and layer.weight.requires_grad
    assert torch.equal(first, layer.weight.detach())


# ---------------------------------------------------------------------------------------------- orthogonal


@pytest.mark.parametrize("gain", [1.0, math.sqrt(2.0)], ids=["g1", "sqrt2"])
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (50, 50), (64, 32, 3, 3), (64, 16, 1, 1), (16, 4, 5)], ids=str)
def test_orthogonal(shape, gain):
    w = _fresh(shape)
    init_weight(w, "orthogonal", gain=gain)
    assert _flat_gram_error(w, gain) <= 1e-4


def test_orthogonal_is_random():
    w1, w2 = _fresh((8, 8), seed=0), _fresh((8, 8), seed=1)
    init_weight(w1, "orthogonal")
    init_weight(w2, "orthogonal")
    assert not torch.allclose(w1, w2)


# ---------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_identity_square_linear(gain):
    w = _fresh((16, 16))
    init_weight(w, "identity", gain=gain)
    assert torch.equal(w, gain * torch.eye(16))


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)], ids=str)
def test_identity_non_square_linear_is_torch_eye(shape):
    w = _fresh(shape)
    init_weight(w, "identity", gain=2.0)
    assert torch.equal(w, 2.0 * nn.init.eye_(torch.empty(shape)))


@pytest.mark.parametrize(
    ("channels", "kernel", "groups"),
    [(8, 3, 1), (8, 1, 1), (8, 5, 1), (8, 3, 2), (12, 3, 4)],
)
def test_identity_conv2d_is_identity_map(channels, kernel, groups):
    gain = 1.5
    w = _fresh((channels, channels // groups, kernel, kernel))
    init_weight(w, "identity", gain=gain, groups=groups)
    x = torch.randn(2, channels, 7, 6)
    y = F.conv2d(x, w, padding=kernel // 2, groups=groups)
    torch.testing.assert_close(y, gain * x)


def test_identity_grouped_conv_with_more_outputs_matches_dirac():
    w = _fresh((64, 16, 3, 3))
    init_weight(w, "identity", gain=2.0, groups=2)
    assert torch.equal(w, 2.0 * nn.init.dirac_(torch.empty(64, 16, 3, 3), groups=2))


@pytest.mark.parametrize("conv", [F.conv1d, F.conv3d], ids=["conv1d", "conv3d"])
def test_identity_conv1d_conv3d(conv):
    spatial = (3,) if conv is F.conv1d else (3, 3, 3)
    w = _fresh((4, 4, *spatial))
    init_weight(w, "identity")
    x = torch.randn(1, 4, *(5 for _ in spatial))
    torch.testing.assert_close(conv(x, w, padding=1), x)


# ---------------------------------------------------------------------------------------------- partial identity


@pytest.mark.parametrize(("in_ch", "out_ch", "groups"), [(8, 32, 1), (16, 64, 2), (8, 8, 1)])
def test_identity_on_a_widening_conv_copies_the_input_into_the_first_channels(in_ch, out_ch, groups):
    """Dirac on the first channels (airbench's partial identity): a widening conv keeps its input in the first
    channels of each group (padding k // 2), times gain; the other channels are zero (torch's ``dirac_``)."""
    w = _fresh((out_ch, in_ch // groups, 3, 3))
    init_weight(w, "identity", gain=2.0, groups=groups)
    x = torch.randn(2, in_ch, 6, 5)
    y = F.conv2d(x, w, padding=1, groups=groups)
    out_pg, in_pg = out_ch // groups, in_ch // groups
    for g in range(groups):
        torch.testing.assert_close(y[:, g * out_pg:g * out_pg + in_pg], 2.0 * x[:, g * in_pg:(g + 1) * in_pg])
        assert torch.equal(y[:, g * out_pg + in_pg:(g + 1) * out_pg], torch.zeros_like(y[:, g * out_pg + in_pg:(g + 1) * out_pg]))
    torch.testing.assert_close(w, 2.0 * nn.init.dirac_(torch.empty_like(w), groups=groups))


# ---------------------------------------------------------------------------------------------- delta orthogonal


def _centre_and_rest(w: torch.Tensor, centre: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    idx = (slice(None), slice(None), *centre)
    rest = w.clone()
    rest[idx] = 0.0
    return w[idx], rest


@pytest.mark.parametrize("gain", [1.0, math.sqrt(2.0)], ids=["g1", "sqrt2"])
@pytest.mark.parametrize(
    ("shape", "centre"),
    [((32, 32, 3, 3), (1, 1)), ((64, 32, 3, 3), (1, 1)), ((16, 32, 5, 5), (2, 2)), ((8, 8, 4, 4), (2, 2)),
     ((8, 4, 3), (1,)), ((8, 8, 3, 3, 3), (1, 1, 1)), ((8, 8, 1, 1), (0, 0))],
    ids=str,
)
def test_delta_orthogonal_structure(shape, centre, gain):
    w = _fresh(shape)
    init_weight(w, "delta_orthogonal", gain=gain)
    centre_matrix, rest = _centre_and_rest(w, centre)
    assert torch.count_nonzero(rest) == 0
    assert _flat_gram_error(centre_matrix, gain) <= 1e-4


@pytest.mark.parametrize("gain", [1.0, math.sqrt(2.0)], ids=["g1", "sqrt2"])
@pytest.mark.parametrize("shape", [(32, 32, 3, 3), (64, 32, 3, 3)], ids=str)
def test_delta_orthogonal_conv_preserves_norm(shape, gain):
    w = _fresh(shape)
    init_weight(w, "delta_orthogonal", gain=gain)
    x = torch.randn(4, shape[1], 9, 9)
    y = F.conv2d(x, w, padding=1)
    torch.testing.assert_close(y.norm(dim=1), gain * x.norm(dim=1), rtol=1e-4, atol=1e-5)
    pixel = torch.zeros(1, shape[1], 3, 3)
    pixel[0, :, 1, 1] = torch.randn(shape[1])
    y = F.conv2d(pixel, w)  # a single centre pixel: the output is the centre matrix applied to it
    assert y.norm().item() == pytest.approx(gain * pixel.norm().item(), rel=1e-4)


def test_delta_orthogonal_grouped_blocks_are_orthogonal():
    groups, gain = 2, math.sqrt(2.0)
    w = _fresh((64, 32, 3, 3))
    init_weight(w, "delta_orthogonal", gain=gain, groups=groups)
    centre_matrix, rest = _centre_and_rest(w, (1, 1))
    assert torch.count_nonzero(rest) == 0
    for block in centre_matrix.split(32, dim=0):
        assert _flat_gram_error(block, gain) <= 1e-4
    x = torch.randn(2, 64, 6, 6)
    y = F.conv2d(x, w, padding=1, groups=groups)
    torch.testing.assert_close(y.norm(dim=1), gain * x.norm(dim=1), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- constants


@pytest.mark.parametrize("shape", [(6, 4), (4, 2, 3, 3), (7,)], ids=str)
def test_constant_and_zeros(shape):
    w = _fresh(shape)
    init_weight(w, "constant", value=0.25)
    assert torch.equal(w, torch.full(shape, 0.25))
    init_weight(w, "zeros")
    assert torch.equal(w, torch.zeros(shape))


@pytest.mark.parametrize("shape", [(6, 4), (7,)], ids=str)
def test_keep_leaves_weight(shape):
    w = torch.randn(shape)
    before = w.clone()
    init_weight(w, "keep")
    assert torch.equal(w, before)


def test_norm_layer_weight_zeroed_in_place():
    bn = nn.BatchNorm2d(5)
    init_weight(bn.weight, "zeros")
    assert torch.equal(bn.weight.detach(), torch.zeros(5)) and bn.weight.requires_grad


@pytest.mark.parametrize("scheme", sorted(set(SCHEME_NAMES) - {"keep", "zeros", "constant"}))
def test_one_dim_refused_for_weighted_schemes(scheme):
    w = torch.ones(8)
    with pytest.raises(ValueError, match="does not apply to a 1-D weight"):
        init_weight(w, scheme, std=0.1, a=0.1, value=1.0)
    assert torch.equal(w, torch.ones(8))


def test_zero_element_weight_is_left_alone():
    w = torch.empty(0, 4)
    init_weight(w, "kaiming_normal", gain=math.sqrt(2.0))
    assert w.shape == (0, 4)


# ---------------------------------------------------------------------------------------------- bias


def test_init_bias_options():
    b = torch.full((1000,), 7.0)
    init_bias(b, "keep", fan_in=16)
    assert torch.equal(b, torch.full((1000,), 7.0))
    init_bias(b, 0.5, fan_in=16)
    assert torch.equal(b, torch.full((1000,), 0.5))
    init_bias(b, -2, fan_in=16)
    assert torch.equal(b, torch.full((1000,), -2.0))
    init_bias(b, "pytorch_default", fan_in=16)
    _assert_uniform_bound(b, 0.25)
    init_bias(b, "zeros", fan_in=16)
    assert torch.equal(b, torch.zeros(1000))


def test_init_bias_on_parameter():
    layer = nn.Linear(4, 3)
    init_bias(layer.bias, "zeros", fan_in=4)
    assert torch.equal(layer.bias.detach(), torch.zeros(3)) and layer.bias.requires_grad


@pytest.mark.parametrize("option", ["ones", "", None, float("nan"), float("inf"), True])
def test_init_bias_refuses_bad_option(option):
    with pytest.raises(ValueError, match="bias"):
        init_bias(torch.zeros(3), option, fan_in=4)


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_scheme():
    with pytest.raises(ValueError, match="unknown scheme 'he_normal'"):
        init_weight(torch.empty(4, 4), "he_normal")


@pytest.mark.parametrize(("scheme", "field"), [("normal", "std"), ("trunc_normal", "std"), ("uniform", "a"),
                                               ("constant", "value")])
def test_missing_required_parameter(scheme, field):
    w = torch.ones(4, 4)
    with pytest.raises(ValueError, match=f"{field}: required by scheme '{scheme}'"):
        init_weight(w, scheme)
    assert torch.equal(w, torch.ones(4, 4))


@pytest.mark.parametrize(("kwargs", "field"), [({"std": -0.1}, "std"), ({"std": float("nan")}, "std")])
def test_invalid_required_parameter(kwargs, field):
    with pytest.raises(ValueError, match=field):
        init_weight(torch.empty(4, 4), "normal", **kwargs)


def test_delta_orthogonal_on_linear_refused():
    with pytest.raises(ValueError, match="'delta_orthogonal' does not apply to a 2-D weight"):
        init_weight(torch.empty(8, 8), "delta_orthogonal")


@pytest.mark.parametrize("scheme", ["kaiming_normal", "lecun_uniform", "xavier_normal"])
def test_bad_mode(scheme):
    with pytest.raises(ValueError, match="mode: must be 'fan_in' or 'fan_out', got 'fan_avg'"):
        init_weight(torch.empty(8, 8), scheme, mode="fan_avg")


@pytest.mark.parametrize("gain", [0.0, -1.0, float("nan")])
def test_bad_gain(gain):
    with pytest.raises(ValueError, match="gain"):
        init_weight(torch.empty(8, 8), "orthogonal", gain=gain)


@pytest.mark.parametrize("scheme", ["identity", "delta_orthogonal"])
@pytest.mark.parametrize("groups", [4, 0])
def test_bad_groups(scheme, groups):
    w = torch.ones(30, 3, 3, 3)
    with pytest.raises(ValueError, match="groups"):
        init_weight(w, scheme, groups=groups)
    assert torch.equal(w, torch.ones(30, 3, 3, 3))


def test_orthogonal_law_has_random_signs():
    """The signs of R's diagonal are folded into Q (Haar law): a raw QR would fix the sign of Q[0, 0]."""
    torch.manual_seed(0)
    firsts = []
    for _ in range(200):
        w = torch.empty(3, 3)
        init_weight(w, "orthogonal")
        firsts.append(w[0, 0].item())
    positive = sum(x > 0 for x in firsts) / len(firsts)
    assert 0.35 <= positive <= 0.65
