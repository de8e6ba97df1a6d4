"""The study: Optuna's study from the settings, its baselines, and the run that fills it with trials.

The flow is one way: settings -> (data, proxy layers: ``trial.prepare``) -> the study (open or resume, count
this start, enqueue missing baselines, start the tracker, fail dead workers' trials) -> a runner fills it
until it holds ``len(baselines) + n_trials`` trials that count: ``sequential.optimize`` one trial at a time,
or ``batched.run_batched`` K at a time. A ``Tracker`` observes each finished trial; it never steers.
"""
from __future__ import annotations

import logging
import math
import signal
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import optuna

from initsearch.errors import ConfigError, StudyInterrupted
from initsearch.proxy.models import locate, target_name
from initsearch.proxy.train import subnormals_flushed
from initsearch.search.batched import run_batched, trials_per_round
from initsearch.search.outcome import NullTracker, Tracker, safely
from initsearch.search.sequential import optimize
from initsearch.search.settings import StudySettings, is_rdb
from initsearch.search.storage import open_storage
from initsearch.search.trial import Proxy
from initsearch.search.warm import describe_network, enqueue_warm_starts, warm_starts
from initsearch.search.workers import StaleTrials, StudyLock, counted, name_new_trials

log = logging.getLogger("initsearch")


# ---- Optuna pieces from the settings -----------------------------------------------------------------------
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


def make_pruner(cfg: dict[str, Any], max_resource: int, multi_objective: bool = False) -> optuna.pruners.BasePruner:
    """The configured pruner; none for a multi-objective study (Optuna cannot prune one: ``run_study`` says so)."""
    name = "none" if multi_objective else cfg["name"]
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(cfg.get("n_startup_trials", 5)), n_warmup_steps=int(cfg.get("n_warmup_steps", 0))
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_resource)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(reduction_factor=int(cfg.get("reduction_factor", 4)))
    return optuna.pruners.NopPruner()


# ---- the whole study ----------------------------------------------------------------------------------------
def open_study(settings: StudySettings, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create the study or load it (same name and storage: resume)."""
    storage = storage if storage is not None else open_storage(settings.storage)
    study = optuna.create_study(
        study_name=settings.study_name,
        storage=storage,
        sampler=make_sampler(settings.sampler, settings.seed),
        pruner=make_pruner(settings.pruner, settings.train.steps * settings.score.seeds, settings.multi_objective),
        directions=settings.directions,
        load_if_exists=True,
    )
    if not study.user_attrs:  # a new study: what later runs of it must match
        study.set_user_attr("metric", settings.score.metric)
        study.set_user_attr("model", recorded_model(settings.model))
        study.set_user_attr("data", data_name(settings.data))
        study.set_user_attr("scoring", scoring_settings(settings))
        return study
    check_resumable(study, settings)
    if not isinstance(study.user_attrs.get("scoring"), dict):  # recorded before this check existed: from now on
        study.set_user_attr("scoring", scoring_settings(settings))
    return study


def check_resumable(study: optuna.Study, settings: StudySettings) -> None:
    """An existing study resumes only under what its scores depend on: its objectives, metric, data, network
    and scoring settings (``check_scoring_unchanged``). One ``ConfigError`` line naming the first that
    differs; nothing is written. ``cli`` calls it before the thread probe and helper workers, ``open_study``
    again."""
    attrs = study.user_attrs
    if len(study.directions) != len(settings.directions):  # an existing study keeps its own directions
        raise ConfigError(
            f"objectives: study {settings.study_name!r} was run with {len(study.directions)} objective(s), got "
            f"[{','.join(settings.objectives)}]; use another study_name"
        )
    model = recorded_model(settings.model)
    if attrs.get("metric") not in (None, settings.score.metric):
        raise ConfigError(
            f"score.metric: study {settings.study_name!r} was run with {attrs['metric']!r}, got {settings.score.metric!r}; "
            "use another study_name"
        )
    if isinstance(attrs.get("data"), str) and canonical(attrs["data"]) != canonical(data_name(settings.data)):
        raise ConfigError(
            f"study_name: study {settings.study_name!r} holds trials on the data {attrs['data']}, and this "
            f"command's data is {data_name(settings.data)}; give the new study a name of its own (study_name=...)"
        )
    if isinstance(attrs.get("model"), dict) and network(attrs["model"]) != network(model):
        raise ConfigError(
            f"study_name: study {settings.study_name!r} holds trials of the model {network(attrs['model'])}, and this "
            f"command's model is {network(model)}; give the new study a name of its own (study_name=...)"
        )
    check_scoring_unchanged(study, settings)


# Data settings that say where the data is, or how it gets here, not what it is: another machine may differ.
DATA_WHERE = {"_target_", "root", "url", "md5", "download", "max_bytes"}


def scoring_settings(settings: StudySettings) -> dict[str, Any]:
    """What a trial's score depends on besides its policy: the network's settings, the data's, the seed (the
    data split and the evaluation seeds), the training run, LSUV's batch, the pre-trained weights' sha256
    and the scoring rule. Scores taken
    under other values do not compare, so a study resumes only under these. Left out: the class and the
    dataset themselves (``check_resumable`` checks them apart), objects given from Python, where the data
    lives (``DATA_WHERE``), and what only changes float rounding (``train.eval_batch_size``, ``train.bf16``,
    the device); ``score.target_acc`` counts only for ``steps_to_target``."""
    skip = {"eval_batch_size", "bf16"}
    train = {key: value for key, value in asdict(settings.train).items() if key not in skip}
    score = settings.score
    return {
        "model": _plain(recorded_model(settings.model), skip={"_target_"}),
        "data": _plain(settings.data, skip=DATA_WHERE),
        "seed": settings.seed,
        "train": train,
        "lsuv_batch": settings.lsuv_batch,
        "pretrained": settings.pretrained.sha256 if settings.pretrained is not None else None,  # the bytes, not the path
        "score": {"seeds": score.seeds, "aggregate": score.aggregate,
                  **({"target_acc": score.target_acc} if score.metric == "steps_to_target" else {})},
    }


def check_scoring_unchanged(study: optuna.Study, settings: StudySettings) -> None:
    """Refuse to resume a study under scoring settings other than those it recorded (``scoring``): one
    ``ConfigError`` line naming the first key that differs, before anything is written. Only keys both
    sides have are compared (a study recorded by another version, a value that was an object); a study
    recorded before this check has nothing to compare. ``resume_check=false`` resumes anyway."""
    recorded = study.user_attrs.get("scoring")
    if not isinstance(recorded, dict) or not settings.resume_check:
        return
    old, new = _flat(recorded), _flat(scoring_settings(settings))
    for key in sorted(old.keys() & new.keys()):
        if not _same(old[key], new[key]):
            raise ConfigError(
                f"{key}: study {settings.study_name!r} was run with {old[key]!r}, this command has {new[key]!r}; "
                "their scores would not compare: run it with the study's settings, give the new study a name of "
                "its own (study_name=...), or resume_check=false to resume anyway")


def _plain(config: Mapping[str, Any], skip: set[str]) -> dict[str, Any]:
    """The JSON-plain entries of a config (objects given from Python left out), without the keys ``skip``."""
    def plain(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        if isinstance(value, Mapping):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return value is None or isinstance(value, (str, bool, int, float))

    def copy(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [copy(v) for v in value]
        if isinstance(value, Mapping):
            return {k: copy(v) for k, v in value.items()}
        return value

    return {key: copy(value) for key, value in config.items() if key not in skip and plain(value)}


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 200}}`` as ``{"train.steps": 200}``: the keys as the command line writes them."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as the study stored them (JSON: tuples come back as lists, 1.0 may be 1; NaN equals NaN)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return bool(a == b)


def check_space_unchanged(study: optuna.Study, settings: StudySettings, proxy: Proxy, probes: int = 8) -> None:
    """A resumed study's searched choices must be the ones this command's space offers: Optuna refuses a
    categorical parameter whose choices changed (a space edited, or shipped with more schemes), which would
    fail every new trial. A few random draws of the space, in memory, give its parameters; the first that
    differs from the study's is one ``ConfigError`` line, before anything is written. Joint studies draw a
    network per trial, so their parameters depend on it: not checked."""
    if settings.space.arch is not None:
        return
    recorded: dict[str, optuna.distributions.BaseDistribution] = {}
    for trial in study.get_trials(deepcopy=False):
        for name, dist in trial.distributions.items():
            recorded.setdefault(name, dist)
    if not recorded:
        return
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(probes):
        trial = probe.ask()
        settings.space.sample(trial, proxy.layers, proxy.pretrained)
        for name, dist in trial.distributions.items():
            old = recorded.get(name)
            if isinstance(old, optuna.distributions.CategoricalDistribution) and old != dist:
                raise ConfigError(
                    f"search_space: study {settings.study_name!r} searched {name} over {list(old.choices)}, and this "
                    f"command's space offers {list(getattr(dist, 'choices', []))}; give the new study a name of its "
                    "own (study_name=...)")


def recorded_model(model: dict[str, Any]) -> dict[str, Any]:
    """The model config as the study records it (JSON): a class given from Python as its dotted name."""
    return {key: target_name(value) if key == "_target_" and value is not None else value for key, value in model.items()}


def network(model: dict[str, Any]) -> str:
    """Which network a model config builds: the user's class, or the built-in proxy's name."""
    target = model.get("_target_")
    return canonical(str(target)) if target is not None else str(model.get("name"))


def canonical(name: str) -> str:
    """A dotted name as the object it imports names itself (``pkg.Net`` re-exported from ``pkg.nets.Net``:
    both ``pkg.nets.Net``), so a study recorded under one spelling resumes under the other; a name that does
    not import (or a built-in dataset's) stays as it is."""
    if "." not in name:
        return name
    try:
        return target_name(locate(name))
    except Exception:
        return name


def data_name(data: dict[str, Any]) -> str:
    """The dataset's name as the study records it: the built-in name, or the user's function."""
    target = data.get("_target_")
    return str(data.get("name")) if target is None else target_name(target) if not isinstance(target, tuple) else "custom"


def enqueue_baselines(study: optuna.Study, baselines: Sequence[str]) -> list[str]:
    """Enqueue the baselines the study has not seen yet (they are never re-run on resume)."""
    seen = {t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)}
    added = [name for name in baselines if name not in seen]
    for name in added:
        study.enqueue_trial({}, user_attrs={"baseline": name})
    return added


def seed_this_start(study: optuna.Study, settings: StudySettings) -> int:
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


class _FailedTrialLines(logging.Filter):
    """Optuna's two lines of a failed trial ("Trial N failed with parameters: ... because of the following
    error: ..." and "Trial N failed with value None."): the traceback shown only with ``tracebacks``, and
    neither line for a trial a SIGINT/SIGTERM stopped (``StudyInterrupted``: the study says so itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.tracebacks = False
        self.next_to_drop: str | None = None  # the start of the second line of an interrupted trial

    def filter(self, record: logging.LogRecord) -> bool:
        drop, self.next_to_drop = self.next_to_drop, None
        if drop is not None and record.getMessage().startswith(drop):
            return False
        if record.exc_info and isinstance(record.exc_info[1], StudyInterrupted):
            self.next_to_drop = record.getMessage().partition(" failed with ")[0] + " failed with value "
            return False
        if not self.tracebacks:
            record.exc_info, record.exc_text = None, None
        return True


_FAILED_TRIAL_LINES = _FailedTrialLines()


def _show_trial_tracebacks(show: bool) -> None:
    """A failed trial's traceback is shown only with ``verbose=true``; its reason is in the trial anyway."""
    _FAILED_TRIAL_LINES.tracebacks = show
    logging.getLogger("optuna.study._optimize").addFilter(_FAILED_TRIAL_LINES)  # added once


def run_study(settings: StudySettings, proxy: Proxy, tracker: Tracker | None = None, config_yaml: str = "") -> optuna.Study:
    """Run (or resume) the study until it holds ``len(baselines) + n_trials`` finished trials that count
    (``workers.counted``: a failure that was retried does not), with any other workers of the same study.

    ``warm_start`` sources are read before the study is created (a missing one fails with nothing written).
    Under the study lock, first: count this start (its sampler seed), enqueue missing baselines and warm
    starts, note the network's description (depth, activations, layer types), start the
    tracker (its parent run exists before the lock goes: one per study), and fail dead workers' trials
    (enqueued again once). Each next trial is admitted by a ``TrialGate``, so parallel workers stop at the
    total together. SIGINT/SIGTERM: raises ``StudyInterrupted`` carrying the study (``TrialRun.end_by``).
    """
    tracker = tracker or NullTracker()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if settings.multi_objective and settings.pruner.get("name") != "none":
        log.warning("pruner: %s is off: Optuna does not prune multi-objective studies (objectives=[%s]); "
                    "every trial trains to the end", settings.pruner.get("name"), ",".join(settings.objectives))
    _show_trial_tracebacks(settings.verbose)
    stale = StaleTrials(tracker, settings.grace_period, heartbeats=is_rdb(settings.storage))
    storage = open_storage(settings.storage, heartbeat_interval=settings.heartbeat_interval,
                           grace_period=settings.grace_period, on_stale=stale.on_rdb_stale)
    name_new_trials(storage)
    study = None
    # earlier winners, read before this study is created or written (a missing source fails here)
    warm = warm_starts(settings.warm_start, storage, settings.space, proxy.layers, proxy.pretrained)
    with subnormals_flushed():  # tiny gradients decay into subnormal floats, slow on the CPU
        try:
            study = open_study(settings, storage)
            check_space_unchanged(study, settings, proxy)
            lock = StudyLock(settings.storage, storage, settings.study_name)
            with lock:
                seed_this_start(study, settings)
                enqueue_baselines(study, settings.baselines)
                enqueue_warm_starts(study, warm)
                if "network" not in study.user_attrs:  # how later studies find this one's winner (export list=true)
                    study.set_user_attr("network", describe_network(proxy.layers))
                safely(tracker.study_started, settings, config_yaml, study)
                flush = getattr(tracker, "flush", None)
                if flush is not None and not getattr(tracker, "starts_alone", False):
                    safely(flush)  # its start under this lock: one parent run per study
                stale.check(study)
            total = len(settings.baselines) + settings.n_trials
            done = counted(study.get_trials(deepcopy=False))
            k = trials_per_round(settings, proxy) if done < total else 1
            if done < total and k > 1:  # population training: K trials at a time
                run_batched(study, settings, proxy, tracker, k, lock=lock, stale=stale)
            elif done < total:
                optimize(study, settings, proxy, tracker, lock, stale, total - done)
        except KeyboardInterrupt as exc:
            stopped = exc if isinstance(exc, StudyInterrupted) else StudyInterrupted(signal.SIGINT)
            stopped.study = study
            if stopped is exc:
                raise
            raise stopped from None
    return study
