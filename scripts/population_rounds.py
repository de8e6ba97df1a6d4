"""Population rounds as a pruned study meets them: members leave at checkpoints, so one population runs at
several row counts. Times ``train_population`` alone (no study, no storage, no tracking).

Each round trains K fresh MLPs of the MLP benchmark's shape (5 Linear layers, the hidden ones 256 wide;
digits-shaped synthetic data: 64 inputs, 10 classes, 1,437 training examples) for 200 steps, batch 128, one
shared seed; at every checkpoint (every 50 steps) the members listed in ``--leave`` stop, in a pattern like a
hyperband study's (the 40-trial study of docs/performance.md stopped 21 at step 50 and 4 at step 100, 4.2 and
0.8 per round of 8; the default here stops 5 and 1). Prints the seconds of all rounds, the rounds' row
counts, and the time spent choosing the matrix-product route (``population._onednn_route``).

    .venv/bin/python scripts/population_rounds.py                  # 5 rounds of 8, 1 thread
    PYTHONPATH=/path/to/other/checkout .venv/bin/python scripts/population_rounds.py   # the same, other code
"""
from __future__ import annotations

import argparse
import time
import types

import torch

from initsearch.proxy import population
from initsearch.proxy.models import MLP
from initsearch.proxy.train import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description="Population rounds with members leaving at checkpoints, timed.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--leave", default="50,50,50,50,50,100,-,-",
                        help="per member, the step at which it stops ('-': runs to the end); K = their count")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    leave = [10**9 if at == "-" else int(at) for at in args.leave.split(",")]
    gen = torch.Generator().manual_seed(0)
    data = types.SimpleNamespace(
        x_train=torch.randn(1437, 64, generator=gen), y_train=torch.randint(0, 10, (1437,), generator=gen),
        x_val=torch.randn(360, 64, generator=gen), y_val=torch.randint(0, 10, (360,), generator=gen),
        num_classes=10, input_shape=(64,))
    cfg = TrainConfig(steps=200, batch_size=128, lr=0.02, eval_every=50)

    probing = [0.0]
    rows: set[int] = set()
    choose = population._onednn_route

    def timed_route(stack, data, cfg):  # a timer around the module's own function
        rows.add(len(stack.members))
        started = time.perf_counter()
        try:
            return choose(stack, data, cfg)
        finally:
            probing[0] += time.perf_counter() - started

    population._onednn_route = timed_route
    started = time.perf_counter()
    for r in range(args.rounds):
        models = []
        for i in range(len(leave)):
            torch.manual_seed(100 * r + i)
            models.append(MLP((64,), 10, depth=5, width=256))
        stop = [(lambda step, curve, at=at: step >= at) for at in leave]
        population.train_population(models, data, cfg, seeds=[r] * len(models), on_checkpoint=stop)
    total = time.perf_counter() - started
    print(f"{args.rounds} rounds of {len(leave)}: {total:.3f} s; row counts met {sorted(rows)}; "
          f"choosing the route {probing[0] * 1e3:.0f} ms; {args.threads} thread(s)")


if __name__ == "__main__":
    main()
