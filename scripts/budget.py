"""Which pruner finds a good policy fastest: best score found against compute and wall time, per Optuna pruner.

    python scripts/budget.py [--cases digits_mlp deep_mlp] [--pruners none median successive_halving hyperband]
                             [--repeats 3] [--n-trials 30] [--out results/budget]

Each (case, pruner, repeat) runs the case's study with study seed = repeat, no baselines, no selection stage and
no tracking (so only the search differs), one process after another. Pruning is multi-fidelity over seeds
too: a trial reports its partial score at every checkpoint of every evaluation seed (step ``i * steps + s``
for seed ``i``), so a pruner can stop a candidate before its second seed. From each study's trials, in order:
the compute spent (training steps: a complete trial's steps times its seeds, a pruned one's last report; a
re-proposed policy costs nothing) and the best score so far. A run "reaches" the target when its best score
is within ``--within`` (default 5%) of the best score any run of that case found. Prints one markdown table
per case: for each pruner, the mean (min-max) final best score, the best score within the compute the cheapest
run used (equal compute), the training steps and seconds to reach the target (and how many repeats did), and
the total steps and seconds. ``--reuse`` reports the studies already under ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

from initsearch.cli import config_dir, run
from initsearch.search.settings import settings_from_config
from initsearch.search.storage import open_storage

CASES: dict[str, list[str]] = {"digits_mlp": ["study=digits_mlp"], "deep_mlp": ["study=deep_mlp"]}


@dataclass
class Trace:
    """One study's search, trial by trial: cumulative training steps, seconds, and the best score so far."""

    steps: list[int]
    seconds: list[float]
    best: list[float]

    def best_within(self, steps: int) -> float:
        """The best score found by the trials that ended within ``steps`` training steps."""
        return min((b for s, b in zip(self.steps, self.best) if s <= steps), default=math.inf)

    def reach(self, target: float) -> tuple[int, float] | None:
        """(steps, seconds) at which the best score first got to ``target`` (minimized); None if never."""
        for steps, seconds, best in zip(self.steps, self.seconds, self.best):
            if best <= target:
                return steps, seconds
        return None


def trace(study: optuna.Study, steps_per_seed: int) -> Trace:
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    start = min(t.datetime_start for t in trials if t.datetime_start is not None)
    used, best = 0, math.inf
    out = Trace([], [], [])
    for t in trials:
        if t.user_attrs.get("duplicate_of") is None:
            if t.state == TrialState.COMPLETE:
                used += steps_per_seed * max(len(t.user_attrs.get("seed_scores") or []), 1)
            elif t.state == TrialState.PRUNED:
                used += max(t.intermediate_values, default=0)
        if t.state == TrialState.COMPLETE and t.value is not None:
            best = min(best, t.value)
        end = t.datetime_complete or t.datetime_start
        out.steps.append(used)
        out.seconds.append((end - start).total_seconds())
        out.best.append(best)
    return out


def run_case(case: str, pruner: str, repeat: int, n_trials: int, out: Path, reuse: bool = False) -> Trace:
    folder = out / case / f"{pruner}-{repeat}"
    folder.mkdir(parents=True, exist_ok=True)
    storage = folder / "study.journal"
    if not reuse:
        storage.unlink(missing_ok=True)
    overrides = CASES[case] + [f"pruner={pruner}", f"seed={repeat}", f"n_trials={n_trials}", "baselines=[]",
                               "select.top_k=0", "tracking_uri=none", "progress=false", f"storage={storage}"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    settings = settings_from_config(cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        run(cfg, folder)  # with --reuse, a finished study's journal: nothing runs
    study = optuna.load_study(study_name=settings.study_name, storage=open_storage(str(storage)))
    return trace(study, settings.train.steps)


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{format(statistics.fmean(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--pruners", nargs="+", default=["none", "median", "successive_halving", "hyperband"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-trials", type=int, default=30)
    ap.add_argument("--within", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/budget")
    ap.add_argument("--reuse", action="store_true", help="report the studies already in --out (finish any unfinished)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out)
    for case in args.cases:
        traces: dict[str, list[Trace]] = {}
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        for repeat in range(args.repeats):  # interleaved: every pruner once per repeat, so drift hits all alike
            for pruner in args.pruners:
                traces.setdefault(pruner, []).append(run_case(case, pruner, repeat, args.n_trials, out, args.reuse))
        best = min(t.best[-1] for ts in traces.values() for t in ts)
        target = best + args.within * abs(best)
        equal = min(t.steps[-1] for ts in traces.values() for t in ts)  # the compute every run had
        lines = [f"### {case}", "",
                 f"`python scripts/budget.py --cases {case} --repeats {args.repeats} --n-trials {args.n_trials}` "
                 f"({started}, load {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())} at the end); "
                 f"target: within {100 * args.within:.0f}% of the best score any run found ({best:.4g}), i.e. "
                 f"<= {target:.4g}. Equal compute: the {equal:,} training steps the cheapest run used.", "",
                 "| pruner | final best | best at equal compute | reached | steps to target | seconds to target | "
                 "total steps | total seconds |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for pruner, ts in traces.items():
            reached = [r for r in (t.reach(target) for t in ts) if r is not None]
            lines.append(
                f"| {pruner} | {spread([t.best[-1] for t in ts], '.4g')} | "
                f"{spread([t.best_within(equal) for t in ts], '.4g')} | {len(reached)}/{len(ts)} | "
                f"{spread([float(r[0]) for r in reached], ',.0f')} | {spread([r[1] for r in reached], '.1f')} | "
                f"{spread([float(t.steps[-1]) for t in ts], ',.0f')} | {spread([t.seconds[-1] for t in ts], '.1f')} |")
        (out / case).mkdir(parents=True, exist_ok=True)
        (out / case / "table.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines) + "\n", flush=True)


if __name__ == "__main__":
    main()
