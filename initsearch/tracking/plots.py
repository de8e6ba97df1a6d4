"""The study's plots as PNG-ready matplotlib figures: optimization history, parameter importances, training curves.

They are drawn off-screen (the Agg backend, unless something already chose one): the study runs in a
terminal or on a thread with no display. Each function returns a figure (or ``None`` when there is nothing
to draw) and ``save_figure`` writes and closes it, so a long study does not keep figures open.
"""
from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """pyplot on the Agg backend when nothing chose a backend yet (the CLI, the logging thread, no display)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_of(obj: Any) -> Any:
    """The figure of what Optuna's matplotlib plots return (an Axes, or an array of them)."""
    first = obj.flat[0] if hasattr(obj, "flat") else obj
    return first.get_figure() if hasattr(first, "get_figure") else first


def save_figure(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)


def plot_history(study: Any, metric: str = "Objective Value") -> Any:
    """Optuna's optimization history (baselines included: they are trials of the study)."""
    import optuna

    pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=metric)
    return _figure_of(ax)


def plot_importances(study: Any, metric: str = "Objective Value") -> Any:
    """Optuna's parameter importances over the complete *searched* trials (baselines have no params), or
    ``None`` when there are fewer than two of them with params (importances need at least two)."""
    import optuna
    from optuna.trial import TrialState

    searched = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if not t.user_attrs.get("baseline") and t.params]
    if len(searched) < 2:
        return None
    only = optuna.create_study(directions=study.directions)
    only.add_trials(searched)
    pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_param_importances(only, target_name=metric)
    return _figure_of(ax)


def plot_training_curves(curves: Mapping[str, Sequence[tuple[int, float]]], metric: str) -> Any:
    """Training loss per step of each labelled run on one chart: baselines dashed, searched trials solid;
    log-scaled when the losses span more than a factor 20 (a diverging run would flatten the others).
    ``None`` when there is nothing to draw."""
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    finite: list[float] = []
    for label, points in curves.items():
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        finite.extend(v for v in values if math.isfinite(v))
        ax.plot(steps, values, label=label, linestyle="--" if "baseline" in label else "-", linewidth=1.2)
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("train_loss (first evaluation seed)")
    ax.set_title(f"Training curves: best searched trials vs baselines (ranked by {metric})")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return fig
