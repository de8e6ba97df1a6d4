"""Tests for initsearch.proxy.models: proxy shapes, stable names, width scaling, build_model and its errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from initsearch.errors import ConfigError
from initsearch.proxy.models import CNN, MLP, ResCNN, build_model, scale_width

DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)


class TinyNet(nn.Module):
    """A user's model for the ``_target_`` tests: takes input_shape and num_classes plus its own key."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 4) -> None:
        super().__init__()
        self.input_shape, self.hidden = input_shape, hidden
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), hidden))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


class NoArgsNet(nn.Module):
    """A user's model that takes neither input_shape nor num_classes."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(64, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _target(cls: type) -> str:
    # The module's import name depends on pytest's import mode (test_models or tests.test_models).
    return f"{cls.__module__}.{cls.__qualname__}"


def _names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


MODEL_CFGS = [
    {"name": "mlp", "depth": 3, "width": 16},
    {"name": "mlp", "depth": 4, "width": 12, "norm": "layer", "dropout": 0.1},
    {"name": "cnn", "channels": [8, 16, 16]},
    {"name": "cnn", "channels": [8, 8, 16, 16], "norm": "batch", "pool_every": 2, "fc_width": 12},
    {"name": "rescnn", "channels": [8, 16], "blocks_per_stage": 2},
    {"name": "rescnn", "channels": [8, 8, 16], "norm": "batch"},
]


@pytest.mark.parametrize("cfg", MODEL_CFGS, ids=lambda c: c["name"])
@pytest.mark.parametrize("shape", [DIGITS, CIFAR], ids=["digits", "cifar"])
def test_models_run_on_digits_and_cifar_shapes(cfg: dict, shape: tuple[int, ...]) -> None:
    model = build_model(cfg, shape, 10)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cfg", MODEL_CFGS, ids=lambda c: c["name"])
def test_names_are_stable_across_width_multipliers(cfg: dict) -> None:
    half = build_model({**cfg, "width_multiplier": 0.5}, CIFAR, 10)
    full = build_model({**cfg, "width_multiplier": 1.0}, CIFAR, 10)
    assert _names(half) == _names(full)
    n_half = sum(p.numel() for p in half.parameters())
    n_full = sum(p.numel() for p in full.parameters())
    assert n_half < n_full  # the multiplier did change the sizes


def test_width_multiplier_scales_mlp_width_and_cnn_channels() -> None:
    mlp = build_model({"name": "mlp", "depth": 2, "width": 30, "width_multiplier": 0.5}, (5,), 2)
    assert mlp.fc1.out_features == 15
    cnn = build_model({"name": "cnn", "channels": [8, 16], "fc_width": 10, "width_multiplier": 2.0}, DIGITS, 3)
    assert (cnn.conv1.out_channels, cnn.conv2.out_channels, cnn.fc1.out_features) == (16, 32, 20)


def test_scale_width_rounds_and_never_goes_below_one() -> None:
    assert scale_width(128, 0.5) == 64
    assert scale_width(3, 0.1) == 1
    assert scale_width([32, 64, 10], 0.25) == [8, 16, 2]  # round(2.5) == 2 (half to even)
    assert scale_width((5,), 1.0) == [5]
    with pytest.raises(ValueError):
        scale_width(8, 0.0)
    with pytest.raises(ValueError):
        scale_width(0, 1.0)


def test_mlp_module_names_and_layers() -> None:
    model = MLP((4,), 3, depth=3, width=8, norm="batch", dropout=0.2)
    assert _names(model)[1:] == ["flatten", "fc1", "norm1", "act1", "drop1", "fc2", "norm2", "act2", "drop2", "out"]
    assert isinstance(model.norm1, nn.BatchNorm1d) and isinstance(model.drop2, nn.Dropout)
    assert model.drop1.p == pytest.approx(0.2)
    assert model.out.out_features == 3 and model.fc1.in_features == 4
    plain = MLP((2, 3), 5, depth=3, width=8)
    assert _names(plain)[1:] == ["flatten", "fc1", "act1", "fc2", "act2", "out"]
    assert plain.fc1.in_features == 6


def test_mlp_layer_norm_and_depth_one() -> None:
    assert isinstance(MLP((4,), 2, depth=2, norm="layer").norm1, nn.LayerNorm)
    logistic = MLP((4,), 2, depth=1)
    assert _names(logistic)[1:] == ["flatten", "out"]
    assert logistic.out.in_features == 4


def test_activation_list_is_applied_per_layer() -> None:
    model = MLP((4,), 2, depth=4, width=8, activation=["tanh", "gelu", "leaky_relu"])
    assert [type(model.act1), type(model.act2), type(model.act3)] == [nn.Tanh, nn.GELU, nn.LeakyReLU]
    cnn = CNN(DIGITS, 2, channels=(4, 4), activation=["selu", "linear", "silu"], fc_width=6)
    assert [type(cnn.act1), type(cnn.act2), type(cnn.act_fc)] == [nn.SELU, nn.Identity, nn.SiLU]


def test_cnn_never_pools_below_one_by_one() -> None:
    model = CNN(DIGITS, 10, channels=(4, 4, 4, 4))
    pools = [name for name in _names(model) if name.startswith("pool")]
    assert pools == ["pool1", "pool2", "pool3"]  # 8 -> 4 -> 2 -> 1, then no more
    feats = model[:-3](torch.randn(2, *DIGITS))  # up to and including act4, before gap
    assert feats.shape[-2:] == (1, 1)
    assert model(torch.randn(2, *DIGITS)).shape == (2, 10)


def test_cnn_norm_pool_every_and_names() -> None:
    model = CNN(CIFAR, 10, channels=(4, 4, 8, 8), norm="batch", pool_every=2, kernel_size=5)
    names = _names(model)[1:]
    assert names == ["conv1", "norm1", "act1", "conv2", "norm2", "act2", "pool2", "conv3", "norm3", "act3",
                     "conv4", "norm4", "act4", "pool4", "gap", "flatten", "out"]
    assert isinstance(model.norm3, nn.BatchNorm2d) and model.conv1.bias is None
    assert model.conv1.padding == (2, 2)
    assert CNN(CIFAR, 10, channels=(4,)).conv1.bias is not None


def test_rescnn_projection_only_when_channels_change() -> None:
    model = ResCNN(CIFAR, 10, channels=(8, 8, 16), blocks_per_stage=2)
    names = set(_names(model))
    assert {"stem", "stages.0.0.conv1", "stages.0.0.conv2", "stages.2.1.conv2", "out"} <= names
    assert "stages.0.0.proj" not in names  # 8 -> 8 at full size: identity
    assert "stages.2.0.proj" in names  # 8 -> 16: 1x1 projection
    assert "stages.2.1.proj" not in names  # 16 -> 16 inside the stage
    assert model.stages[2][0].proj.kernel_size == (1, 1)
    assert "stages.1.0.proj" in names  # same channels but stride 2: the shortcut must downsample too


def test_rescnn_identity_block_keeps_the_input_in_the_sum() -> None:
    model = ResCNN(DIGITS, 2, channels=(4,), activation="linear")
    block = model.stages[0][0]
    for conv in (block.conv1, block.conv2):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(block(x), x)  # zero branch + identity shortcut, linear activation


def test_rescnn_norm_adds_batchnorms() -> None:
    model = ResCNN(DIGITS, 2, channels=(4, 8), norm="batch")
    assert isinstance(model.stem_norm, nn.BatchNorm2d)
    assert isinstance(model.stages[1][0].proj_norm, nn.BatchNorm2d)
    assert model.stem.bias is None


def test_build_model_target_passes_shape_and_classes() -> None:
    model = build_model({"_target_": _target(TinyNet), "hidden": 7}, DIGITS, 5)
    assert isinstance(model, TinyNet)
    assert model.input_shape == DIGITS and model.hidden == 7
    assert model(torch.randn(2, *DIGITS)).shape == (2, 5)


def test_build_model_target_keeps_values_the_config_sets() -> None:
    model = build_model({"_target_": _target(TinyNet), "num_classes": 3}, DIGITS, 5)
    assert model.head.out_features == 3


def test_build_model_target_not_given_arguments_it_does_not_take() -> None:
    model = build_model({"_target_": _target(NoArgsNet), "width": 2}, DIGITS, 5)
    assert model.fc.out_features == 2


def test_build_model_accepts_omegaconf() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "cnn", "channels": [4, 8], "width_multiplier": 0.5})
    model = build_model(cfg, DIGITS, 3)
    assert model.conv2.out_channels == 4


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"name": "mlp", "depth": 0}, "model.depth: must be >= 1, got 0"),
        ({"name": "mlp", "width": 0}, "model.width"),
        ({"name": "mlp", "width": 2.5}, "model.width"),
        ({"name": "mlp", "activation": "swish"}, "model.activation"),
        ({"name": "mlp", "depth": 3, "activation": ["relu"]}, "model.activation"),
        ({"name": "mlp", "depth": 3, "activation": ["relu", "nope"]}, "model.activation[1]"),
        ({"name": "mlp", "norm": "group"}, "model.norm"),
        ({"name": "mlp", "dropout": 1.0}, "model.dropout"),
        ({"name": "mlp", "widht": 3}, "model.widht"),
        ({"name": "mlp", "width_multiplier": 0}, "model.width_multiplier"),
        ({"name": "cnn", "channels": []}, "model.channels"),
        ({"name": "cnn", "channels": [4, 0]}, "model.channels[1]"),
        ({"name": "cnn", "pool_every": 0}, "model.pool_every"),
        ({"name": "cnn", "channels": [4], "fc_width": 3, "activation": ["relu"]}, "model.activation"),
        ({"name": "rescnn", "blocks_per_stage": 0}, "model.blocks_per_stage"),
        ({"name": "transformer"}, "model.name"),
        ({}, "model.name"),
        ({"_target_": "no_such_package_xyz.Net"}, "model._target_"),
        ({"_target_": "collections.OrderedDict"}, "model._target_"),
    ],
)
def test_config_errors_name_the_key(cfg: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(cfg, DIGITS, 10)
    assert str(info.value).startswith(key)


def test_convolutional_models_need_an_image_shape() -> None:
    with pytest.raises(ConfigError, match="model.input_shape"):
        build_model({"name": "cnn"}, (64,), 10)
