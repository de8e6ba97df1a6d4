"""The matrix-product route: oneDNN only where it is exact to float32 precision and faster, measured."""
from __future__ import annotations

import copy
import functools
import time

import pytest
import torch
from torch import nn

import initsearch.proxy.population as population
from initsearch.proxy import kernels as kernels
from initsearch.proxy.losses import LOSSES
from initsearch.proxy.models import MLP
from initsearch.proxy.optimizers import FusedSGD
from initsearch.proxy.population import train_population
from initsearch.proxy.train import TrainConfig, train_run
from tests.conftest import teacher_data

needs_route = pytest.mark.skipif(not kernels.available(), reason="this torch has no oneDNN matmul setting")


@pytest.fixture(autouse=True)
def fresh_verdicts():
    kernels.forget()
    yield
    kernels.forget()


def current() -> str:
    return torch.backends.mkldnn.matmul.fp32_precision


def test_matches_accepts_float32_rounding_and_refuses_bfloat16_rounding():
    torch.manual_seed(0)
    ref = [torch.randn(64, 128), torch.randn(10)]
    assert kernels.matches(ref, [t.clone() for t in ref])
    assert kernels.matches(ref, [t * (1 + 1e-6) for t in ref])
    assert not kernels.matches(ref, [ref[0].bfloat16().float(), ref[1]])  # 8-bit mantissa: ~1e-3 off
    assert not kernels.matches(ref, [ref[0], ref[1][:5]])
    assert not kernels.matches(ref, ref[:1])
    assert not kernels.matches(ref, [ref[0], ref[1] * float("nan")])


def fake_step(lossy: bool, onednn_s: float, default_s: float, calls: list[str]):
    """A step whose result and duration depend on the route it runs on."""
    torch.manual_seed(1)
    value = torch.randn(256)

    def step() -> list[torch.Tensor]:
        on = current() == kernels.ONEDNN
        calls.append("onednn" if on else "default")
        time.sleep(onednn_s if on else default_s)
        return [value.bfloat16().float() if on and lossy else value.clone()]

    return step


@needs_route
def test_the_route_is_taken_only_when_exact_and_faster_and_the_verdict_is_cached():
    calls: list[str] = []
    assert kernels.choose_route(fake_step(False, 0.001, 0.01, calls), "exact-fast")
    assert "onednn" in calls and "default" in calls
    calls.clear()
    assert kernels.choose_route(fake_step(False, 0.001, 0.01, calls), "exact-fast") and calls == []  # cached
    assert not kernels.choose_route(fake_step(True, 0.001, 0.01, calls), "lossy-fast")
    assert not kernels.choose_route(fake_step(False, 0.01, 0.001, calls), "exact-slow")
    assert current() in kernels.DEFAULT_PRECISIONS  # every probe puts the setting back


@needs_route
def test_keys_sharing_a_speed_key_are_timed_once_but_each_checked_for_exactness():
    calls: list[str] = []
    assert kernels.choose_route(fake_step(False, 0.001, 0.01, calls), ("K", 10), speed_key="family")
    timed = len(calls)
    calls.clear()
    assert kernels.choose_route(fake_step(False, 0.001, 0.01, calls), ("K", 9), speed_key="family")
    assert sorted(calls) == ["default", "onednn"] and timed > 2  # one step each way: exactness only
    assert not kernels.choose_route(fake_step(True, 0.001, 0.01, calls), ("K", 8), speed_key="family")


@needs_route
def test_a_family_timed_slower_on_onednn_runs_no_probe_for_its_other_keys():
    calls: list[str] = []
    assert not kernels.choose_route(fake_step(False, 0.01, 0.001, calls), ("K", 10), speed_key="slow-family")
    assert "onednn" in calls and "default" in calls
    calls.clear()
    assert not kernels.choose_route(fake_step(False, 0.001, 0.01, calls), ("K", 9), speed_key="slow-family")
    assert calls == []  # the family is slower on oneDNN: no exactness check can make it worth taking
    assert kernels.known(("K", 9)) is False
    assert kernels.choose_route(fake_step(False, 0.001, 0.01, calls), ("K", 9), speed_key="fast-family") is False
    assert calls == []  # (the verdict per key is cached)


@needs_route
def test_a_family_whose_first_probe_was_inexact_is_not_probed_again():
    calls: list[str] = []
    assert not kernels.choose_route(fake_step(True, 0.001, 0.01, calls), ("K", 10), speed_key="lossy-family")
    assert sorted(calls) == ["default", "onednn"]  # the exactness check only: no timing
    calls.clear()
    assert not kernels.choose_route(fake_step(False, 0.001, 0.01, calls), ("K", 9), speed_key="lossy-family")
    assert calls == []
    assert kernels.choose_route(fake_step(False, 0.001, 0.01, calls), ("K", 7), speed_key="other-family")


@needs_route
def test_a_precision_the_user_chose_is_never_changed():
    before = current()
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        assert not kernels.available()
        calls: list[str] = []
        assert not kernels.choose_route(fake_step(False, 0.001, 0.01, calls), "user-chose") and calls == []
        with kernels.Route() as route:
            route.use(False)
            assert current() == "bf16"
        assert current() == "bf16"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


@needs_route
def test_route_restores_the_setting():
    before = current()
    with kernels.Route() as route:
        route.use(True)
        assert current() == kernels.ONEDNN
        route.use(False)
        assert current() == before
        route.use(True)
    assert current() == before


def _current_or_none() -> str:
    return current() if kernels._backend() is not None else "none"


def _spy_steps(monkeypatch, on_step=None) -> list[str]:
    """The route setting at every optimizer step (the probe never steps an optimizer)."""
    seen: list[str] = []
    original = FusedSGD.step

    def step(self, *args, **kwargs):
        seen.append(_current_or_none())
        if on_step is not None:
            on_step(len(seen))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FusedSGD, "step", step)
    return seen


def test_population_steps_use_the_chosen_route_and_validation_the_default(monkeypatch):
    """Whatever the probe decides on this machine, every training step runs on its route, validation and
    everything after training on the caller's setting, and the curves are train_run's."""
    data = teacher_data((16,), n_train=256, n_val=64)
    cfg = TrainConfig(steps=12, batch_size=64, lr=0.05, eval_every=4)
    # exactness still decides; speed does not, so the oneDNN route runs wherever it is exact
    monkeypatch.setattr(population, "choose_route", functools.partial(kernels.choose_route, min_gain=-1e9))
    validation: set[str] = set()
    original_logits = population._StackedSequential.logits

    def logits(self, *args, **kwargs):
        validation.add(_current_or_none())
        return original_logits(self, *args, **kwargs)

    monkeypatch.setattr(population._StackedSequential, "logits", logits)
    before = _current_or_none()
    models = []
    for i in range(4):
        torch.manual_seed(i)
        models.append(MLP((16,), 3, depth=3, width=32))
    copies = [copy.deepcopy(m) for m in models]
    steps = _spy_steps(monkeypatch)
    together = train_population(models, data, cfg, seeds=[5] * 4)
    assert together.engine == "stacked"
    monkeypatch.undo()
    verdicts = list(kernels._VERDICTS.values())
    assert len(verdicts) == 1, "the stacked engine asked for a route once"
    assert steps == [kernels.ONEDNN if verdicts[0] else before] * cfg.steps
    assert validation == {before}
    assert _current_or_none() == before
    for member, copy_ in zip(together.curves, copies):
        alone = train_run(copy_, data, cfg, seed=5)
        torch.testing.assert_close(torch.tensor(member.train_loss), torch.tensor(alone.train_loss), rtol=1e-4, atol=1e-4)
    for m, c in zip(models, copies):
        for (name, a), (_, b) in zip(m.state_dict().items(), c.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_the_setting_is_restored_when_a_training_step_is_interrupted(monkeypatch):
    data = teacher_data((8,), n_train=64, n_val=16)
    cfg = TrainConfig(steps=9, batch_size=16, eval_every=3)
    monkeypatch.setattr(population, "choose_route", lambda step, key, **_: True)
    before = _current_or_none()

    def interrupt(count: int) -> None:
        if count == 5:  # in the middle of the second segment, with the route on
            raise KeyboardInterrupt

    steps = _spy_steps(monkeypatch, interrupt)
    models = [nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3)]
    with pytest.raises(KeyboardInterrupt):
        train_population(models, data, cfg, seeds=[0, 1, 2])
    if kernels.available():
        assert steps[-1] == kernels.ONEDNN
    assert _current_or_none() == before


def test_the_probe_step_does_not_depend_on_the_members_weights(monkeypatch):
    """The verdict is cached per shape, so the probe computes on synthetic operands: zero weights (exact in
    bfloat16) must not change what it compares."""
    data = teacher_data((8,), n_train=64, n_val=16)
    cfg = TrainConfig(steps=3, batch_size=16, eval_every=3)
    probes = []
    monkeypatch.setattr(population, "choose_route", lambda step, key, **_: probes.append(step) or False)
    models = [nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3)]
    stack = population._build_stack(models, [0, 1, 2], cfg, torch.device("cpu"), population._StackedSequential(models[0], LOSSES["cross_entropy"]))
    population._onednn_route(stack, data, cfg)
    first = [t.clone() for t in probes[0]()]
    with torch.no_grad():
        for p in stack.params.values():
            p.zero_()
    second = probes[0]()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(bool(t.abs().sum() > 0) for t in first)  # real products, not zeros


def test_stacks_that_differ_only_in_rows_share_one_speed_family(monkeypatch):
    """Members leave a round at checkpoints, so one population meets several row counts: the speed is timed
    once for every count of 2 or more (one family), once for a single row."""
    data = teacher_data((8,), n_train=64, n_val=16)
    cfg = TrainConfig(steps=12, batch_size=16, eval_every=3)
    families: dict[object, set[int]] = {}

    def record(step, key, speed_key=None, **_):
        families.setdefault(speed_key, set()).add(key.rows)
        return False

    monkeypatch.setattr(population, "choose_route", record)
    models = [nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(4)]
    leave_at = {0: 3, 1: 6, 2: 9}  # member -> the checkpoint where its callback stops it

    def stop_at(member):
        return lambda step, curve: step >= leave_at.get(member, 99)

    train_population(models, data, cfg, seeds=[0] * 4, on_checkpoint=[stop_at(i) for i in range(4)])
    assert sorted(sorted(rows) for rows in families.values()) == [[1], [2, 3, 4]]
    key = next(k for k, rows in families.items() if rows == {2, 3, 4})
    assert key.rows == 2 and [shape for _, shape, _, _ in key.params] == [(8, 8), (8,), (3, 8), (3,)]  # a member's
