"""The command line's engine from Python: ``initsearch.search`` and ``initsearch.validate_policy``.

Both compose the same Hydra config as ``python -m initsearch`` (the same presets, overrides, defaults,
stores and MLflow runs), then put the user's objects (a model class or factory, ``(train, val)`` data)
where the command line would have put dotted names. A class or function importable by name is recorded
by that name, so a study started from Python can be resumed, shared with other workers and validated
from the command line.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from initsearch.errors import ConfigError, did_you_mean
from initsearch.init.policy import InitPolicy, load_policy
from initsearch.proxy.models import locate, target_name
from initsearch.search.settings import StudySettings, settings_from_config

ModelSource = type | Callable[[], Any] | str | None
DataSource = tuple[Any, Any] | Callable[..., Any] | str | None


@dataclass(frozen=True)
class SearchResult:
    """What ``initsearch.search`` found.

    ``policy``: the exported best policy (``InitPolicy``), also written to ``policy_path``; ``study``: the
    ``optuna.Study``; ``trials``: one row per trial (``kind``: ``search`` or the baseline's name, ``state``,
    the score and its per-seed values); ``summary``: the text the command line prints.
    """

    policy: InitPolicy
    policy_path: Path
    study: optuna.Study
    trials: pd.DataFrame
    summary: str

    def __repr__(self) -> str:
        return f"SearchResult(study={self.study.study_name!r}, trials={len(self.trials)}, policy_path='{self.policy_path}')"


def search(
    model: ModelSource,
    data: DataSource,
    *,
    n_trials: int = 30,
    study_name: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    **settings: Any,
) -> SearchResult:
    """Search an init policy for ``model`` on ``data``, as ``python -m initsearch`` does, and export the best.

    ``model``: a class (built with ``input_shape``/``num_classes``/``width_multiplier`` where its signature
    names them) or a zero-argument callable returning a fresh ``nn.Module``; ``None`` keeps the config's
    model (a built-in proxy). ``data``: ``(train, val)``, each a tuple of tensors ``(x, y)`` or a map-style
    dataset of ``(x, y)`` pairs, or a function returning that; ``None`` keeps the config's dataset.
    ``overrides``: the command line's Hydra overrides (``["train.steps=300", "search_space=grouped"]``);
    ``**settings``: top-level config keys (``seed=1``, ``batch_trials=4``, ``baselines=["he", "lsuv"]``).
    ``study_name`` defaults to the model's and the data function's names (``TinyResNet_load``: never a
    preset's study, which holds another network); ``storage``/``tracking_uri`` to the command line's stores
    (``tracking_uri="none"`` turns MLflow off). The best policy goes to ``out_dir/best_policy.json``
    (default ``outputs/<study_name>/<date_time>/``).

    Example::

        result = initsearch.search(MyNet, ((x_train, y_train), (x_val, y_val)), n_trials=20,
                                   overrides=["train.steps=300"])
        print(result.summary)
        initsearch.apply_policy(MyNet(), result.policy, example_batch=x_train[:256])
    """
    from initsearch.cli import bad_input, remove_unused_output_dir, run_settings

    cfg, study_settings = _compose(model, data, overrides, n_trials=n_trials, study_name=study_name,
                                   storage=storage, tracking_uri=tracking_uri, **settings)
    out = Path(out_dir) if out_dir is not None else \
        Path("outputs") / study_settings.study_name / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    made = [folder for folder in (out, out.parent, out.parent.parent) if not folder.exists()]
    try:
        finished = run_settings(study_settings, cfg, out)
    except Exception as exc:
        if out in made and bad_input(exc):  # the folders this call made, for a study that never ran
            remove_unused_output_dir(out, parents=len(made) - 1)
        raise
    return SearchResult(load_policy(finished.policy_path), finished.policy_path, finished.study,
                        finished.summary.table, finished.summary.format())


def validate_policy(
    policy: InitPolicy | str | Path | Mapping[str, Any],
    model: ModelSource,
    data: DataSource,
    *,
    seeds: int = 5,
    steps: int | None = None,
    study_name: str | None = None,
    overrides: Sequence[str] = (),
    **settings: Any,
) -> pd.DataFrame:
    """Train the full-size ``model`` (``width_multiplier=1``) from ``policy`` and from every baseline on
    ``seeds`` fresh seeds (none the search used) for ``steps`` steps (default 5x ``train.steps``), as
    ``python -m initsearch.validate`` does, and return its table: one row per contender, mean and spread of
    the study's score, and (classification) steps to the target accuracy and the final accuracy. The
    verdict sentence is in ``table.attrs["verdict"]``. Nothing is logged to MLflow. ``model``, ``data``,
    ``overrides`` and ``**settings`` as for :func:`search`.

    Example::

        table = initsearch.validate_policy(result.policy, MyNet, (train, val), seeds=5)
        print(table.to_string(index=False)); print(table.attrs["verdict"])
    """
    from initsearch.validate import run_validation, together_unless_told

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds: must be a whole number >= 1, got {seeds!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps: must be a whole number >= 1, got {steps!r}")
    _, study_settings = _compose(model, data, overrides, study_name=study_name, **settings)
    study_settings = together_unless_told(study_settings, overrides, told="batch_trials" in settings)
    report = run_validation(study_settings, load_policy(policy), seeds=seeds, steps=steps)
    table = report.table()
    table.attrs["verdict"] = report.verdict()
    return table


# ---- composing the config ---------------------------------------------------------------------------------
def _compose(model: ModelSource, data: DataSource, overrides: Sequence[str], **values: Any
             ) -> tuple[DictConfig, StudySettings]:
    """The composed config (objects replaced by their names) and the settings (objects in place)."""
    from hydra import compose, initialize_config_dir

    from initsearch.cli import compose_error_line, config_dir, custom_study_name

    if isinstance(overrides, str):
        raise ConfigError(f"overrides: must be a list of strings, got the string {overrides!r}")
    groups = [f"{group}=custom" for group, given in (("model", model), ("data", data)) if given is not None]
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="initsearch"):
            cfg = compose(config_name="config", overrides=[*groups, *overrides])
    except Exception as exc:  # the command line's line: an unknown key with the closest known one
        raise ConfigError(f"overrides: {compose_error_line(exc, [*groups, *overrides])}") from None
    model_name = _name_of(model)
    if model is not None:
        cfg.model._target_ = model_name
    if data is not None:
        cfg.data._target_ = _name_of(data)
    if values.get("study_name") is None and (model is not None or data is not None):
        values["study_name"] = custom_study_name([_short_name(x) for x in (model, data) if x is not None])
    for key, value in values.items():
        if value is None:
            continue
        if key not in cfg:  # the command line's "did you mean", else the keys there are
            hint = did_you_mean(key, list(cfg))
            raise ConfigError(f"{key}: no such key{hint}" if hint else
                              f"{key}: unknown setting; expected a top-level key of the config "
                              f"({', '.join(k for k in cfg if not isinstance(cfg[k], DictConfig))}, ...)")
        OmegaConf.update(cfg, key, value, merge=isinstance(value, Mapping))  # score={"seeds": 1} keeps score.metric
    study_settings = settings_from_config(cfg)
    objects_model = model is not None and not _importable(model)
    objects_data = data is not None and not _importable(data)
    if (objects_model or objects_data) and study_settings.n_workers > 1:
        which = "model" if objects_model else "data"
        raise ConfigError(f"n_workers: several worker processes need the {which} by an importable name "
                          "(package.module.Name), not a local object; use n_workers=1 or name it")
    if objects_model:
        study_settings = replace(study_settings, model={**study_settings.model, "_target_": model})
    if objects_data:
        study_settings = replace(study_settings, data={**study_settings.data, "_target_": data})
    return cfg, study_settings


def _importable(obj: Any) -> bool:
    """Whether ``obj`` is a string, or a module-level class/function that its dotted name imports back."""
    if isinstance(obj, str):
        return True
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname or not callable(obj):
        return False
    try:
        return locate(f"{module}.{qualname}") is obj
    except Exception:
        return False


def _name_of(obj: Any) -> str:
    """How the config records a user's object: its dotted name, or a description when it has none."""
    if isinstance(obj, str):
        return obj
    if _importable(obj):
        return target_name(obj)
    if isinstance(obj, tuple):
        return "<(train, val) given from Python>"
    return f"<{target_name(obj)} given from Python>"


def _short_name(obj: Any) -> str:
    """A class's or function's own name (``TinyResNet``, ``diabetes``); ``data`` for ``(train, val)``."""
    if isinstance(obj, str):
        return obj.rsplit(".", 1)[-1]
    name = getattr(obj, "__name__", "")
    return "" if "<" in name else name or ("data" if isinstance(obj, tuple) else "")
