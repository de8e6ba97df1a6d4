"""Shared helpers: compose the project's Hydra config the way the app does, with tiny overrides."""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

from initsearch.cli import config_dir

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A study that takes a few seconds: synthetic data, a 2-layer MLP, 20 steps, 2 baselines; no pruner, so every
# trial trains to the end whatever the scores (tests of pruning choose theirs).
TINY = [
    "data=synthetic",
    "model.depth=2",
    "model.width=16",
    "train.steps=20",
    "train.eval_every=10",
    "n_trials=2",
    "baselines=[he,xavier]",
    "score.seeds=1",
    "tracking_uri=none",
    "pruner=none",
]


def compose_config(overrides: list[str], study: str | None = None) -> DictConfig:
    """The composed config of ``python -m initsearch [study=...] overrides``."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        full = ([f"study={study}"] if study else []) + list(overrides)
        return compose(config_name="config", overrides=full)


@dataclass
class TensorData:
    """The duck-typed data object ``train_run``/``train_population`` take (``initsearch.proxy.train.TrainData``)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]


def teacher_data(shape: tuple[int, ...] = (10,), n_train: int = 512, n_val: int = 256, classes: int = 3, seed: int = 0) -> TensorData:
    """A learnable problem: labels are the argmax of a random linear teacher on Gaussian inputs of ``shape``."""
    g = torch.Generator().manual_seed(seed)
    dim = 1
    for d in shape:
        dim *= d
    w = torch.randn(dim, classes, generator=g)
    x = torch.randn(n_train + n_val, *shape, generator=g)
    y = (x.flatten(1) @ w).argmax(dim=1)
    return TensorData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes, tuple(shape))


def plain_mlp(depth: int = 10, width: int = 64, act: type[nn.Module] = nn.ReLU, d_in: int = 20, d_out: int = 10) -> nn.Sequential:
    """``depth`` Linear layers with ``act`` between them, as a flat ``nn.Sequential``."""
    mods: list[nn.Module] = []
    for _ in range(depth - 1):
        mods += [nn.Linear(d_in, width), act()]
        d_in = width
    mods.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*mods)


@pytest.fixture(autouse=True, scope="session")
def sigint_acts():
    """The Ctrl-C tests need SIGINT to act. A suite started in the background of a non-interactive shell
    (``make test &`` in a script) inherits it ignored (POSIX), and initsearch keeps an ignored SIGINT ignored
    (``nohup``), by design: give this process, and the commands it starts, the default handler back."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test on one torch thread: the tensors are small, and on a busy 2-core machine threads thrash."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in a fresh working directory (the default stores are relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spy_populations(monkeypatch) -> list[tuple[str, int]]:
    """(engine, members) of every population ``search.trial.train_contenders`` trains (selection, validate)."""
    import initsearch.search.trial as trial_mod

    seen: list[tuple[str, int]] = []
    original = trial_mod.train_population

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append((result.engine, len(result.curves)))
        return result

    monkeypatch.setattr(trial_mod, "train_population", spy)
    return seen
