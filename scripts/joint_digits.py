"""Joint architecture + init search on digits, its score-vs-size front, and the winner validated.

1. runs ``python -m initsearch search_space=joint`` (the MLP's depth, width, activation, norm, residual skips
   and a role-based init policy, under ``arch.max_params``), beside the textbook baselines on the default
   4 x 128 ReLU MLP;
2. draws every complete trial's score against its parameter count, the non-dominated ones (no other trial
   is both smaller and better) joined as the front, into ``--figure``;
3. validates the winner (``validate model=best_model.yaml``) against he and pytorch_default on its network.

    OMP_NUM_THREADS=1 python scripts/joint_digits.py --out /tmp/joint --trials 30 --figure docs/joint_pareto.png

Figures go to docs/results.md by hand, with the date and this command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna
from command_line import run  # scripts/command_line.py: this script's folder is on sys.path
from optuna.trial import TrialState

from initsearch.proxy.models import build_model, count_parameters
from initsearch.search.storage import open_storage


def front(points: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """The (params, score, trial) points no other point beats on both (fewer params and lower score)."""
    best: list[tuple[int, float, int]] = []
    for point in sorted(points):
        if not best or point[1] < best[-1][1]:
            best.append(point)
    return best


def plot(study: optuna.Study, figure: Path) -> list[tuple[int, float, int]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if "n_params" in t.user_attrs]
    points = [(t.user_attrs["n_params"], t.value, t.number) for t in trials]
    pareto = front(points)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, color="0.6", label="trials")
    ax.plot([p[0] for p in pareto], [p[1] for p in pareto], "o-", color="C3", label="front (non-dominated)")
    base = count_parameters(build_model({"name": "mlp", "depth": 4, "width": 128}, (64,), 10))
    for i, baseline in enumerate(t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.user_attrs.get("baseline")):
        ax.scatter([base], [baseline.value], marker="x", color=f"C{i}", label=f"{baseline.user_attrs['baseline']} (4x128 MLP)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{study.user_attrs.get('metric')} (lower is better)")
    ax.set_title("joint architecture + init search on digits: score vs size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    return pareto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--max-params", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--figure", type=Path, default=Path("joint_pareto.png"))
    parser.add_argument("--replot", action="store_true", help="only draw the figure of the study in --out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    storage = str(args.out / "studies.journal")
    py = [sys.executable, "-m"]
    if args.replot:
        plot(optuna.load_study(study_name="digits_joint", storage=open_storage(storage)), args.figure)
        return
    stdout = run([*py, "initsearch", "search_space=joint", "study_name=digits_joint", f"n_trials={args.trials}",
                  f"arch.max_params={args.max_params}", "baselines=[pytorch_default,he,orthogonal]",
                  "tracking_uri=none", f"storage={storage}", f"hydra.run.dir={args.out / 'study'}"])
    print("\n".join(line for line in stdout.splitlines() if line.startswith(("best found", "winner"))))
    study = optuna.load_study(study_name="digits_joint", storage=open_storage(storage))
    for n_params, value, number in plot(study, args.figure):
        print(f"front: trial {number}: {n_params} parameters, score {value:.4f}, {study.trials[number].user_attrs['model']}")
    print(f"wrote {args.figure}")
    searched = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if not t.user_attrs.get("baseline")]
    best = min(searched, key=lambda t: t.value)
    policy = args.out / "winner" / "best_policy.json"
    run([*py, "initsearch.export", "study_name=digits_joint", f"storage={storage}", f"trial={best.number}",
         f"out={policy}"])
    model = policy.parent / "best_model.yaml"
    print(f"best searched trial {best.number}: {best.user_attrs['n_params']} parameters, {best.user_attrs['model']}")
    print(run([*py, "initsearch.validate", f"policy={policy}", f"model={model}", f"seeds={args.seeds}",
               "baselines=[pytorch_default,he]", "tracking_uri=none", f"out={args.out / 'validate'}"]))


if __name__ == "__main__":
    main()
