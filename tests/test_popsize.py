"""batch_trials=auto: K from a member's memory and the free memory (the same logic on every device)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from initsearch.errors import ConfigError
from initsearch.proxy.models import CNN, MLP, ResCNN
from initsearch.proxy.popsize import CPU_K, MAX_K, auto_population_size, member_bytes, population_size
from initsearch.search.settings import settings_from_config
from tests.conftest import TINY, compose_config


def test_member_bytes_counts_parameters_state_and_activations():
    model = MLP((10,), 3, depth=2, width=16)  # flatten 10, fc1 16, act1 16, out 3 per example
    params = sum(p.numel() for p in model.parameters())
    per_example = 10 + 16 + 16 + 3
    assert member_bytes(model, (10,), 8, "sgd") == 4 * (3 * params + 2 * 8 * per_example)
    assert member_bytes(model, (10,), 8, "adam") == 4 * (4 * params + 2 * 8 * per_example)
    cnn = CNN((3, 32, 32), 10, channels=[32, 64, 128, 128])
    assert member_bytes(cnn, (3, 32, 32), 128, "sgd") > 2 * member_bytes(cnn, (3, 32, 32), 32, "sgd")


def test_population_size_fits_half_the_free_memory_between_one_and_the_cap():
    assert population_size(100, 1_000) == 5
    assert population_size(100, 150) == 1  # never below one
    assert population_size(1, 10**12) == MAX_K
    assert population_size(100, 10_000, headroom=0.2) == 20


def test_auto_size_per_engine_and_device():
    cnn, res = CNN((3, 16, 16), 10, channels=[32, 64]), ResCNN((3, 16, 16), 10, channels=[8, 16])
    assert auto_population_size(cnn, (3, 16, 16), 128, "adam", torch.device("cpu")) == CPU_K
    assert auto_population_size(res, (3, 16, 16), 128, "adam", torch.device("cpu")) == CPU_K  # stacked too
    own = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1, padding_mode="circular"), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    assert auto_population_size(own, (3, 16, 16), 128, "adam", torch.device("cpu")) == 1  # vmap: one by one on the CPU
    per = member_bytes(cnn, (3, 16, 16), 128, "adam")
    cuda = torch.device("cuda")  # the device is only named: the free memory is given
    assert auto_population_size(cnn, (3, 16, 16), 128, "adam", cuda, free_bytes=20 * per) == 10
    assert auto_population_size(res, (3, 16, 16), 128, "adam", cuda, free_bytes=10**15) == MAX_K
    assert auto_population_size(own, (3, 16, 16), 128, "adam", cuda, free_bytes=10**15) == MAX_K  # vmap on CUDA


def test_batch_trials_takes_auto_or_a_whole_number():
    assert settings_from_config(compose_config(TINY + ["batch_trials=auto"])).batch_trials == "auto"
    assert settings_from_config(compose_config(TINY + ["batch_trials=3"])).batch_trials == 3
    for bad in ("0", "fast", "1.5", "true"):
        with pytest.raises(ConfigError, match=r"^batch_trials: must be auto or a whole number >= 1"):
            settings_from_config(compose_config(TINY + [f"batch_trials={bad}"]))


def test_auto_size_on_cuda_without_an_estimate_is_one():
    """A forward that needs real data cannot run on the meta device: with no estimate of what a member needs,
    ``auto`` trains one at a time on CUDA rather than guess a K that may not fit."""

    class NeedsValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * (1.0 if float(x.abs().max()) < 1e9 else 0.0)  # .item() on the input

    model = NeedsValues()
    with pytest.raises(Exception):
        member_bytes(model, (6,), 8, "adam")
    cuda = torch.device("cuda")  # only named: the free memory is given
    assert auto_population_size(model, (6,), 8, "adam", cuda, free_bytes=10**12) == 1
