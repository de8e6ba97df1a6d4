"""What GradInit and MetaInit learn on a study's proxy: each method's objective before and after, and the
learned multiplier of each layer's weight (relative to the He init both start from).

    python scripts/learned_scales.py [study=digits_mlp ...overrides] [--seeds 2]

Used in docs/results.md to say why a learned init trains slower than the init it started from.
"""
from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize_config_dir

from initsearch.cli import config_dir
from initsearch.contenders.learned import run_learned_baseline
from initsearch.contenders.names import LEARNED_BASELINES
from initsearch.search.settings import settings_from_config
from initsearch.search.trial import fresh_model, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*args.overrides, "model.width_multiplier=1.0"])
    settings = settings_from_config(cfg)
    proxy = prepare(settings)
    print("| method | seed | objective at start | at end | learned weight multipliers |")
    print("| --- | --- | ---: | ---: | --- |")
    for name in LEARNED_BASELINES:
        for seed in range(1_000_000, 1_000_000 + args.seeds):  # validate's first fresh seeds
            model = fresh_model(settings.model, proxy.data, proxy.device, seed)
            _, result = run_learned_baseline(name, model, proxy.data.x_train, proxy.data.y_train, seed=seed,
                                             batch_size=settings.train.batch_size)
            scales = ", ".join(f"{k} {v:.3g}" for k, v in result.scales.items() if not k.endswith("bias"))
            print(f"| {name} | {seed} | {result.history[0]:.4g} | {result.history[-1]:.4g} | {scales} |", flush=True)


if __name__ == "__main__":
    main()
