"""Reproduce docs/results.md: for each case, run the study, then validate its best policy on fresh seeds.

    python scripts/results.py [--cases digits_mlp digits_cnn deep_mlp tanh_mlp deep_cnn_digits residual_digits]
        [--n-trials 30] [--seeds 5] [--out results]

Each case is a study preset plus overrides; its baselines include GradInit and MetaInit. The search scores
candidates on the study's own seeds; `validate` then trains the full-size model from the best policy and from
every baseline on `--seeds` fresh seeds for 5x the search's budget. Prints one markdown table per case (and
writes it, with the CSV, under --out).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import optuna
import torch
from hydra import compose, initialize_config_dir

from initsearch.cli import config_dir, run
from initsearch.export import trial_policy
from initsearch.init.policy import load_policy, save_policy
from initsearch.search.report import summarize
from initsearch.search.settings import settings_from_config
from initsearch.search.storage import open_storage
from initsearch.validate import run_validation

ALL_BASELINES = "[pytorch_default,xavier,he,lecun,orthogonal,lsuv,gradinit,metainit]"
CASES: dict[str, list[str]] = {
    "digits_mlp": ["study=digits_mlp"],
    "digits_cnn": ["study=digits_cnn"],
    "deep_mlp": ["study=deep_mlp"],
    # a tanh network: 8 tanh layers on digits
    "tanh_mlp": ["study=digits_mlp", "study_name=tanh_mlp", "model.activation=tanh", "model.depth=8", "model.width=64"],
    # without normalization: a deep plain CNN (16 convs) and a residual CNN (8 blocks)
    "deep_cnn_digits": ["study=deep_cnn_digits"],
    "residual_digits": ["study=residual_digits"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--n-trials", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default="results")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    for case in args.cases:
        folder = out / case
        folder.mkdir(parents=True, exist_ok=True)
        overrides = CASES[case] + [
            f"n_trials={args.n_trials}", f"baselines={ALL_BASELINES}", f"storage={folder}/study.journal", "tracking_uri=none",
        ]
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        t0 = time.perf_counter()
        run(cfg, folder)
        t1 = time.perf_counter()
        settings = settings_from_config(cfg)
        # validate the best *searched* policy (the study's own export may be a baseline that won the search)
        study = optuna.load_study(study_name=settings.study_name, storage=open_storage(settings.storage))
        summary = summarize(study, settings.score.metric)
        if summary.best_search is None:
            print(f"### {case}\n\nno searched trial completed\n")
            continue
        searched = save_policy(trial_policy(study, summary.best_search), folder / "best_searched_policy.json")
        report = run_validation(settings, load_policy(searched), seeds=args.seeds)
        t2 = time.perf_counter()
        table = report.table()
        table.to_csv(folder / "validation.csv", index=False)
        command = f"python scripts/results.py --cases {case} --n-trials {args.n_trials} --seeds {args.seeds}"
        md = [
            f"### {case}",
            "",
            f"`{command}` — overrides: `{' '.join(CASES[case])}`; search {t1 - t0:.0f} s, validation {t2 - t1:.0f} s "
            f"({report.steps} steps, seeds {report.seeds[0]}..{report.seeds[-1]}).",
            f"Search: {summary.headline()}.",
            "",
            table.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else "```\n" + table.to_string(index=False) + "\n```",
            "",
            f"**Verdict:** {report.verdict()}.",
            "",
        ]
        (folder / "table.md").write_text("\n".join(md))
        print("\n".join(md), flush=True)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
