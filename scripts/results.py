"""Reproduce docs/results.md: for each case, run the study, then validate its best policy on fresh seeds.

    python scripts/results.py [--cases digits_mlp digits_cnn deep_mlp tanh_mlp deep_cnn_digits residual_digits deep_cnn32_digits
        deep_cnn32_lr01_digits residual16_digits
        residual32_digits]
        [--n-trials 30] [--seeds 5] [--out results] [--baselines "[he,lsuv,...]"] [--equal-compute]
        [--validate-batch auto] [--select-steps 1500] [--select-batch 1]

Each case is a study preset plus overrides; its baselines include GradInit and MetaInit, both sized for the
proxies and at their papers' settings (``gradinit_paper``, ``metainit_paper``). The search scores candidates on
the study's own seeds, the selection stage retrains the front-runners on new seeds, and `validate` then trains
the full-size model from the **exported** policy (what a user gets: a baseline, when one won) and from every
baseline on `--seeds` fresh seeds for 5x the search's budget. ``--equal-compute`` adds GradInit and MetaInit
rows given the search's compute: as many forward + backward passes as the searched trials' training steps
took (2 per step and seed; pruned trials counted to their last report), divided by the method's passes per
iteration (GradInit 6 with SGD, MetaInit 7). Prints one markdown table per case (and writes it, with the CSV,
under --out).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import optuna
import torch
from hydra import compose, initialize_config_dir
from optuna.trial import TrialState

from initsearch.cli import config_dir, run
from initsearch.contenders.learned import run_learned_baseline
from initsearch.export import pick_trial, trial_policy
from initsearch.init.policy import load_policy, save_policy
from initsearch.proxy.train import train_run
from initsearch.search.report import summarize
from initsearch.search.settings import settings_from_config
from initsearch.search.storage import open_storage
from initsearch.search.trial import fresh_model, prepare
from initsearch.validate import ContenderResult, ValidationReport, run_validation

ALL_BASELINES = "[pytorch_default,xavier,he,lecun,orthogonal,lsuv,gradinit,metainit,gradinit_paper,metainit_paper]"
PASSES_PER_ITERATION = {"gradinit": 6, "metainit": 7}  # forward + backward sweeps (contenders/learned.py)
CASES: dict[str, list[str]] = {
    "digits_mlp": ["study=digits_mlp"],
    "digits_cnn": ["study=digits_cnn"],
    "deep_mlp": ["study=deep_mlp"],
    # a tanh network: 8 tanh layers on digits
    "tanh_mlp": ["study=digits_mlp", "study_name=tanh_mlp", "model.activation=tanh", "model.depth=8", "model.width=64"],
    # without normalization: a deep plain CNN (16 convs) and a residual CNN (8 blocks)
    "deep_cnn_digits": ["study=deep_cnn_digits"],
    "residual_digits": ["study=residual_digits"],
    # deeper: 32 plain convs of 16 channels (pooling after every 10), where He failed every seed in the depth table
    "deep_cnn32_digits": ["study=deep_cnn_digits", "study_name=deep_cnn32_digits", f"model.channels=[{','.join(['16'] * 32)}]",
                          "model.pool_every=10"],
    # the same at the depth table's learning rate (0.01, half the preset's): does the found policy stay stable?
    "deep_cnn32_lr01_digits": ["study=deep_cnn_digits", "study_name=deep_cnn32_lr01_digits",
                               f"model.channels=[{','.join(['16'] * 32)}]", "model.pool_every=10", "train.lr=0.01"],
    # deeper: 16 residual blocks of 16 channels (32 branch convs), where He and orthogonal blow up at the start
    "residual16_digits": ["study=residual_digits", "study_name=residual16_digits", "model.channels=[16,16]",
                          "model.blocks_per_stage=8"],
    # deeper still: 32 residual blocks of 8 channels (64 branch convs), where Xavier and LSUV train some seeds only
    "residual32_digits": ["study=residual_digits", "study_name=residual32_digits", "model.channels=[8,8]",
                          "model.blocks_per_stage=16"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--n-trials", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default="results")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baselines", default=ALL_BASELINES,
                    help="the baselines, as a Hydra list (default: all ten); e.g. without the slow paper settings")
    ap.add_argument("--equal-compute", action="store_true", help="add GradInit/MetaInit rows given the search's compute")
    ap.add_argument("--validate-batch", default="1",
                    help="batch_trials for the validation only: 1 (one contender at a time, the default), K or "
                    "auto (a seed's contenders K at a time: the same table to float rounding, faster)")
    ap.add_argument("--select-steps", type=int, default=None,
                    help="select.steps: the selection stage's training steps (default: the search's); e.g. validate's "
                    "5x, to judge the front-runners at the budget they are validated at")
    ap.add_argument("--select-batch", default="auto",
                    help="select.batch_trials: the selection stage's candidates of a seed trained K at a time (auto, "
                    "the default; 1: one at a time, as the runs before 2026-11-30 16:30 UTC did)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    for case in args.cases:
        folder = out / case
        folder.mkdir(parents=True, exist_ok=True)
        overrides = CASES[case] + [
            f"n_trials={args.n_trials}", f"baselines={args.baselines}", f"storage={folder}/study.journal", "tracking_uri=none",
        ] + ([f"select.steps={args.select_steps}"] if args.select_steps is not None else []) + [
            f"select.batch_trials={args.select_batch}"]
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        t0 = time.perf_counter()
        run(cfg, folder)
        t1 = time.perf_counter()
        settings = settings_from_config(cfg)
        # validate what the study exports (the selection stage's choice; a baseline when one won)
        study = optuna.load_study(study_name=settings.study_name, storage=open_storage(settings.storage))
        summary = summarize(study, settings.score.metric)
        exported = pick_trial(study)
        policy_file = save_policy(trial_policy(study, exported), folder / "exported_policy.json")
        batch = args.validate_batch if args.validate_batch == "auto" else int(args.validate_batch)
        report = run_validation(replace(settings, batch_trials=batch), load_policy(policy_file), seeds=args.seeds)
        budget_note = ""
        if args.equal_compute:
            passes = search_passes(study, settings.train.steps)
            for method, per in PASSES_PER_ITERATION.items():
                iterations = max(passes // per, 1)
                report.results.append(learned_at(settings, report, method, iterations))
            budget_note = f" Equal compute: the search's {passes:,} forward + backward passes."
        t2 = time.perf_counter()
        kind = exported.user_attrs.get("baseline") or "searched"
        table = report.table()
        table.to_csv(folder / "validation.csv", index=False)
        command = (f"python scripts/results.py --cases {case} --n-trials {args.n_trials} --seeds {args.seeds}"
                   + (f" --baselines '{args.baselines}'" if args.baselines != ALL_BASELINES else "")
                   + (" --equal-compute" if args.equal_compute else "")
                   + (f" --validate-batch {args.validate_batch}" if args.validate_batch != "1" else "")
                   + (f" --select-steps {args.select_steps}" if args.select_steps is not None else "")
                   + (f" --select-batch {args.select_batch}" if args.select_batch != "auto" else ""))
        md = [
            f"### {case}",
            "",
            f"`{command}` — overrides: `{' '.join(CASES[case])}`; search {t1 - t0:.0f} s, validation {t2 - t1:.0f} s "
            f"({report.steps} steps, seeds {report.seeds[0]}..{report.seeds[-1]}).",
            f"Search: {summary.headline()}. Exported: trial {exported.number} ({kind}).{budget_note}",
            "",
            table.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else "```\n" + table.to_string(index=False) + "\n```",
            "",
            f"**Verdict:** {report.verdict()}.",
            "",
        ]
        (folder / "table.md").write_text("\n".join(md))
        print("\n".join(md), flush=True)


def search_passes(study: optuna.Study, steps: int) -> int:
    """Forward + backward passes the searched trials' training took: 2 per step and seed (a complete trial trains
    every seed for ``steps``; a pruned one is counted to its last report, one seed)."""
    total = 0
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("baseline") or t.user_attrs.get("duplicate_of") is not None:
            continue
        if t.state == TrialState.COMPLETE:
            total += steps * max(len(t.user_attrs.get("seed_scores") or []), 1)
        elif t.state == TrialState.PRUNED:
            total += max(t.intermediate_values, default=0)
    return 2 * total


def learned_at(settings, report: ValidationReport, method: str, iterations: int) -> ContenderResult:
    """GradInit or MetaInit run for ``iterations`` on each of the report's seeds, then trained like the others."""
    target = {**settings.model, "width_multiplier": 1.0}
    proxy = prepare(replace(settings, model=target))
    train = replace(settings.train, steps=report.steps)
    options = {"iterations": iterations} if method == "gradinit" else {"steps": iterations}
    if method == "gradinit":
        options["optimizer"] = "adam" if train.optimizer in ("adam", "adamw") else "sgd"
    result = ContenderResult(f"{method} ({iterations} it., equal compute)")
    for seed in report.seeds:
        model = fresh_model(target, proxy.data, proxy.device, seed)
        run_learned_baseline(method, model, proxy.data.x_train, proxy.data.y_train, seed=seed,
                             batch_size=train.batch_size, options=options)
        curve = train_run(model, proxy.data, train, seed=seed)
        result.add(seed, curve, settings.score.metric, report.steps, settings.score.target_acc)
    return result


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
