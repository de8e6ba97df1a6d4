"""How many front-runners, and how many new seeds, the selection stage needs: measured on finished studies.

    python scripts/selection_defaults.py --journal results/digits_mlp/study.journal study=digits_mlp
        [--top 8] [--baselines 3] [--reference-seeds 10] [--draws 400]

For a finished study (its journal, and the overrides that composed it), the ``--top`` best complete
searched trials and the ``--baselines`` best complete baselines are trained again on ``--reference-seeds``
seeds nobody used (``seed * 1000 + 700 + i``: not the search's, the selection stage's, or ``validate``'s).
Then, for every ``select.top_k`` and ``select.seeds`` in the grid, the selection stage is replayed many times
(``--draws``): its seeds drawn at random from the reference seeds, its choice made as the stage makes it
(the best mean over the search's scores and the drawn seeds' among the top ``top_k`` searched trials and the
``select.baselines`` best baselines), and the choice **judged on the reference seeds it did not see**:

- ``regret``: the chosen candidate's held-out mean minus the best candidate's (in the score's direction; 0 is
  the best possible choice among these candidates);
- ``worse than best baseline``: how often the choice is worse, on the held-out seeds, than the baseline
  that is best there (the outcome the stage exists to prevent);
- ``cost``: the stage's trainings as a share of the search's (trials x ``score.seeds``).

Prints one markdown table per study. ``top_k = 0`` is "no selection stage": export the best search score.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from dataclasses import replace

import optuna
import torch
from hydra import compose, initialize_config_dir

from initsearch.cli import config_dir
from initsearch.contenders.baselines import contender_policy
from initsearch.init.policy import InitPolicy
from initsearch.proxy.scoring import score_or_nan
from initsearch.search.selection import front_runners
from initsearch.search.settings import settings_from_config
from initsearch.search.storage import open_storage
from initsearch.search.trial import prepare, train_contender

REFERENCE_SEED_OFFSET = 700  # seed * 1000 + 700 + i: past the search's (+ i) and the selection stage's (+ 500 + i)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="the study's Hydra overrides, e.g. study=digits_mlp")
    ap.add_argument("--journal", required=True, help="the finished study's journal file")
    ap.add_argument("--top", type=int, default=8, help="searched trials retrained")
    ap.add_argument("--baselines", type=int, default=3, help="best baselines retrained")
    ap.add_argument("--reference-seeds", type=int, default=10)
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--top-k", default="0,1,2,3,5,8", help="select.top_k values replayed")
    ap.add_argument("--seeds", default="1,2,3,5", help="select.seeds values replayed")
    ap.add_argument("--select-baselines", type=int, default=2, help="select.baselines replayed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*args.overrides, f"storage={args.journal}"])
    settings = settings_from_config(cfg)
    proxy = prepare(settings)
    study = optuna.load_study(study_name=settings.study_name, storage=open_storage(args.journal))
    maximize = settings.score.direction == "maximize"
    sign = -1.0 if maximize else 1.0  # lower signed score is better

    # the stage's own front-runners (distinct policies), only more of them
    runners = front_runners(study, replace(settings, select=replace(settings.select, top_k=args.top,
                                                                    baselines=args.baselines)))
    searched = [t for t, kind in runners if kind == "search"]
    baselines = [t for t, kind in runners if kind != "search"]
    seeds = [settings.seed * 1000 + REFERENCE_SEED_OFFSET + i for i in range(args.reference_seeds)]
    if not searched or not baselines:
        raise SystemExit(f"{args.journal}: needs complete searched trials and baselines (found {len(searched)} and "
                         f"{len(baselines)})")
    grid = [int(v) for v in args.seeds.split(",")]
    if max(grid) >= len(seeds):
        raise SystemExit(f"--seeds {args.seeds}: each must be below --reference-seeds {len(seeds)}, so that some "
                         "reference seeds judge the choice")

    started = time.perf_counter()
    rows = []  # (label, kind, search scores, reference scores)
    for trial in [*searched, *baselines]:
        baseline = trial.user_attrs.get("baseline")
        policy = contender_policy(baseline, settings.pretrained) if baseline else InitPolicy.from_dict(trial.user_attrs["policy"])
        scores = []
        for seed in seeds:
            curve = train_contender(settings.model, proxy.data, proxy.device, policy, baseline, seed, settings.train,
                                    proxy.example_x, proxy.discovery)
            scores.append(score_or_nan(curve, settings.score.metric, budget=settings.train.steps,
                                       target_acc=settings.score.target_acc))
        search_scores = [float(s) for s in trial.user_attrs.get("seed_scores") or []]
        rows.append((f"trial {trial.number}", baseline or "search", search_scores, scores))
        print(f"  {rows[-1][0]} ({rows[-1][1]}): search {fmt(search_scores)}; reference mean "
              f"{statistics.fmean(finite(scores)) if finite(scores) else math.nan:.4g}", flush=True)
    trained_s = time.perf_counter() - started

    rng = random.Random(0)
    n_search = sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("baseline"))
    print(f"\n{settings.study_name}: {len(searched)} searched + {len(baselines)} baselines retrained on "
          f"{len(seeds)} reference seeds ({trained_s:.0f} s); {args.draws} replays per cell; {settings.score.metric}, "
          f"{settings.score.direction}; the search: {n_search} trials x {settings.score.seeds} seeds\n")
    print("| select.top_k | select.seeds | mean regret | worse than best baseline | chose a baseline | cost (share of the search's trainings) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for top_k in [int(v) for v in args.top_k.split(",")]:
        for n_seeds in ([0] if top_k == 0 else grid):
            regrets, worse, chose_baseline = [], 0, 0
            for _ in range(args.draws):
                drawn = set(rng.sample(range(len(seeds)), n_seeds))
                held = [i for i in range(len(seeds)) if i not in drawn]
                pool = _pool(rows, top_k, args.select_baselines, sign)
                chosen = min(pool, key=lambda r: _key(_mean(r[2] + [r[3][i] for i in drawn]), sign))
                held_key = {r[0]: _key(_mean([r[3][i] for i in held]), sign) for r in rows}
                regrets.append(held_key[chosen[0]] - min(held_key.values()))
                best_baseline = min(held_key[r[0]] for r in rows if r[1] != "search")
                worse += held_key[chosen[0]] > best_baseline
                chose_baseline += chosen[1] != "search"
            cost = 0.0 if top_k == 0 else (min(top_k, len(searched)) + args.select_baselines) * n_seeds / (
                n_search * settings.score.seeds)
            print(f"| {top_k} | {n_seeds} | {statistics.fmean(regrets):.4g} | {worse / args.draws:.0%} | "
                  f"{chose_baseline / args.draws:.0%} | {cost:.0%} |")


def _pool(rows: list, top_k: int, n_baselines: int, sign: float) -> list:
    """The candidates a stage with these settings retrains (``top_k`` 0: only the best search score)."""
    searched = [r for r in rows if r[1] == "search"]
    if top_k == 0:
        return searched[:1]
    baselines = sorted((r for r in rows if r[1] != "search"), key=lambda r: _key(_mean(r[2]), sign))
    return searched[:top_k] + baselines[:n_baselines]


def _mean(values: list[float]) -> float:
    values = finite(values)
    return statistics.fmean(values) if values else math.nan


def _key(value: float, sign: float) -> float:
    """Lower is better: the score in the minimizing direction; no finite score is the worst."""
    return sign * value if math.isfinite(value) else math.inf


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def fmt(values: list[float]) -> str:
    return " ".join(f"{v:.4g}" for v in values)


if __name__ == "__main__":
    main()
