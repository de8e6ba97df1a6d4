"""Does a run's outcome depend on float rounding? One contender, the same seeds, different torch thread counts.

    python scripts/thread_sensitivity.py --threads 1 2 --seeds 1000000 1000001 --steps 1500 \
        study=residual_digits model.channels=[8,8] model.blocks_per_stage=16

Trains the study's model from one baseline's init (``--init``, PyTorch's default unless told) on each seed,
once per thread count, and prints each run's score and final validation accuracy. The runs differ only in
the order the CPU sums floats in (a thread count splits reductions differently), so on a network at the
edge of trainability the same init and seed can train on one count and stay at chance on another: then a
comparison of inits on a handful of seeds measures this rounding as much as the inits.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from hydra import compose, initialize_config_dir

from initsearch.cli import config_dir
from initsearch.contenders.baselines import contender_policy
from initsearch.proxy.scoring import score_or_nan
from initsearch.search.settings import settings_from_config
from initsearch.search.trial import prepare, train_contender


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000000, 1000001])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the study's train.steps)")
    ap.add_argument("--init", default="pytorch_default", help="a baseline's name")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m initsearch")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*args.overrides, "tracking_uri=none"])
    settings = settings_from_config(cfg)
    proxy = prepare(settings)
    steps = args.steps or settings.train.steps
    train = replace(settings.train, steps=steps)
    policy = contender_policy(args.init, settings.pretrained)
    print(f"| seed | threads | {settings.score.metric} | final val acc | seconds |\n| ---: | ---: | ---: | ---: | ---: |")
    for seed in args.seeds:
        for threads in args.threads:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            curve = train_contender(settings.model, proxy.data, proxy.device, policy, args.init, seed, train,
                                    proxy.example_x, proxy.discovery)
            score = score_or_nan(curve, settings.score.metric, budget=steps, target_acc=settings.score.target_acc)
            acc = curve.val_acc[-1] if curve.val_acc and not curve.diverged else float("nan")
            print(f"| {seed} | {threads} | {score:.4g} | {acc:.3f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
