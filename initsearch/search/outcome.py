"""What a study tells its observers: one ``TrialOutcome`` per finished trial, through the ``Tracker`` protocol.

The search owns these types and the tracking stage implements them, so observing never needs the engine:
``tracking/`` imports this module, never the runners.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import optuna

    from initsearch.init.diagnostics import SignalReport
    from initsearch.proxy.train import Curve
    from initsearch.search.settings import StudySettings

log = logging.getLogger("initsearch")


def trial_score(trial: Any) -> float | None:
    """A finished trial's score: its value, or in a multi-objective study (score, then parameter count) its
    first value (``FrozenTrial.value`` raises there); ``None`` when it has none (pruned, failed, running)."""
    values = trial.values
    return None if not values else values[0]


def score_direction(study: Any) -> str:
    """``minimize`` or ``maximize``: the direction of the study's score (its first objective)."""
    import optuna

    return "minimize" if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else "maximize"


@dataclass
class TrialOutcome:
    """What one trial did, for trackers: its policy, per-seed curves and scores, and how it ended."""

    number: int
    baseline: str | None
    params: dict[str, Any]
    policy: dict[str, Any] | None = None
    state: str = "running"  # complete | pruned | failed
    value: float | None = None
    seed_scores: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    signals: SignalReport | None = None
    reason: str | None = None
    seconds: float = 0.0
    n_params: int | None = None  # a joint search's network size (the second objective of a multi-objective study)


class Tracker(Protocol):
    """Observes a study (MLflow does; tests may). Must not raise into the study."""

    def study_started(self, settings: StudySettings, config_yaml: str, study: optuna.Study) -> None: ...

    def trial_finished(self, outcome: TrialOutcome) -> None: ...

    def study_finished(self, study: optuna.Study, summary: Any, policy_path: Any) -> None: ...


class NullTracker:
    """The tracker of ``tracking_uri=none``: observes nothing."""

    def study_started(self, settings, config_yaml, study) -> None:
        pass

    def trial_finished(self, outcome) -> None:
        pass

    def study_finished(self, study, summary, policy_path) -> None:
        pass


def safely(fn: Callable[..., object], *args: object) -> None:
    """Call an observer's hook (or another side job of a trial); a failure is logged as a warning, never
    allowed to lose the study."""
    try:
        fn(*args)
    except Exception as exc:  # observers must not break the search
        what = getattr(fn, "__name__", "a hook").strip("_")
        log.warning("%s failed (%s: %s); the study goes on", what, type(exc).__name__, exc)
