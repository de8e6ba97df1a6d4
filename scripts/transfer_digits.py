"""Transfer on offline data: pre-train on digits 0-4, search and validate on digits 5-9.

1. trains the default digits MLP (4 x 128, ReLU) on the five classes 0-4 and saves its state dict;
2. runs a study on the classes 5-9 with ``pretrained=`` that file (each role may draw "checkpoint"; the
   baselines ``checkpoint`` and ``checkpoint_fresh_head`` run beside the textbook ones), and the same
   study without it (from scratch);
3. validates both winners on fresh seeds against he, pytorch_default and both checkpoint baselines
   (``python -m initsearch.validate``) and prints the commands and the tables.

    python scripts/transfer_digits.py --out /tmp/transfer --trials 16 --subset 400
    python scripts/transfer_digits.py --out /tmp/transfer --pretrain-only     # step 1 only

Figures go to docs/results.md by hand, with the date and this command.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from command_line import run  # scripts/command_line.py: this script's folder is on sys.path

from initsearch.init.checkpoints import save_state_dict
from initsearch.proxy.data import keep_classes, load_dataset
from initsearch.proxy.models import build_model
from initsearch.proxy.train import TrainConfig, train_run

MODEL = {"name": "mlp", "depth": 4, "width": 128, "activation": "relu"}


def pretrain(out: Path, steps: int, seed: int) -> Path:
    """Train the MLP on digits 0-4 and save its state dict; print its validation accuracy."""
    data = keep_classes(load_dataset("digits", seed=seed), [0, 1, 2, 3, 4])
    torch.manual_seed(seed)
    model = build_model(MODEL, data.input_shape, data.num_classes)
    curve = train_run(model, data, TrainConfig.from_mapping({"steps": steps, "batch_size": 128, "lr": 0.05,
                                                              "eval_every": steps}), seed=seed)
    path = out / "digits04.pt"
    sha = save_state_dict(model, path)
    print(f"pre-trained on digits 0-4: val acc {curve.val_acc[-1]:.3f} after {steps} steps -> {path} ({sha[:12]})")
    return path


def best_policy(stdout: str) -> str:
    return next(line.split(": ", 1)[1].strip() for line in stdout.splitlines() if line.startswith("best policy:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--subset", type=int, default=400, help="training examples of all ten digits kept before "
                                                                 "the split into 0-4 and 5-9 (null: all)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pretrain-only", action="store_true", help="stop after writing digits04.pt")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    weights = pretrain(args.out, args.pretrain_steps, seed=0)
    if args.pretrain_only:
        return
    common = ["+data.classes=[5,6,7,8,9]", f"data.subset={args.subset}", "search_space=grouped",
              f"n_trials={args.trials}", "tracking_uri=none", f"storage={args.out / 'studies.journal'}"]
    py = [sys.executable, "-m"]
    winners = {}
    for name, extra in (("transfer", [f"pretrained={weights}"]), ("scratch", [])):
        stdout = run([*py, "initsearch", f"study_name=digits59_{name}", *common, *extra,
                      f"hydra.run.dir={args.out / name}"])
        print("\n".join(line for line in stdout.splitlines() if line.startswith(("best found", "winner"))))
        winners[name] = best_policy(stdout)
    for name, policy in winners.items():
        stdout = run([*py, "initsearch.validate", f"policy={policy}", f"pretrained={weights}",
                      "+data.classes=[5,6,7,8,9]", f"subset={args.subset}", f"seeds={args.seeds}",
                      "baselines=[pytorch_default,he]", "tracking_uri=none", f"out={args.out / ('validate_' + name)}"])
        print(stdout)
    summary = {name: json.loads(Path(p).read_text())["rules"] for name, p in winners.items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
