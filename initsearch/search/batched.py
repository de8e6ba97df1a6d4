"""Population studies (``batch_trials=K``): ask Optuna for K trials at once, train them together, tell K results.

The study hands over to ``run_batched`` when ``batch_trials > 1``. Each trial is a ``TrialRun``, as in the
sequential runner: only the training (one population per evaluation seed) and the telling differ. A round:

1. **Admission**, under the study lock (as ``workers.TrialGate`` admits one trial): dead workers' trials are
   failed (``stale.check``), then as many trials as there is room for (the study's total minus the trials
   that count and the running ones, at most K) are created with ``study.ask()`` and marked with this worker
   (``workers.mark_worker``). Enqueued baselines and retries come first, as in ``study.optimize``.
2. **Policies**: ``TrialRun.begin`` for each (a searched trial whose parameters a complete trial already
   had is answered with that trial's score without training).
3. **Per evaluation seed**: every member still open gets its initialized model (``TrialRun.init_model``),
   then all of them train together (``population.train_population``), each with its own checkpoint
   callback and heartbeat, and each curve is recorded and scored (``TrialRun.record``).
4. **Results**: ``TrialRun.conclude`` aggregates; each trial is told to Optuna as complete, pruned or
   failed, and its ``TrialOutcome`` goes to the tracker.

A member that fails (its init fails, its score cannot be computed, a storage error in its pruning callback)
fails alone; only an error of the population's training as a whole (CUDA out of memory, say: lower
``batch_trials``) fails every member of that round. SIGINT/SIGTERM: the round's open trials are failed
``interrupted by SIGINT`` (or SIGTERM), each is enqueued again once, and the interrupt goes on up, as in
the sequential runner (``TrialRun.end_by``).

The count is the study's: this process starts at most as many trials as were missing when it began, and
none once the study holds ``len(baselines) + n_trials`` trials that count (``workers.counted``) plus running
ones; ``timeout`` is checked before each round. The sampler sees a round's results only after the round:
K trials asked together are proposed from the same history (a larger K takes fewer, bigger steps); TPE runs
with ``constant_liar`` so they do not all land on the same point.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import optuna
import torch
from optuna.trial import TrialState

from initsearch.proxy.population import train_population
from initsearch.proxy.train import Curve
from initsearch.search.outcome import Tracker, TrialOutcome, safely
from initsearch.search.settings import StudySettings, is_rdb
from initsearch.search.trial import Proxy, TrialRun, population_size
from initsearch.search.workers import Heartbeat, StaleTrials, StudyLock, counted, mark_worker, running

log = logging.getLogger("initsearch")


def run_batched(study: optuna.Study, settings: StudySettings, proxy: Proxy, tracker: Tracker, k: int, *,
                lock: StudyLock | None = None, stale: StaleTrials | None = None) -> None:
    """Run the study's missing trials ``k`` at a time (see the module docstring). ``lock`` and ``stale`` are
    the study's; without them, this function opens its own on the study's storage."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"batch_trials must be an integer >= 1, got {k!r}")
    lock = lock if lock is not None else StudyLock(settings.storage, study._storage, settings.study_name)
    stale = stale if stale is not None else StaleTrials(tracker, settings.grace_period, is_rdb(settings.storage))
    lie_about_running_trials(study.sampler)
    total = len(settings.baselines) + settings.n_trials
    left = total - counted(study.get_trials(deepcopy=False))
    started = time.perf_counter()
    engines: set[str] = set()  # the engines logged so far (each once per study)
    while left > 0:
        if settings.timeout is not None and time.perf_counter() - started >= settings.timeout:
            break
        trials = admit(study, lock, stale, total, min(k, left))
        if not trials:
            break
        run_round(settings, proxy, tracker, study, trials, engines=engines)
        left -= len(trials)


def trials_per_round(settings: StudySettings, proxy: Proxy) -> int:
    """``batch_trials`` as a number: itself, or for ``auto`` the K ``popsize.auto_population_size`` picks
    for this proxy on its device (logged)."""
    return population_size(settings, settings.model, proxy.data, proxy.device, what="trial(s) per round")


def lie_about_running_trials(sampler: optuna.samplers.BaseSampler) -> None:
    """Turn on TPE's ``constant_liar`` for batched asks: K trials asked from the same history would otherwise
    pile up on the same point (most of a round re-proposed already scored policies on digits_mlp); with it,
    TPE counts the round's running trials as bad results and spreads the others. Optuna takes the flag only
    in the constructor, and the study's sampler is already built and seeded, so this sets the attribute that
    constructor argument sets (Optuna 4.x); other samplers are left alone."""
    if isinstance(sampler, optuna.samplers.TPESampler) and hasattr(sampler, "_constant_liar"):
        sampler._constant_liar = True


def admit(study: optuna.Study, lock: StudyLock, stale: StaleTrials, total: int, want: int) -> list[optuna.Trial]:
    """Under the study lock: fail dead workers' trials, then create up to ``want`` trials while there is room."""
    with lock:
        stale.check(study)
        trials = study.get_trials(deepcopy=False)
        room = total - counted(trials) - running(trials)
        asked = []
        for _ in range(max(0, min(want, room))):
            trial = study.ask()
            mark_worker(trial)
            asked.append(trial)
    return asked


def run_round(settings: StudySettings, proxy: Proxy, tracker: Tracker, study: optuna.Study,
              trials: Sequence[optuna.Trial], engines: set[str] | None = None) -> list[TrialOutcome]:
    """Evaluate ``trials`` together and tell Optuna and the tracker how each one ended. The engine that
    trained a population is logged (info) unless ``engines`` already holds its description; it is added."""
    engines = set() if engines is None else engines
    runs = [TrialRun(settings, proxy, trial, Heartbeat(settings.heartbeat_interval)) for trial in trials]
    with _heartbeats(study, trials):
        try:
            for run in runs:
                _step(run, run.begin)
            for i, seed in enumerate(settings.eval_seeds):
                _train_seed(settings, proxy, [r for r in runs if r.open], i, seed, engines)
            for run in runs:
                if run.open:
                    _step(run, run.conclude)
        except BaseException as exc:  # SIGINT/SIGTERM (or worse): the open trials fail and run again later
            for run in runs:
                run.end_by(exc)
            _close_all(study, tracker, runs)
            raise
    _close_all(study, tracker, runs)
    return [r.outcome for r in runs]


def _step(run: TrialRun, step: Callable[[], object]) -> None:
    """One step of a member; an exception ends that trial alone, the round goes on."""
    try:
        step()
    except Exception as exc:
        run.end_by(exc)


def _guarded(run: TrialRun, callback: Callable[[int, Curve], bool]) -> Callable[[int, Curve], bool]:
    """The member's checkpoint callback; a storage error ends this member (and stops its training) instead
    of the whole population."""

    def on_checkpoint(step: int, curve: Curve) -> bool:
        try:
            return callback(step, curve)
        except Exception as exc:
            run.end_by(exc)
            return True

    return on_checkpoint


def _train_seed(settings: StudySettings, proxy: Proxy, runs: list[TrialRun], i: int, seed: int,
                engines: set[str]) -> None:
    """Initialize every open member for evaluation seed ``seed``, train them as one population, score each;
    log the engine that ran them when it is new to ``engines``."""
    ready: list[TrialRun] = []
    models: list[torch.nn.Module] = []
    for run in runs:
        try:
            models.append(run.init_model(i, seed))
        except Exception as exc:
            run.end_by(exc)
            continue
        ready.append(run)
    if not ready:
        return
    callbacks = [_guarded(run, run.on_checkpoint(i)) for run in ready]
    try:
        result = train_population(models, proxy.data, settings.train, seeds=[seed] * len(models),
                                  on_checkpoint=callbacks)
    except Exception as exc:
        for run in ready:
            run.end_by(exc)
        return
    if len(models) > 1 and result.describe() not in engines:
        engines.add(result.describe())
        log.info("Population training: %d members on %s, engine: %s", len(models), proxy.device, result.describe())
    for run, model, curve in zip(ready, models, result.curves):
        _step(run, functools.partial(run.record, seed, curve, model))


def _close_all(study: optuna.Study, tracker: Tracker, runs: Sequence[TrialRun]) -> None:
    """Tell Optuna and the tracker how each member ended, in trial order."""
    for run in runs:
        run.finish()
        if run.state == TrialState.COMPLETE:
            study.tell(run.trial, run.told)
        else:
            if run.state == TrialState.FAIL:
                log.warning("Trial %d failed: %s", run.trial.number, run.outcome.reason)
            study.tell(run.trial, state=run.state or TrialState.FAIL)
        safely(tracker.trial_finished, run.outcome)


@contextlib.contextmanager
def _heartbeats(study: optuna.Study, trials: Sequence[optuna.Trial]) -> Iterator[None]:
    """Optuna's own heartbeat thread per running trial, as ``study.optimize`` keeps one (RDB storages with
    heartbeats; a no-op elsewhere)."""
    try:
        from optuna.storages._heartbeat import get_heartbeat_thread  # Optuna's, private: optional here
    except ImportError:
        yield
        return
    with contextlib.ExitStack() as stack:
        for trial in trials:
            stack.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
        yield
