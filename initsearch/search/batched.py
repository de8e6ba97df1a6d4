"""Population studies (``batch_trials=K``): ask Optuna for K trials at once, train them together, tell K results.

``run_study`` hands over to ``run_batched`` when ``batch_trials > 1``. A round:

1. **Admission**, under the study lock (as ``workers.TrialGate`` admits one trial): dead workers' trials are
   failed (``stale.check``), then as many trials as there is room for (the study's total minus the trials
   that count and the running ones, at most K) are created with ``study.ask()`` and marked with this worker
   (``workers.mark_worker``). Enqueued baselines and retries come first, as in ``study.optimize``.
2. **Policies**: each trial's policy is sampled from the search space, or is its baseline's
   (``contender_policy``); a searched trial whose parameters an earlier complete trial already had is
   answered with that trial's score without training (as ``Objective`` does).
3. **Per evaluation seed**: every member still running gets a fresh proxy (``Objective._fresh_model``), its
   init (``init_contender``: the policy, or GradInit/MetaInit with their passes counted), the finite-weights
   check, on the first seed its init diagnostics and the optional pre-screen; then all of them train
   together (``population.train_population``), each with its own pruning callback and heartbeat.
4. **Results**: each member is checked (finite weights), scored and aggregated over seeds exactly as
   ``Objective._evaluate`` does, and told to Optuna as complete, pruned or failed, with the same
   ``user_attrs`` and the same ``TrialOutcome`` to the tracker.

A member that fails (its init fails, its score cannot be computed, a storage error in its pruning callback)
fails alone; only an error of the population's training as a whole (CUDA out of memory, say: lower
``batch_trials``) fails every member of that round. SIGINT/SIGTERM: the round's open trials are failed
``interrupted by SIGINT`` (or SIGTERM), each is enqueued again once (``workers.enqueue_retry``), and the
interrupt goes on up, as in ``Objective``.

The count is ``run_study``'s: this process starts at most as many trials as were missing when it began, and
none once the study holds ``len(baselines) + n_trials`` trials that count (``workers.counted``) plus running
ones; ``timeout`` is checked before each round. The sampler sees a round's results only after the round:
K trials asked together are proposed from the same history (a larger K takes fewer, bigger steps); TPE runs
with ``constant_liar`` so they do not all land on the same point.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState

from initsearch.search.settings import StudySettings
from initsearch.contenders.baselines import contender_policy
from initsearch.init.policy import InitPolicy
from initsearch.proxy.population import train_population
from initsearch.proxy.scoring import aggregate, partial_score, score
from initsearch.search.study import (
    Objective,
    Proxy,
    Tracker,
    TrialOutcome,
    _complete_twin,
    _first_line,
    _interrupt_reason,
    _release_cuda_memory,
    _require_finite,
    _safely,
    _StaleTrials,
)
from initsearch.proxy.train import Curve
from initsearch.search.workers import Heartbeat, StudyLock, counted, enqueue_retry, mark_worker, running

log = logging.getLogger("initsearch")

_STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


@dataclass
class _Member:
    """One trial of a round: its Optuna trial, what it did so far, and how it ended (``state`` set once)."""

    trial: optuna.Trial
    outcome: TrialOutcome
    started: float
    beat: Heartbeat
    policy: InitPolicy | None = None
    state: TrialState | None = None
    value: float | None = None

    @property
    def open(self) -> bool:
        return self.state is None

    @property
    def prunable(self) -> bool:
        return self.outcome.baseline is None

    def end(self, state: TrialState, reason: str | None = None, value: float | None = None) -> None:
        """Record how the trial ended (the first call wins)."""
        if self.state is None:
            self.state, self.value = state, value
            self.outcome.state = _STATE_NAMES[state]
            if reason:
                self.outcome.reason = reason
            if state == TrialState.COMPLETE:
                self.outcome.value = value

    def end_by(self, exc: Exception) -> None:
        """End as ``Objective`` ends a trial that raised ``exc``: pruned, or failed with the reason."""
        if isinstance(exc, optuna.TrialPruned):
            self.end(TrialState.PRUNED, str(exc))
        elif isinstance(exc, torch.cuda.OutOfMemoryError):
            self.end(TrialState.FAIL, f"CUDA out of memory: {_first_line(exc)}")
            _release_cuda_memory(exc)
        else:
            self.end(TrialState.FAIL, f"{type(exc).__name__}: {exc}")


def run_batched(study: optuna.Study, settings: StudySettings, proxy: Proxy, tracker: Tracker, k: int, *,
                lock: StudyLock | None = None, stale: _StaleTrials | None = None) -> None:
    """Run the study's missing trials ``k`` at a time (see the module docstring). ``lock`` and ``stale`` are
    ``run_study``'s; without them, this function opens its own on the study's storage."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"batch_trials must be an integer >= 1, got {k!r}")
    lock = lock if lock is not None else StudyLock(settings.storage, study._storage, settings.study_name)
    stale = stale if stale is not None else _StaleTrials(tracker, settings.grace_period, "://" in settings.storage)
    objective = Objective(settings, proxy, tracker)
    _lie_about_running_trials(study.sampler)
    total = len(settings.baselines) + settings.n_trials
    left = total - counted(study.get_trials(deepcopy=False))
    started = time.perf_counter()
    while left > 0:
        if settings.timeout is not None and time.perf_counter() - started >= settings.timeout:
            break
        trials = admit(study, lock, stale, total, min(k, left))
        if not trials:
            break
        run_round(objective, study, trials)
        left -= len(trials)


def _lie_about_running_trials(sampler: optuna.samplers.BaseSampler) -> None:
    """Turn on TPE's ``constant_liar`` for batched asks: K trials asked from the same history would otherwise
    pile up on the same point (measured: 7 of a round's 10 trials re-proposed already scored policies on
    digits_mlp); with it, TPE counts the round's running trials as bad results and spreads the others.
    Optuna takes the flag only in the constructor, and the study's sampler is already built and seeded, so
    this sets the attribute that constructor argument sets (Optuna 4.x); other samplers are left alone."""
    if isinstance(sampler, optuna.samplers.TPESampler) and hasattr(sampler, "_constant_liar"):
        sampler._constant_liar = True


def admit(study: optuna.Study, lock: StudyLock, stale: _StaleTrials, total: int, want: int) -> list[optuna.Trial]:
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


def run_round(objective: Objective, study: optuna.Study, trials: Sequence[optuna.Trial]) -> list[TrialOutcome]:
    """Evaluate ``trials`` together and tell Optuna and the tracker how each one ended."""
    members = [_begin(objective, trial) for trial in trials]
    with _heartbeats(study, trials):
        try:
            for i, seed in enumerate(objective.s.eval_seeds):
                _train_seed(objective, [m for m in members if m.open], i, seed)
            for m in members:
                if m.open:
                    _conclude(objective, m)
        except BaseException as exc:  # SIGINT/SIGTERM (or worse): the open trials fail and run again later
            reason = _interrupt_reason(exc) if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            for m in members:
                if m.open:
                    m.end(TrialState.FAIL, reason)
                    if isinstance(exc, KeyboardInterrupt):
                        _safely(enqueue_retry, study, m.trial.number, m.trial.params, m.trial.user_attrs, reason)
            _close_all(objective, study, members)
            raise
    _close_all(objective, study, members)
    return [m.outcome for m in members]


# ---- the steps of a member --------------------------------------------------------------------------------
def _begin(objective: Objective, trial: optuna.Trial) -> _Member:
    """The trial's policy (sampled, or its baseline's) and attributes; answered at once when a complete twin
    already scored these parameters (``Objective.__call__``'s first half)."""
    baseline = trial.user_attrs.get("baseline")
    m = _Member(trial, TrialOutcome(trial.number, baseline, params={}), time.perf_counter(),
                Heartbeat(objective.s.heartbeat_interval))
    try:
        policy = contender_policy(baseline) if baseline else objective.s.space.sample(trial, objective.proxy.layers)
        m.outcome.params = dict(trial.params)
        m.outcome.policy = policy.to_dict()
        trial.set_user_attr("kind", "baseline" if baseline else "search")
        trial.set_user_attr("policy", m.outcome.policy)
        twin = None if baseline else _complete_twin(trial)
        if twin is None:
            m.policy = policy
            return m
        m.outcome.seed_scores = list(twin.user_attrs.get("seed_scores") or [])
        for key in ("seed_scores", "seeds"):
            trial.set_user_attr(key, twin.user_attrs.get(key))
        trial.set_user_attr("duplicate_of", twin.number)
        m.end(TrialState.COMPLETE, f"same policy as trial {twin.number}", twin.value)
    except Exception as exc:  # noqa: BLE001 - this trial ends, the round goes on
        m.end_by(exc)
    return m


def _init_model(objective: Objective, m: _Member, i: int, seed: int) -> torch.nn.Module:
    """A fresh proxy initialized as the member's contender, exactly as ``Objective`` does it."""
    return objective.init_for_seed(m.trial, m.policy, m.outcome, i, seed)


def _pruning_callback(objective: Objective, m: _Member, i: int) -> Callable[[int, Curve], bool]:
    """Beat, report the partial score and ask the pruner, as ``Objective`` does; a storage error ends this
    member (and stops its training) instead of the whole population."""
    s = objective.s
    steps = s.train.steps

    def on_checkpoint(step: int, curve: Curve) -> bool:
        if not m.open:
            return True
        try:
            m.beat(m.trial)
            if not m.prunable or not objective.pruning:
                return False
            m.trial.report(partial_score(curve, s.score.metric, budget=steps, target_acc=s.score.target_acc),
                           i * steps + step)
            return m.trial.should_prune()
        except Exception as exc:  # noqa: BLE001
            m.end_by(exc)
            return True

    return on_checkpoint


def _train_seed(objective: Objective, members: list[_Member], i: int, seed: int) -> None:
    """Initialize every open member for evaluation seed ``seed``, train them as one population, score each."""
    s, p = objective.s, objective.proxy
    ready: list[_Member] = []
    models: list[torch.nn.Module] = []
    for m in members:
        try:
            model = _init_model(objective, m, i, seed)
        except Exception as exc:  # noqa: BLE001
            m.end_by(exc)
            continue
        ready.append(m)
        models.append(model)
    if not ready:
        return
    callbacks = [_pruning_callback(objective, m, i) for m in ready]
    try:
        curves = train_population(models, p.data, s.train, seeds=[seed] * len(models), on_checkpoint=callbacks)
    except Exception as exc:  # noqa: BLE001 - the population as a whole failed: so did each of its members
        for m in ready:
            m.end_by(exc)
        return
    for m, model, curve in zip(ready, models, curves):
        m.outcome.curves.append(curve)
        m.outcome.seeds.append(seed)
        if not m.open:
            continue
        try:
            if curve.diverged:
                raise optuna.TrialPruned(f"diverged on seed {seed}: {curve.reason}")
            if curve.stopped:
                raise optuna.TrialPruned(f"pruned at step {curve.steps_done} of seed {seed}")
            _require_finite(model, f"after training (seed {seed})")
            m.outcome.seed_scores.append(score(curve, s.score.metric, budget=s.train.steps,
                                               target_acc=s.score.target_acc))
        except Exception as exc:  # noqa: BLE001
            m.end_by(exc)


def _conclude(objective: Objective, m: _Member) -> None:
    """Aggregate the member's seed scores (``Objective._evaluate``'s end)."""
    s = objective.s
    try:
        m.trial.set_user_attr("seed_scores", m.outcome.seed_scores)
        m.trial.set_user_attr("seeds", m.outcome.seeds)
        value = aggregate(m.outcome.seed_scores, s.score.aggregate, s.score.direction)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"non-finite score {value}")
    except Exception as exc:  # noqa: BLE001
        m.end_by(exc)
        return
    m.end(TrialState.COMPLETE, None, value)


def _close_all(objective: Objective, study: optuna.Study, members: Sequence[_Member]) -> None:
    """Tell Optuna and the tracker how each member ended, in trial order."""
    for m in members:
        m.outcome.seconds = time.perf_counter() - m.started
        if m.outcome.reason:
            _safely(m.trial.set_user_attr, "reason", m.outcome.reason[:1000])
        if m.state == TrialState.COMPLETE:
            study.tell(m.trial, m.value)
        else:
            if m.state == TrialState.FAIL:
                log.warning("Trial %d failed: %s", m.trial.number, m.outcome.reason)
            study.tell(m.trial, state=m.state or TrialState.FAIL)
        _safely(objective.tracker.trial_finished, m.outcome)


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
