"""How many torch threads the study trains with: ``threads=N``, or ``auto`` (the default) measured at start.

A trial trains a small proxy for a few hundred steps; its matrix products are too small for several threads
to pay off, and on a small or busy CPU the threads mostly wait for each other (docs/performance.md,
"Threads"). ``auto`` times a short run of the proxy (``MEASURE_STEPS`` steps, best of ``REPEATS``) with one
thread and with each doubling up to the cores this worker has, and keeps the fastest; a count only wins
when it takes at most ``MARGIN`` of the time of the best fewer, so a tie goes to fewer threads, and the
trying stops at the first count that does not win. On a GPU the
count does not matter and nothing is measured; nor in a short study, where the measurement would cost more
than ``PROBE_SHARE`` of the training it plans (one thread then, what small proxies train fastest on).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from initsearch.errors import first_line
from initsearch.proxy.train import train_run
from initsearch.search.settings import StudySettings
from initsearch.search.trial import Proxy, fresh_model

log = logging.getLogger("initsearch")

MEASURE_STEPS = 30
REPEATS = 2
MARGIN = 0.9  # more threads must take at most 90% of the time of fewer to be chosen
PROBE_SHARE = 0.05  # auto measures only when its steps are at most this share of the study's planned steps


@dataclass
class ThreadChoice:
    """The count chosen and, when measured, the seconds of the short run per count tried."""

    threads: int
    seconds: dict[int, float] = field(default_factory=dict)
    note: str = ""  # why ``auto`` measured nothing

    def describe(self) -> str:
        if not self.seconds:
            return f"threads: {self.threads}" + (f" (auto; {self.note})" if self.note else "")
        timed = ", ".join(f"{n}: {1000 * s:.0f} ms" for n, s in sorted(self.seconds.items()))
        return f"threads: {self.threads} (auto; {MEASURE_STEPS} proxy steps took {timed})"


def available_cores(n_workers: int = 1) -> int:
    """The cores this process may use (its CPU affinity), shared between ``n_workers`` workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, n_workers))


def candidates(cores: int) -> list[int]:
    """1, 2, 4, ... up to ``cores``, and ``cores`` itself."""
    out, n = [], 1
    while n < cores:
        out.append(n)
        n *= 2
    return out + [cores]


def probe_steps(cores: int) -> int:
    """Training steps ``auto`` runs at most on ``cores`` cores: a warm-up and the repeats on one thread,
    the repeats on each larger count."""
    return MEASURE_STEPS * (1 + REPEATS * len(candidates(cores)))


def planned_steps(settings: StudySettings) -> int:
    """Training steps the study plans: its searched trials and baselines, each on every evaluation seed."""
    return (settings.n_trials + len(settings.baselines)) * settings.score.seeds * settings.train.steps


def time_proxy(settings: StudySettings, proxy: Proxy, threads: int, repeats: int = REPEATS,
               warm_up: bool = True, enough_s: float = math.inf) -> float:
    """Seconds of ``MEASURE_STEPS`` training steps of a fresh proxy on ``threads`` threads: the best of
    ``repeats`` runs, after a warm-up run (the allocator, the kernels) unless ``warm_up`` is off; no more
    runs once one took ``enough_s`` or longer (it cannot win: on a busy CPU a losing count is slow)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = replace(settings.train, steps=MEASURE_STEPS, eval_every=MEASURE_STEPS)
        best = math.inf
        for i in range(repeats + int(warm_up)):
            model = fresh_model(settings.model, proxy.data, proxy.device, seed=i)
            started = time.perf_counter()
            train_run(model, proxy.data, cfg, seed=i)
            if warm_up and i == 0:
                continue
            best = min(best, time.perf_counter() - started)
            if best >= enough_s:
                break
        return best
    finally:
        torch.set_num_threads(before)


def choose_threads(settings: StudySettings, proxy: Proxy, planned: int | None = None) -> ThreadChoice:
    """The thread count to train with (``settings.threads``; ``auto`` as the module says). Counts are tried
    in increasing order and the trying stops at the first that is not faster: on a busy CPU each losing
    run is slow, so the measurement costs about one of them. ``planned``: the training steps the command
    plans, when it is not the study's (``validate``)."""
    cores = available_cores(settings.n_workers)
    if settings.threads != "auto":
        return ThreadChoice(int(settings.threads))
    if proxy.device.type != "cpu" or cores == 1:
        return ThreadChoice(cores)
    what = "study" if planned is None else "run"
    planned = planned_steps(settings) if planned is None else planned
    if probe_steps(cores) > PROBE_SHARE * planned:
        return ThreadChoice(1, note=f"a short {what} ({planned} steps planned): not measured")
    seconds: dict[int, float] = {}
    chosen = 1
    try:
        for n in candidates(cores):
            first = n == 1
            seconds[n] = time_proxy(settings, proxy, n, warm_up=first,
                                    enough_s=math.inf if first else seconds[chosen] / MARGIN)
            if first:
                continue
            if seconds[n] > MARGIN * seconds[chosen]:
                break
            chosen = n
    except Exception as exc:  # a model that fails to train fails its trials, where the study records why
        log.debug("threads=auto: the proxy did not train (%s); one thread", first_line(exc, with_type=True))
        return ThreadChoice(1)
    return ThreadChoice(chosen, seconds)


@contextmanager
def use_threads(choice: ThreadChoice) -> Iterator[ThreadChoice]:
    """Torch on ``choice.threads`` threads while inside; the count it had afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    try:
        yield choice
    finally:
        torch.set_num_threads(before)
