"""Tests for initsearch.proxy.scoring: each metric on hand-made curves, partial scores, aggregates, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from initsearch.errors import ConfigError
from initsearch.proxy.scoring import (
    METRICS,
    aggregate,
    check_aggregate,
    check_metric,
    direction,
    partial_score,
    score,
)
from initsearch.proxy.train import Curve


def make_curve(losses: list[float], val: list[tuple[int, float, float]], **kw: object) -> Curve:
    """A curve from per-step losses and (step, val_loss, val_acc) points; steps_done = len(losses)."""
    return Curve(train_loss=np.asarray(losses, dtype=np.float64), val_steps=[v[0] for v in val],
                 val_loss=[v[1] for v in val], val_acc=[v[2] for v in val],
                 steps_done=kw.pop("steps_done", len(losses)), **kw)  # type: ignore[arg-type]


# 8 steps, validation at 4 and 8.
CURVE = make_curve([4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5], [(4, 1.2, 0.40), (8, 0.9, 0.70)])


def test_auc_loss_is_the_mean_training_loss_over_the_budget() -> None:
    assert score(CURVE, "auc_loss", budget=8) == pytest.approx(13.0 / 8)
    assert score(CURVE, "auc_loss", budget=4) == pytest.approx(10.0 / 4)  # a longer curve: first 4 steps


def test_final_val_loss_and_val_acc_at_budget() -> None:
    assert score(CURVE, "final_val_loss", budget=8) == pytest.approx(0.9)
    assert score(CURVE, "val_acc_at_budget", budget=8) == pytest.approx(0.70)
    assert score(CURVE, "val_acc_at_budget", budget=6) == pytest.approx(0.40)  # last point at or before 6


def test_steps_to_target_returns_the_first_step_reaching_it() -> None:
    assert score(CURVE, "steps_to_target", budget=8, target_acc=0.4) == 4.0
    assert score(CURVE, "steps_to_target", budget=8, target_acc=0.65) == 8.0


def test_steps_to_target_penalty_keeps_failures_ordered_and_behind_successes() -> None:
    budget = 8
    near = make_curve([1.0] * 8, [(4, 1.0, 0.5), (8, 1.0, 0.75)])
    far = make_curve([1.0] * 8, [(4, 1.0, 0.2), (8, 1.0, 0.25)])
    success = make_curve([1.0] * 8, [(4, 1.0, 0.5), (8, 1.0, 0.8)])
    s_near, s_far, s_ok = (score(c, "steps_to_target", budget=budget, target_acc=0.8) for c in (near, far, success))
    assert s_ok == 8.0
    assert s_near == pytest.approx(budget * (2 - 0.75 / 0.8))
    assert s_far == pytest.approx(budget * (2 - 0.25 / 0.8))
    assert s_ok <= budget < s_near < s_far <= 2 * budget


def test_steps_to_target_uses_the_best_accuracy_not_the_last() -> None:
    dipped = make_curve([1.0] * 8, [(4, 1.0, 0.6), (8, 1.0, 0.2)])
    assert score(dipped, "steps_to_target", budget=8, target_acc=0.8) == pytest.approx(8 * (2 - 0.6 / 0.8))


def test_steps_to_target_needs_a_target() -> None:
    for bad in (None, 0.0, 1.5):
        with pytest.raises(ConfigError, match=r"^score\.target_acc:"):
            score(CURVE, "steps_to_target", budget=8, target_acc=bad)


def test_incomplete_or_diverged_curves_are_not_scored() -> None:
    stopped = make_curve([4.0, 3.0, 2.0, 1.0], [(4, 1.2, 0.4)], stopped=True, reason="stopped by callback at step 4")
    for metric in METRICS:
        with pytest.raises(ValueError, match="4 of 8 steps"):
            score(stopped, metric, budget=8, target_acc=0.5)
    diverged = make_curve([2.0] * 7 + [math.nan], [], diverged=True, reason="loss is nan at step 8")
    with pytest.raises(ValueError, match="diverged"):
        score(diverged, "auc_loss", budget=8)


def test_partial_score_uses_the_curve_so_far() -> None:
    half = make_curve([4.0, 3.0, 2.0, 1.0], [(4, 1.2, 0.4)])
    assert partial_score(half, "auc_loss", budget=8) == pytest.approx(2.5)
    assert partial_score(half, "final_val_loss", budget=8) == pytest.approx(1.2)
    assert partial_score(half, "val_acc_at_budget", budget=8) == pytest.approx(0.4)
    assert partial_score(half, "steps_to_target", budget=8, target_acc=0.4) == 4.0
    assert partial_score(half, "steps_to_target", budget=8, target_acc=0.8) == pytest.approx(8 * (2 - 0.5))
    assert partial_score(CURVE, "auc_loss", budget=8) == score(CURVE, "auc_loss", budget=8)


def test_partial_score_without_the_points_it_needs() -> None:
    empty = make_curve([], [])
    with pytest.raises(ValueError, match="no training steps"):
        partial_score(empty, "auc_loss", budget=8)
    with pytest.raises(ValueError, match="no validation point"):
        partial_score(empty, "final_val_loss", budget=8)
    assert partial_score(empty, "steps_to_target", budget=8, target_acc=0.5) == 16.0  # the worst penalty


def test_direction() -> None:
    assert direction("val_acc_at_budget") == "maximize"
    assert [direction(m) for m in ("auc_loss", "final_val_loss", "steps_to_target")] == ["minimize"] * 3


def test_unknown_metric_and_aggregate_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^score\.metric: .*'auc'"):
        check_metric("auc")
    with pytest.raises(ConfigError, match=r"^score\.metric:"):
        score(CURVE, "accuracy", budget=8)
    with pytest.raises(ConfigError, match=r"^score\.metric:"):
        direction("nope")
    with pytest.raises(ConfigError, match=r"^score\.aggregate: .*'max'"):
        check_aggregate("max")
    assert check_metric("auc_loss") == "auc_loss" and check_aggregate("median") == "median"


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget"):
        score(CURVE, "auc_loss", budget=0)


@pytest.mark.parametrize(
    ("how", "direction_", "expected"),
    [
        ("mean", "minimize", 2.5),
        ("mean", "maximize", 2.5),
        ("median", "minimize", 2.0),
        ("worst", "minimize", 5.0),
        ("worst", "maximize", 1.0),
        ("mean_plus_std", "minimize", 2.5 + math.sqrt(2.25)),
        ("mean_plus_std", "maximize", 2.5 - math.sqrt(2.25)),
    ],
)
def test_aggregate(how: str, direction_: str, expected: float) -> None:
    # values 1, 2, 2, 5: mean 2.5, median 2, population variance (2.25 + 0.25 + 0.25 + 6.25) / 4 = 2.25
    assert aggregate([1.0, 2.0, 2.0, 5.0], how, direction_) == pytest.approx(expected)


def test_aggregate_errors_and_single_value() -> None:
    assert aggregate([3.0], "mean_plus_std", "minimize") == 3.0
    with pytest.raises(ConfigError, match=r"^score\.aggregate:"):
        aggregate([1.0], "max", "minimize")
    with pytest.raises(ValueError, match="direction"):
        aggregate([1.0], "mean", "up")
    with pytest.raises(ValueError, match="non-empty"):
        aggregate([], "mean", "minimize")
