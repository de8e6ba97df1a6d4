"""The bare one-at-a-time loop as a whole process: what a study's wall clock is compared with end to end.

It builds the same proxy as ``python -m initsearch`` with the same overrides (the same Hydra config, data,
model and training settings), draws ``--trials`` policies from the study's search space (Optuna's random
sampler, in memory), initializes each on the first evaluation seed and trains it with ``train_run``, one
after another, with no search, no storage, no tracking, no report; then it exits. Time it from outside
(``scripts/bench_e2e.py`` does), so the process start, imports and data loading count as they do for a study.

    .venv/bin/python scripts/bare_loop.py --trials 40 model.depth=5 model.width=256
    .venv/bin/python scripts/bare_loop.py --trials 40 --threads 1 study=digits_cnn
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.append(str(Path(__file__).resolve().parents[1]))  # PYTHONPATH (another checkout's code) goes first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, help="policies drawn and trained")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m initsearch")
    args = parser.parse_args(argv)

    import optuna
    import torch
    from hydra import compose, initialize_config_dir

    from initsearch.cli import config_dir
    from initsearch.init.apply import apply_policy
    from initsearch.proxy.train import train_run
    from initsearch.search.settings import settings_from_config
    from initsearch.search.trial import fresh_model, prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(args.overrides))
    settings = settings_from_config(cfg)
    proxy = prepare(settings)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=settings.seed))
    seed = settings.eval_seeds[0]
    losses = []
    first = None
    for _ in range(args.trials):
        trial = sampler.ask()
        policy = settings.space.sample(trial, proxy.layers)
        sampler.tell(trial, 0.0)
        model = fresh_model(settings.model, proxy.data, proxy.device, seed)
        apply_policy(model, policy, example_batch=proxy.example_x, seed=seed)
        curve = train_run(model, proxy.data, settings.train, seed=seed)
        losses.append(curve.train_loss[-1] if len(curve.train_loss) else float("nan"))
        first = first if first is not None else time.perf_counter() - STARTED
    print(f"bare loop: {args.trials} trials trained one at a time on {torch.get_num_threads()} threads; "
          f"first trial done {first:.2f} s after start, last {time.perf_counter() - STARTED:.2f} s; "
          f"mean final training loss {sum(losses) / max(len(losses), 1):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
