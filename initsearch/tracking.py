"""MLflow tracking: one parent run per study, one nested run per trial, batched metrics, artifacts, plots.

Layout in MLflow (the experiment is named after the study):

- the **parent run** (tags ``initsearch.study=<name>``, ``initsearch.role=parent``) holds the composed config
  as params and as ``config.yaml``, and at the end the best scores, ``best_policy.json``, ``trials.csv`` and
  PNG plots. Re-running the same command (resume) finds it by those tags and attaches to it again;
- one **child run** per trial (tag ``mlflow.parentRunId``), baselines included (``initsearch.kind=baseline``,
  ``initsearch.baseline=<name>``; searched ones ``initsearch.kind=search``), with the sampled params, the
  per-step training loss, the validation checkpoints, the init diagnostics, the score and ``policy.json``.

Where it goes (``tracking_uri``): ``null`` = ``sqlite:///<working dir>/mlflow.db`` made absolute, with the
artifacts in ``<dir of the db>/mlartifacts``; any other ``sqlite:///`` path likewise; ``http(s)://host:port``
= a team ``mlflow server`` (its /health is probed at start, so an unreachable server is one clear
``ConfigError`` before any training); ``none`` (or ``off``) = no tracking.

Cost: the study's thread only enqueues; one background worker thread makes every MLflow call, in order.
Logging one digits_mlp trial (2 seeds x 200 steps: about 450 metric rows, one ``log_batch``) costs that thread
about 35-55 ms of CPU on a local SQLite store, almost all of it MLflow's ORM, and about 17 ms against a
server; a thread shares the GIL with the training loop, so on a busy machine this is roughly what a trial
pays (``scripts/tracking_overhead.py`` measures it).
``study_finished`` (or ``close``, also registered with ``atexit``) drains the queue. A failing MLflow call is
a warning, never an exception in the study; after ``MAX_FAILURES`` failures in a row tracking turns itself
off for the rest of the process rather than queueing minutes of HTTP retries.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import posixpath
import queue
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from initsearch.config import DEFAULT_TRACKING_URI, StudySettings
from initsearch.errors import ConfigError
from initsearch.study import NullTracker, Tracker, TrialOutcome, _redact, resolve_device
from initsearch.workers import worker_alive, worker_id  # reliability (issue 7)

log = logging.getLogger("initsearch")

OFF_VALUES = ("none", "off")
PROBE_TIMEOUT_S = 5.0
MAX_FAILURES = 3
CURVES_TOP = 3  # searched trials drawn against the baselines in training_curves.png

# MLflow's limits (mlflow.utils.validation; the tests check these against the installed MLflow).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_BATCH_BYTES = 900_000  # under MLflow's 1 MB request limit, with room for the JSON framing

STATUS_OF_STATE = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}
TRUNCATED = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


# ---- where the runs go -----------------------------------------------------------------------------------
def resolve_tracking_uri(uri: str | None, cwd: Path | None = None) -> str | None:
    """The store to log to, stable across runs, or ``None`` when tracking is off.

    ``None``/empty -> ``DEFAULT_TRACKING_URI`` (``sqlite:///mlflow.db``); a relative SQLite path is made
    absolute against ``cwd`` (the working directory), so every run of the same command, and the MLflow UI
    started in that folder, see the same database; a plain path (no ``://``) becomes a ``file:`` URI;
    ``none``/``off`` -> ``None``; anything else (http, postgresql, ...) is kept as given.
    """
    text = DEFAULT_TRACKING_URI if uri is None or not str(uri).strip() else str(uri).strip()
    if text.lower() in OFF_VALUES:
        return None
    base = Path.cwd() if cwd is None else cwd
    if text.startswith("sqlite:///"):
        path, sep, query = text[len("sqlite:///"):].partition("?")
        if path and path != ":memory:":
            full = Path(path).expanduser()
            full = full if full.is_absolute() else base / full
            return f"sqlite:///{full.absolute().as_posix()}{sep}{query}"
        return text
    if "://" not in text:
        full = Path(text).expanduser()
        return (full if full.is_absolute() else base / full).absolute().as_uri()
    return text.rstrip("/") if _is_http(text) else text


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go to ``mlartifacts/`` next to the database file (a ``file:`` URI), so
    they do not depend on the folder a later run starts in. Servers and other stores decide for themselves."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].partition("?")[0]
        if path and path != ":memory:":
            return (Path(path).parent / "mlartifacts").as_uri()
    return None


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Probe ``GET {uri}/health`` once with a short timeout; raise a one-line ``ConfigError`` when it fails.

    MLflow's own client would retry with backoff for minutes; this answers in at most ``timeout`` seconds.
    401/403 count as reachable (the server is there and wants credentials, which MLflow reads from
    ``MLFLOW_TRACKING_USERNAME``/``..._PASSWORD``).
    """
    shown = _redact(uri)
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            resp.read(64)
        return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return
        reason = f"GET /health answered HTTP {exc.code}"
    except urllib.error.URLError as exc:
        reason = str(exc.reason)
    except (OSError, ValueError) as exc:  # socket timeouts, malformed URLs
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    raise ConfigError(
        f"tracking_uri: cannot reach MLflow at {shown}: {reason} (start the server, or set tracking_uri=none)"
    ) from None


def make_tracker(settings: StudySettings) -> Tracker:
    """The tracker of ``settings.tracking_uri``: ``NullTracker`` when off, else an ``MlflowTracker``.

    Everything that can fail on a bad URI fails here, before any training: an HTTP server is probed;
    a database store is opened (created and migrated on first use: this is also what makes the later
    per-trial calls cheap).
    """
    uri = resolve_tracking_uri(settings.tracking_uri)
    if uri is None:
        return NullTracker()
    if _is_http(uri):
        check_reachable(uri)
        # A RestStore prints two "View run" lines per finished run; one link per study is enough (we log it).
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    elif uri.startswith("sqlite:///"):
        _make_parent_dir(uri)
    client = _open_client(uri)
    return MlflowTracker(client, uri, default_artifact_location(uri))


def _make_parent_dir(uri: str) -> None:
    path = uri[len("sqlite:///"):].partition("?")[0]
    if path and path != ":memory:":
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"tracking_uri: cannot create the folder of {path}: {exc}") from None


def _open_client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri`` whose store has answered once (a one-line ``ConfigError`` if not)."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any store error is a bad tracking_uri for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"tracking_uri: cannot open MLflow store {_redact(uri)}: {type(exc).__name__}: {first}") from None
    return client


# ---- the background worker -------------------------------------------------------------------------------
class _Worker:
    """One daemon thread running submitted calls in order. A failing call is logged as a warning; after
    ``MAX_FAILURES`` in a row the remaining and later calls are dropped (one warning says so)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failures = 0
        self.disabled = False
        self.cpu_s: dict[str, float] = {}  # CPU seconds spent per kind of call (scripts/tracking_overhead.py)

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self.disabled:
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="initsearch-mlflow", daemon=True)
                self._thread.start()
        self._queue.put((fn, args))

    def drain(self) -> None:
        """Wait until every submitted call has run."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def stop(self) -> None:
        """Drain, then end the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if not self.disabled:
                    self._run(*item)
            finally:
                self._queue.task_done()

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        started = time.thread_time()
        try:
            fn(*args)
            self._failures = 0
        except Exception as exc:  # noqa: BLE001 - tracking must never break the study
            self._failures += 1
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.warning("MLflow tracking: %s failed (%s: %s)", fn.__name__.strip("_"), type(exc).__name__, first[:300])
            if self._failures >= MAX_FAILURES:
                self.disabled = True
                log.warning("MLflow tracking: %d failures in a row; tracking is off for the rest of this run", self._failures)
        finally:
            name = fn.__name__
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + time.thread_time() - started


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---- the tracker -----------------------------------------------------------------------------------------
class MlflowTracker:
    """Logs a study to MLflow through an explicit ``MlflowClient`` (no fluent active-run state).

    The three hooks only enqueue work (with the wall-clock time they were called at, so the runs keep the
    trials' real start and end times); the worker thread does the MLflow calls.
    """

    def __init__(self, client: Any, uri: str, artifact_location: str | None = None) -> None:
        self.client = client
        self.uri = uri
        self.artifact_location = artifact_location
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self._worker = _Worker()
        self._finished = False
        self._closed = False
        atexit.register(self.close)

    # -- hooks (the study's thread) --
    def study_started(self, settings: StudySettings, config_yaml: str, study: Any) -> None:
        self._worker.submit(self._start, settings, config_yaml, study.study_name, _now_ms())
        self._worker.submit(self._backfill, study)  # reliability (issue 7)

    def trial_finished(self, outcome: TrialOutcome) -> None:
        self._worker.submit(self._log_trial, outcome, _now_ms())

    def study_finished(self, study: Any, summary: Any, policy_path: Any) -> None:
        """Log the end-of-study results, then drain the queue and stop the worker (this blocks)."""
        self._finished = True
        self._worker.submit(self._finish, study, summary, None if policy_path is None else Path(policy_path))
        self.close()

    def flush(self) -> None:
        """Block until everything enqueued so far is logged."""
        self._worker.drain()

    @property
    def worker_cpu_s(self) -> dict[str, float]:
        """CPU seconds the worker thread has spent so far, per kind of call (``_log_trial``, ``_start``...)."""
        return dict(self._worker.cpu_s)

    # ---- reliability (issue 7): a helper worker process leaves the parent run to the main process ----
    def detach(self) -> None:
        """Drain and stop without touching the parent run (another process of the study finishes it)."""
        self._finished = True
        self.close()
    # ---- end reliability ----

    def close(self) -> None:
        """Drain and stop the worker. A parent whose study did not finish (interrupted, or no trial finished)
        is marked KILLED; running the command again sets it RUNNING and continues it."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if not self._finished:
            self._worker.submit(self._abandon)
        self._worker.stop()

    # -- worker side --
    def _start(self, settings: StudySettings, config_yaml: str, name: str, started_ms: int) -> None:
        """Find or create the experiment and the parent run (started at ``started_ms``, when the study
        started); log the config (params, tags, config.yaml). On resume, new config keys become params and
        changed ones are listed in the tag ``initsearch.resumed_with`` (MLflow params cannot change)."""
        client = self.client
        self.experiment_id = self._experiment(name)
        parent = self._find_parent(name)
        tags = parent_tags(settings)
        yaml_text = redact_text(config_yaml, (settings.storage, settings.tracking_uri or ""))
        params = config_params(yaml_text)
        if parent is None:
            run = client.create_run(self.experiment_id, start_time=started_ms, tags={"initsearch.study": name,
                                    "initsearch.role": "parent"}, run_name=name)
            self.parent_id = run.info.run_id
            log_in_batches(client, self.parent_id, params=params, tags=tags)
            client.log_text(self.parent_id, yaml_text, "config.yaml")
            log.info("MLflow: study %r -> parent run %s in %s", name, self.parent_id, _redact(self.uri))
            return
        self.parent_id = parent.info.run_id
        client.update_run(self.parent_id, status="RUNNING")
        logged = parent.data.params
        new = [(k, v) for k, v in params if k not in logged]
        changed = [f"{k}={v}" for k, v in params if k in logged and logged[k] != v]
        tags["initsearch.resumed_with"] = _clip(" ".join(changed) or "(same config)", MAX_TAG_VALUE)
        log_in_batches(client, self.parent_id, params=new, tags=tags)
        self._resumed = True  # reliability (issue 7)
        self._close_dead_children()  # reliability (issue 7)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        client.log_text(self.parent_id, yaml_text, f"resumes/config-{stamp}.yaml")
        log.info("MLflow: study %r resumes parent run %s in %s", name, self.parent_id, _redact(self.uri))

    def _experiment(self, name: str) -> str:
        """The experiment named after the study: found, restored when it was deleted, or created."""
        client = self.client
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=self.artifact_location,
                                                tags={"initsearch.study": name})
            except Exception:  # noqa: BLE001 - another process may have created it meanwhile
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            log.warning("MLflow: experiment %r was deleted; restoring it to continue the study", name)
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _find_parent(self, name: str) -> Any:
        """The oldest active parent run of study ``name`` in the experiment, or ``None``."""
        runs = search_all(self.client, self.experiment_id, "tags.`initsearch.role` = 'parent'",
                          order_by=["attributes.start_time ASC"])
        matches = [r for r in runs if r.data.tags.get("initsearch.study") == name]
        return matches[0] if matches else None

    def _log_trial(self, outcome: TrialOutcome, end_ms: int) -> None:
        """One child run: created with the trial's start time, filled with one or a few ``log_batch`` calls,
        the artifacts, then terminated with the trial's end time and the status of its state."""
        if self.parent_id is None:
            raise RuntimeError(f"no parent run (the study's start was not logged); trial {outcome.number} skipped")
        client = self.client
        start_ms = end_ms - int(round(outcome.seconds * 1000))
        run = client.create_run(self.experiment_id, start_time=start_ms, run_name=trial_run_name(outcome),
                                tags={**trial_tags(outcome, self.parent_id), "initsearch.worker": worker_id()})
        run_id = run.info.run_id
        status = STATUS_OF_STATE.get(outcome.state, "KILLED")
        try:
            log_in_batches(client, run_id, metrics=trial_metrics(outcome, start_ms, end_ms),
                           params=trial_params(outcome))
            if outcome.policy is not None:
                client.log_text(run_id, _json(outcome.policy), "policy.json")
            rows = signal_rows(outcome.signals)
            if rows:
                client.log_text(run_id, _json(rows), "init_signals.json")
        except Exception:
            status = "FAILED" if status == "FINISHED" else status
            raise
        finally:
            client.set_terminated(run_id, status=status, end_time=end_ms)

    def _finish(self, study: Any, summary: Any, policy_path: Path | None) -> None:
        """Headline metrics, best_policy.json, trials.csv and the plots on the parent; parent FINISHED."""
        if self.parent_id is None:
            raise RuntimeError("no parent run (the study's start was not logged); end of study skipped")
        client = self.client
        log_in_batches(client, self.parent_id, metrics=summary_metrics(summary, _now_ms()), tags=summary_tags(summary))
        with tempfile.TemporaryDirectory(prefix="initsearch-mlflow-") as tmp:
            folder = Path(tmp)
            if policy_path is not None and policy_path.is_file():
                (folder / "best_policy.json").write_bytes(policy_path.read_bytes())
            summary.table.to_csv(folder / "trials.csv", index=False)
            self._plots(study, summary, folder)
            client.log_artifacts(self.parent_id, str(folder))
        client.set_terminated(self.parent_id, status="FINISHED", end_time=_now_ms())

    def _plots(self, study: Any, summary: Any, folder: Path) -> None:
        """Each plot on its own: one that cannot be drawn is skipped (debug log), the others still come."""
        plots: list[tuple[str, Callable[[], Any]]] = [
            ("optimization_history.png", lambda: plot_history(study, summary.metric)),
            ("param_importances.png", lambda: plot_importances(study, summary.metric)),
            ("training_curves.png", lambda: plot_training_curves(self._curve_histories(summary), summary.metric)),
        ]
        for name, draw in plots:
            try:
                fig = draw()
            except Exception as exc:  # noqa: BLE001 - a missing plot must not lose the rest
                log.debug("MLflow: %s skipped (%s: %s)", name, type(exc).__name__, exc)
                continue
            if fig is not None:
                _save_figure(fig, folder / name)

    def _curve_histories(self, summary: Any) -> dict[str, list[tuple[int, float]]]:
        """``train_loss`` of the best few complete searched trials that have one (a trial that re-proposed an
        already scored policy did not train) and of every baseline, read back from MLflow, so trials logged
        by an earlier, resumed process are drawn too; labelled for the legend."""
        table = summary.table
        children = search_all(self.client, self.experiment_id, f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                              order_by=["attributes.start_time ASC"])
        run_of: dict[int, str] = {}
        for run in children:  # oldest first: a later run of the same trial number wins
            number = run.data.tags.get("initsearch.trial")
            if number is not None and number.isdigit():
                run_of[int(number)] = run.info.run_id

        def history(number: int) -> list[tuple[int, float]]:
            if number not in run_of:
                return []
            return sorted((m.step, m.value) for m in self.client.get_metric_history(run_of[number], "train_loss"))

        curves: dict[str, list[tuple[int, float]]] = {}
        searched = table[(table["kind"] == "search") & (table["state"] == "complete")]["trial"]
        for number in searched:  # best first
            points = history(int(number))
            if points:
                curves[f"trial {int(number)}"] = points
            if len(curves) == CURVES_TOP:
                break
        for number, kind in zip(table["trial"], table["kind"]):
            if kind != "search":
                points = history(int(number))
                if points:
                    curves[f"{kind} (baseline)"] = points
        return curves

    # ---- reliability (issue 7): child runs a killed process left RUNNING ----
    def _close_dead_children(self) -> None:
        """Mark KILLED the child runs still RUNNING whose process (tag ``initsearch.worker``) is gone: a
        process killed while it logged a trial leaves one behind. Runs of live or remote workers stay."""
        children = search_all(self.client, self.experiment_id,
                              f"tags.`mlflow.parentRunId` = '{self.parent_id}' and attributes.status = 'RUNNING'")
        for run in children:
            worker = run.data.tags.get("initsearch.worker")
            if worker and worker_alive(worker) is False:
                self.client.set_terminated(run.info.run_id, status="KILLED")

    def _backfill(self, study: Any) -> None:
        """On resume: a child run for each finished trial that has none and whose worker process is gone
        (killed after the trial ended, before its run was logged), from what the study stored: state,
        score, per-seed scores, params, reason, policy (no curves)."""
        if self.parent_id is None or not getattr(self, "_resumed", False):
            return
        children = search_all(self.client, self.experiment_id, f"tags.`mlflow.parentRunId` = '{self.parent_id}'")
        logged = {run.data.tags.get("initsearch.trial") for run in children}
        states = {"COMPLETE": "complete", "PRUNED": "pruned"}
        for t in study.get_trials(deepcopy=False):
            worker = t.user_attrs.get("worker")
            if str(t.number) in logged or not t.state.is_finished() or not isinstance(worker, str):
                continue
            if worker_alive(worker) is not False:
                continue  # a live (or remote) worker logs its own trials
            outcome = TrialOutcome(t.number, t.user_attrs.get("baseline"), dict(t.params), policy=t.user_attrs.get("policy"),
                                   state=states.get(t.state.name, "failed"), value=t.value,
                                   seed_scores=list(t.user_attrs.get("seed_scores") or []), reason=t.user_attrs.get("reason"))
            end = t.datetime_complete or t.datetime_start
            if t.datetime_start is not None and t.datetime_complete is not None:
                outcome.seconds = (t.datetime_complete - t.datetime_start).total_seconds()
            self._log_trial(outcome, int(end.timestamp() * 1000) if end is not None else _now_ms())
    # ---- end reliability ----

    def _abandon(self) -> None:
        """The process ends without ``study_finished``: mark the parent KILLED (a resume sets it RUNNING)."""
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status="KILLED", end_time=_now_ms())


# ---- what gets logged (pure functions) ----------------------------------------------------------------------
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
    return _clip(text, MAX_PARAM_VALUE)


def _clip(text: str, limit: int) -> str:
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
        if url and _redact(url) != url:
            text = text.replace(url, _redact(url))
    return text


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        module = sys.modules.get(dist)
        return str(getattr(module, "__version__", "unknown"))


def parent_tags(settings: StudySettings) -> dict[str, str]:
    """Study name, storage (absolute path, or URL without password), device, metric, versions."""
    storage = settings.storage if "://" in settings.storage else str(Path(settings.storage).absolute())
    try:
        device = str(resolve_device(settings.device))
    except Exception:  # noqa: BLE001 - the study resolved it already; a tag must not fail
        device = settings.device
    if device.startswith("cuda"):
        import torch

        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    tags = {
        "initsearch.study": settings.study_name,
        "initsearch.role": "parent",
        "initsearch.storage": _clip(_redact(storage), MAX_TAG_VALUE),
        "initsearch.device": device,
        "initsearch.metric": settings.score.metric,
        "initsearch.direction": settings.score.direction,
    }
    for dist in ("initsearch", "torch", "optuna", "mlflow"):
        tags[f"initsearch.version.{dist}"] = _version(dist)
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
        tags["initsearch.reason"] = _clip(outcome.reason, MAX_TAG_VALUE)
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


def trial_metrics(outcome: TrialOutcome, start_ms: int, end_ms: int) -> list[Any]:
    """Every metric of a trial as ``mlflow.entities.Metric``s (logged in batches, never one call per step).

    Per seed ``i``: ``train_loss{sfx}`` at steps 1..steps_done and ``val_loss{sfx}``/``val_acc{sfx}`` at the
    checkpoints. Timestamps place each seed's steps evenly over its own training time, the seeds back to
    back and ending at ``end_ms`` (the host only reads the losses at checkpoints, so per-step times are
    not measured; this keeps MLflow's wall-time axis truthful to within a seed). The init diagnostics at
    step 0 and ``start_ms``; ``score``, ``seed_score_s{i}``, ``seconds`` at ``end_ms``.
    """
    from mlflow.entities import Metric

    metrics: list[Any] = [Metric(k, v, start_ms, 0) for k, v in signal_metrics(outcome.signals)]
    curves = list(outcome.curves)
    after = [sum(c.seconds for c in curves[i + 1:]) for i in range(len(curves))]
    for i, curve in enumerate(curves):
        sfx = seed_suffix(i)
        t_end = end_ms - 1000.0 * after[i]
        t_start = max(float(start_ms), t_end - 1000.0 * curve.seconds)
        n = max(len(curve.train_loss), 1)

        def at(step: int) -> int:
            return int(t_start + (t_end - t_start) * min(step, n) / n)

        for j, loss in enumerate(curve.train_loss):
            metrics.append(Metric(f"train_loss{sfx}", float(loss), at(j + 1), j + 1))
        for step, loss, acc in zip(curve.val_steps, curve.val_loss, curve.val_acc):
            metrics.append(Metric(f"val_loss{sfx}", float(loss), at(step), int(step)))
            metrics.append(Metric(f"val_acc{sfx}", float(acc), at(step), int(step)))
    if outcome.value is not None:
        metrics.append(Metric("score", float(outcome.value), end_ms, 0))
    for i, value in enumerate(outcome.seed_scores):
        metrics.append(Metric(f"seed_score_s{i}", float(value), end_ms, 0))
    metrics.append(Metric("seconds", float(outcome.seconds), end_ms, 0))
    return metrics


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


def signal_metrics(signals: Any) -> list[tuple[str, float]]:
    """``init_<field>.<layer>`` for every numeric field of every layer row (``init_output_std.net.0``,
    ``init_output_mean.net.0``, ``init_grad_norm.net.0``, ``init_weight_std.net.0``), and ``init_loss`` (the
    loss on the batch at init); non-numeric fields and unusable keys are left out."""
    metrics = []
    for row in signal_rows(signals):
        layer = row.get("name", row.get("layer"))
        if layer is None:
            continue
        for field, value in row.items():
            if field in ("name", "layer") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            key = clean_key(f"init_{field}.{layer}")
            if key is not None:
                metrics.append((key, float(value)))
    loss = getattr(signals, "loss", None)
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        metrics.append(("init_loss", float(loss)))
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


def summary_metrics(summary: Any, now_ms: int) -> list[Any]:
    """``best_score``, ``best_search_score``, ``best_baseline_score``, ``improvement_pct`` (those that exist),
    at step = number of trials in the study, so resumed studies draw a history of the headline."""
    from mlflow.entities import Metric

    step = int(len(summary.table))
    values = {
        "best_score": summary.best.value if summary.best is not None else None,
        "best_search_score": summary.best_search.value if summary.best_search is not None else None,
        "best_baseline_score": summary.best_baseline.value if summary.best_baseline is not None else None,
        "improvement_pct": summary.improvement_pct,
    }
    return [Metric(k, float(v), now_ms, step) for k, v in values.items() if v is not None and math.isfinite(float(v))]


def summary_tags(summary: Any) -> dict[str, str]:
    tags = {"mlflow.note.content": _clip(summary.headline(), MAX_TAG_VALUE)}
    if summary.best is not None:
        tags["initsearch.best_trial"] = str(summary.best.number)
        tags["initsearch.best_kind"] = summary.best.user_attrs.get("baseline") or "search"
    return tags


def batches(metrics: Sequence[Any] = (), params: Sequence[tuple[str, str]] = (),
            tags: Sequence[tuple[str, str]] = ()) -> Iterator[tuple[list[Any], list[tuple[str, str]], list[tuple[str, str]]]]:
    """Split into ``log_batch`` calls within MLflow's limits: <= 1000 metrics, <= 100 params, <= 100 tags,
    <= 1000 entities in all, and about <= 0.9 MB of keys and values per call."""
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

    params = list(params.items()) if isinstance(params, Mapping) else list(params)
    tags = list(tags.items()) if isinstance(tags, Mapping) else list(tags)
    calls = 0
    for m, p, t in batches(metrics, params, tags):
        client.log_batch(run_id, metrics=m, params=[Param(k, v) for k, v in p], tags=[RunTag(k, v) for k, v in t])
        calls += 1
    return calls


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


# ---- plots (Agg, no display) ---------------------------------------------------------------------------------
def _pyplot() -> Any:
    """pyplot on the Agg backend when nothing chose a backend yet (the CLI, a worker thread, no display)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_of(obj: Any) -> Any:
    """The figure of what Optuna's matplotlib plots return (an Axes, or an array of them)."""
    first = obj.flat[0] if hasattr(obj, "flat") else obj
    return first.get_figure() if hasattr(first, "get_figure") else first


def _save_figure(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)


def plot_history(study: Any, metric: str = "Objective Value") -> Any:
    """Optuna's optimization history (baselines included: they are trials of the study)."""
    import optuna

    _pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=metric)
    return _figure_of(ax)


def plot_importances(study: Any, metric: str = "Objective Value") -> Any:
    """Optuna's parameter importances over the complete *searched* trials (baselines have no params), or
    ``None`` when there are fewer than two of them with params (importances need at least two)."""
    import optuna
    from optuna.trial import TrialState

    searched = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if not t.user_attrs.get("baseline") and t.params]
    if len(searched) < 2:
        return None
    only = optuna.create_study(directions=study.directions)
    only.add_trials(searched)
    _pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_param_importances(only, target_name=metric)
    return _figure_of(ax)


def plot_training_curves(curves: Mapping[str, Sequence[tuple[int, float]]], metric: str) -> Any:
    """Training loss per step of each labelled run on one chart: baselines dashed, searched trials solid;
    log-scaled when the losses span more than a factor 20 (a diverging run would flatten the others).
    ``None`` when there is nothing to draw."""
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    finite: list[float] = []
    for label, points in curves.items():
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        finite.extend(v for v in values if math.isfinite(v))
        ax.plot(steps, values, label=label, linestyle="--" if "baseline" in label else "-", linewidth=1.2)
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("train_loss (first evaluation seed)")
    ax.set_title(f"Training curves: best searched trials vs baselines (ranked by {metric})")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return fig
