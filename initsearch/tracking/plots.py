"""The study's plots as PNG-ready matplotlib figures: score by trial, training curves, init signals, importances.

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


def score_label(metric: str, direction: str) -> str:
    """A score axis's label: the metric and which way is better."""
    return f"{metric} ({'lower' if direction == 'minimize' else 'higher'} is better)"


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
    # a multi-objective study (score, parameters): the importances for the score
    target = None if len(study.directions) == 1 else (lambda t: t.values[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_param_importances(only, target=target, target_name=metric)
    return _figure_of(ax)


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average (``alpha`` = weight of the newest value); non-finite values are carried
    over as they are and do not enter the average, so a diverging tail stays visible."""
    out: list[float] = []
    level: float | None = None
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        level = v if level is None else alpha * v + (1.0 - alpha) * level
        out.append(level)
    return out


def plot_training_curves(curves: Mapping[str, Sequence[Sequence[tuple[int, float]]]], metric: str) -> Any:
    """Training loss per step of each labelled run, one line per run: the mean over its evaluation seeds,
    smoothed (EMA over about 5% of the steps), with the seeds' smoothed min-max spread shaded. Baselines
    dashed, searched trials solid; log-scaled when the losses span more than a factor 20 (a diverging run
    would flatten the others). ``curves`` maps a label to one ``[(step, loss), ...]`` list per seed.
    ``None`` when there is nothing to draw."""
    import numpy as np

    curves = {k: [list(seed) for seed in v if seed] for k, v in curves.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    finite: list[float] = []
    for label, seeds in curves.items():
        steps = sorted({s for seed in seeds for s, _ in seed})
        index = {s: i for i, s in enumerate(steps)}
        grid = np.full((len(seeds), len(steps)), np.nan)
        for row, seed in enumerate(seeds):
            for s, v in seed:
                grid[row, index[s]] = v
        alpha = min(1.0, 2.0 / (max(len(steps), 1) * 0.05 + 1.0))
        smooth = np.array([ema(list(row), alpha) for row in grid])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # steps that no seed reached (stopped runs)
            mean, low, high = np.nanmean(smooth, 0), np.nanmin(smooth, 0), np.nanmax(smooth, 0)
        finite.extend(float(v) for v in mean if math.isfinite(v))
        baseline = "baseline" in label
        (line,) = ax.plot(steps, mean, label=label, linestyle="--" if baseline else "-", linewidth=1.6)
        if len(seeds) > 1:
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (EMA; mean over seeds, band = seed range)")
    ax.set_title(f"Training curves: best searched trials vs baselines (ranked by {metric})")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return fig


def plot_scores(table: Any, metric: str, direction: str) -> Any:
    """The score of every searched trial against its number (complete as dots, pruned as crosses at their
    partial score), the best so far as a step line, and each baseline as a horizontal line with the best
    baseline's drawn bold. ``table`` is the summary's (columns ``trial``, ``kind``, ``state``, ``metric``).
    ``None`` when no trial has a score."""
    scored = table[table[metric].notna()]
    if scored.empty:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    search = scored[scored["kind"] == "search"].sort_values("trial")
    complete = search[search["state"] == "complete"]
    pruned = search[search["state"] == "pruned"]
    ax.scatter(complete["trial"], complete[metric], s=18, color="tab:blue", label="searched trial", zorder=3)
    if not pruned.empty:
        ax.scatter(pruned["trial"], pruned[metric], s=18, marker="x", color="tab:gray",
                   label="pruned (partial score)", zorder=3)
    if not complete.empty:
        values = complete[metric].to_numpy(dtype=float)
        best = [min(values[: i + 1]) if direction == "minimize" else max(values[: i + 1]) for i in range(len(values))]
        ax.step(complete["trial"], best, where="post", color="tab:blue", linewidth=1.5, label="best searched so far")
    baselines = scored[(scored["kind"] != "search") & (scored["state"] == "complete")]
    if not baselines.empty:
        pick = baselines[metric].idxmin() if direction == "minimize" else baselines[metric].idxmax()
        for i, row in baselines.iterrows():
            top = i == pick
            ax.axhline(row[metric], color="tab:red" if top else "tab:gray", linestyle="--",
                       linewidth=1.6 if top else 0.7, alpha=1.0 if top else 0.6,
                       label=f"best baseline: {row['kind']}" if top else None)
        ax.autoscale_view()
        low, high = ax.get_ylim()
        where = label_positions([float(v) for v in baselines[metric]], low, high)
        for (i, row), y in zip(baselines.iterrows(), where):
            ax.annotate(str(row["kind"]), (1.0, y), xycoords=("axes fraction", "data"), fontsize=7,
                        color="tab:red" if i == pick else "tab:gray", xytext=(3, 0), textcoords="offset points",
                        va="center")
    ax.set_xlabel("trial number")
    ax.set_ylabel(score_label(metric, direction))
    ax.set_title(f"{metric} by trial, against the baselines")
    ax.legend(fontsize="small", loc="best")
    ax.grid(True, alpha=0.3)
    return fig


def label_positions(values: Sequence[float], low: float, high: float, gap: float = 0.045) -> list[float]:
    """Heights for labels of lines at ``values`` on an axis from ``low`` to ``high``: each as near its line as
    can be while every two stay ``gap`` (a fraction of the axis) apart, so close lines get readable labels.
    In the order given."""
    span = (high - low) or 1.0
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = [(values[i] - low) / span for i in order]
    for k in range(1, len(placed)):  # push up what sits too close above its neighbour
        placed[k] = max(placed[k], placed[k - 1] + gap)
    overflow = placed[-1] - 1.0 if placed else 0.0
    if overflow > 0:  # past the top: shift down, keeping the gaps, as far as the bottom allows
        placed = [p - min(overflow, placed[0]) for p in placed]
    out = [0.0] * len(values)
    for k, i in enumerate(order):
        out[i] = low + placed[k] * span
    return out


def plot_init_signals(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> Any:
    """The per-layer init diagnostics of each labelled run (layers in forward order on the x axis): the
    output std of each layer (top) and the gradient norm of its weight (bottom), both log-scaled, so a signal
    that vanishes or explodes with depth shows at a glance. ``None`` when there is nothing to draw."""
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        return None
    plt = pyplot()
    longest = max(rows.values(), key=len)
    names = [str(r.get("name", i)) for i, r in enumerate(longest)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.5 * len(names) + 3), 6), sharex=True)
    for label, layer_rows in rows.items():
        style = "--" if "baseline" in label else "-"
        for ax, field in ((top, "output_std"), (bottom, "grad_norm")):
            values = [r.get(field) for r in layer_rows]
            values = [float(v) if isinstance(v, (int, float)) and v and v > 0 else math.nan for v in values]
            ax.plot(range(len(values)), values, style, marker="o", markersize=3, label=label)
    top.set_yscale("log")
    bottom.set_yscale("log")
    top.set_ylabel("output std at init")
    bottom.set_ylabel("|grad| of weight at init")
    bottom.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    top.set_title("Signal through the layers at init")
    top.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, not over
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    return fig


def plot_policy(rows: Sequence[Mapping[str, Any]], title: str) -> Any:
    """A picture of a policy on a model: its layers in forward order (top to bottom), each with the scheme
    it gets (the bar's colour and label), its scale (the bar's length; 1 = the scheme as published) and
    whether LSUV rescales it afterwards. ``rows``: ``name``, ``activation``, ``scheme``, ``scale``, ``lsuv``
    (and optionally ``gain``). ``None`` when there are no layers."""
    if not rows:
        return None
    plt = pyplot()
    schemes = list(dict.fromkeys(str(r["scheme"]) for r in rows))
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(schemes)}
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ys = list(range(len(rows)))[::-1]
    scales = [float(r.get("scale", 1.0)) for r in rows]
    ax.barh(ys, scales, color=[colours[str(r["scheme"])] for r in rows], height=0.6)
    top = max(max(scales), 1.0)
    for y, r, scale in zip(ys, rows, scales):
        gain = r.get("gain")
        gain_text = "" if gain is None else (f", gain {gain}" if isinstance(gain, str) else f", gain {gain:.3g}")
        ax.text(scale + 0.02 * top, y, f"{r['scheme']} ×{scale:.3g}{gain_text}" + ("  + LSUV" if r.get("lsuv") else ""),
                va="center", fontsize=8)
    ax.axvline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_yticks(ys, [f"{r['name']} ({r.get('activation', '?')})" for r in rows], fontsize=8)
    ax.set_xlim(0, top * 1.9)
    ax.set_xlabel("scale (1 = the scheme as published)")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def plot_pareto_front(table: Any, front: Sequence[int], metric: str, direction: str) -> Any:
    """A multi-objective study's score against network size: every complete trial as a dot (baselines as
    crosses, labelled), the Pareto front (``study.best_trials``: no other trial is both smaller and better)
    joined as a step line, smallest first. ``table`` is the summary's (``trial``, ``kind``, ``state``,
    ``metric``, ``n_params``); ``front`` the front's trial numbers. ``None`` when no trial has both."""
    done = table[(table["state"] == "complete") & table[metric].notna() & table["n_params"].notna()]
    if done.empty:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    search = done[done["kind"] == "search"]
    baselines = done[done["kind"] != "search"]
    ax.scatter(search["n_params"].astype(float), search[metric], s=16, color="0.6", label="searched trial", zorder=2)
    if not baselines.empty:
        ax.scatter(baselines["n_params"].astype(float), baselines[metric], s=30, marker="x", color="tab:red",
                   label="baseline (the configured model)", zorder=3)
        for _, row in baselines.iterrows():
            ax.annotate(str(row["kind"]), (float(row["n_params"]), row[metric]), fontsize=7, color="tab:red",
                        xytext=(3, 3), textcoords="offset points")
    on_front = done[done["trial"].isin(list(front))].sort_values(["n_params", metric])
    if not on_front.empty:
        ax.step(on_front["n_params"].astype(float), on_front[metric], where="post", color="tab:blue", linewidth=1.2)
        ax.scatter(on_front["n_params"].astype(float), on_front[metric], s=28, color="tab:blue",
                   label="Pareto front", zorder=4)
        for _, row in on_front.iterrows():
            ax.annotate(f"#{int(row['trial'])}", (float(row["n_params"]), row[metric]), fontsize=7, color="tab:blue",
                        xytext=(3, -9), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(score_label(metric, direction))
    ax.set_title(f"{metric} against network size: the Pareto front")
    ax.legend(fontsize="small", loc="best")
    ax.grid(True, alpha=0.3)
    return fig
