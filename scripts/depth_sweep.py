"""He et al. 2015 at small scale: at which depth does each textbook init stop training a plain ReLU net?

    python scripts/depth_sweep.py [--depths 4 8 16 24 32 48] [--seeds 3] [--steps 500] [--out docs/depth_sweep.json]
    python scripts/depth_sweep.py --model cnn --width 16 --depths 4 8 16 24 32 --inits xavier he orthogonal delta_orthogonal
    python scripts/depth_sweep.py --model rescnn --width 8 --depths 16 32 64 128 --inits he xavier pytorch_default skipinit

A plain ReLU MLP (``--model mlp``: depth Linear layers, width 64) or a plain ReLU CNN (``--model cnn``: depth
3x3 convs of ``--width`` channels, 2x2 max-pooling after every depth // 3 convs while the map is at least 2x2,
then global pooling and one Linear), no normalization, no skips, or a residual CNN without normalization
(``--model rescnn``: depth basic blocks of ``--width`` channels in two stages), on sklearn's digits (1x8x8),
SGD with momentum. For each init and depth, over several seeds: the final validation accuracy, whether the
net trained (final validation accuracy >= 0.5; chance is 0.1) and the logits' standard deviation at init (how
far the signal grew or shrank on its way through). ``delta_orthogonal`` (Xiao et al. 2018) gives the convs a
delta-orthogonal kernel with the activation's gain and the other layers orthogonal; ``skipinit`` is
``docs/policies/skipinit.json`` (zero residual branch ends, He elsewhere). Prints markdown tables and writes
the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from initsearch import apply_policy
from initsearch.contenders.baselines import baseline_policy
from initsearch.init.policy import InitPolicy, load_policy
from initsearch.proxy.data import load_dataset
from initsearch.proxy.models import build_model
from initsearch.proxy.train import TrainConfig, train_run

TRAINED = 0.5


def init_policy(name: str) -> InitPolicy:
    """A textbook baseline's policy, delta-orthogonal convs (orthogonal elsewhere), or SkipInit's zero
    branch ends (``docs/policies/skipinit.json``)."""
    if name == "skipinit":
        return load_policy(Path(__file__).resolve().parents[1] / "docs" / "policies" / "skipinit.json")
    if name != "delta_orthogonal":
        return baseline_policy(name)
    return InitPolicy.from_dict({"format": "initsearch-policy", "version": 1,
                                 "rules": [{"type": "conv", "scheme": "delta_orthogonal", "gain": "auto"}],
                                 "default": {"scheme": "orthogonal", "gain": "auto"}})


def model_config(kind: str, depth: int, width: int) -> dict:
    """The net of this depth: an MLP of ``depth`` Linear layers, a CNN of ``depth`` convs, or a residual CNN of
    ``depth`` basic blocks (two stages of ``depth // 2``)."""
    if kind == "mlp":
        return {"name": "mlp", "depth": depth, "width": width, "activation": "relu"}
    if kind == "rescnn":
        return {"name": "rescnn", "channels": [width, width], "blocks_per_stage": max(1, depth // 2),
                "activation": "relu"}
    return {"name": "cnn", "channels": [width] * depth, "pool_every": max(1, depth // 3), "activation": "relu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["mlp", "cnn", "rescnn"], default="mlp")
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 24, 32, 48])
    ap.add_argument("--inits", nargs="+", default=["xavier", "he", "lecun", "orthogonal", "pytorch_default"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    data = load_dataset("digits", seed=0)
    cfg = TrainConfig(steps=args.steps, batch_size=128, lr=args.lr, eval_every=args.steps)
    rows = []
    start = time.perf_counter()
    for depth in args.depths:
        for init in args.inits:
            accs, logit_stds = [], []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = build_model(model_config(args.model, depth, args.width), data.input_shape, 10)
                apply_policy(model, init_policy(init), example_batch=data.x_train[:256], seed=seed)
                with torch.no_grad():
                    logit_stds.append(float(model(data.x_train[:256]).std()))
                curve = train_run(model, data, cfg, seed=seed)
                accs.append(curve.val_acc[-1] if curve.val_acc and not curve.diverged else float("nan"))
            trained = sum(1 for a in accs if a >= TRAINED)
            rows.append({"depth": depth, "init": init, "val_acc": accs, "trained": trained, "seeds": args.seeds,
                         "logit_std_at_init": logit_stds})
            print(f"depth {depth:3d} {init:16s} trained {trained}/{args.seeds}  val_acc " + " ".join(f"{a:.2f}" for a in accs)
                  + "  logit std at init " + " ".join(f"{v:.3g}" for v in logit_stds), flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s\n")
    inits = args.inits
    print("| depth | " + " | ".join(inits) + " |")
    print("| --- | " + " | ".join("---" for _ in inits) + " |")
    for depth in args.depths:
        cells = []
        for init in inits:
            r = next(r for r in rows if r["depth"] == depth and r["init"] == init)
            mean = statistics.fmean(a for a in r["val_acc"] if a == a) if any(a == a for a in r["val_acc"]) else float("nan")
            cells.append(f"{r['trained']}/{r['seeds']} ({mean:.2f})")
        print(f"| {depth} | " + " | ".join(cells) + " |")
    print("\nlogits' standard deviation at init (median over seeds)\n")
    print("| depth | " + " | ".join(inits) + " |")
    print("| --- | " + " | ".join("---" for _ in inits) + " |")
    for depth in args.depths:
        stds = [statistics.median(next(r for r in rows if r["depth"] == depth and r["init"] == i)["logit_std_at_init"])
                for i in inits]
        print(f"| {depth} | " + " | ".join(f"{v:.3g}" for v in stds) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
