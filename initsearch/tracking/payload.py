"""What MLflow receives for a study, built from plain data: params, tags, metric rows and texts.

No MLflow here: ``runs`` logs the study-level runs with them (in the writer process, or on the tracker's
thread), and each trial becomes one plain, JSON-able payload (``trial_payload``) that ``runs.log_trial``
turns into a child run. Keys are cleaned and values clipped to MLflow's limits here, so one odd config
key or long reason never makes a whole batch fail; the store URLs in the config and the tags are shown
without their passwords.
"""
from __future__ import annotations

import json
import logging
import math
import posixpath
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from initsearch.errors import redact_url
from initsearch.search.outcome import TrialOutcome, trial_score
from initsearch.search.settings import StudySettings, is_rdb, resolve_device
from initsearch.tracking.runs import MAX_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE

log = logging.getLogger("initsearch")

# A pruned trial is a normal end of a search (Optuna stopped it early on purpose): FINISHED, with the state in
# the tag ``initsearch.state``; only a failure shows as failed in MLflow.
STATUS_OF_STATE = {"complete": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}
# Metric keys: MLflow's UI groups a run's charts by the key's prefix before "/" into sections in alphabetical
# order, so the curves ("curves/...") lead, then "init/..." and the single-value scalars. ``SIGNALS_TABLE`` is the per-layer init diagnostics as one MLflow table artifact.
TRAIN_LOSS, VAL_LOSS, VAL_ACC = "curves/train_loss", "curves/val_loss", "curves/val_acc"
SIGNALS_TABLE = "init_signals.json"
TRUNCATED = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and empty mappings stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def param_value(value: Any) -> str:
    """A param's string: strings as they are, everything else as JSON (``null``, ``true``, ``[1, 2]``),
    clipped to MLflow's 6000 characters with a visible ``...[truncated]`` (the full text is in config.yaml)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return clip(text, MAX_PARAM_VALUE)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def clean_key(key: str) -> str | None:
    """A key MLflow accepts (letters, digits, ``_ - . / : space``; not a path that normalizes to another
    name), or ``None`` when it is too long (MLflow allows 250 characters) and must be skipped."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    if posixpath.normpath(key) != key or key.startswith("/"):
        key = key.replace("/", "_")
    if not key or len(key) > MAX_KEY:
        return None
    return key


def config_params(config_yaml: str) -> list[tuple[str, str]]:
    """The composed config flattened into ``(key, value)`` params (``hydra`` left out; it is in config.yaml).
    Keys MLflow cannot hold are skipped with a debug log."""
    import yaml

    tree = yaml.safe_load(config_yaml) if config_yaml.strip() else {}
    if not isinstance(tree, Mapping):
        return []
    params = []
    for key, value in flatten({k: v for k, v in tree.items() if k != "hydra"}).items():
        name = clean_key(key)
        if name is None:
            log.debug("MLflow: config key %r too long for a param; it is in config.yaml", key)
            continue
        params.append((name, param_value(value)))
    return params


def redact_text(text: str, urls: Sequence[str]) -> str:
    """``text`` with the password of each URL in ``urls`` replaced by ``***``."""
    for url in urls:
        if url and redact_url(url) != url:
            text = text.replace(url, redact_url(url))
    return text


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        module = sys.modules.get(dist)
        return str(getattr(module, "__version__", "unknown"))


def parent_tags(settings: StudySettings) -> dict[str, str]:
    """Study name, storage (absolute path, or URL without password), device, metric, versions."""
    storage = settings.storage if is_rdb(settings.storage) else str(Path(settings.storage).absolute())
    try:
        device = str(resolve_device(settings.device))
    except Exception:
        device = settings.device
    if device.startswith("cuda"):
        import torch

        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    tags = {
        "initsearch.study": settings.study_name,
        "initsearch.role": "parent",
        "initsearch.storage": clip(redact_url(storage), MAX_TAG_VALUE),
        "initsearch.device": device,
        "initsearch.metric": settings.score.metric,
        "initsearch.direction": settings.score.direction,
    }
    for dist in ("initsearch", "torch", "optuna", "mlflow"):
        tags[f"initsearch.version.{dist}"] = version(dist)
    return tags


def trial_run_name(outcome: TrialOutcome) -> str:
    return f"{outcome.baseline} (trial {outcome.number})" if outcome.baseline else f"trial {outcome.number}"


def trial_tags(outcome: TrialOutcome, parent_id: str) -> dict[str, str]:
    tags = {
        "mlflow.parentRunId": parent_id,
        "initsearch.role": "trial",
        "initsearch.trial": str(outcome.number),
        "initsearch.kind": "baseline" if outcome.baseline else "search",
        "initsearch.state": outcome.state,
    }
    if outcome.baseline:
        tags["initsearch.baseline"] = outcome.baseline
    if outcome.reason:
        tags["initsearch.reason"] = clip(outcome.reason, MAX_TAG_VALUE)
    return tags


def trial_params(outcome: TrialOutcome) -> list[tuple[str, str]]:
    """``trial``, ``baseline`` (for baselines) and every sampled parameter."""
    params = [("trial", str(outcome.number))]
    if outcome.baseline:
        params.append(("baseline", outcome.baseline))
    for key, value in outcome.params.items():
        name = clean_key(key)
        if name is not None and name not in ("trial", "baseline"):
            params.append((name, param_value(value)))
    return params


def seed_suffix(i: int) -> str:
    """The metric-key suffix of the ``i``-th evaluation seed: none for the first, ``_s1``, ``_s2``... after."""
    return "" if i == 0 else f"_s{i}"


def trial_metric_rows(outcome: TrialOutcome, start_ms: int, end_ms: int) -> list[tuple[str, float, int, int]]:
    """Every metric of a trial as plain ``(key, value, timestamp_ms, step)`` rows (logged in batches, never
    one call per step; plain so they can be sent to the writer process as JSON).

    Per seed ``i``: ``curves/train_loss{sfx}`` at steps 1..steps_done and ``curves/val_loss{sfx}``/``curves/val_acc{sfx}`` at the
    checkpoints. Timestamps place each seed's steps evenly over its own training time, the seeds back to
    back and ending at ``end_ms`` (the host only reads the losses at checkpoints, so per-step times are
    not measured; this keeps MLflow's wall-time axis truthful to within a seed). Then the scalars:
    ``init/loss`` and ``init/grad_ratio`` at step 0 and ``start_ms`` (the per-layer diagnostics are the
    ``init_signals.json`` table, not one metric per layer); ``score``, ``seed_score_s{i}``, ``seconds`` at
    ``end_ms``.
    """
    rows: list[tuple[str, float, int, int]] = []
    curves = list(outcome.curves)
    after = [sum(c.seconds for c in curves[i + 1:]) for i in range(len(curves))]
    for i, curve in enumerate(curves):
        sfx = seed_suffix(i)
        t_end = end_ms - 1000.0 * after[i]
        t_start = max(float(start_ms), t_end - 1000.0 * curve.seconds)
        n = max(len(curve.train_loss), 1)

        def at(step: int) -> int:
            return int(t_start + (t_end - t_start) * min(step, n) / n)

        key = f"{TRAIN_LOSS}{sfx}"
        rows.extend((key, float(loss), at(j + 1), j + 1) for j, loss in enumerate(curve.train_loss))
        for step, loss, acc in zip(curve.val_steps, curve.val_loss, curve.val_acc):
            rows.append((f"{VAL_LOSS}{sfx}", float(loss), at(step), int(step)))
            if math.isfinite(acc):  # NaN where the study's loss has no accuracy (regression)
                rows.append((f"{VAL_ACC}{sfx}", float(acc), at(step), int(step)))
    rows.extend((k, v, start_ms, 0) for k, v in signal_metrics(outcome.signals))
    if outcome.value is not None:
        rows.append(("score", float(outcome.value), end_ms, 0))
    if outcome.n_params is not None:
        rows.append(("n_params", float(outcome.n_params), end_ms, 0))
    for i, value in enumerate(outcome.seed_scores):
        rows.append((f"seed_score_s{i}", float(value), end_ms, 0))
    rows.append(("seconds", float(outcome.seconds), end_ms, 0))
    return rows


def trial_payload(outcome: TrialOutcome, end_ms: int, worker: str) -> dict[str, Any]:
    """Everything the child run of a trial holds, as plain JSON-able data (``runs.log_trial``).

    The run ids (``experiment_id``, tag ``mlflow.parentRunId``) are filled in later, once the study's
    start is logged. ``worker`` is the study process's ``worker_id`` (tag ``initsearch.worker``: a resume
    closes the runs a dead worker left RUNNING), also when the writer process logs the run.
    """
    start_ms = end_ms - int(round(outcome.seconds * 1000))
    texts: dict[str, str] = {}
    if outcome.policy is not None:
        texts["policy.json"] = _json(outcome.policy)
    tags = {**trial_tags(outcome, ""), "initsearch.worker": worker}
    table = signal_table(outcome.signals)
    if table is not None:
        texts[SIGNALS_TABLE] = _json(table)
        # What mlflow.log_table records: the UI's artifact view then shows the file as a table.
        tags["mlflow.loggedArtifacts"] = json.dumps([{"path": SIGNALS_TABLE, "type": "table"}])
    return {
        "number": outcome.number,
        "experiment_id": None,
        "run_name": trial_run_name(outcome),
        "start_ms": start_ms,
        "end_ms": end_ms,
        "tags": tags,
        "params": trial_params(outcome),
        "metrics": trial_metric_rows(outcome, start_ms, end_ms),
        "texts": texts,
        "status": STATUS_OF_STATE.get(outcome.state, "KILLED"),
    }


def signal_rows(signals: Any) -> list[dict[str, Any]]:
    """The per-layer rows of a ``diagnostics.SignalReport`` as plain dicts (JSON-ready)."""
    if signals is None:
        return []
    if hasattr(signals, "to_rows"):
        rows = signals.to_rows()
    elif hasattr(signals, "rows"):
        rows = signals.rows
    elif hasattr(signals, "layers"):
        rows = signals.layers
    else:
        rows = signals
    out = []
    for row in rows or []:
        if is_dataclass(row) and not isinstance(row, type):
            row = asdict(row)
        elif hasattr(row, "to_dict"):
            row = row.to_dict()
        if isinstance(row, Mapping):
            out.append({str(k): _plain(v) for k, v in row.items()})
    return out


def signal_table(signals: Any) -> dict[str, list[Any]] | None:
    """The per-layer rows as an MLflow table (``{"columns": [...], "data": [[...], ...]}``, the layout
    ``mlflow.log_table`` writes), layers in forward order; ``None`` when there are no rows."""
    rows = signal_rows(signals)
    if not rows:
        return None
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}


def signal_metrics(signals: Any) -> list[tuple[str, float]]:
    """Two scalars of the init diagnostics: ``init/loss`` (the loss on the batch at init) and
    ``init/grad_ratio`` (largest over smallest positive per-layer gradient norm: how unevenly the layers
    would learn). The per-layer values are in the table (``signal_table``), not one metric each."""
    metrics = []
    grads = [row.get("grad_norm") for row in signal_rows(signals)]
    positive = [float(g) for g in grads if isinstance(g, (int, float)) and not isinstance(g, bool)
                and math.isfinite(g) and g > 0]
    loss = getattr(signals, "loss", None)
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        metrics.append(("init/loss", float(loss)))
    if positive:
        metrics.append(("init/grad_ratio", max(positive) / min(positive)))
    return metrics


def _plain(value: Any) -> Any:
    """A JSON-safe copy: numpy/torch scalars -> floats, non-finite floats -> None, tuples -> lists."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _json(value: Any) -> str:
    return json.dumps(_plain(value), indent=2)


def summary_metric_rows(summary: Any, now_ms: int) -> list[tuple[str, float, int, int]]:
    """``best_score`` (the exported trial's: the selection stage's choice, else the best score),
    ``best_search_score``, ``best_baseline_score``, ``improvement_pct`` (those that exist) as
    ``[key, value, timestamp_ms, step]`` rows, at step = number of trials in the study, so resumed studies
    draw a history of the headline."""
    step = int(len(summary.table))
    winner = summary.winner
    values = {
        "best_score": trial_score(winner) if winner is not None else None,
        "best_search_score": trial_score(summary.best_search) if summary.best_search is not None else None,
        "best_baseline_score": trial_score(summary.best_baseline) if summary.best_baseline is not None else None,
        "improvement_pct": summary.improvement_pct,
    }
    return [(k, float(v), now_ms, step) for k, v in values.items() if v is not None and math.isfinite(float(v))]


def summary_tags(summary: Any) -> dict[str, str]:
    """The headline as the run's note; ``best_trial`` and ``best_kind``: the trial whose policy is the run's
    ``best_policy.json`` (the selection stage's choice when it ran)."""
    tags = {"mlflow.note.content": clip(summary.headline(), MAX_TAG_VALUE)}
    winner = summary.winner
    if winner is not None:
        tags["initsearch.best_trial"] = str(winner.number)
        tags["initsearch.best_kind"] = winner.user_attrs.get("baseline") or "search"
    return tags


def network_tags(study: Any) -> dict[str, str]:
    """The network a study searched (``study.user_attrs["network"]``: depth, activation mix, layer types) as
    tags of its parent run, beside ``initsearch.best_policy``, so ``export list=true`` finds earlier winners."""
    network = study.user_attrs.get("network") or {}
    tags = {f"initsearch.net.{key}": clip(str(value), MAX_TAG_VALUE) for key, value in network.items()}
    model = study.user_attrs.get("model")
    if isinstance(model, dict):
        tags["initsearch.net.model"] = clip(str(model.get("_target_") or model.get("name")), MAX_TAG_VALUE)
    tags["initsearch.best_policy"] = "best_policy.json"
    return tags
