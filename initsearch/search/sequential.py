"""The sequential runner: Optuna's ``study.optimize`` runs one trial at a time, each a ``TrialRun``.

Each next trial is admitted by a ``TrialGate`` under the study lock (so parallel workers stop at the study's
total together), marked with its worker, and beats at the training checkpoints. Optuna tells each result.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna

from initsearch.proxy.train import train_run
from initsearch.search.outcome import Tracker, safely
from initsearch.search.settings import StudySettings
from initsearch.search.trial import Proxy, TrialRun
from initsearch.search.workers import Heartbeat, StaleTrials, StudyLock, TrialGate, mark_worker


def _noop(*args: object) -> None:
    pass


@dataclass
class TrialHooks:
    """What the runner does around each trial: ``started(trial)`` first (mark the trial's worker, let the
    admission lock go), ``alive(trial)`` at each training checkpoint (the heartbeat)."""

    started: Callable[[optuna.Trial], None] = _noop
    alive: Callable[[optuna.Trial], None] = _noop


class Objective:
    """Optuna's objective: one ``TrialRun`` per call, training its seeds one after the other with
    ``train_run``. Returns the value; raises ``TrialPruned`` or the error for Optuna to record (an interrupt
    goes on up, after the trial was enqueued again)."""

    def __init__(self, settings: StudySettings, proxy: Proxy, tracker: Tracker, hooks: TrialHooks | None = None):
        self.s = settings
        self.proxy = proxy
        self.tracker = tracker
        self.hooks = hooks or TrialHooks()

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        run = TrialRun(self.s, self.proxy, trial, self.hooks.alive)
        try:
            self.hooks.started(trial)
            if run.begin():
                self._train_seeds(run)
                run.conclude()
            return run.told
        except BaseException as exc:
            run.end_by(exc)
            raise
        finally:
            run.finish()
            safely(self.tracker.trial_finished, run.outcome)

    def _train_seeds(self, run: TrialRun) -> None:
        """Each evaluation seed: init, train, record. Its own frame, so that after an error the models and
        curves die with it (``release_cuda_memory`` can clear a traceback's frames, not a running one)."""
        for i, seed in enumerate(self.s.eval_seeds):
            model = run.init_model(i, seed)
            curve = train_run(model, self.proxy.data, self.s.train, seed=seed, on_checkpoint=run.on_checkpoint(i))
            run.record(seed, curve, model)


def optimize(study: optuna.Study, settings: StudySettings, proxy: Proxy, tracker: Tracker, lock: StudyLock,
             stale: StaleTrials, at_most: int) -> None:
    """Optuna's loop over at most ``at_most`` trials, each admitted by the gate, marked with its worker, and
    beating at checkpoints; stops at the study's total, ``timeout``, or when the gate says so."""
    total = len(settings.baselines) + settings.n_trials
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
    gate = TrialGate(lock, total, before_check=stale.check, poll_s=min(5.0, settings.heartbeat_interval),
                     deadline=deadline)
    beat = Heartbeat(settings.heartbeat_interval)

    def started(trial: optuna.Trial) -> None:
        try:
            mark_worker(trial)
        finally:
            gate.entered()

    objective = Objective(settings, proxy, tracker, TrialHooks(started=started, alive=beat))
    try:
        if gate.admit(study):
            study.optimize(
                objective,
                n_trials=at_most,
                timeout=settings.timeout,
                catch=(Exception,),
                callbacks=[gate],
                gc_after_trial=False,
                show_progress_bar=False,  # the study shows its own (search.progress)
            )
    finally:
        gate.close()
