"""How well does the zero-cost pre-screen agree with the trained score? (issue 5, item 4)

    python scripts/prescreen_agreement.py [--study deep_mlp] [--n 60] [--seed 0]

Samples --n random policies from the study's search space (plus its baselines), and for each: the signal
statistics at init on one batch (initsearch.init.diagnostics: per-layer output std, gradient norms), the pre-screen's
verdict (is_degenerate), and the trained score of one short run (the study's budget, one seed). Prints the
Spearman rank correlation of each statistic with the score, and how many of the pre-screen's rejections were
policies that would have scored among the best quarter (what turning it on would lose).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import optuna
import pandas as pd
import torch
from hydra import compose, initialize_config_dir

from initsearch.cli import config_dir
from initsearch.contenders.baselines import contender_policy, init_contender
from initsearch.init.diagnostics import is_degenerate, signal_report
from initsearch.proxy.models import build_model
from initsearch.proxy.scoring import score
from initsearch.proxy.train import train_run
from initsearch.search.settings import settings_from_config
from initsearch.search.trial import prepare


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return math.nan
    ra, rb = pd.Series(a[ok]).rank().to_numpy(), pd.Series(b[ok]).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="deep_mlp")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"study={args.study}", "tracking_uri=none"])
    s = settings_from_config(cfg)
    proxy = prepare(s)
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    rows = []
    start = time.perf_counter()
    candidates: list[tuple[str, object]] = [(b, None) for b in s.baselines] + [("search", None)] * args.n
    for kind, _ in candidates:
        trial = sampler.ask()
        policy = contender_policy(kind) if kind != "search" else s.space.sample(trial, proxy.layers)
        sampler.tell(trial, 0.0)
        seed = s.eval_seeds[0]
        torch.manual_seed(seed)
        model = build_model(s.model, proxy.data.input_shape, proxy.data.num_classes)
        init_contender(model, policy, baseline=None if kind == "search" else kind, seed=seed, example_x=proxy.example_x,
                       train_x=proxy.data.x_train, train_y=proxy.data.y_train, train=s.train)
        report = signal_report(model, proxy.example_x, proxy.example_y)
        summary = report.summary()
        verdict = is_degenerate(report, low=s.prescreen.low, high=s.prescreen.high)
        curve = train_run(model, proxy.data, s.train, seed=seed)
        value = math.inf if curve.diverged else score(curve, s.score.metric, budget=s.train.steps)
        rows.append({"kind": kind, "score": value, "rejected": verdict is not None, "reason": verdict,
                     "log_std_last_dev": abs(math.log(max(summary["output_std_last"], 1e-30))),
                     "log_std_range": math.log(max(summary["output_std_max"], 1e-30) / max(summary["output_std_min"], 1e-30)),
                     "log_grad_ratio": math.log(summary["grad_ratio"]) if summary["grad_ratio"] > 0 else math.inf})
    df = pd.DataFrame(rows)
    print(f"{len(df)} candidates in {time.perf_counter() - start:.0f} s (study {args.study}, {s.train.steps} steps, one seed)")
    scores = df["score"].replace(math.inf, np.nan).to_numpy(dtype=float)
    for col in ("log_std_last_dev", "log_std_range", "log_grad_ratio"):
        print(f"Spearman({col}, {s.score.metric}) = {spearman(df[col].to_numpy(dtype=float), scores):+.2f}")
    good = df["score"] <= df["score"].quantile(0.25)
    print(f"pre-screen rejects {int(df.rejected.sum())}/{len(df)}; of those, {int((df.rejected & good).sum())} were in the best quarter "
          f"(best quarter: {s.score.metric} <= {df['score'].quantile(0.25):.4g})")
    print(f"best score overall {df['score'].min():.4g}; best among accepted {df[~df.rejected]['score'].min():.4g}")
    finite = df.assign(score=scores, diverged=~np.isfinite(df["score"].to_numpy(dtype=float)))
    table = finite.groupby("rejected").agg(n=("score", "size"), diverged=("diverged", "sum"), best=("score", "min"),
                                           median=("score", "median"), worst=("score", "max"))
    print(table.to_string())


if __name__ == "__main__":
    main()
