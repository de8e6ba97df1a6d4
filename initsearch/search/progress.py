"""Progress of a study while it runs: a tracker that shows it and passes every hook on to the real one.

On a terminal, a tqdm bar (tqdm comes with Optuna); otherwise (a log file, CI) one line for the first trial,
then at most one every ``LINE_INTERVAL_S`` seconds, and one for the last:

    12/40 trials · best auc_loss 0.094 (trial 9) · best baseline lsuv 0.113 · ETA 1m10s

Both go to stderr (stdout keeps the summary). ``progress=false`` shows nothing. Counts are the study's
(its finished trials at the start, plus those this process finishes); the ETA is this process's pace.
"""
from __future__ import annotations

import math
import sys
import time
from typing import IO, Any

from optuna.trial import TrialState

from initsearch.search.outcome import NullTracker, Tracker, TrialOutcome, trial_score
from initsearch.search.settings import StudySettings
from initsearch.search.workers import counted

LINE_INTERVAL_S = 5.0


def format_duration(seconds: float) -> str:
    """``42s``, ``1m10s``, ``2h05m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Shows a study's progress and forwards every hook (and any other attribute: ``flush``, ``close``,
    ``runs_url``...) to ``inner``. Showing never raises into the study."""

    def __init__(self, inner: Tracker | None, settings: StudySettings, stream: IO[str] | None = None,
                 enabled: bool | None = None, interval_s: float = LINE_INTERVAL_S) -> None:
        self.inner = inner if inner is not None else NullTracker()
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = settings.progress if enabled is None else enabled
        self.interval_s = interval_s
        self.metric = settings.score.metric
        self.minimize = settings.score.direction == "minimize"
        self.total = len(settings.baselines) + settings.n_trials
        self.done = 0
        self.ran = 0  # trials this process finished
        self.best_search: tuple[float, int] | None = None  # (value, trial number)
        self.best_baseline: tuple[float, str] | None = None
        self._started = time.monotonic()
        self._last_line = -math.inf
        self._bar: Any = None

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- the hooks --
    def study_started(self, settings: StudySettings, config_yaml: str, study: Any) -> None:
        try:
            self._begin(study)
        finally:
            self.inner.study_started(settings, config_yaml, study)

    def trial_finished(self, outcome: TrialOutcome) -> None:
        try:
            self.done += 1
            self.ran += 1
            if outcome.state == "complete" and outcome.value is not None and math.isfinite(outcome.value):
                self._offer(outcome.value, outcome.baseline, outcome.number)
            self._show()
        finally:
            self.inner.trial_finished(outcome)

    def study_finished(self, study: Any, summary: Any, policy_path: Any) -> None:
        self._end()
        self.inner.study_finished(study, summary, policy_path)

    def close(self) -> None:
        self._end()
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    # -- showing --
    def line(self) -> str:
        parts = [f"{min(self.done, self.total)}/{self.total} trials"]
        if self.best_search is not None:
            parts.append(f"best {self.metric} {self.best_search[0]:.4g} (trial {self.best_search[1]})")
        if self.best_baseline is not None:
            parts.append(f"best baseline {self.best_baseline[1]} {self.best_baseline[0]:.4g}")
        eta = self.eta_s()
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return " · ".join(parts)

    def eta_s(self) -> float | None:
        """Seconds left at this process's pace so far; ``None`` before its first trial or when done."""
        left = self.total - self.done
        if self.ran == 0 or left <= 0:
            return None
        return (time.monotonic() - self._started) / self.ran * left

    def _begin(self, study: Any) -> None:
        trials = study.get_trials(deepcopy=False)
        self.done = counted(trials)
        for t in trials:
            value = trial_score(t) if t.state == TrialState.COMPLETE else None
            if value is not None and math.isfinite(value):
                self._offer(value, t.user_attrs.get("baseline"), t.number)
        self._started = time.monotonic()
        if not self.enabled or self.done >= self.total:
            return
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, file=self.stream, unit="trial",
                             dynamic_ncols=True, leave=False, bar_format="{n}/{total} trials |{bar:24}| {desc}")
            self._bar.set_description_str(self.line().split(" · ", 1)[-1] if self.done else "", refresh=True)

    def _offer(self, value: float, baseline: str | None, number: int) -> None:
        def better(old: float) -> bool:
            return value < old if self.minimize else value > old

        if baseline:
            if self.best_baseline is None or better(self.best_baseline[0]):
                self.best_baseline = (value, baseline)
        elif self.best_search is None or better(self.best_search[0]):
            self.best_search = (value, number)

    def _show(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = min(self.done, self.total)
            self._bar.set_description_str(self.line().split(" · ", 1)[-1], refresh=True)
            return
        now = time.monotonic()
        if self.ran == 1 or self.done >= self.total or now - self._last_line >= self.interval_s:
            self._last_line = now
            print(self.line(), file=self.stream, flush=True)

    def _end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Steps:
    """Progress of a fixed number of steps of other work (``validate``'s training runs), shown as the study's
    is: a tqdm bar on a terminal, else the first line, then one every ``interval_s`` seconds, and the last."""

    def __init__(self, total: int, unit: str, enabled: bool = True, stream: IO[str] | None = None,
                 interval_s: float = LINE_INTERVAL_S) -> None:
        self.total, self.unit, self.enabled = total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.done = 0
        self._started = time.monotonic()
        self._last_line = -math.inf
        self._bar: Any = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, file=self.stream, unit=unit, dynamic_ncols=True, leave=False)

    def step(self, what: str) -> None:
        """One more step done; ``what`` says which (``policy, seed 1000001``)."""
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(what, refresh=True)
            if self.done >= self.total:
                self._bar.close()
            return
        now = time.monotonic()
        if self.done == 1 or self.done >= self.total or now - self._last_line >= self.interval_s:
            self._last_line = now
            left = self.total - self.done
            eta = f" · ETA {format_duration((now - self._started) / self.done * left)}" if left else ""
            print(f"{self.done}/{self.total} {self.unit} · {what}{eta}", file=self.stream, flush=True)
