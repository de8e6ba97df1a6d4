"""threads=auto: the count that trains the proxy fastest, measured at start (ties go to fewer threads);
threads=N as given; the study trains on the chosen count and torch gets its count back afterwards."""
from __future__ import annotations

import math

import pytest
import torch

import initsearch.search.sequential as sequential_module
import initsearch.search.threads as threads_module
from initsearch.cli import run
from initsearch.errors import ConfigError
from initsearch.search.settings import settings_from_config
from initsearch.search.threads import ThreadChoice, candidates, choose_threads, time_proxy, use_threads
from initsearch.search.trial import prepare
from tests.conftest import TINY, compose_config


def settings_of(*extra: str):
    return settings_from_config(compose_config(TINY + list(extra)))


def test_candidates_double_up_to_the_cores():
    assert candidates(1) == [1]
    assert candidates(2) == [1, 2]
    assert candidates(6) == [1, 2, 4, 6]
    assert candidates(8) == [1, 2, 4, 8]


@pytest.mark.parametrize("timings, chosen", [
    ({1: 0.10, 2: 0.30, 4: 0.50, 8: 0.90}, 1),  # a tiny proxy: more threads only wait for each other
    ({1: 1.00, 2: 0.50, 4: 0.48, 8: 0.60}, 2),  # 4 is not clearly faster than 2: the tie goes to fewer
    ({1: 1.00, 2: 0.55, 4: 0.30, 8: 0.20}, 8),  # a large proxy uses the cores
    ({1: 1.00, 2: 0.95, 4: 0.50, 8: 0.40}, 1),  # 2 does not win: 4 and 8 are not tried
])
def test_auto_keeps_the_fastest_count_and_ties_go_to_fewer_threads(timings, chosen, monkeypatch):
    settings = settings_of("n_trials=1000")  # long enough to be worth measuring
    proxy = prepare(settings)
    monkeypatch.setattr(threads_module, "available_cores", lambda n_workers=1: 8)
    monkeypatch.setattr(threads_module, "time_proxy", lambda s, p, n, **kw: timings[n])
    choice = choose_threads(settings, proxy)
    tried = [n for n in timings if n <= max(choice.seconds)]
    assert choice.threads == chosen and choice.seconds == {n: timings[n] for n in tried}
    assert max(choice.seconds) == (8 if chosen == 8 else [n for n in timings if n > chosen][0])
    assert choice.describe().startswith(f"threads: {chosen} (auto; 30 proxy steps took 1: ")


def test_a_given_count_or_a_single_core_is_not_measured(monkeypatch):
    def never(*args):
        raise AssertionError("measured")

    monkeypatch.setattr(threads_module, "time_proxy", never)
    assert choose_threads(settings_of("threads=3"), None) == ThreadChoice(3)
    monkeypatch.setattr(threads_module, "available_cores", lambda n_workers=1: 1)
    settings = settings_of()
    assert choose_threads(settings, prepare(settings)) == ThreadChoice(1)


def test_workers_on_one_machine_split_its_cores(monkeypatch):
    monkeypatch.setattr(threads_module.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert threads_module.available_cores(1) == 8 and threads_module.available_cores(3) == 2


def test_the_measurement_is_a_real_short_run_and_restores_the_count():
    settings = settings_of()
    proxy = prepare(settings)
    torch.set_num_threads(1)
    seconds = time_proxy(settings, proxy, 2)
    assert math.isfinite(seconds) and seconds > 0
    assert torch.get_num_threads() == 1
    with use_threads(ThreadChoice(2)):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_a_bad_thread_count_is_one_line(value):
    with pytest.raises(ConfigError, match=r"^threads: must be auto or a whole number >= 1, got "):
        settings_of(f"threads={value}")


def test_the_study_trains_on_the_chosen_count(in_tmp, monkeypatch):
    seen, real = [], sequential_module.train_run

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential_module, "train_run", spy)
    torch.set_num_threads(1)
    run(compose_config(TINY + [f"storage={in_tmp}/s.journal", "study_name=threads", "threads=2"]), in_tmp / "out")
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == 1  # given back after the study


def test_a_slow_count_is_not_run_again(monkeypatch):
    settings = settings_of()
    proxy = prepare(settings)
    runs, real = [], threads_module.train_run
    monkeypatch.setattr(threads_module, "train_run", lambda *a, **k: runs.append(1) or real(*a, **k))
    time_proxy(settings, proxy, 1)
    assert len(runs) == 1 + threads_module.REPEATS  # a warm-up, then the repeats
    runs.clear()
    time_proxy(settings, proxy, 2, warm_up=False, enough_s=0.0)
    assert len(runs) == 1  # already past enough_s: it cannot win


def test_a_proxy_that_cannot_train_leaves_the_error_to_its_trials(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("user model exploded")

    monkeypatch.setattr(threads_module, "train_run", broken)
    monkeypatch.setattr(threads_module, "available_cores", lambda n_workers=1: 2)
    settings = settings_of("n_trials=1000")
    assert choose_threads(settings, prepare(settings)) == ThreadChoice(1)


def test_a_short_study_is_not_measured(monkeypatch):
    """The measurement would cost more than PROBE_SHARE of the study's training: one thread, said why."""
    def never(*args, **kwargs):
        raise AssertionError("measured")

    monkeypatch.setattr(threads_module, "time_proxy", never)
    monkeypatch.setattr(threads_module, "available_cores", lambda n_workers=1: 2)
    settings = settings_of()  # 2 trials + 2 baselines, 1 seed, 20 steps: 80 steps planned
    choice = choose_threads(settings, prepare(settings))
    assert choice.threads == 1 and not choice.seconds
    assert choice.describe() == "threads: 1 (auto; a short study (80 steps planned): not measured)"
    assert threads_module.probe_steps(2) > threads_module.PROBE_SHARE * threads_module.planned_steps(settings)


def test_a_command_that_plans_its_own_steps_is_measured_by_them(monkeypatch):
    """``validate`` passes the steps it plans (contenders x seeds x budget): a long validation of a study
    whose own plan is short is measured, a short one is not."""
    timed = []

    def fake(settings, proxy, n, **kwargs):
        timed.append(n)
        return 1.0 / n

    monkeypatch.setattr(threads_module, "time_proxy", fake)
    monkeypatch.setattr(threads_module, "available_cores", lambda n_workers=1: 2)
    settings = settings_of()  # 80 steps planned by the study itself: not measured
    proxy = prepare(settings)
    short = choose_threads(settings, proxy, planned=100)
    assert short.threads == 1 and timed == []
    assert short.describe() == "threads: 1 (auto; a short run (100 steps planned): not measured)"
    long = choose_threads(settings, proxy, planned=3 * 5 * 1000)
    assert timed == [1, 2] and long.threads == 2 and set(long.seconds) == {1, 2}
