"""Residual branch ends (policy format version 2): discovery's ``branch_last`` and ``position: "branch_last"``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initsearch.errors import PolicyError
from initsearch.init.apply import apply_policy
from initsearch.init.layers import discover_layers
from initsearch.init.policy import InitPolicy
from initsearch.proxy.models import build_model


class _Residual(nn.Module):
    """inp -> x + norm(fc2(relu(fc1(x)))) * 0.5 -> out; ``untraceable`` forces the hooks method."""

    def __init__(self, untraceable: bool = False) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.inp, self.fc1, self.fc2, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        x = self.inp(x)
        if self.untraceable and bool(x.sum() > -1e9):
            x = x * 1.0
        x = x + self.norm(self.fc2(F.relu(self.fc1(x)))) * 0.5
        return self.out(x)


def _ends(model, x=None):
    return {layer.name for layer in discover_layers(model, x) if layer.branch_last}


@pytest.mark.parametrize("untraceable", [False, True], ids=["fx", "hooks"])
def test_branch_end_found_through_norm_and_scalar_ops(untraceable):
    model = _Residual(untraceable)
    found = discover_layers(model, torch.randn(3, 4))
    assert found.method == ("hooks" if untraceable else "fx")
    assert {layer.name for layer in found if layer.branch_last} == {"fc2"}
    assert found.by_name()["fc2"].position == "hidden"


def test_projection_shortcut_is_not_a_branch_end():
    model = build_model({"name": "rescnn"}, (3, 16, 16), 10)
    ends = _ends(model)
    assert ends and all(name.endswith("conv2") for name in ends)
    assert not any(name.endswith("proj") for name in ends)


class _NotResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bias = nn.Linear(4, 4), nn.Parameter(torch.zeros(4))

    def forward(self, x):
        h = self.fc(x)
        return (h + h) + 1.0 + self.bias  # no skip path: the same tensor twice, a number, a parameter


def test_additions_without_a_skip_path_are_not_branch_ends():
    assert _ends(_NotResidual()) == set()
    assert _ends(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))) == set()


def test_zero_branch_ends_make_each_block_start_as_its_shortcut():
    """Fixup/SkipInit: with every branch end zeroed, a residual block's output is its shortcut's."""
    model = _Residual()
    policy = {"format": "initsearch-policy", "version": 2,
              "rules": [{"position": "branch_last", "scheme": "zeros"}], "default": {"scheme": "keep"}}
    report = apply_policy(model, policy, seed=0)
    assert [r.name for r in report.layers if r.scheme == "zeros"] == ["fc2"]
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.allclose(model(x), model.out(model.inp(x) + model.norm.bias * 0.5))


def test_branch_last_is_version_2_and_written_as_such():
    rule = {"position": "branch_last", "scheme": "zeros"}
    with pytest.raises(PolicyError, match=r'rules\[0\].position: branch_last is a version 2 feature'):
        InitPolicy.from_dict({"format": "initsearch-policy", "version": 1, "rules": [rule]})
    policy = InitPolicy.from_dict({"format": "initsearch-policy", "version": 2, "rules": [rule]})
    assert policy.to_dict()["version"] == 2 and InitPolicy.from_dict(policy.to_dict()) == policy
