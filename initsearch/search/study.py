"""The study: Optuna storage, sampler, pruner, the baselines, and the trial loop.

The flow is one way: settings -> (data, proxy layers) -> for each trial: policy (sampled, or a baseline) ->
for each evaluation seed: fresh proxy, ``apply_policy``, short ``train_run`` -> score -> aggregate -> Optuna.
A ``Tracker`` observes each finished trial and the end of the study; it never steers.
"""
from __future__ import annotations

import gc
import inspect
import logging
import math
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
import torch
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from initsearch.init.apply import forked_seed
from initsearch.search.settings import StudySettings
from initsearch.proxy.data import Dataset, load_dataset
from initsearch.init.diagnostics import SignalReport, is_degenerate, signal_report
from initsearch.errors import ConfigError, InitSearchError
from initsearch.init.layers import LayerDiscovery, LayerInfo, discover_layers
from initsearch.proxy.models import build_model
from initsearch.init.policy import InitPolicy
from initsearch.proxy.scoring import aggregate, partial_score, score
from initsearch.contenders.baselines import contender_policy, init_contender
from initsearch.proxy.train import Curve, train_run
from initsearch.search.workers import (
    Heartbeat,
    StudyLock,
    TrialGate,
    counted,
    enqueue_retry,
    fail_stale_trials,
    mark_worker,
)

log = logging.getLogger("initsearch")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class StudyFailed(InitSearchError):
    """No trial of the study finished, so there is nothing to export."""


class StudyInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the study (a ``KeyboardInterrupt``, so Optuna fails the running trial and
    re-raises it). That trial is recorded failed, reason ``interrupted by SIGINT``, and enqueued again;
    ``study`` is the study so far (``None`` if it stopped before the study was open). The process should
    exit with ``exit_status`` (128 + the signal number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        self.study: optuna.Study | None = None
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _interrupt_reason(exc: BaseException) -> str:
    return f"interrupted by {signal.Signals(getattr(exc, 'signum', signal.SIGINT)).name}"


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


class Tracker(Protocol):
    """Observes a study (MLflow does; tests may). Must not raise into the study."""

    def study_started(self, settings: StudySettings, config_yaml: str, study: optuna.Study) -> None: ...

    def trial_finished(self, outcome: TrialOutcome) -> None: ...

    def study_finished(self, study: optuna.Study, summary: Any, policy_path: Any) -> None: ...


class NullTracker:
    def study_started(self, settings, config_yaml, study) -> None:
        pass

    def trial_finished(self, outcome) -> None:
        pass

    def study_finished(self, study, summary, policy_path) -> None:
        pass


# ---- Optuna pieces from the settings -----------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but CUDA is not available on this machine")
    return torch.device(name)


def open_storage(
    url: str,
    *,
    heartbeat_interval: int = 60,
    grace_period: int = 180,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """An Optuna storage from ``storage=``: a URL with ``://`` is an RDB (SQLite for one process; PostgreSQL
    for several machines), anything else the path of a journal file (safe for several processes on one
    machine). RDBs get Optuna's heartbeats: a trial whose worker stopped beating for ``grace_period``
    seconds is failed and ``on_stale(study, trial)`` runs (default: enqueue it again once, ``retry_of``).
    A database that cannot be reached is one ``ConfigError`` line (at most ~10 s for PostgreSQL), password
    hidden."""
    if "://" not in url:
        try:
            return JournalStorage(JournalFileBackend(url))
        except OSError as exc:
            raise ConfigError(f"storage: cannot open the journal file {url!r}: {exc.strerror or exc}") from None
    engine_kwargs = None
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg2://", "postgresql+psycopg://")):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}  # an unroutable host fails in 10 s, not minutes
    # Optuna 4.9 renamed the stale-trial callback argument; older releases know only the first name.
    callback_arg = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in inspect.signature(
        RDBStorage.__init__).parameters else "failed_trial_callback"
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and what several machines need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                **{callback_arg: on_stale or _retry_stale_trial},
            )
    except Exception as exc:  # sqlalchemy errors: unreachable server, bad URL, missing driver
        raise ConfigError(f"storage: cannot open {_redact(url)}: {_storage_problem(exc, url)}") from None


def _storage_problem(exc: Exception, url: str) -> str:
    """The first line of a database error, the password hidden; a missing driver named with its package."""
    missing = exc.__cause__ if isinstance(exc.__cause__, ModuleNotFoundError) else None
    if missing is not None:
        hint = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}.get(missing.name or "", missing.name)
        return f"its database driver is not installed (no module {missing.name!r}; pip install '{hint}')"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    password = _password(url)
    if password:
        first = first.replace(password, "***")
    return f"{type(exc).__name__}: {first}"


def _retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat failed ``trial`` (its worker went silent): run its parameters again, once."""
    enqueue_retry(study, trial.number, trial.params, trial.user_attrs, "worker lost: no heartbeat")


def _password(url: str) -> str | None:
    rest = url.split("://", 1)[1] if "://" in url else ""
    creds = rest.rsplit("@", 1)[0] if "@" in rest else ""
    return creds.split(":", 1)[1] if ":" in creds else None


def _redact(url: str) -> str:
    """The URL without a password (``postgresql://user:***@host/db``)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


def make_sampler(cfg: dict[str, Any], seed: int) -> optuna.samplers.BaseSampler:
    name = cfg["name"]
    if name == "tpe":
        multivariate = bool(cfg.get("multivariate", True))
        with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna 4, and the better choice here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=int(cfg.get("n_startup_trials", 10)), multivariate=multivariate, group=multivariate
            )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.GPSampler(seed=seed)


def make_pruner(cfg: dict[str, Any], max_resource: int) -> optuna.pruners.BasePruner:
    name = cfg["name"]
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(cfg.get("n_startup_trials", 5)), n_warmup_steps=int(cfg.get("n_warmup_steps", 0))
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_resource)
    return optuna.pruners.NopPruner()


# ---- what every trial shares -------------------------------------------------------------------------------
@dataclass
class Proxy:
    """The data on the device, the example batch, and the proxy model's discovered layers."""

    data: Dataset
    example_x: torch.Tensor
    example_y: torch.Tensor
    layers: tuple[LayerInfo, ...]
    device: torch.device
    layer_method: str = "fx"  # how discover_layers found them ("fx" or "hooks")

    @property
    def discovery(self) -> LayerDiscovery:
        """The layers as ``apply_policy(layers=...)`` takes them: every fresh copy of the proxy has these."""
        return LayerDiscovery(self.layers, self.layer_method)


def prepare(settings: StudySettings) -> Proxy:
    """Load the data and discover the proxy's layers: everything that can fail on a bad config fails here,
    before the study's storage is touched."""
    device = resolve_device(settings.device)
    d = settings.data
    data = load_dataset(
        d.get("name"),
        root=d.get("root"),
        url=d.get("url"),
        md5=d.get("md5"),
        download=bool(d.get("download", True)),
        val_fraction=float(d.get("val_fraction", 0.2)),
        subset=d.get("subset"),
        normalize=bool(d.get("normalize", True)),
        seed=settings.seed,
        device=device,
        synthetic=d.get("synthetic"),
    )
    g = torch.Generator(device="cpu").manual_seed(settings.seed)
    idx = torch.randperm(len(data.x_train), generator=g)[: settings.lsuv_batch].to(device)
    example_x, example_y = data.x_train[idx], data.y_train[idx]
    model = build_model(settings.model, data.input_shape, data.num_classes).to(device)
    try:
        discovery = discover_layers(model, example_x)
    except InitSearchError:
        raise
    except Exception as exc:  # a user's model that fails on the data: one line, before the study opens
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"model: the proxy failed on a batch of {d.get('name')} data: {type(exc).__name__}: {first}") from None
    return Proxy(data, example_x, example_y, discovery.layers, device, discovery.method)


# ---- one trial -----------------------------------------------------------------------------------------------
def _noop(*args: object) -> None:
    pass


@dataclass
class TrialHooks:
    """What the study runner does around each trial: ``started(trial)`` first (mark the trial's worker, let
    the admission lock go), ``alive(trial)`` at each training checkpoint (the heartbeat)."""

    started: Callable[[optuna.Trial], None] = _noop
    alive: Callable[[optuna.Trial], None] = _noop


class Objective:
    """Scores one trial's policy on every evaluation seed; reports intermediate values for pruning.

    How a trial can end: complete; pruned (by the pruner, the pre-screen, a diverged loss, non-finite
    weights or score); failed with ``user_attrs["reason"]`` (an exception, e.g. in a user's model, or CUDA
    out of memory: the cache is emptied for the next trial); failed ``interrupted by SIGINT``/``SIGTERM``
    (then also enqueued again, once, and the interrupt goes on up).
    """

    def __init__(self, settings: StudySettings, proxy: Proxy, tracker: Tracker, hooks: TrialHooks | None = None):
        self.s = settings
        self.proxy = proxy
        self.tracker = tracker
        self.hooks = hooks or TrialHooks()

    @property
    def pruning(self) -> bool:
        """Whether searched trials report partial scores at checkpoints: not with ``pruner=none``, where each
        report would be one storage write and one read that no pruner looks at."""
        return self.s.pruner.get("name") != "none"

    def __call__(self, trial: optuna.Trial) -> float:
        start = time.perf_counter()
        baseline = trial.user_attrs.get("baseline")
        outcome = TrialOutcome(trial.number, baseline, params={})
        try:
            self.hooks.started(trial)
            policy = contender_policy(baseline) if baseline else self.s.space.sample(trial, self.proxy.layers)
            outcome.params = dict(trial.params)
            outcome.policy = policy.to_dict()
            trial.set_user_attr("kind", "baseline" if baseline else "search")
            trial.set_user_attr("policy", outcome.policy)
            twin = None if baseline else _complete_twin(trial)
            if twin is not None:  # the sampler proposed a policy already scored: same seeds, same score
                outcome.seed_scores = list(twin.user_attrs.get("seed_scores") or [])
                outcome.reason = f"same policy as trial {twin.number}"
                for key in ("seed_scores", "seeds"):
                    trial.set_user_attr(key, twin.user_attrs.get(key))
                trial.set_user_attr("duplicate_of", twin.number)
                outcome.value, outcome.state = twin.value, "complete"
                return twin.value
            outcome.value = self._evaluate(trial, policy, outcome, prunable=baseline is None and self.pruning)
            outcome.state = "complete"
            return outcome.value
        except optuna.TrialPruned as exc:
            outcome.state, outcome.reason = "pruned", str(exc)
            raise
        except KeyboardInterrupt as exc:  # SIGINT/SIGTERM: not the policy's fault, so it runs again later
            outcome.state, outcome.reason = "failed", _interrupt_reason(exc)
            _safely(enqueue_retry, trial.study, trial.number, trial.params, trial.user_attrs, outcome.reason)
            raise
        except torch.cuda.OutOfMemoryError as exc:
            outcome.state, outcome.reason = "failed", f"CUDA out of memory: {_first_line(exc)}"
            _release_cuda_memory(exc)
            raise
        except Exception as exc:
            outcome.state, outcome.reason = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            outcome.seconds = time.perf_counter() - start
            if outcome.reason:
                trial.set_user_attr("reason", outcome.reason[:1000])
            _safely(self.tracker.trial_finished, outcome)

    def init_for_seed(self, trial: optuna.Trial, policy: InitPolicy, outcome: TrialOutcome, i: int, seed: int) -> torch.nn.Module:
        """A fresh proxy initialized as the trial's contender for evaluation seed number ``i``; raises
        ``TrialPruned`` for non-finite weights or (on the first seed) a pre-screen rejection."""
        s, p = self.s, self.proxy
        model = self._fresh_model(seed)
        used, learned = init_contender(model, policy, baseline=outcome.baseline, seed=seed, example_x=p.example_x,
                                       train_x=p.data.x_train, train_y=p.data.y_train, train=s.train,
                                       layers=p.discovery)
        if learned is not None:  # GradInit/MetaInit: the policy they learned, and what it cost
            passes = trial.user_attrs.get("learned_passes", [0, 0])
            trial.set_user_attr("learned_passes", [passes[0] + learned.forward_passes, passes[1] + learned.backward_passes])
            if i == 0:
                outcome.policy = used.to_dict()
                trial.set_user_attr("policy", outcome.policy)
        _require_finite(model, f"after init (seed {seed})")
        if i == 0:
            outcome.signals = signal_report(model, p.example_x, p.example_y)
            reason = is_degenerate(outcome.signals, low=s.prescreen.low, high=s.prescreen.high)
            if s.prescreen.enabled and reason:
                raise optuna.TrialPruned(f"pre-screen: {reason}")
        return model

    def _evaluate(self, trial: optuna.Trial, policy: InitPolicy, outcome: TrialOutcome, prunable: bool) -> float:
        s, p = self.s, self.proxy
        steps = s.train.steps
        for i, seed in enumerate(s.eval_seeds):
            model = self.init_for_seed(trial, policy, outcome, i, seed)

            def on_checkpoint(step: int, curve: Curve, i: int = i) -> bool:
                self.hooks.alive(trial)
                if not prunable:
                    return False
                trial.report(partial_score(curve, s.score.metric, budget=steps, target_acc=s.score.target_acc), i * steps + step)
                return trial.should_prune()

            curve = train_run(model, p.data, s.train, seed=seed, on_checkpoint=on_checkpoint)
            outcome.curves.append(curve)
            outcome.seeds.append(seed)
            if curve.diverged:
                raise optuna.TrialPruned(f"diverged on seed {seed}: {curve.reason}")
            if curve.stopped:
                raise optuna.TrialPruned(f"pruned at step {curve.steps_done} of seed {seed}")
            _require_finite(model, f"after training (seed {seed})")
            outcome.seed_scores.append(score(curve, s.score.metric, budget=steps, target_acc=s.score.target_acc))
        trial.set_user_attr("seed_scores", outcome.seed_scores)
        trial.set_user_attr("seeds", outcome.seeds)
        value = aggregate(outcome.seed_scores, s.score.aggregate, s.score.direction)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"non-finite score {value}")
        return value

    def _fresh_model(self, seed: int) -> torch.nn.Module:
        with forked_seed(seed):
            model = build_model(self.s.model, self.proxy.data.input_shape, self.proxy.data.num_classes)
        return model.to(self.proxy.device)


def _require_finite(model: torch.nn.Module, when: str) -> None:
    """Prune the trial when a weight is NaN/inf (an exploding init or run): one host sync when all is well."""
    params = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        return
    bad = next(name for name, p in params if not bool(torch.isfinite(p).all()))
    raise optuna.TrialPruned(f"non-finite weights in {bad} {when}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _release_cuda_memory(exc: BaseException) -> None:
    """After CUDA ran out of memory: drop the failed trial's tensors (held by the traceback's frames), then
    hand the cached blocks back, so the next trial starts with the memory the study started with."""
    traceback.clear_frames(exc.__traceback__)
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _complete_twin(trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """A complete searched trial of the same study with exactly these parameters, if any."""
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.number != trial.number and other.params == trial.params and not other.user_attrs.get("baseline"):
            return other
    return None


def _safely(fn, *args) -> None:
    """Run a tracker hook; a tracking failure is logged, never allowed to lose the study."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - observers must not break the search
        log.warning("tracking failed (%s: %s); the study goes on", type(exc).__name__, exc)


# ---- the whole study ----------------------------------------------------------------------------------------
def open_study(settings: StudySettings, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create the study or load it (same name and storage: resume)."""
    storage = storage if storage is not None else open_storage(settings.storage)
    study = optuna.create_study(
        study_name=settings.study_name,
        storage=storage,
        sampler=make_sampler(settings.sampler, settings.seed),
        pruner=make_pruner(settings.pruner, settings.train.steps * settings.score.seeds),
        direction="minimize" if settings.score.direction == "minimize" else "maximize",
        load_if_exists=True,
    )
    attrs = study.user_attrs
    if not attrs:
        study.set_user_attr("metric", settings.score.metric)
        study.set_user_attr("model", settings.model)
        study.set_user_attr("data", settings.data.get("name"))
    elif attrs.get("metric") not in (None, settings.score.metric):
        raise ConfigError(
            f"score.metric: study {settings.study_name!r} was run with {attrs['metric']!r}, got {settings.score.metric!r}; "
            "use another study_name"
        )
    return study


def enqueue_baselines(study: optuna.Study, baselines: Sequence[str]) -> list[str]:
    """Enqueue the baselines the study has not seen yet (they are never re-run on resume)."""
    seen = {t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)}
    added = [name for name in baselines if name not in seen]
    for name in added:
        study.enqueue_trial({}, user_attrs={"baseline": name})
    return added


class _StaleTrials:
    """Fails trials left RUNNING by dead workers (``workers.fail_stale_trials``; on RDBs also Optuna's
    heartbeat check) and closes their MLflow runs as FAILED: the tracker logs each one as a failed trial."""

    def __init__(self, tracker: Tracker, grace_period: float, heartbeats: bool) -> None:
        self.tracker = tracker
        self.grace_period = grace_period
        self.heartbeats = heartbeats  # an RDB: Optuna's heartbeat judges the workers of other hosts

    def check(self, study: optuna.Study) -> None:
        if self.heartbeats:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # calls on_rdb_stale for each
        fail_stale_trials(study, self.grace_period, self._log, other_hosts=not self.heartbeats)

    def on_rdb_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reason = f"worker lost: no heartbeat for {self.grace_period:g} s"
        enqueue_retry(study, trial.number, trial.params, trial.user_attrs, reason)
        self._log(trial, reason)

    def _log(self, trial: FrozenTrial, reason: str) -> None:
        outcome = TrialOutcome(trial.number, trial.user_attrs.get("baseline"), dict(trial.params),
                               policy=trial.user_attrs.get("policy"), state="failed", reason=reason)
        if trial.datetime_start is not None and trial.datetime_complete is not None:
            outcome.seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        _safely(self.tracker.trial_finished, outcome)


def _seed_this_start(study: optuna.Study, settings: StudySettings) -> int:
    """Count this start of the study (``user_attrs["starts"]``) and give its sampler a seed of its own.

    The first start uses ``seed`` itself, so a fresh study is reproducible. Every later start (a resume, a
    parallel worker, another machine) gets a seed derived from ``seed`` and its index: with the same seed it
    would propose the very parameters the first start already tried. Call under the study lock.
    """
    index = int(study.user_attrs.get("starts", 0) or 0)
    study.set_user_attr("starts", index + 1)
    if index:
        study.sampler = make_sampler(settings.sampler, (settings.seed * 1_000_003 + index) % 2**31)
    return index


class _NoTraceback(logging.Filter):
    """Keeps Optuna's "Trial N failed ... because of the following error: ..." line, drops its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


_NO_TRACEBACK = _NoTraceback()


def _show_trial_tracebacks(show: bool) -> None:
    """A failed trial's traceback is shown only with ``verbose=true``; its reason is in the trial anyway."""
    logger = logging.getLogger("optuna.study._optimize")
    if show:
        logger.removeFilter(_NO_TRACEBACK)
    else:
        logger.addFilter(_NO_TRACEBACK)


def run_study(settings: StudySettings, proxy: Proxy, tracker: Tracker | None = None, config_yaml: str = "") -> optuna.Study:
    """Run (or resume) the study until it holds ``len(baselines) + n_trials`` finished trials that count
    (``workers.counted``: a failure that was retried does not), with any other workers of the same study.

    Under the study lock, first: count this start (its sampler seed), enqueue missing baselines, start the
    tracker (its parent run exists before the lock goes: one per study), and fail dead workers' trials
    (enqueued again once). Each next trial is admitted by a ``TrialGate``, so parallel workers stop at the
    total together. SIGINT/SIGTERM: raises ``StudyInterrupted`` carrying the study (see ``Objective``).
    """
    tracker = tracker or NullTracker()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _show_trial_tracebacks(settings.verbose)
    rdb = "://" in settings.storage
    stale = _StaleTrials(tracker, settings.grace_period, heartbeats=rdb)
    storage = open_storage(settings.storage, heartbeat_interval=settings.heartbeat_interval,
                           grace_period=settings.grace_period, on_stale=stale.on_rdb_stale)
    study = None
    # Tiny gradients and momentum buffers decay into subnormal floats, which the CPU handles ~100x slower
    # (a pytorch_default trial on digits took 30 s instead of 0.5 s). Flushing them to zero changes no result
    # that matters here. The setting is process-wide (torch has no getter): on while the study runs, off after.
    torch.set_flush_denormal(True)
    try:
        study = open_study(settings, storage)
        lock = StudyLock(settings.storage, storage, settings.study_name)
        with lock:
            _seed_this_start(study, settings)
            enqueue_baselines(study, settings.baselines)
            _safely(tracker.study_started, settings, config_yaml, study)
            _safely(getattr(tracker, "flush", _noop))
            stale.check(study)
        total = len(settings.baselines) + settings.n_trials
        done = counted(study.get_trials(deepcopy=False))
        if done < total and settings.batch_trials > 1:  # population training (issue 6): K trials at a time
            from initsearch.search.batched import run_batched

            run_batched(study, settings, proxy, tracker, settings.batch_trials, lock=lock, stale=stale)
        elif done < total:
            _optimize(study, settings, proxy, tracker, lock, stale, total - done)
    except KeyboardInterrupt as exc:
        stopped = exc if isinstance(exc, StudyInterrupted) else StudyInterrupted(signal.SIGINT)
        stopped.study = study
        if stopped is exc:
            raise
        raise stopped from None
    finally:
        torch.set_flush_denormal(False)
    return study


def _optimize(study: optuna.Study, settings: StudySettings, proxy: Proxy, tracker: Tracker, lock: StudyLock,
              stale: _StaleTrials, at_most: int) -> None:
    """Optuna's loop, each trial admitted by the gate, marked with its worker, and beating at checkpoints."""
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
                show_progress_bar=sys.stderr.isatty(),
            )
    finally:
        gate.close()
