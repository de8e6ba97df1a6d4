"""The MLflow runs of a study: each trial's child run, the parent run's start (or resume) and end, and what the
end-of-study figures read back; every call batched within MLflow's limits.

Each function takes an ``MlflowClient`` and plain, JSON-ready arguments (the payloads of ``payload``), so
the same code runs in the writer process (``writer``: the usual way, so the study process never imports
MLflow) and in the study process (``tracker.MlflowTracker``, when there is no writer or it died).
Standard library, MLflow and ``initsearch.errors`` only, like the writer.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from initsearch.errors import first_line

# MLflow's limits (mlflow.utils.validation; the tests check these against the installed MLflow).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_BATCH_BYTES = 900_000  # under MLflow's 1 MB request limit, with room for the JSON framing


# ---- batching within MLflow's limits ---------------------------------------------------------------------
def batches(metrics: Sequence[Any] = (), params: Sequence[tuple[str, str]] = (),
            tags: Sequence[tuple[str, str]] = ()) -> Iterator[tuple[list[Any], list[tuple[str, str]], list[tuple[str, str]]]]:
    """Split into ``log_batch`` calls within MLflow's limits: <= 1000 metrics, <= 100 params, <= 100 tags,
    <= 1000 entities in all, and about <= 0.9 MB of keys and values per call. ``metrics`` are objects with
    a ``key`` (``mlflow.entities.Metric``)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    i = j = k = 0
    while i < len(metrics) or j < len(params) or k < len(tags):
        budget = MAX_BATCH_BYTES
        p: list[tuple[str, str]] = []
        t: list[tuple[str, str]] = []
        m: list[Any] = []
        while j < len(params) and len(p) < MAX_PARAMS_TAGS_PER_BATCH and (not p or budget > _size(*params[j])):
            budget -= _size(*params[j])
            p.append(params[j])
            j += 1
        while k < len(tags) and len(t) < MAX_PARAMS_TAGS_PER_BATCH and (not (p or t) or budget > _size(*tags[k])):
            budget -= _size(*tags[k])
            t.append(tags[k])
            k += 1
        room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(p) - len(t))
        while i < len(metrics) and len(m) < room and (not (p or t or m) or budget > _size(metrics[i].key, "")):
            budget -= _size(metrics[i].key, "")
            m.append(metrics[i])
            i += 1
        yield m, p, t


def _size(key: str, value: str) -> int:
    """A generous estimate of one entity's bytes in a JSON request (numbers, step, timestamp, quotes)."""
    return len(key.encode()) + len(value.encode()) + 80


def log_in_batches(client: Any, run_id: str, metrics: Sequence[Any] = (),
                   params: Sequence[tuple[str, str]] | Mapping[str, str] = (),
                   tags: Sequence[tuple[str, str]] | Mapping[str, str] = ()) -> int:
    """Log everything with as few ``client.log_batch`` calls as MLflow's limits allow; return the count."""
    from mlflow.entities import Param, RunTag

    params = list(params.items()) if isinstance(params, Mapping) else [tuple(p) for p in params]
    tags = list(tags.items()) if isinstance(tags, Mapping) else [tuple(t) for t in tags]
    calls = 0
    for m, p, t in batches(metrics, params, tags):
        client.log_batch(run_id, metrics=m, params=[Param(k, v) for k, v in p], tags=[RunTag(k, v) for k, v in t])
        calls += 1
    return calls


def metric_entities(rows: Sequence[Sequence[Any]]) -> list[Any]:
    """``[key, value, timestamp_ms, step]`` rows as ``mlflow.entities.Metric``s."""
    from mlflow.entities import Metric

    return [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in rows]


# ---- errors ----------------------------------------------------------------------------------------------
_NO_ANSWER = re.compile(r"API request to (\S+?)/api/\S* failed with exception .*?(Connection refused|Read timed out|"
                        r"Connection reset|Connection aborted|Name or service not known|timed out)", re.IGNORECASE)


def short_error(exc: BaseException) -> str:
    """One short line for a failed MLflow call: a server that did not answer is ``<url> did not answer
    (Connection refused)`` rather than MLflow's nested urllib3 message; anything else its first line."""
    text = first_line(exc, with_type=True, limit=4000)
    found = _NO_ANSWER.search(text)
    if found:
        return f"{found.group(1)} did not answer ({found.group(2)})"
    return text if len(text) <= 300 else text[:297] + "..."


# ---- one trial ---------------------------------------------------------------------------------------------
class ArtifactsNotLogged(Exception):
    """The trial's run is logged, but not its text artifacts (the artifact store refused them)."""


def finished_trial_run(client: Any, experiment_id: str, parent_id: str, number: Any) -> Any:
    """The finished (not RUNNING) child run of trial ``number`` under ``parent_id``, or ``None``."""
    runs = client.search_runs([str(experiment_id)], f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                              f"tags.`initsearch.trial` = '{number}'", max_results=10)
    done = [r for r in runs if r.info.status != "RUNNING"]
    return done[0] if done else None


def log_trial(client: Any, payload: Mapping[str, Any], check_existing: bool = False) -> str:
    """Log one trial's child run from its plain payload; return the run id.

    Fields: ``experiment_id``, ``run_name``, ``start_ms``, ``end_ms``, ``tags`` (``mlflow.parentRunId``
    included), ``params`` (``[key, value]`` pairs), ``metrics`` (``[key, value, timestamp_ms, step]``),
    ``texts`` (``{artifact file name: text}``), ``status`` (``FINISHED``/``KILLED``/``FAILED``). The run is
    created with the trial's start time, filled with one or a few ``log_batch`` calls, terminated with the
    trial's end time, then given its text artifacts. ``check_existing`` (a trial tried before): when the
    trial already has a finished run, that one is returned and nothing is logged, so each trial is logged
    once. When logging fails half-way the partial run is deleted (or, when that fails too, left RUNNING
    for the next run of the study to delete) and the error raised; a run whose artifacts could not be
    stored is kept and ``ArtifactsNotLogged`` raised.
    """
    tags = dict(payload["tags"])
    if check_existing:
        done = finished_trial_run(client, payload["experiment_id"], tags["mlflow.parentRunId"], payload["number"])
        if done is not None:
            return done.info.run_id
    run = client.create_run(str(payload["experiment_id"]), start_time=int(payload["start_ms"]),
                            run_name=payload["run_name"], tags=tags)
    run_id = run.info.run_id
    try:
        log_in_batches(client, run_id, metrics=metric_entities(payload["metrics"]), params=payload["params"])
        client.set_terminated(run_id, status=str(payload["status"]), end_time=int(payload["end_ms"]))
    except Exception:
        try:
            client.delete_run(run_id)
        except Exception:
            pass
        raise
    for name, text in payload["texts"].items():
        try:
            client.log_text(run_id, text, name)
        except Exception as exc:
            raise ArtifactsNotLogged(f"{name} of trial {payload.get('number')}: "
                                     f"{first_line(exc, with_type=True, limit=300)}") from None
    return run_id


# ---- the study's parent run ----------------------------------------------------------------------------
def search_all(client: Any, experiment_id: str | None, filter_string: str, order_by: list[str] | None = None) -> list[Any]:
    """Every run matching ``filter_string`` (all pages)."""
    if experiment_id is None:
        return []
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def experiment(client: Any, name: str, artifact_location: str | None, tags: Mapping[str, str]) -> tuple[str, bool]:
    """The experiment named after the study: found, restored when it was deleted, or created (with
    ``tags``; an existing one missing any of them gets them). Returns its id and whether it was restored."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=dict(tags)), False
        except Exception:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    restored = exp.lifecycle_stage == "deleted"
    if restored:
        client.restore_experiment(exp.experiment_id)
    for key, value in tags.items():
        if key not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id, restored


def start_study(client: Any, name: str, started_ms: int, params: Sequence[Sequence[str]], tags: Mapping[str, str],
                yaml_text: str, artifact_location: str | None, experiment_tags: Mapping[str, str]) -> dict[str, Any]:
    """Find or create the experiment and the study's parent run (the oldest active run tagged
    ``initsearch.role=parent`` of study ``name``; a new one starts at ``started_ms``) and log the config:
    ``params``, ``tags`` and ``config.yaml``. On resume the parent is set RUNNING again, new config keys
    become params and changed ones are listed in the tag ``initsearch.resumed_with`` (MLflow params cannot
    change), and the config is kept as ``resumes/config-<time>.yaml``.

    Returns ``experiment_id``, ``parent_id``, ``resumed``, ``restored`` (the experiment had been deleted),
    ``artifact_error`` (the config file was refused: one line, or ``None``) and, on resume,
    ``running_children`` (``[run_id, initsearch.worker]`` of child runs still RUNNING) and ``logged`` (the
    trial numbers that have a finished child run), for the caller to close dead workers' runs and backfill.
    """
    experiment_id, restored = experiment(client, name, artifact_location, experiment_tags)
    parents = [r for r in search_all(client, experiment_id, "tags.`initsearch.role` = 'parent'",
                                     order_by=["attributes.start_time ASC"])
               if r.data.tags.get("initsearch.study") == name]
    out: dict[str, Any] = {"experiment_id": experiment_id, "restored": restored, "resumed": bool(parents),
                           "running_children": [], "logged": [], "artifact_error": None}
    tags = dict(tags)
    params = [(str(k), str(v)) for k, v in params]
    if not parents:
        run = client.create_run(experiment_id, start_time=int(started_ms), run_name=name,
                                tags={"initsearch.study": name, "initsearch.role": "parent"})
        out["parent_id"] = parent_id = run.info.run_id
        log_in_batches(client, parent_id, params=params, tags=tags)
        out["artifact_error"] = _artifact(client.log_text, parent_id, yaml_text, "config.yaml")
        return out
    parent = parents[0]
    out["parent_id"] = parent_id = parent.info.run_id
    client.update_run(parent_id, status="RUNNING")
    logged = parent.data.params
    new = [(k, v) for k, v in params if k not in logged]
    changed = [f"{k}={v}" for k, v in params if k in logged and logged[k] != v]
    text = " ".join(changed) or "(same config)"
    tags["initsearch.resumed_with"] = text if len(text) <= MAX_TAG_VALUE else text[:MAX_TAG_VALUE - 3] + "..."
    log_in_batches(client, parent_id, params=new, tags=tags)
    children = search_all(client, experiment_id, f"tags.`mlflow.parentRunId` = '{parent_id}'")
    out["running_children"] = [[r.info.run_id, r.data.tags.get("initsearch.worker", "")] for r in children
                               if r.info.status == "RUNNING"]
    out["logged"] = sorted({r.data.tags["initsearch.trial"] for r in children
                            if r.info.status != "RUNNING" and "initsearch.trial" in r.data.tags})
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out["artifact_error"] = _artifact(client.log_text, parent_id, yaml_text, f"resumes/config-{stamp}.yaml")
    return out


def delete_runs(client: Any, run_ids: Sequence[str]) -> dict[str, Any]:
    """Delete these runs (half-logged child runs of dead workers, which the backfill logs again)."""
    for run_id in run_ids:
        client.delete_run(run_id)
    return {"deleted": len(run_ids)}


def figure_data(client: Any, experiment_id: str, parent_id: str, searched: Sequence[int],
                baselines: Sequence[Sequence[Any]], top: int, curve_key: str, signals_file: str) -> dict[str, Any]:
    """What the end-of-study figures compare, read back from the child runs (so trials an earlier, resumed
    process logged are drawn too): the first ``top`` of ``searched`` (trial numbers, best first) whose run
    has a ``curve_key`` curve, labelled ``trial <n>``, and every baseline of ``baselines`` (``[label,
    number]``) that has one. Returns ``curves`` (label: one ``[[step, value], ...]`` per evaluation seed,
    ``curve_key``, ``curve_key_s1``...) and ``signals`` (label: the rows of the run's ``signals_file``
    table; runs without one are left out)."""
    children = search_all(client, experiment_id, f"tags.`mlflow.parentRunId` = '{parent_id}'",
                          order_by=["attributes.start_time ASC"])
    run_of: dict[int, Any] = {}
    for run in children:  # oldest first: a later run of the same trial number wins
        number = run.data.tags.get("initsearch.trial")
        if number is not None and number.isdigit() and curve_key in run.data.metrics:
            run_of[int(number)] = run
    shown: dict[str, Any] = {}
    for number in searched:
        if int(number) in run_of and len(shown) < top:
            shown[f"trial {int(number)}"] = run_of[int(number)]
    for label, number in baselines:
        if int(number) in run_of:
            shown[str(label)] = run_of[int(number)]
    curves: dict[str, list[list[list[float]]]] = {}
    for label, run in shown.items():
        keys = sorted((k for k in run.data.metrics if k == curve_key or k.startswith(curve_key + "_s")),
                      key=lambda k: (len(k), k))
        curves[label] = [sorted([m.step, m.value] for m in client.get_metric_history(run.info.run_id, k)) for k in keys]
    signals: dict[str, list[dict[str, Any]]] = {}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per small download
    with tempfile.TemporaryDirectory(prefix="initsearch-signals-") as tmp:
        for label, run in shown.items():
            try:
                path = client.download_artifacts(run.info.run_id, signals_file, tmp)
                table = json.loads(Path(path).read_text())
            except Exception:  # a run logged without diagnostics (a backfilled trial)
                continue
            signals[label] = [dict(zip(table["columns"], row)) for row in table["data"]]
    return {"curves": curves, "signals": signals}


def finish_study(client: Any, parent_id: str, metrics: Sequence[Sequence[Any]], tags: Mapping[str, str],
                 folder: str | None, end_ms: int) -> dict[str, Any]:
    """The end of the study on its parent run: the headline ``metrics`` (``[key, value, timestamp_ms,
    step]``) and ``tags``, every file of ``folder`` as an artifact, then FINISHED at ``end_ms``. Returns
    ``artifact_error`` (the artifact store refused the files: one line, or ``None``)."""
    log_in_batches(client, parent_id, metrics=metric_entities(metrics), tags=dict(tags))
    error = _artifact(client.log_artifacts, parent_id, folder) if folder else None
    client.set_terminated(parent_id, status="FINISHED", end_time=int(end_ms))
    return {"artifact_error": error}


def abandon_study(client: Any, parent_id: str, end_ms: int) -> dict[str, Any]:
    """The study's process ends before the study did: its parent run is KILLED (a resume sets it RUNNING)."""
    client.set_terminated(parent_id, status="KILLED", end_time=int(end_ms))
    return {}


def _artifact(fn: Any, run_id: str, *args: Any) -> str | None:
    """Store an artifact of the parent run; ``None``, or one line when the artifact store refuses it."""
    try:
        fn(run_id, *args)
    except Exception as exc:
        return f"artifacts not stored (the study's run: {short_error(exc)})"
    return None


STUDY_CALLS = {"start_study": start_study, "delete_runs": delete_runs, "figure_data": figure_data,
               "finish_study": finish_study, "abandon_study": abandon_study}
