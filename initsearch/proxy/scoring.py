"""Early-convergence scores of a training ``Curve``, and how to combine them over seeds.

Every function here is pure: a score depends on the curve and the arguments only.

| metric | value | direction |
| --- | --- | --- |
| ``auc_loss`` | mean training loss over the first ``budget`` steps (area under the loss curve / budget) | minimize |
| ``final_val_loss`` | the last validation loss at or before ``budget`` | minimize |
| ``val_acc_at_budget`` | the last validation accuracy at or before ``budget`` | maximize |
| ``steps_to_target`` | the first validation step whose accuracy reaches ``target_acc``; if none, a penalty | minimize |

The ``steps_to_target`` penalty for a curve that never reaches the target is
``budget * (2 - best_acc / target_acc)``, in ``(budget, 2 * budget]``: every failure ranks behind every
success, and among failures the one that came closer ranks first, so the sampler still sees a slope.

``score`` scores complete runs only: a curve that diverged or ended before ``budget`` steps raises
``ValueError`` (the study decides what such a trial is worth). ``partial_score`` gives the same metric on a
curve so far, for Optuna's pruner.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

from initsearch.errors import ConfigError
from initsearch.proxy.train import Curve

METRICS: tuple[str, ...] = ("auc_loss", "final_val_loss", "val_acc_at_budget", "steps_to_target")
AGGREGATES: tuple[str, ...] = ("mean", "worst", "median", "mean_plus_std")
DIRECTIONS: tuple[str, ...] = ("minimize", "maximize")
_MAXIMIZED = frozenset({"val_acc_at_budget"})
ACCURACY_METRICS: tuple[str, ...] = ("val_acc_at_budget", "steps_to_target")  # classification studies only


def check_metric(metric: object) -> str:
    """``metric`` if it is a known metric name, else ConfigError naming ``score.metric``."""
    if metric not in METRICS:
        raise ConfigError(f"score.metric: must be one of {', '.join(METRICS)}, got {metric!r}")
    return metric  # type: ignore[return-value]


def check_aggregate(how: object) -> str:
    """``how`` if it is a known aggregate, else ConfigError naming ``score.aggregate``."""
    if how not in AGGREGATES:
        raise ConfigError(f"score.aggregate: must be one of {', '.join(AGGREGATES)}, got {how!r}")
    return how  # type: ignore[return-value]


def direction(metric: str) -> str:
    """``"maximize"`` for ``val_acc_at_budget``, ``"minimize"`` for the other metrics."""
    return "maximize" if check_metric(metric) in _MAXIMIZED else "minimize"


def score(curve: Curve, metric: str, *, budget: int, target_acc: float | None = None) -> float:
    """The metric of a complete run (see the module docstring).

    Raises ``ValueError`` when the curve diverged or has fewer than ``budget`` steps done.
    """
    check_metric(metric)
    _check_budget(budget)
    if curve.diverged:
        raise ValueError(f"cannot score a diverged curve ({curve.reason})")
    if curve.steps_done < budget:
        why = f" ({curve.reason})" if curve.reason else ""
        raise ValueError(f"cannot score a curve with {curve.steps_done} of {budget} steps done{why}; "
                         "use partial_score for intermediate values")
    return _metric_value(curve, metric, budget, target_acc)


def score_or_nan(curve: Curve, metric: str, *, budget: int, target_acc: float | None = None) -> float:
    """``score`` of a complete run; NaN for one that diverged or stopped before ``budget`` steps (a seed that did
    not train is left out of means, and counted, by the callers)."""
    if curve.diverged or curve.steps_done < budget:
        return math.nan
    return score(curve, metric, budget=budget, target_acc=target_acc)


def partial_score(curve: Curve, metric: str, *, budget: int, target_acc: float | None = None) -> float:
    """The metric on the curve so far (for Optuna's pruner): ``auc_loss`` is the mean loss of the steps done,
    the validation metrics use the validation points so far, ``steps_to_target`` penalizes with the best
    accuracy so far. Raises ``ValueError`` when the curve has no point the metric needs yet."""
    check_metric(metric)
    _check_budget(budget)
    return _metric_value(curve, metric, budget, target_acc)


def _check_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")


def _check_target(target_acc: float | None) -> float:
    if target_acc is None or isinstance(target_acc, bool) or not 0.0 < float(target_acc) <= 1.0:
        raise ConfigError(f"score.target_acc: steps_to_target needs a target accuracy in (0, 1], got {target_acc!r}")
    return float(target_acc)


def _metric_value(curve: Curve, metric: str, budget: int, target_acc: float | None) -> float:
    """The metric over the first ``budget`` steps of what the curve holds."""
    if metric == "auc_loss":
        losses = np.asarray(curve.train_loss, dtype=np.float64)[:budget]
        if losses.size == 0:
            raise ValueError("auc_loss: the curve has no training steps yet")
        return float(losses.mean())
    steps, losses, accs = _val_points(curve, budget)
    if metric == "steps_to_target":
        return _steps_to_target(steps, accs, budget, _check_target(target_acc))
    if not steps:
        raise ValueError(f"{metric}: the curve has no validation point at or before step {budget}")
    return float(losses[-1] if metric == "final_val_loss" else accs[-1])


def _val_points(curve: Curve, budget: int) -> tuple[list[int], list[float], list[float]]:
    """The validation steps, losses and accuracies at or before ``budget``."""
    keep = [i for i, s in enumerate(curve.val_steps) if s <= budget]
    return ([curve.val_steps[i] for i in keep], [curve.val_loss[i] for i in keep], [curve.val_acc[i] for i in keep])


def _steps_to_target(steps: list[int], accs: list[float], budget: int, target_acc: float) -> float:
    """The first step with accuracy >= target; else ``budget * (2 - best / target)`` (NaN counts as 0)."""
    for step, acc in zip(steps, accs):
        if acc >= target_acc:
            return float(step)
    best = max((a for a in accs if not math.isnan(a)), default=0.0)
    return budget * (2.0 - max(best, 0.0) / target_acc)


def aggregate(values: Sequence[float], how: str, direction: str) -> float:
    """Combine one trial's scores over seeds.

    ``mean``; ``median``; ``worst`` (the max when minimizing, the min when maximizing); ``mean_plus_std``
    (mean + std when minimizing, mean - std when maximizing, population std: a pessimistic mean that
    penalizes seed sensitivity). Non-finite values propagate (one inf seed makes the mean inf).
    """
    check_aggregate(how)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"aggregate needs a non-empty list of numbers, got {values!r}")
    sign = 1.0 if direction == "minimize" else -1.0
    if how == "mean":
        return float(arr.mean())
    if how == "median":
        return float(np.median(arr))
    if how == "worst":
        return float(arr.max() if sign > 0 else arr.min())
    return float(arr.mean() + sign * arr.std())


def paired_gains(policy: Sequence[float], baseline: Sequence[float], direction: str) -> list[float]:
    """Per seed, how much better the policy scored than the baseline (positive = better), over the seeds where
    both have a score (the same seeds train every contender, so the pairs share their data and batches)."""
    sign = 1.0 if direction == "minimize" else -1.0
    return [sign * (b - p) for p, b in zip(policy, baseline) if math.isfinite(p) and math.isfinite(b)]


def interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t with n - 1 degrees of freedom);
    NaN half-width for fewer than two values."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    from scipy.stats import t as student_t

    return mean, float(student_t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
