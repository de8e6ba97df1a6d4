"""Tests for initsearch.proxy.optimizers: each update is torch.optim's fused one, bit for bit, without dynamo."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from initsearch.proxy.optimizers import FusedAdam, FusedSGD, fused_kernels_take
from initsearch.proxy.train import TrainConfig, make_optimizer, training_optimizer

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _net(dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    # the third Linear is unused at odd steps: parameters without a gradient are skipped, as torch.optim does
    return nn.ModuleList([nn.Linear(5, 7), nn.Linear(7, 3), nn.Linear(5, 3)]).to(device=device, dtype=dtype)


def _train(make, dtype: torch.dtype, device: str, steps: int = 12) -> tuple[list[torch.Tensor], object]:
    """``steps`` steps of a warmup schedule (the lr changes every step, as training's warmup writes it)."""
    net = _net(dtype, device)
    opt = make(list(net.parameters()))
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.05 * (step + 1) / steps
        x = torch.randn(4, 5, generator=gen).to(device=device, dtype=dtype)
        out = net[1](torch.tanh(net[0](x)))
        if step % 2 == 0:
            out = out + net[2](x)
        opt.zero_grad(set_to_none=True)
        out.pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()], opt


CASES = {
    "sgd momentum": (lambda p: FusedSGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
                     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True)),
    "sgd plain": (lambda p: FusedSGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1, fused=True)),
    "adam": (lambda p: FusedAdam(p, lr=0.1, betas=(0.8, 0.99), weight_decay=1e-3),
             lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.8, 0.99), weight_decay=1e-3, fused=True)),
    "adamw": (lambda p: FusedAdam(p, lr=0.1, weight_decay=0.05, decoupled=True),
              lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.05, fused=True)),
}


@pytest.mark.parametrize("device", DEVICES)
# Not float16/bfloat16: there torch.optim's own fused SGD leaves momentum-buffer elements that depend on the
# allocator's state (two torch.optim runs in one process, a dummy allocation between them, differ at step 2).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_updates_and_state_are_torch_optims_fused_ones_bit_for_bit(case: str, dtype: torch.dtype, device: str):
    ours, theirs = CASES[case]
    params, opt = _train(ours, dtype, device)
    expected, reference = _train(theirs, dtype, device)
    assert all(torch.equal(a, b) for a, b in zip(params, expected))
    assert not all(torch.equal(a, b) for a, b in zip(params, _train(ours, dtype, device, steps=11)[0]))
    # the same state, under the same keys: what a population moves when it drops members
    ours_state = [opt.state[p] for g in opt.param_groups for p in g["params"]]
    their_state = [reference.state[p] for g in reference.param_groups for p in g["params"]]
    assert [sorted(s) for s in ours_state] == [sorted(s) for s in their_state]
    for mine, reference_state in zip(ours_state, their_state):
        for key, value in reference_state.items():  # torch.equal alone ignores dtype and device
            assert (mine[key].dtype, mine[key].device) == (value.dtype, value.device), key
            assert torch.equal(mine[key], value), key


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_training_optimizer_is_make_optimizers_update_through_the_fused_kernel(name: str):
    """Same hyperparameters as ``make_optimizer`` (the reference), one class per optimizer name."""
    cfg = TrainConfig(lr=0.3, warmup_steps=2, momentum=0.8, weight_decay=1e-4, optimizer=name)
    model = nn.Linear(3, 2)
    ours, reference = training_optimizer(model, cfg), make_optimizer(model, cfg)
    assert type(ours) is (FusedSGD if name == "sgd" else FusedAdam)
    for key, value in reference.defaults.items():
        if key in ours.defaults and key not in ("fused", "foreach"):
            assert ours.defaults[key] == value, key
    assert ours.param_groups[0]["lr"] == reference.param_groups[0]["lr"] == cfg.lr_at(1)
    assert ours.defaults.get("decoupled_weight_decay", False) is (name == "adamw")


def test_an_empty_parameter_list_is_refused_as_torch_optim_refuses_it():
    for make in (lambda: FusedSGD([], lr=0.1), lambda: FusedAdam([], lr=0.1)):
        with pytest.raises(ValueError, match="empty parameter list"):
            make()


def test_tensors_the_kernels_do_not_take_fall_back_to_torch_optim():
    assert fused_kernels_take([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    assert not fused_kernels_take([torch.zeros(2), torch.zeros(2, dtype=torch.complex64)])
    assert not fused_kernels_take([torch.zeros(2, device="meta")])
    model = nn.Module()
    model.weight = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    assert isinstance(training_optimizer(model, TrainConfig()), torch.optim.SGD)


def test_training_does_not_import_dynamo():
    """The point of the module: a training run never pays ``torch._dynamo``'s import (about a second)."""
    code = ("import sys, torch; from initsearch.proxy.models import MLP; from initsearch.proxy.train import "
            "TrainConfig, train_run; from tests.conftest import teacher_data; d = teacher_data((6,)); "
            "[train_run(MLP(d.input_shape, d.num_classes, depth=2, width=8), d, TrainConfig(steps=4, batch_size=8, "
            "eval_every=2, optimizer=o), seed=0) for o in ('sgd', 'adam', 'adamw')]; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
