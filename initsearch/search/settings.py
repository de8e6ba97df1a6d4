"""The composed Hydra config -> typed, validated settings, before anything is trained or written.

Every invalid value raises ``ConfigError`` with one line that names the key, e.g.
``n_trials: must be a whole number >= 1, got 0``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from initsearch.contenders.names import ALL_BASELINES, PRETRAINED_BASELINES
from initsearch.errors import ConfigError, is_finite_number
from initsearch.init.checkpoints import file_sha256
from initsearch.init.policy import CheckpointRef
from initsearch.proxy.scoring import check_aggregate, check_metric, direction
from initsearch.proxy.train import TrainConfig
from initsearch.search.space import CONV_MODELS, SearchSpace, space_from_config

DEFAULT_STORAGE = "initsearch.journal"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SAMPLERS = ("tpe", "random", "cmaes", "gp")
PRUNERS = ("median", "hyperband", "successive_halving", "none")
OBJECTIVES = ("score", "params")  # what a study minimizes (or maximizes): the score, then the parameter count
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "random", "gp")  # CMA-ES optimizes one objective only


@dataclass(frozen=True)
class ScoreSettings:
    metric: str
    target_acc: float
    seeds: int
    aggregate: str

    @property
    def direction(self) -> str:
        return direction(self.metric)


@dataclass(frozen=True)
class PrescreenSettings:
    enabled: bool
    low: float
    high: float


@dataclass(frozen=True)
class SelectSettings:
    """The selection stage before export (``search/selection.py``): the ``top_k`` best searched trials and the
    ``baselines`` best baselines again on ``seeds`` new seeds, for ``steps`` training steps (``None``: the
    search's ``train.steps``), ``batch_trials`` of them at once as one population (``auto``: K for the proxy
    and device; the same curves as one at a time up to float rounding); ``top_k=0`` turns it off."""

    top_k: int = 3
    seeds: int = 5
    baselines: int = 2
    steps: int | None = None
    batch_trials: int | str = "auto"  # candidates of one seed trained at once as one population (1: one at a time)


@dataclass(frozen=True)
class TrackingSettings:
    """How tracking rides out an MLflow outage: each call gives up after about ``retry_timeout`` seconds,
    the command waits at most ``flush_timeout`` seconds at exit for logs the store does not take, and the
    trials MLflow did not take wait in ``spool_dir`` (``None``: ``mlflow-spool/`` beside the journal file,
    or in the working directory for a database storage) until a later run logs them."""

    flush_timeout: float = 20.0
    retry_timeout: float = 10.0
    spool_dir: str | None = None


@dataclass(frozen=True)
class StudySettings:
    """Everything a study needs, validated. ``model`` and ``data`` stay plain dicts: they are checked where
    they are used (``build_model``, ``load_dataset``), which happens before any trial runs."""

    study_name: str
    n_trials: int
    timeout: float | None
    seed: int
    storage: str
    tracking_uri: str | None
    device: str
    verbose: bool
    baselines: tuple[str, ...]
    score: ScoreSettings
    prescreen: PrescreenSettings
    select: SelectSettings
    lsuv_batch: int
    model: dict[str, Any]
    data: dict[str, Any]
    train: TrainConfig
    space: SearchSpace
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    # speed: trials asked from Optuna and trained together as one stacked population; 1 = one by one;
    # "auto": chosen for the proxy and device when the study starts (``batched.trials_per_round``)
    batch_trials: int | str = 1
    # several workers: processes on this machine; heartbeat seconds and the silence after which a
    # RUNNING trial counts as abandoned (its worker died) and is failed and retried once
    n_workers: int = 1
    heartbeat_interval: int = 60
    grace_period: int = 180
    # what the user sees and how the CPU is used: a progress bar/lines; torch threads ("auto" = measured)
    progress: bool = True
    threads: int | str = "auto"
    # pre-trained weights (a state dict of the model): the absolute path and the file's sha256
    pretrained: CheckpointRef | None = None
    # earlier winners enqueued as the first searched trials: policy files or study names in this storage
    warm_start: tuple[str, ...] = ()
    tracking: TrackingSettings = TrackingSettings()
    tracking_only: bool = False  # log to MLflow what it misses, run no trial
    resume_check: bool = True  # a study resumes only under the settings its scores depend on (study.py)
    # ("score",): one objective; ("score", "params"): the score and the network's trainable parameters
    # together (a joint search; Optuna keeps the Pareto front, and prunes nothing)
    objectives: tuple[str, ...] = ("score",)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        """Optuna's direction of each objective: the score's, then ``minimize`` for the parameter count."""
        return [self.score.direction if name == "score" else "minimize" for name in self.objectives]

    @property
    def eval_seeds(self) -> list[int]:
        """The training seeds every candidate is scored on (the same for all, so they compare fairly)."""
        return [self.seed * 1000 + i for i in range(self.score.seeds)]


def _int(value: Any, key: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}: must be a whole number >= {low}, got {value!r}")
    return value


def _number(value: Any, key: str, low: float | None = None, high: float | None = None, open_low: bool = False) -> float:
    ok = is_finite_number(value)
    ok = ok and (low is None or (value > low if open_low else value >= low)) and (high is None or value <= high)
    if not ok:
        bounds = f"{'(' if open_low else '['}{low}, {high if high is not None else 'inf'}]" if low is not None else "finite"
        raise ConfigError(f"{key}: must be a number in {bounds}, got {value!r}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty string, got {value!r}")
    return value


def _grace_period(value: Any, interval: Any) -> int:
    """``grace_period``: a whole number of seconds longer than ``heartbeat_interval`` (a live worker must be
    able to beat at least once within it, or its trials would be failed under it)."""
    grace = _int(value, "grace_period", 1)
    if isinstance(interval, int) and not isinstance(interval, bool) and grace <= interval:
        raise ConfigError(f"grace_period: must be longer than heartbeat_interval ({interval}), got {grace}")
    return grace


def pretrained_from_config(value: Any) -> CheckpointRef | None:
    """``pretrained``: null, or the path of a state dict file (absolute, or relative to the working
    directory), returned with its sha256 so every policy of the study pins the file's bytes."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"pretrained: must be the path of a state dict file, got {value!r}")
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"pretrained: no such file: {path}")
    try:
        return CheckpointRef(str(path), file_sha256(path))
    except OSError as exc:
        raise ConfigError(f"pretrained: cannot read {path}: {exc.strerror}") from None


def _with_pretrained_baselines(baselines: list[str], pretrained: CheckpointRef | None) -> tuple[str, ...]:
    """With pre-trained weights, the two checkpoint baselines join the study's baselines; without, they are
    refused by name."""
    if pretrained is None:
        for i, name in enumerate(baselines):
            if name in PRETRAINED_BASELINES:
                raise ConfigError(f"baselines[{i}]: {name!r} needs pre-trained weights: pretrained=PATH")
        return tuple(baselines)
    return tuple(baselines) + tuple(name for name in PRETRAINED_BASELINES if name not in baselines)


def settings_from_config(cfg: DictConfig | Mapping[str, Any]) -> StudySettings:
    """Validate the composed config; raise ``ConfigError`` naming the first bad key."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    c.pop("hydra", None)
    score = c.get("score") or {}
    metric = score.get("metric")
    check_metric(metric)
    check_aggregate(score.get("aggregate"))
    baselines = c.get("baselines") or []
    if isinstance(baselines, str) or not isinstance(baselines, list):
        raise ConfigError(f"baselines: must be a list of names, got {baselines!r}")
    for i, name in enumerate(baselines):
        if name not in ALL_BASELINES:
            raise ConfigError(f"baselines[{i}]: unknown baseline {name!r}; expected any of {', '.join(ALL_BASELINES)}")
    prescreen = c.get("prescreen") or {}
    sampler = dict(c.get("sampler") or {})
    if sampler.get("name") not in SAMPLERS:
        raise ConfigError(f"sampler.name: unknown sampler {sampler.get('name')!r}; expected one of {', '.join(SAMPLERS)}")
    pruner = dict(c.get("pruner") or {})
    if pruner.get("name") not in PRUNERS:
        raise ConfigError(f"pruner.name: unknown pruner {pruner.get('name')!r}; expected one of {', '.join(PRUNERS)}")
    timeout = c.get("timeout")
    device = _str(c.get("device", "auto"), "device")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N, got {device!r}")
    model = c.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"model: must be a mapping, got {model!r}")
    data = c.get("data")
    if not isinstance(data, dict):
        raise ConfigError(f"data: must be a mapping, got {data!r}")
    pretrained = pretrained_from_config(c.get("pretrained"))
    return StudySettings(
        study_name=_str(c.get("study_name"), "study_name"),
        n_trials=_int(c.get("n_trials"), "n_trials", 1),
        timeout=None if timeout is None else _number(timeout, "timeout", 0, open_low=True),
        seed=_int(c.get("seed"), "seed", 0),
        storage=_str(c.get("storage") or DEFAULT_STORAGE, "storage"),
        tracking_uri=c.get("tracking_uri") or None,
        device=device,
        verbose=_bool(c.get("verbose", False), "verbose"),
        baselines=_with_pretrained_baselines(baselines, pretrained),
        score=ScoreSettings(
            metric=metric,
            target_acc=_number(score.get("target_acc", 0.9), "score.target_acc", 0, 1, open_low=True),
            seeds=_int(score.get("seeds", 1), "score.seeds", 1),
            aggregate=score.get("aggregate"),
        ),
        prescreen=PrescreenSettings(
            enabled=_bool(prescreen.get("enabled", False), "prescreen.enabled"),
            low=_number(prescreen.get("low", 1e-3), "prescreen.low", 0, open_low=True),
            high=_number(prescreen.get("high", 1e3), "prescreen.high", 0, open_low=True),
        ),
        select=_select(c.get("select") or {}),
        lsuv_batch=_int(c.get("lsuv_batch", 256), "lsuv_batch", 2),
        model=model,
        data=data,
        train=TrainConfig.from_mapping(c.get("train") or {}),
        space=_joint_fits(space_from_config(c.get("search_space") or {}, c.get("arch")), c),
        sampler=sampler,
        pruner=pruner,
        batch_trials=_batch_trials(c.get("batch_trials", 1)),
        n_workers=_int(c.get("n_workers", 1), "n_workers", 1),
        heartbeat_interval=_int(c.get("heartbeat_interval", 60), "heartbeat_interval", 1),
        grace_period=_grace_period(c.get("grace_period", 180), c.get("heartbeat_interval", 60)),
        progress=_bool(c.get("progress", True), "progress"),
        threads=_threads(c.get("threads", "auto")),
        pretrained=pretrained,
        warm_start=_warm_start(c.get("warm_start")),
        tracking=_tracking(c.get("tracking") or {}),
        tracking_only=_bool(c.get("tracking_only", False), "tracking_only"),
        resume_check=_bool(c.get("resume_check", True), "resume_check"),
        objectives=_objectives(c.get("objectives", ["score"]), c, sampler),
    )


def _tracking(t: Mapping[str, Any]) -> TrackingSettings:
    if not isinstance(t, Mapping):
        raise ConfigError(f"tracking: must be a mapping, got {t!r}")
    spool = t.get("spool_dir")
    return TrackingSettings(
        flush_timeout=_number(t.get("flush_timeout", 20.0), "tracking.flush_timeout", 0),
        retry_timeout=_number(t.get("retry_timeout", 10.0), "tracking.retry_timeout", 1),
        spool_dir=None if spool is None else _str(spool, "tracking.spool_dir"),
    )


def _select(s: Mapping[str, Any]) -> SelectSettings:
    if not isinstance(s, Mapping):
        raise ConfigError(f"select: must be a mapping, got {s!r}")
    d = SelectSettings()  # a key left out takes the dataclass's default
    return SelectSettings(top_k=_int(s.get("top_k", d.top_k), "select.top_k", 0),
                          seeds=_int(s.get("seeds", d.seeds), "select.seeds", 1),
                          baselines=_int(s.get("baselines", d.baselines), "select.baselines", 0),
                          steps=None if s.get("steps") is None else _int(s["steps"], "select.steps", 1),
                          batch_trials=_batch_trials(s.get("batch_trials", d.batch_trials), "select.batch_trials"))


def _batch_trials(value: Any, key: str = "batch_trials") -> int | str:
    """``auto`` (K chosen for the proxy and device at start) or a whole number >= 1."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: must be auto or a whole number >= 1, got {value!r}")
    return value


def _threads(value: Any) -> int | str:
    """``auto`` (the count that trains the proxy fastest, measured at start) or a whole number >= 1."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"threads: must be auto or a whole number >= 1, got {value!r}")
    return value


def _objectives(value: Any, c: Mapping[str, Any], sampler: Mapping[str, Any]) -> tuple[str, ...]:
    """``objectives``: ``[score]`` (the default), or ``[score, params]`` for a joint search that also keeps
    networks small; the sampler must handle several objectives (CMA-ES does not)."""
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or not items or items[0] != "score" or len(set(items)) != len(items)
            or any(item not in OBJECTIVES for item in items)):
        raise ConfigError(f"objectives: must be [score] or [score, params], got {value!r}")
    if len(items) > 1:
        if (c.get("search_space") or {}).get("name") != "joint":
            raise ConfigError("objectives: params needs search_space=joint (every trial of another space trains "
                              "the same network, of one size)")
        if sampler.get("name") not in MULTI_OBJECTIVE_SAMPLERS:
            raise ConfigError(f"sampler.name: {sampler.get('name')} cannot run a multi-objective study "
                              f"(objectives=[{','.join(items)}]); use one of {', '.join(MULTI_OBJECTIVE_SAMPLERS)}")
    return tuple(items)


def _joint_fits(space: SearchSpace, c: Mapping[str, Any]) -> SearchSpace:
    """A joint search builds another network per trial: population training (one network, K copies) cannot
    train it, a state dict of the configured model does not fit it, and earlier policies name no network.
    A study of a CNN (``model.name`` cnn or rescnn) draws CNNs (``JointCNN``); any other draws MLPs."""
    if space.arch is None:
        return space
    model = c.get("model") if isinstance(c.get("model"), Mapping) else {}
    if model.get("_target_") is None and model.get("name") in CONV_MODELS:
        space = replace(space, arch=replace(space.arch, network="cnn"))
    if c.get("batch_trials", 1) not in (1, None):
        raise ConfigError(f"batch_trials: search_space=joint trains one network per trial, set batch_trials=1, "
                          f"got {c.get('batch_trials')!r}")
    for key in ("pretrained", "warm_start"):
        if c.get(key):
            raise ConfigError(f"{key}: not available with search_space=joint, whose trials draw their own networks")
    return space


def _warm_start(value: Any) -> tuple[str, ...]:
    """``warm_start``: a list of policy files or study names (one name alone is taken as a list of one)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
        raise ConfigError(f"warm_start: must be a list of policy files or study names, got {value!r}")
    return tuple(items)


def is_rdb(url: str) -> bool:
    """Whether ``storage=`` names a database (a URL) rather than a journal file (a path)."""
    return "://" in url


def resolve_device(name: str) -> torch.device:
    """The device of the ``device`` setting: ``auto`` is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but CUDA is not available on this machine")
    return torch.device(name)
