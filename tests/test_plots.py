"""The study's figures: smoothed curves with the seeds' spread, score by trial against the best baseline, the
signal through the layers at init."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from initsearch.tracking.plots import ema, plot_init_signals, plot_scores, plot_training_curves, pyplot


def test_ema_smooths_and_passes_non_finite_values_through():
    assert ema([1.0, 3.0, 3.0], 0.5) == [1.0, 2.0, 2.5]
    out = ema([1.0, math.nan, 3.0], 0.5)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == 2.0


def test_training_curves_one_line_per_run_with_the_seed_range_shaded():
    seeds = [[(s, 2.0 - 0.01 * s) for s in range(1, 101)], [(s, 2.2 - 0.01 * s) for s in range(1, 101)]]
    fig = plot_training_curves({"trial 3": seeds, "he (baseline)": seeds[:1]}, "auc_loss")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"trial 3", "he (baseline)"}
    assert lines["he (baseline)"].get_linestyle() == "--" and lines["trial 3"].get_linestyle() == "-"
    assert len(ax.collections) == 1  # the band of the run with two seeds only
    mean = lines["trial 3"].get_ydata()
    assert mean[0] == pytest.approx(2.1 - 0.01) and mean[-1] > 2.1 - 0.01 * 100  # smoothed: lags the raw mean
    pyplot().close(fig)
    assert plot_training_curves({}, "auc_loss") is None


def test_scores_by_trial_draw_the_best_baseline_line():
    table = pd.DataFrame({"trial": [0, 1, 2, 3, 4], "kind": ["he", "lsuv", "search", "search", "search"],
                          "state": ["complete", "complete", "complete", "pruned", "complete"],
                          "auc_loss": [0.5, 0.4, 0.45, 0.9, 0.3]})
    fig = plot_scores(table, "auc_loss", "minimize")
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    best = next(line for line in ax.get_lines() if line.get_label() == "best baseline: lsuv")
    assert list(best.get_ydata()) == [0.4, 0.4]
    assert "best searched so far" in labels
    pyplot().close(fig)
    assert plot_scores(table.assign(auc_loss=None), "auc_loss", "minimize") is None


def test_init_signals_one_point_per_layer_in_order():
    rows = [{"name": "fc1", "output_std": 1.0, "grad_norm": 0.1}, {"name": "out", "output_std": 0.5, "grad_norm": 0.2}]
    fig = plot_init_signals({"trial 2": rows, "he (baseline)": rows})
    top, bottom = fig.axes
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["fc1", "out"]
    assert list(top.get_lines()[0].get_ydata()) == [1.0, 0.5] and list(bottom.get_lines()[0].get_ydata()) == [0.1, 0.2]
    fig.canvas.draw()  # the legend sits beside the plots, never over their lines
    renderer = fig.canvas.get_renderer()
    assert top.get_legend().get_window_extent(renderer).x0 >= top.get_window_extent(renderer).x1
    pyplot().close(fig)
    assert plot_init_signals({}) is None


def test_the_policy_picture_lists_the_layers_in_order_with_scheme_scale_and_lsuv():
    from initsearch.tracking.plots import plot_policy

    rows = [{"name": "fc1", "activation": "relu", "scheme": "kaiming_normal", "scale": 1.2, "gain": "auto", "lsuv": True},
            {"name": "out", "activation": "linear", "scheme": "orthogonal", "scale": 0.5, "gain": None, "lsuv": False}]
    fig = plot_policy(rows, "Best policy")
    ax = fig.axes[0]
    ticks = sorted(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())), reverse=True)
    assert [label for _, label in ticks] == ["fc1 (relu)", "out (linear)"]  # forward order, top to bottom
    assert [round(p.get_width(), 3) for p in ax.patches] == [1.2, 0.5]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["kaiming_normal ×1.2, gain auto  + LSUV", "orthogonal ×0.5"]
    pyplot().close(fig)
    assert plot_policy([], "x") is None


def test_baseline_labels_keep_their_order_and_a_readable_gap_near_their_lines():
    from initsearch.tracking.plots import label_positions

    values = [0.113, 0.128, 0.131, 0.172, 0.185, 0.41]  # the default study's baselines: he and orthogonal 0.003 apart
    low, high = 0.07, 0.68
    placed = label_positions(values, low, high)
    gap = 0.045 * (high - low)
    ordered = sorted(placed)
    assert [placed.index(p) for p in ordered] == list(range(len(values)))  # the lines' order
    assert all(b - a >= gap - 1e-12 for a, b in zip(ordered, ordered[1:]))
    assert placed[0] == values[0] and placed[-1] == values[-1]  # lines with room keep their own height
    assert all(low <= p <= high for p in placed)
    # crowded at the top: shifted down as a block, still inside the axis
    top = label_positions([0.99, 0.995, 1.0], 0.0, 1.0)
    assert max(top) <= 1.0 + 1e-12 and min(b - a for a, b in zip(sorted(top), sorted(top)[1:])) >= 0.045 - 1e-12
