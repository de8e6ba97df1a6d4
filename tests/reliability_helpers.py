"""Models and helpers for the reliability tests: user models that are slow or break, and study/CLI helpers.

The models are built through ``model._target_=tests.reliability_helpers.<Class>`` (the subprocesses get the
repository root on ``PYTHONPATH``). They look like the TINY MLP (20 -> width -> classes) to the study.
"""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from tests.conftest import PYTHON, REPO, subprocess_env


def _in_training(module: nn.Module) -> bool:
    """True in a training step (train mode with autograd on); layer discovery runs in eval mode, no_grad."""
    return module.training and torch.is_grad_enabled()


class _TwoLayer(nn.Module):
    def __init__(self, input_shape: Sequence[int] = (20,), num_classes: int = 4, width: int = 16, **_: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(int(torch.tensor(list(input_shape)).prod()), width)
        self.act1 = nn.ReLU()
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act1(self.fc1(x.flatten(1))))


class SlowMLP(_TwoLayer):
    """Sleeps ``delay`` seconds in every training forward pass: trials that last long enough to be killed."""

    def __init__(self, input_shape: Sequence[int] = (20,), num_classes: int = 4, delay: float = 0.05, **kw: Any) -> None:
        super().__init__(input_shape, num_classes, **kw)
        self.delay = float(delay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _in_training(self):
            time.sleep(self.delay)
        return super().forward(x)


class BrokenInTraining(_TwoLayer):
    """Works for layer discovery, raises in every training step: every trial fails."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _in_training(self):
            raise RuntimeError("user model exploded in forward")
        return super().forward(x)


class NanLoss(_TwoLayer):
    """Outputs NaN in training: the loss is NaN from the first step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * float("nan") if _in_training(self) else out


class ExplodingWeights(_TwoLayer):
    """A weight that grows by 1e30 per training step (outside the loss, so only the weights show it)."""

    def __init__(self, input_shape: Sequence[int] = (20,), num_classes: int = 4, **kw: Any) -> None:
        super().__init__(input_shape, num_classes, **kw)
        self.drift = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _in_training(self):
            with torch.no_grad():
                self.drift.mul_(1e30)
        return super().forward(x)


class AlwaysBroken(_TwoLayer):
    """Raises on any input, layer discovery included."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("this model cannot run")


def target(cls: type, **kwargs: Any) -> list[str]:
    """Overrides that make the study's proxy ``cls`` (with extra constructor arguments). ``model=mlp`` keeps the
    built-in group, so the tiny study's ``model.depth``/``model.width`` overrides still compose (they never
    reach ``cls``: a built-in proxy's keys are dropped for a ``_target_``). No selection stage: these models
    test how studies stop, fail and resume, and retraining the front-runners would only sleep longer."""
    return ["model=mlp", f"+model._target_=tests.reliability_helpers.{cls.__name__}", "select.top_k=0"] + [
        f"+model.{k}={v}" for k, v in kwargs.items()]


def load_trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    from initsearch.search.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(deepcopy=False)


def cli_env(**extra: str) -> dict[str, str]:
    env = subprocess_env()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def cli(args: Sequence[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m initsearch ARGS`` in ``cwd``; stdout/stderr captured as text."""
    return subprocess.run([PYTHON, "-m", "initsearch", *args], capture_output=True, text=True, env=cli_env(),
                          cwd=cwd, timeout=timeout)


def start_cli(args: Sequence[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """``python -m initsearch ARGS`` in the background (its own process group), output into ``log``."""
    with open(log, "w") as handle:
        return subprocess.Popen([PYTHON, "-m", "initsearch", *args], stdout=handle, stderr=subprocess.STDOUT,
                                env=cli_env(**env), cwd=cwd, start_new_session=True)


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``check`` every 0.2 s; fail the test after ``timeout`` seconds (or when ``proc`` ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def running_trial(storage: str, name: str, min_number: int = 0) -> optuna.trial.FrozenTrial | None:
    """A RUNNING trial numbered ``>= min_number`` that has started training (has a worker), or ``None``."""
    try:
        trials = load_trials(storage, name)
    except Exception:
        return None
    for t in trials:
        if t.state == optuna.trial.TrialState.RUNNING and t.number >= min_number and "worker" in t.user_attrs:
            return t
    return None


def fresh_running_trial(storage: str, name: str, after: int = -1, max_age: float = 1.0) -> optuna.trial.FrozenTrial | None:
    """A RUNNING trial numbered above ``after`` that started training less than ``max_age`` seconds ago
    (so a signal sent now lands in the middle of it, not as it ends), or ``None``. Training has started once
    the trial recorded its policy: its parameters are all sampled then (a trial stopped while it samples
    keeps only the parameters drawn so far, and its retry draws the rest)."""
    import datetime

    trial = running_trial(storage, name, after + 1)
    if trial is None or trial.datetime_start is None or "policy" not in trial.user_attrs:
        return None
    return trial if (datetime.datetime.now() - trial.datetime_start).total_seconds() < max_age else None


def one_line_error(stderr: str) -> str:
    """The last line of stderr, checked to be the CLI's error line, with no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("initsearch: error: "), stderr
    return lines[-1]
