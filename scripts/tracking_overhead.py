"""How much MLflow tracking adds to a study's wall time.

Runs the default study (digits_mlp, its baselines, ``--n-trials`` searched trials) with tracking off and
with the default tracking (``sqlite:///<tmp>/mlflow.db``), each in its own temporary working directory,
and prints seconds per trial and the overhead in percent. The timed span is what the study's thread
waits for: ``run_study`` plus draining the tracker's queue of trial logs. The one-time costs, opening the
store and starting the writer process (``make_tracker``) and the end-of-study artifacts and plots (``study_finished``), are printed apart.
Both modes run the same trials (same seed and sampler; the tracker never steers), so the difference is
the tracking. ``--repeats`` alternates off/on several times and reports medians and the best of each (on a
shared machine other load only ever adds time). It also prints, per trial, the CPU the study process spends
on tracking (building and sending the payloads) and the CPU the writer process spends logging the trial:
figures that other load on the machine does not change. Before and after the runs it checks whether a
second busy process slows this one (a VM whose two cores share one physical core): the writer process
is nearly free for the study only when it does not.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/tracking_overhead.py [--n-trials 12] [--repeats 1] [overrides ...]
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from initsearch.cli import config_dir  # noqa: E402
from initsearch.export import export_policy  # noqa: E402
from initsearch.search.report import summarize  # noqa: E402
from initsearch.search.settings import settings_from_config  # noqa: E402
from initsearch.search.study import run_study  # noqa: E402
from initsearch.search.trial import prepare  # noqa: E402
from initsearch.search.workers import FINISHED  # noqa: E402
from initsearch.tracking.tracker import make_tracker  # noqa: E402


@dataclass
class Timing:
    """One study's wall times, in seconds."""

    mode: str
    trials: int
    study_s: float  # run_study + draining the trial logs
    setup_s: float  # make_tracker
    finish_s: float  # study_finished (artifacts, plots, final drain)
    median_trial_s: float  # the median of the trials' own durations (robust to bursts of other load)
    trial_cpu_s: float  # CPU spent logging the trials: the writer process's (0 when off)
    start_cpu_s: float  # CPU the tracking thread spent on the study's start: experiment, parent run, config
    main_cpu_s: float  # CPU the study process spent per its trials: building payloads + sending them
    writer_cpu_s: float  # the writer process's CPU in all (its start, importing MLflow, included)
    drain_s: float  # the wait at the end of run_study for the last trial logs

    @property
    def per_trial(self) -> float:
        return self.study_s / max(self.trials, 1)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def one_study(tracking: bool, n_trials: int, extra: list[str]) -> Timing:
    """Run the default study once in a fresh temporary working directory; time its parts."""
    old = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="initsearch-overhead-") as tmp:
        os.chdir(tmp)
        try:
            overrides = [f"n_trials={n_trials}", f"storage={tmp}/study.journal",
                         "tracking_uri=null" if tracking else "tracking_uri=none", *extra]
            cfg = compose_cfg(overrides)
            settings = settings_from_config(cfg)
            proxy = prepare(settings)  # data and layers: the same for both modes, not timed
            t0 = time.perf_counter()
            tracker = make_tracker(settings)
            t1 = time.perf_counter()
            study = run_study(settings, proxy, tracker, OmegaConf.to_yaml(cfg))
            t_run = time.perf_counter()
            flush = getattr(tracker, "flush", None)
            if flush is not None:
                flush()
            t2 = time.perf_counter()
            cpu = getattr(tracker, "tracking_cpu_s", {})
            summary = summarize(study, settings.score.metric)
            path = export_policy(study, Path(tmp) / "best_policy.json")
            t3 = time.perf_counter()
            tracker.study_finished(study, summary, path)
            t4 = time.perf_counter()
            finished = study.get_trials(deepcopy=False, states=FINISHED)
            durations = [t.duration.total_seconds() for t in finished if t.duration is not None]
        finally:
            os.chdir(old)
    return Timing("on" if tracking else "off", len(finished), t2 - t1, t1 - t0, t4 - t3,
                  statistics.median(durations) if durations else math.nan, cpu.get("_log_trial", 0.0),
                  cpu.get("_start", 0.0), cpu.get("trial_finished", 0.0) + cpu.get("_send_trial", 0.0),
                  cpu.get("writer", 0.0), t2 - t_run)


def _spin(n: int) -> float:
    """Seconds this process takes for ``n`` iterations of a plain Python loop."""
    started = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - started


def second_core_slowdown(n: int = 3_000_000) -> float:
    """How much a busy second process slows a one-thread loop here (fraction): about 0 when the machine
    really has a second core free, about 1 when the two cores share one (a busy VM host). The writer
    process is only nearly free for the study in the first case."""
    alone = min(_spin(n) for _ in range(2))
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.2)
        shared = min(_spin(n) for _ in range(2))
    finally:
        busy.kill()
        busy.wait()
    return shared / alone - 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=12, help="searched trials (the 6 baselines run too)")
    parser.add_argument("--repeats", type=int, default=1, help="off/on pairs; medians and bests are reported")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. score.seeds=1")
    args = parser.parse_args(argv)
    logging.getLogger("initsearch").setLevel(logging.WARNING)
    print(f"torch threads: {__import__('torch').get_num_threads()}, cpus: {os.cpu_count()}; a busy second process "
          f"slows this one by {100.0 * second_core_slowdown():+.0f}% (about 0: two free cores; about +100%: they share one)")
    runs: dict[str, list[Timing]] = {"off": [], "on": []}
    for r in range(args.repeats):
        for tracking in (False, True):
            t = one_study(tracking, args.n_trials, args.overrides)
            runs[t.mode].append(t)
            print(f"  [{r + 1}/{args.repeats}] tracking {t.mode:>3}: {t.trials} trials, study {t.study_s:.2f} s "
                  f"({t.per_trial:.3f} s/trial); setup {t.setup_s:.2f} s, end of study {t.finish_s:.2f} s")
    off, on = runs["off"], runs["on"]

    def med(ts: list[Timing], key: str) -> float:
        return statistics.median(getattr(t, key) for t in ts)

    def pct(a: float, b: float) -> str:
        return f"{100.0 * (a - b) / b:+.1f}%"

    off_s, on_s = med(off, "per_trial"), med(on, "per_trial")
    best_off, best_on = min(t.per_trial for t in off), min(t.per_trial for t in on)
    def per_trial_ms(key: str) -> float:
        return 1000.0 * statistics.median(getattr(t, key) / max(t.trials, 1) for t in on)

    cpu_ms, main_ms = per_trial_ms("trial_cpu_s"), per_trial_ms("main_cpu_s")
    print(f"seconds per trial (run_study + drain of the trial logs, median of {args.repeats}): "
          f"off {off_s:.3f}, on {on_s:.3f}; overhead {pct(on_s, off_s)}")
    print(f"  best of {args.repeats}: off {best_off:.3f}, on {best_on:.3f}; overhead {pct(best_on, best_off)}")
    print(f"  median trial duration: off {med(off, 'median_trial_s'):.3f} s, on {med(on, 'median_trial_s'):.3f} s")
    print(f"  study process CPU for tracking: {main_ms:.2f} ms per trial (payload + send) = "
          f"{100.0 * main_ms / 1000.0 / off_s:.1f}% of an untracked trial")
    print(f"  writer process CPU: {cpu_ms:.1f} ms per trial logging it (on another core); "
          f"{med(on, 'writer_cpu_s'):.2f} s in all, its start included; final drain {med(on, 'drain_s'):.2f} s")
    print(f"second-core check after the runs: {100.0 * second_core_slowdown():+.0f}%")
    print(f"one-time with tracking: open the store and start the writer {med(on, 'setup_s'):.2f} s, study start (experiment, parent, "
          f"config) {med(on, 'start_cpu_s'):.2f} s CPU, end-of-study artifacts and plots {med(on, 'finish_s'):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
