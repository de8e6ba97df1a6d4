"""discover_layers: order, positions, fans and the activation after each layer, by torch.fx and by hooks.

Most models are checked twice: as they are (torch.fx traces them) and wrapped in ``Untraceable`` (a
data-dependent ``if`` makes fx fail, so discovery runs the model with hooks); both must agree.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initsearch.init.layers import LayerDiscovery, LayerInfo, discover_layers


class Untraceable(nn.Module):
    """Runs ``net`` behind data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *xs):
        if torch.isfinite(xs[0]).all():
            return self.net(*xs)
        return xs[0]


def discover_both(model: nn.Module, example) -> LayerDiscovery:
    """Discover by fx on ``model`` and by hooks on ``Untraceable(model)``; assert both agree."""
    by_fx = discover_layers(model, example)
    by_hooks = discover_layers(Untraceable(model), example)
    assert by_fx.method == "fx"
    assert by_hooks.method == "hooks"
    unwrapped = [dataclasses.replace(info, name=info.name.removeprefix("net.")) for info in by_hooks]
    assert unwrapped == list(by_fx)
    return by_fx


def roles(found: LayerDiscovery) -> list[tuple]:
    return [(i.name, i.family, i.activation, i.activation_param, i.position) for i in found]


def assert_fans_match_torch(model: nn.Module, found: LayerDiscovery) -> None:
    modules = dict(model.named_modules())
    for info in found:
        weight = modules[info.name].weight
        assert info.weight_shape == tuple(weight.shape)
        if info.family == "norm":
            assert (info.fan_in, info.fan_out) == (None, None)
        else:
            assert (info.fan_in, info.fan_out) == nn.init._calculate_fan_in_and_fan_out(weight)
    assert [info.index for info in found] == list(range(len(found)))


# ---- models -----------------------------------------------------------------------------------------------
def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


class FunctionalNet(nn.Module):
    """Activations as functional calls and tensor methods, in-place ones included."""

    def __init__(self) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(5, 5) for _ in range(8))

    def forward(self, x):
        f = self.fcs
        x = F.relu(f[0](x))
        x = torch.tanh(f[1](x))
        x = f[2](x).relu()
        x = F.leaky_relu(f[3](x), 0.2)
        x = F.gelu(f[4](x))
        x = F.relu(f[5](x), inplace=True)
        x = f[6](x)
        x.relu_()  # result unused: x itself is rectified
        return f[7](x)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn, added to the (projected) input, then relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = BasicBlock(4, 4)
        self.block2 = BasicBlock(4, 8, stride=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.block2(self.block1(F.relu(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---- tests ------------------------------------------------------------------------------------------------
def test_sequential_mlp_order_positions_fans_and_last_layer_linear():
    model = mlp()
    found = discover_both(model, torch.randn(2, 4))
    assert roles(found) == [
        ("0", "linear", "relu", None, "first"),
        ("2", "linear", "relu", None, "hidden"),
        ("4", "linear", "linear", None, "last"),
    ]
    assert [(i.type, i.fan_in, i.fan_out) for i in found] == [("Linear", 4, 8), ("Linear", 8, 6), ("Linear", 6, 3)]
    assert_fans_match_torch(model, found)
    assert isinstance(found[0], LayerInfo) and len(found) == 3 and found.by_name()["2"] is found[1]


def test_batchnorm_and_dropout_are_looked_through_and_bn_is_listed_as_norm():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2))
    found = discover_both(model, torch.randn(3, 4))
    assert roles(found) == [
        ("0", "linear", "tanh", None, "first"),
        ("1", "norm", "tanh", None, None),
        ("4", "linear", "linear", None, "last"),
    ]
    assert found[1].type == "BatchNorm1d" and found[1].weight_shape == (6,)
    assert_fans_match_torch(model, found)


def test_cnn_pooling_and_flatten_are_looked_through():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(6, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.SiLU(),
        nn.Linear(8, 5),
    )
    found = discover_both(model, torch.randn(2, 3, 10, 10))
    assert roles(found) == [
        ("0", "conv", "relu", None, "first"),
        ("3", "conv", "relu", None, "hidden"),
        ("6", "conv", "silu", None, "hidden"),
        ("10", "linear", "linear", None, "last"),
    ]
    assert (found[0].fan_in, found[0].fan_out) == (27, 36)
    assert_fans_match_torch(model, found)


def test_view_reshape_permute_are_looked_through():
    class Reshaping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)
            self.out = nn.Linear(15, 1)

        def forward(self, x):
            h = self.conv(x).permute(0, 2, 1).reshape(-1, 4)
            h = torch.sigmoid(self.fc(h).view(x.shape[0], -1))
            return self.out(h)

    found = discover_both(Reshaping(), torch.randn(2, 2, 5))
    assert [(i.name, i.activation) for i in found] == [("conv", "linear"), ("fc", "sigmoid"), ("out", "linear")]


def test_functional_activations_and_their_parameters():
    model = FunctionalNet()
    found = discover_both(model, torch.randn(2, 5))
    assert [(i.name, i.activation, i.activation_param) for i in found] == [
        ("fcs.0", "relu", None),
        ("fcs.1", "tanh", None),
        ("fcs.2", "relu", None),
        ("fcs.3", "leaky_relu", pytest.approx(0.2)),
        ("fcs.4", "gelu", None),
        ("fcs.5", "relu", None),
        ("fcs.6", "relu", None),
        ("fcs.7", "linear", None),
    ]


def test_residual_add_is_looked_through_with_identity_and_projection_shortcuts():
    model = ResNetTiny()
    found = discover_both(model, torch.randn(2, 3, 8, 8))
    got = {i.name: (i.activation, i.position) for i in found}
    assert got["stem"] == ("relu", "first")
    for block in ("block1", "block2"):
        assert got[f"{block}.conv1"] == ("relu", "hidden")
        assert got[f"{block}.bn1"] == ("relu", None)
        assert got[f"{block}.conv2"] == ("relu", "hidden")  # relu(bn2(conv2(.)) + x)
        assert got[f"{block}.bn2"] == ("relu", None)
    assert got["block2.shortcut.0"] == ("relu", "hidden")  # the 1x1 projection also reaches the relu
    assert got["block2.shortcut.1"] == ("relu", None)
    assert got["fc"] == ("linear", "last")
    assert [i.name for i in found] == [
        "stem", "block1.conv1", "block1.bn1", "block1.conv2", "block1.bn2",
        "block2.conv1", "block2.bn1", "block2.conv2", "block2.bn2", "block2.shortcut.0", "block2.shortcut.1", "fc",
    ]
    assert_fans_match_torch(model, found)


def test_forward_order_not_registration_order():
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc3 = nn.Linear(6, 2)
            self.fc2 = nn.Linear(5, 6)
            self.fc1 = nn.Linear(4, 5)

        def forward(self, x):
            return self.fc3(F.relu(self.fc2(torch.tanh(self.fc1(x)))))

    found = discover_both(Reversed(), torch.randn(2, 4))
    assert roles(found) == [
        ("fc1", "linear", "tanh", None, "first"),
        ("fc2", "linear", "relu", None, "hidden"),
        ("fc3", "linear", "linear", None, "last"),
    ]


def test_untraceable_model_falls_back_to_hooks_with_functional_activations():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 4)
            self.c = nn.Linear(4, 4)
            self.d = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.e = nn.Linear(4, 1)

        def forward(self, x):
            h = self.a(x)
            if x.sum() > 0:  # data-dependent: fx cannot trace this
                h = F.leaky_relu(h, 0.3)
            else:
                h = self.unused(h)
            h = self.b(h).sigmoid()
            h = F.elu(self.c(h), alpha=0.5)
            h = self.d(h)
            h = torch.relu_(h)
            return self.e(h)

    model = Branchy()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    found = discover_layers(model, torch.ones(2, 3))
    assert found.method == "hooks"
    assert roles(found) == [
        ("a", "linear", "leaky_relu", pytest.approx(0.3), "first"),
        ("b", "linear", "sigmoid", None, "hidden"),
        ("c", "linear", "elu", 0.5, "hidden"),
        ("d", "linear", "relu", None, "hidden"),
        ("e", "linear", "linear", None, "last"),
    ]  # "unused" was not called on this input: not listed


def test_mixed_activation_modules_each_found():
    acts = [nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.SELU(), nn.SiLU(), nn.ELU(0.5), nn.LeakyReLU(0.1), nn.GELU(),
            nn.ReLU6(), nn.ReLU(inplace=True)]
    layers: list[nn.Module] = []
    for act in acts:
        layers += [nn.Linear(3, 3), act]
    model = nn.Sequential(*layers, nn.Linear(3, 1))
    found = discover_both(model, torch.randn(2, 3))
    assert [(i.activation, i.activation_param) for i in found] == [
        ("relu", None), ("tanh", None), ("sigmoid", None), ("selu", None), ("silu", None), ("elu", 0.5),
        ("leaky_relu", pytest.approx(0.1)), ("gelu", None), ("relu", None), ("relu", None), ("linear", None),
    ]
    assert [i.position for i in found] == ["first"] + ["hidden"] * 9 + ["last"]


def test_default_parameters_of_leaky_relu_and_elu_are_reported():
    model = nn.Sequential(nn.Linear(2, 2), nn.LeakyReLU(), nn.Linear(2, 2), nn.ELU(), nn.Linear(2, 2))
    found = discover_both(model, torch.randn(2, 2))
    assert [(i.activation, i.activation_param) for i in found[:2]] == [
        ("leaky_relu", pytest.approx(0.01)), ("elu", 1.0),
    ]


def test_grouped_and_1d_3d_convolution_fans():
    model = nn.Sequential(
        nn.Conv1d(3, 6, 5, padding=2), nn.Tanh(),
        nn.Conv1d(6, 12, 3, groups=3, padding=1), nn.GELU(),
        nn.Conv1d(12, 12, 3, groups=12, padding=1),
    )
    found = discover_both(model, torch.randn(2, 3, 7))
    assert [(i.type, i.fan_in, i.fan_out, i.activation) for i in found] == [
        ("Conv1d", 15, 30, "tanh"), ("Conv1d", 6, 36, "gelu"), ("Conv1d", 3, 36, "linear"),
    ]
    assert_fans_match_torch(model, found)

    grouped = nn.Conv2d(8, 16, 3, groups=4)
    info = discover_layers(grouped)[0]
    assert (tuple(grouped.weight.shape), info.fan_in, info.fan_out) == ((16, 2, 3, 3), 18, 144)

    model3d = nn.Sequential(
        nn.Conv3d(2, 4, (1, 2, 3)), nn.InstanceNorm3d(4, affine=True), nn.ReLU(), nn.Conv3d(4, 2, 1),
    )
    found3d = discover_both(model3d, torch.randn(1, 2, 3, 4, 5))
    assert roles(found3d) == [
        ("0", "conv", "relu", None, "first"), ("1", "norm", "relu", None, None), ("3", "conv", "linear", None, "last"),
    ]
    assert (found3d[0].fan_in, found3d[0].fan_out) == (12, 24)
    assert_fans_match_torch(model3d, found3d)


def test_only_affine_norm_layers_are_listed():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False),
        nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False), nn.Tanh(), nn.Linear(8, 2),
    )
    found = discover_both(model, torch.randn(3, 4))
    assert [(i.name, i.type, i.activation) for i in found] == [
        ("0", "Linear", "relu"), ("1", "LayerNorm", "relu"), ("3", "Linear", "linear"),
        ("5", "Linear", "tanh"), ("8", "Linear", "linear"),
    ]
    groupnorm = nn.Sequential(nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 1, 1))
    assert [(i.type, i.family, i.activation) for i in discover_both(groupnorm, torch.randn(1, 2, 3, 3))] == [
        ("Conv2d", "conv", "silu"), ("GroupNorm", "norm", "silu"), ("Conv2d", "conv", "linear"),
    ]


def test_several_paths_take_the_first_activation_in_forward_order():
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(3, 4)
            self.fc2 = nn.Linear(4, 4)
            self.fc3 = nn.Linear(3, 4)
            self.fc4 = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc1(x)
            a = self.fc2(h)  # this path meets a layer first: no activation on it
            b = torch.sigmoid(h)
            c = F.relu(h)
            g = self.fc3(x)
            return self.fc4(torch.tanh(g * 2.0) + F.relu(g)) + a + b + c

    found = discover_both(Fork(), torch.randn(2, 3))
    assert [(i.name, i.activation) for i in found] == [
        ("fc1", "sigmoid"), ("fc2", "linear"), ("fc3", "tanh"), ("fc4", "linear"),
    ]


def test_shared_layer_listed_once_at_first_call():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.rec = nn.Linear(4, 4)
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            h = self.rec(torch.tanh(self.inp(x)))
            h = self.rec(F.relu(h))
            return self.out(torch.sigmoid(h))

    found = discover_both(Shared(), torch.randn(2, 3))
    assert roles(found) == [
        ("inp", "linear", "tanh", None, "first"),
        ("rec", "linear", "relu", None, "hidden"),  # the activation after its first call
        ("out", "linear", "linear", None, "last"),
    ]


def test_unnamed_nonlinearity_ends_the_search_and_unused_layers_are_excluded():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(3, 3)
            self.never = nn.Conv2d(1, 1, 1)
            self.fc2 = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc2(F.relu(F.softplus(self.fc1(x))))

    found = discover_both(Odd(), torch.randn(2, 3))
    assert roles(found) == [("fc1", "linear", "linear", None, "first"), ("fc2", "linear", "linear", None, "last")]


def test_layer_subclass_is_one_layer_and_its_inner_ops_are_hidden():
    class SquashedLinear(nn.Linear):
        def forward(self, x):
            return torch.sigmoid(super().forward(x)) * 2.0

    model = nn.Sequential(nn.Linear(3, 3), SquashedLinear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    found = discover_both(model, torch.randn(2, 3))
    assert [(i.name, i.type, i.family, i.activation) for i in found] == [
        ("0", "Linear", "linear", "linear"),  # the sigmoid inside the next layer is not this layer's activation
        ("1", "SquashedLinear", "linear", "relu"),
        ("3", "Linear", "linear", "linear"),
    ]


def test_prelu_counts_as_leaky_relu_with_its_slope():
    model = nn.Sequential(nn.Linear(2, 2), nn.PReLU(init=0.3), nn.Linear(2, 2))
    found = discover_both(model, torch.randn(2, 2))
    assert (found[0].activation, found[0].activation_param) == ("leaky_relu", pytest.approx(0.3))


def test_tuple_input_is_passed_as_positional_arguments():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.left = nn.Linear(3, 4)
            self.right = nn.Linear(2, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, a, b):
            return self.head(torch.tanh(self.left(a) + self.right(b)))

    found = discover_both(TwoInputs(), (torch.randn(2, 3), torch.randn(2, 2)))
    assert roles(found) == [
        ("left", "linear", "tanh", None, "first"),
        ("right", "linear", "tanh", None, "hidden"),
        ("head", "linear", "linear", None, "last"),
    ]


def test_bare_layer_and_lone_layer_are_last():
    found = discover_layers(nn.Linear(3, 2), torch.randn(1, 3))
    assert roles(found) == [("", "linear", "linear", None, "last")]
    lone = discover_both(nn.Sequential(nn.Linear(3, 2), nn.ReLU()), torch.randn(1, 3))
    assert roles(lone) == [("0", "linear", "relu", None, "last")]


def test_untraceable_without_example_input_is_a_clear_error():
    with pytest.raises(ValueError, match="example input"):
        discover_layers(Untraceable(mlp()), None)


def test_lazy_layer_without_weight_is_refused():
    with pytest.raises(ValueError, match="lazy"):
        discover_layers(nn.Sequential(nn.LazyLinear(3)), torch.randn(1, 2))


@pytest.mark.parametrize("wrap", [False, True], ids=["fx", "hooks"])
def test_discovery_leaves_weights_buffers_and_training_flags_unchanged(wrap):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2))
    model = Untraceable(model) if wrap else model
    model.train()
    model.get_submodule("net.2" if wrap else "2").eval()  # a mixed state must come back as it was
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    found = discover_layers(model, torch.randn(5, 4) * 3 + 1)
    assert found.method == ("hooks" if wrap else "fx")
    assert {name: m.training for name, m in model.named_modules()} == flags
    after = model.state_dict()
    assert state.keys() == after.keys()
    for key, value in state.items():
        assert torch.equal(value, after[key]), key
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
