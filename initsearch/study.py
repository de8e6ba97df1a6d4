"""The study: Optuna storage, sampler, pruner, the baselines, and the trial loop.

The flow is one way: settings -> (data, proxy layers) -> for each trial: policy (sampled, or a baseline) ->
for each evaluation seed: fresh proxy, ``apply_policy``, short ``train_run`` -> score -> aggregate -> Optuna.
A ``Tracker`` observes each finished trial and the end of the study; it never steers.
"""
from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
import torch
from optuna.storages import JournalStorage, RDBStorage, RetryFailedTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from initsearch.apply import apply_policy
from initsearch.config import StudySettings
from initsearch.data import Dataset, load_dataset
from initsearch.diagnostics import SignalReport, is_degenerate, signal_report
from initsearch.errors import ConfigError, InitSearchError
from initsearch.layers import LayerInfo, discover_layers
from initsearch.models import build_model
from initsearch.policy import InitPolicy
from initsearch.scoring import aggregate, partial_score, score
from initsearch.space import baseline_policy
from initsearch.train import Curve, train_run

log = logging.getLogger("initsearch")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class StudyFailed(InitSearchError):
    """No trial of the study finished, so there is nothing to export."""


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


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from ``storage=``: a URL with ``://`` is an RDB (SQLite for one process; PostgreSQL
    for several machines, with heartbeats so a dead worker's trial is failed and retried once); anything else
    is the path of a journal file, which is safe for several processes on one machine."""
    if "://" not in url:
        return JournalStorage(JournalFileBackend(url))
    try:
        return RDBStorage(
            url,
            heartbeat_interval=60,
            grace_period=180,
            failed_trial_callback=RetryFailedTrialCallback(max_retry=1),
        )
    except Exception as exc:  # sqlalchemy errors: unreachable server, bad URL, missing driver
        raise ConfigError(f"storage: cannot open {_redact(url)}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


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


def prepare(settings: StudySettings) -> Proxy:
    """Load the data and discover the proxy's layers: everything that can fail on a bad config fails here,
    before the study's storage is touched."""
    device = resolve_device(settings.device)
    # Tiny gradients and momentum buffers decay into subnormal floats, which the CPU handles ~100x slower
    # (a pytorch_default trial on digits took 30 s instead of 0.5 s). Flushing them to zero changes no result
    # that matters here and is process-wide: this is the study's own process.
    torch.set_flush_denormal(True)
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
    layers = discover_layers(model, example_x).layers
    return Proxy(data, example_x, example_y, layers, device)


# ---- one trial -----------------------------------------------------------------------------------------------
class Objective:
    """Scores one trial's policy on every evaluation seed; reports intermediate values for pruning."""

    def __init__(self, settings: StudySettings, proxy: Proxy, tracker: Tracker):
        self.s = settings
        self.proxy = proxy
        self.tracker = tracker

    def __call__(self, trial: optuna.Trial) -> float:
        start = time.perf_counter()
        baseline = trial.user_attrs.get("baseline")
        outcome = TrialOutcome(trial.number, baseline, params={})
        try:
            policy = baseline_policy(baseline) if baseline else self.s.space.sample(trial, self.proxy.layers)
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
            outcome.value = self._evaluate(trial, policy, outcome, prunable=baseline is None)
            outcome.state = "complete"
            return outcome.value
        except optuna.TrialPruned as exc:
            outcome.state, outcome.reason = "pruned", str(exc)
            raise
        except Exception as exc:
            outcome.state, outcome.reason = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            outcome.seconds = time.perf_counter() - start
            if outcome.reason:
                trial.set_user_attr("reason", outcome.reason[:1000])
            _safely(self.tracker.trial_finished, outcome)

    def _evaluate(self, trial: optuna.Trial, policy: InitPolicy, outcome: TrialOutcome, prunable: bool) -> float:
        s, p = self.s, self.proxy
        steps = s.train.steps
        for i, seed in enumerate(s.eval_seeds):
            model = self._fresh_model(seed)
            apply_policy(model, policy, example_batch=p.example_x, seed=seed)
            if i == 0:
                outcome.signals = signal_report(model, p.example_x, p.example_y)
                reason = is_degenerate(outcome.signals, low=s.prescreen.low, high=s.prescreen.high)
                if s.prescreen.enabled and reason:
                    raise optuna.TrialPruned(f"pre-screen: {reason}")

            def on_checkpoint(step: int, curve: Curve, i: int = i) -> bool:
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
            outcome.seed_scores.append(score(curve, s.score.metric, budget=steps, target_acc=s.score.target_acc))
        trial.set_user_attr("seed_scores", outcome.seed_scores)
        trial.set_user_attr("seeds", outcome.seeds)
        value = aggregate(outcome.seed_scores, s.score.aggregate, s.score.direction)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"non-finite score {value}")
        return value

    def _fresh_model(self, seed: int) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(self.s.model, self.proxy.data.input_shape, self.proxy.data.num_classes)
        return model.to(self.proxy.device)


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
def open_study(settings: StudySettings) -> optuna.Study:
    """Create the study or load it (same name and storage: resume)."""
    storage = open_storage(settings.storage)
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


def run_study(settings: StudySettings, proxy: Proxy, tracker: Tracker | None = None, config_yaml: str = "") -> optuna.Study:
    """Run (or resume) the study until it holds ``len(baselines) + n_trials`` finished trials."""
    tracker = tracker or NullTracker()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(settings)
    enqueue_baselines(study, settings.baselines)
    total = len(settings.baselines) + settings.n_trials
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    _safely(tracker.study_started, settings, config_yaml, study)
    if done < total:
        study.optimize(
            Objective(settings, proxy, tracker),
            n_trials=total - done,
            timeout=settings.timeout,
            catch=(Exception,),
            callbacks=[MaxTrialsCallback(total, states=FINISHED)],
            gc_after_trial=False,
            show_progress_bar=sys.stderr.isatty(),
        )
    return study
