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

Cost: the per-trial child runs are logged by a **writer process** (``initsearch/mlflow_writer.py``, started
by path by ``make_tracker`` so that it imports MLflow but not torch, at a lower priority). The study's
thread only turns each ``TrialOutcome`` into a plain payload (``trial_payload``: tags, params, about 450
``(key, value, timestamp, step)`` metric rows, policy.json and init_signals.json as text) and queues it;
a background thread sends it as one JSON line. That costs the study process about 0.7 ms of CPU per
digits_mlp trial; the writer spends the ~34 ms of MLflow ORM CPU per trial on the other core, no
longer under the study's GIL. ``scripts/tracking_overhead.py --n-trials 20 --repeats 5`` on a quiet
2-core machine (OMP_NUM_THREADS=1, 2026-11-29 09:29): +2.2% per trial (median; best of 5 +4.4%), where the
same trials logged on a thread paid +20.7% to +26.4%. This needs the second core to be free: when it is busy (other
jobs, or a VM whose two cores share one), the writer's CPU competes with training again and a trial
pays roughly what logging it costs (+15-20% measured then). Starting the writer (importing MLflow, about
1.3 s of CPU) overlaps opening the store in ``make_tracker``, a one-time cost.
The one-time work stays in this process on the background thread, in order: the experiment and parent
run (resume, closing dead workers' runs, backfill) before any trial is sent; at the end of the study,
``study_finished`` waits until the writer has acknowledged every trial (the training-curves plot reads
them back), then logs the results and plots. ``flush`` waits for the writer's acknowledgements too.
While the study waits like this (``flush``, ``study_finished``), the thread logs a queued trial itself
whenever the writer already has ``STEAL_BACKLOG`` trials in hand: the last round of a batched study (K
trials at once) is then logged on both cores (SQLite serializes the two processes' short transactions).
``close`` (also registered with ``atexit``) sends EOF and waits a bounded time, and so does ``flush``; the
writer logs what it was sent even when this process is gone (SIGKILL; a resume meanwhile leaves those trials
to it: ``writer_running_for``), and ignores SIGINT and SIGHUP (this process handles Ctrl-C and closes it).
Passwords in the tracking URI are replaced by ``***`` in every message (MLflow quotes failing URLs). A
failing MLflow call is a warning, never an exception in the study; after ``MAX_FAILURES`` failures in a row
tracking turns itself off for the rest of the process rather than queueing minutes of HTTP retries. A
writer that cannot start or dies is one warning: the trials it had not acknowledged, and the later ones,
are logged by the background thread instead (``MlflowTracker(..., writer=False)`` does that from the start).
"""
from __future__ import annotations

import atexit
import http.client
import json
import logging
import math
import os
import posixpath
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from initsearch.search.settings import DEFAULT_TRACKING_URI, StudySettings
from initsearch.errors import ConfigError
from initsearch.tracking.writer import (  # noqa: F401 - the batching rules and MLflow's limits live there
    MAX_BATCH_BYTES,
    MAX_ENTITIES_PER_BATCH,
    MAX_FAILURES,
    MAX_KEY,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VALUE,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VALUE,
    URI_ENV,
    batches,
    hide_password_of,
    log_in_batches,
    log_trial,
    one_line,
    scrub,
)
from initsearch.search.study import NullTracker, Tracker, TrialOutcome, _redact, resolve_device
from initsearch.search.workers import running_with_env, worker_alive, worker_id  # reliability (issue 7)

log = logging.getLogger("initsearch")

OFF_VALUES = ("none", "off")
PROBE_TIMEOUT_S = 5.0
CURVES_TOP = 3  # searched trials drawn against the baselines in training_curves.png

WRITER_SCRIPT = Path(__file__).with_name("writer.py")  # run by path: imports MLflow, not torch
CLOSE_TIMEOUT_S = 60.0  # close() (interrupted, atexit): the longest wait for the queued logging
FINISH_TIMEOUT_S = 600.0  # study_finished: the same, with the end-of-study artifacts and plots
WRITER_EXIT_TIMEOUT_S = 45.0  # of which at most this long for the writer to log what it was sent
STALL_TIMEOUT_S = 300.0  # flush(): give up when the writer acknowledged nothing for this long
STEAL_BACKLOG = 2  # while the study waits: log a trial here when the writer holds this many unacknowledged
WRITER_READY_TIMEOUT_S = 30.0  # make_tracker: the longest wait for the writer to import MLflow and open the store

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
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, malformed URLs, bad ports
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    hide_password_of(uri)
    reason = scrub(reason)
    raise ConfigError(
        f"tracking_uri: cannot reach MLflow at {shown}: {reason} (start the server, or set tracking_uri=none)"
    ) from None


def make_tracker(settings: StudySettings) -> Tracker:
    """The tracker of ``settings.tracking_uri``: ``NullTracker`` when off, else an ``MlflowTracker``.

    Everything that can fail on a bad URI fails here, before any training: an HTTP server is probed;
    a database store is opened (created and migrated on first use: this is also what makes the later
    per-trial calls cheap). The writer process is started first, so that its MLflow import overlaps the
    opening; it opens the store after this process has (``MlflowTracker`` waits for that, bounded).
    """
    uri = resolve_tracking_uri(settings.tracking_uri)
    if uri is None:
        return NullTracker()
    hide_password_of(uri)  # MLflow's errors quote the failing request's URL: warnings show *** instead
    if _is_http(uri):
        check_reachable(uri)
        # A RestStore prints two "View run" lines per finished run; one link per study is enough (we log it).
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    elif uri.startswith("sqlite:///"):
        _make_parent_dir(uri)
    writer = WriterProcess.launch(uri)  # importing MLflow there while this process opens the store
    try:
        client = _open_client(uri)
    except BaseException:
        if writer is not None:
            writer.kill()
        raise
    return MlflowTracker(client, uri, default_artifact_location(uri), writer=writer if writer is not None else False)


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


WRITER_FOR_ENV = "INITSEARCH_MLFLOW_WRITER_FOR"  # in the writer's environment: the worker_id() that started it


def writer_running_for(worker: str) -> bool:
    """Whether a writer process started by study process ``worker`` (a ``worker_id``) still runs on this
    machine: after its study process was killed it logs what it had been sent, so a resume must not log
    those trials a second time."""
    return running_with_env(WRITER_FOR_ENV, worker)


# ---- the background thread -------------------------------------------------------------------------------
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

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted call has run; ``False`` when they have not after ``timeout`` seconds."""
        if self._thread is None or not self._thread.is_alive():
            return True
        q = self._queue
        deadline = None if timeout is None else time.monotonic() + timeout
        with q.all_tasks_done:  # Queue.join() with a deadline
            while q.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                q.all_tasks_done.wait(left)
        return True

    def stop(self, timeout: float | None = None) -> bool:
        """Let the queued calls run, then end the thread; ``False`` when it is still busy after ``timeout``
        seconds (it is a daemon thread: the process can still exit)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def disable(self, failures: int) -> None:
        """Drop this and every later call (one warning)."""
        if not self.disabled:
            self.disabled = True
            log.warning("MLflow tracking: %d failures in a row; tracking is off for the rest of this run", failures)

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
            log.warning("MLflow tracking: %s failed (%s)", fn.__name__.strip("_"), one_line(exc))
            if self._failures >= MAX_FAILURES:
                self.disable(self._failures)
        finally:
            name = fn.__name__
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + time.thread_time() - started


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---- the writer process ------------------------------------------------------------------------------------
def writer_command() -> list[str]:
    """How the writer is started: this interpreter running ``mlflow_writer.py`` by path (no torch import).
    The tracking URI goes in the environment (``mlflow_writer.URI_ENV``), out of sight of ``ps``."""
    return [sys.executable, str(WRITER_SCRIPT)]


class WriterProcess:
    """The study process's end of the writer (``initsearch/mlflow_writer.py``).

    ``send_trial`` (from the tracker's thread) writes one JSON line per trial and keeps the payload until
    the writer acknowledges it; a reader thread reads the acknowledgements (``{"seq", "cpu", "trial_cpu",
    "error", "disabled"}``; seq 0 = ready) and hands each to ``on_ack``. When the writer ends without
    being asked (killed, crashed, could not import MLflow), the payloads it did not acknowledge are handed
    to ``on_death`` once, so the tracker logs them itself: at least once, never lost (a writer killed
    between creating a run and acknowledging it leaves that run twice, the first one RUNNING).
    """

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.cpu_s = 0.0  # the writer's process CPU so far (its start included)
        self.trial_cpu_s = 0.0  # of which logging trials
        self.dead = False
        self.closing = False
        self._on_ack: Callable[[dict[str, Any]], None] = lambda ack: None
        self._on_death: Callable[[str, list[dict[str, Any]]], None] | None = None
        self._death: tuple[str, list[dict[str, Any]]] | None = None  # a death before bind()
        self._cond = threading.Condition()
        self._sent = 0
        self._acked = -1  # seq 0 = the writer imported MLflow and is ready
        self._pending: dict[int, dict[str, Any] | None] = {}
        self._reader = threading.Thread(target=self._read, name="initsearch-mlflow-acks", daemon=True)
        self._reader.start()

    @classmethod
    def launch(cls, uri: str) -> WriterProcess | None:
        """Start the writer on ``uri``; ``None`` and a warning when it cannot be started at all."""
        try:
            proc = subprocess.Popen(writer_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                                    env={**os.environ, URI_ENV: uri, WRITER_FOR_ENV: worker_id()})
        except (OSError, ValueError) as exc:
            log.warning("MLflow tracking: cannot start the writer process (%s); logging the trials in this "
                        "process instead", one_line(exc))
            return None
        return cls(proc)

    def bind(self, on_ack: Callable[[dict[str, Any]], None], on_death: Callable[[str, list[dict[str, Any]]], None]) -> None:
        """Who hears of acknowledgements and of the writer's death (a death before this is told now)."""
        with self._cond:
            self._on_ack, self._on_death = on_ack, on_death
            death, self._death = self._death, None
        if death is not None:
            on_death(*death)

    @property
    def unacknowledged(self) -> int:
        with self._cond:
            return sum(1 for p in self._pending.values() if p is not None)

    def send_trial(self, payload: dict[str, Any]) -> bool:
        """Send one trial; ``False`` when the writer is gone (the caller logs it itself)."""
        return self._send("trial", payload)

    def open_store(self, timeout: float) -> bool:
        """Have the writer open its client on the store (after this process created it); wait for that up
        to ``timeout`` s. ``False`` when it is not done by then (the trials then wait in the pipe)."""
        if not self._send("open", None):
            return False
        return self.wait_acknowledged(stall_timeout=timeout)

    def _send(self, op: str, payload: dict[str, Any] | None) -> bool:
        with self._cond:
            if self.dead or self.closing:
                return False
            seq = self._sent + 1
            line = json.dumps({"op": op, "seq": seq, **(payload or {})}).encode() + b"\n"  # may raise: nothing pending
            self._sent = seq
            self._pending[seq] = payload
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            self._died(f"cannot be written to ({one_line(exc)})")
        return True

    def wait_acknowledged(self, stall_timeout: float = STALL_TIMEOUT_S) -> bool:
        """Block until everything sent so far is acknowledged or the writer is gone; ``False`` when it
        acknowledged nothing for ``stall_timeout`` seconds (then the caller stops waiting)."""
        with self._cond:
            target, last, since = self._sent, self._acked, time.monotonic()
            while self._acked < target and not self.dead:
                self._cond.wait(min(1.0, stall_timeout))
                if self._acked != last:
                    last, since = self._acked, time.monotonic()
                elif time.monotonic() - since >= stall_timeout:
                    return False
        return True

    def close_input(self) -> None:
        """EOF to the writer: it logs what it was sent, then exits."""
        with self._cond:
            self.closing = True
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the writer to exit (after ``close_input``); ``False`` if it still runs."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._reader.join(5.0)
        return True

    def kill(self) -> None:
        """End a writer that has nothing to log (the store could not be opened)."""
        self.close_input()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5.0)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                ack = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(ack, dict) or not isinstance(ack.get("seq"), int):
                continue
            with self._cond:
                self._pending.pop(ack["seq"], None)
                self._acked = max(self._acked, ack["seq"])
                self.cpu_s = float(ack.get("cpu") or 0.0)
                self.trial_cpu_s = float(ack.get("trial_cpu") or 0.0)
                self._cond.notify_all()
                on_ack = self._on_ack
            on_ack(ack)
        try:
            code = self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            code = None
        with self._cond:
            expected = self.closing and not any(p is not None for p in self._pending.values())
            if expected:
                self.dead = True
                self._cond.notify_all()
        if not expected:
            self._died("ended" if code is None else f"exited with status {code}")

    def _died(self, reason: str) -> None:
        with self._cond:
            if self.dead:
                return
            self.dead = True
            orphans = [p for _, p in sorted(self._pending.items()) if p is not None]
            self._pending.clear()
            self._cond.notify_all()
            on_death = self._on_death
            if on_death is None:
                self._death = (reason, orphans)
        if on_death is not None:
            on_death(reason, orphans)


# ---- the tracker -----------------------------------------------------------------------------------------
class MlflowTracker:
    """Logs a study to MLflow: the study-level runs through an explicit ``MlflowClient`` on a background
    thread, the trials' child runs through a writer process (``writer=False``, or when the writer cannot
    start or dies: on the same thread, with the same client).

    The three hooks only build plain payloads and enqueue them (with the wall-clock time they were called
    at, so the runs keep the trials' real start and end times); nothing here raises into the study.
    """

    def __init__(self, client: Any, uri: str, artifact_location: str | None = None,
                 writer: bool | WriterProcess = True) -> None:
        """``writer``: a started ``WriterProcess`` (``make_tracker`` starts it before opening the store, so
        its MLflow import overlaps that; it opens the store once this process has), ``True`` to start one
        when the study starts, ``False`` to log the trials on the thread."""
        self.client = client
        self.uri = uri
        self.artifact_location = artifact_location
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.use_writer = bool(writer)
        self.writer: WriterProcess | None = None
        self._worker = _Worker()
        self._worker_tag = worker_id()
        self._orphans: list[dict[str, Any]] = []
        self._orphans_lock = threading.Lock()
        self._payload_cpu_s = 0.0  # the study's thread, building trial payloads
        self._here_cpu_s = 0.0  # the tracker's thread, logging trials itself (no writer)
        self._finished = False
        self._closed = False
        self._draining = False  # the study waits for the logs: the thread helps the writer (``_log_trial``)
        self.logged_here = 0  # trials this process logged itself (no writer, its orphans, or helping it)
        atexit.register(self.close)
        if isinstance(writer, WriterProcess):
            self._attach_writer(writer)
            writer.open_store(WRITER_READY_TIMEOUT_S)

    # -- hooks (the study's thread) --
    def study_started(self, settings: StudySettings, config_yaml: str, study: Any) -> None:
        self._worker_tag = worker_id()
        if self.use_writer and self.writer is None:
            self._start_writer()
        self._worker.submit(self._start, settings, config_yaml, study.study_name, _now_ms())
        self._worker.submit(self._backfill, study)  # reliability (issue 7)

    def trial_finished(self, outcome: TrialOutcome) -> None:
        """Build the trial's payload here (about 1 ms) and queue it; the thread sends it to the writer."""
        if self._worker.disabled:
            return
        started = time.thread_time()
        try:
            payload = trial_payload(outcome, _now_ms(), self._worker_tag)
        except Exception as exc:  # noqa: BLE001 - tracking must never break the study
            log.warning("MLflow tracking: trial %s not logged (%s)", outcome.number, one_line(exc))
            return
        finally:
            self._payload_cpu_s += time.thread_time() - started
        self._worker.submit(self._log_trial, payload)

    def study_finished(self, study: Any, summary: Any, policy_path: Any) -> None:
        """Log the end-of-study results once every trial is logged (the training-curves plot reads them
        back), then stop the thread and the writer (this blocks, at most ``FINISH_TIMEOUT_S``)."""
        self._finished = True
        self._draining = True
        self._worker.submit(self._await_writer)
        self._worker.submit(self._eof_writer)  # nothing left to send: it exits while the plots are drawn
        self._worker.submit(self._finish, study, summary, None if policy_path is None else Path(policy_path))
        self._close(FINISH_TIMEOUT_S)

    def flush(self) -> bool:
        """Block until everything enqueued so far is logged (the writer's acknowledgements included), at most
        about ``STALL_TIMEOUT_S`` seconds longer than the writer keeps answering; ``False`` (and a warning)
        when it gave up waiting, e.g. for a stopped writer whose full pipe blocks the sending thread."""
        self._draining = True
        self._worker.submit(self._await_writer)
        if self._worker.drain(STALL_TIMEOUT_S + 1.0):
            return True
        log.warning("MLflow tracking: flush gave up after %.0f s; the writer is not taking the queued trials",
                    STALL_TIMEOUT_S + 1.0)
        return False

    @property
    def worker_cpu_s(self) -> dict[str, float]:
        """CPU seconds spent so far, per kind: the tracker's thread per call (``_start``, ``_finish``...),
        ``trial_finished`` (the study's thread building payloads), ``_send_trial`` (the thread sending them),
        ``_log_trial`` (logging the trials: the writer's CPU for them, plus this process's when it logged
        some itself) and ``writer`` (the writer process in all, its start included)."""
        cpu = dict(self._worker.cpu_s)
        thread = cpu.pop("_log_trial", 0.0)  # the thread's step: send to the writer, or log here
        cpu["_send_trial"] = max(thread - self._here_cpu_s, 0.0)
        cpu["trial_finished"] = self._payload_cpu_s
        cpu["_log_trial"] = (self.writer.trial_cpu_s if self.writer is not None else 0.0) + self._here_cpu_s
        cpu["writer"] = self.writer.cpu_s if self.writer is not None else 0.0
        return cpu

    # ---- reliability (issue 7): a helper worker process leaves the parent run to the main process ----
    def detach(self) -> None:
        """Drain and stop without touching the parent run (another process of the study finishes it)."""
        self._finished = True
        self.close()
    # ---- end reliability ----

    def close(self) -> None:
        """Drain and stop the thread and the writer (at most ``CLOSE_TIMEOUT_S``). A parent whose study did
        not finish (interrupted, or no trial finished) is marked KILLED; running the command again sets it
        RUNNING and continues it."""
        self._close(CLOSE_TIMEOUT_S)

    def _close(self, timeout: float) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._worker.submit(self._close_writer)
        if not self._finished:
            self._worker.submit(self._abandon)
        if not self._worker.stop(timeout):
            # The thread may be blocked writing to a stuck writer's pipe (holding its lock): leave both; the
            # pipe closes when this process exits, and the writer then logs what it got and exits too.
            log.warning("MLflow tracking: still busy after %.0f s; not waiting for it any longer", timeout)
            return
        if self.writer is not None and not self.writer.closing:
            self.writer.close_input()  # tracking turned itself off (the thread skipped _close_writer): EOF
            self.writer.wait_exit(min(WRITER_EXIT_TIMEOUT_S, 5.0))  # and reap it (it only acknowledges by now)

    # -- the writer (study's thread to start it; the tracker's thread for the rest) --
    def _start_writer(self) -> None:
        writer = WriterProcess.launch(self.uri)
        if writer is not None:
            self._attach_writer(writer)

    def _attach_writer(self, writer: WriterProcess) -> None:
        self.writer = writer
        writer.bind(self._on_ack, self._on_writer_death)

    def _on_ack(self, ack: dict[str, Any]) -> None:
        """The reader thread: a failure the writer reports is a warning; its giving up turns tracking off."""
        if ack.get("error"):
            log.warning("MLflow tracking (writer process): %s", ack["error"])
        if ack.get("disabled"):
            self._worker.disable(MAX_FAILURES)

    def _on_writer_death(self, reason: str, orphans: list[dict[str, Any]]) -> None:
        """The writer ended unasked: one warning; what it did not acknowledge is logged here (the thread
        picks them up before its next trial, or in ``flush``/``close``), as are the later trials."""
        log.warning("MLflow tracking: the writer process (pid %s) %s; logging %s in this process instead",
                    self.writer.pid if self.writer is not None else "?", reason,
                    f"its {len(orphans)} unacknowledged trials and the next ones" if orphans else "the next trials")
        with self._orphans_lock:
            self._orphans.extend(orphans)

    def _log_trial(self, payload: dict[str, Any]) -> None:
        """The thread's step for one trial: fill in the run ids (known once ``_start`` ran) and hand it to
        the writer, or log it here when there is none (``scripts/bench.py`` times this method)."""
        if self.parent_id is None:
            raise RuntimeError(f"no parent run (the study's start was not logged); trial {payload['number']} skipped")
        payload["experiment_id"] = self.experiment_id
        payload["tags"]["mlflow.parentRunId"] = self.parent_id
        self._log_orphans()
        helping = self._draining and self.writer is not None and self.writer.unacknowledged >= STEAL_BACKLOG
        if self.writer is None or helping or not self.writer.send_trial(payload):
            self._log_here(payload)

    def _log_here(self, payload: dict[str, Any]) -> None:
        started = time.thread_time()
        try:
            log_trial(self.client, payload)
            self.logged_here += 1
        finally:
            self._here_cpu_s += time.thread_time() - started

    def _log_orphans(self) -> None:
        """Log here the trials a dead writer did not acknowledge (each failure a warning)."""
        while True:
            with self._orphans_lock:
                if not self._orphans:
                    return
                payload = self._orphans.pop(0)
            try:
                self._log_here(payload)
            except Exception as exc:  # noqa: BLE001 - the next ones still get their chance
                log.warning("MLflow tracking: log_trial failed (trial %s: %s)", payload.get("number"), one_line(exc))

    def _await_writer(self) -> None:
        """Wait until the writer acknowledged every trial sent (or died: then log the rest here)."""
        if self.writer is not None and not self.writer.wait_acknowledged():
            log.warning("MLflow tracking: the writer process (pid %d) answered nothing for %.0f s; not waiting "
                        "for its %d trials", self.writer.pid, STALL_TIMEOUT_S, self.writer.unacknowledged)
        self._log_orphans()
        self._draining = self._finished  # after a flush, later trials go to the writer again

    def _eof_writer(self) -> None:
        if self.writer is not None:
            self.writer.close_input()

    def _close_writer(self) -> None:
        """EOF to the writer, then wait (bounded) for it to log what it was sent and exit."""
        writer = self.writer
        if writer is None:
            return
        writer.close_input()
        if not writer.wait_exit(WRITER_EXIT_TIMEOUT_S):
            log.warning("MLflow tracking: the writer process (pid %d) still has %d trials to log; it finishes "
                        "them on its own", writer.pid, writer.unacknowledged)
        self._log_orphans()

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
            if writer_running_for(worker):
                continue  # the dead worker's writer still works through what it was sent: it logs this one
            outcome = TrialOutcome(t.number, t.user_attrs.get("baseline"), dict(t.params), policy=t.user_attrs.get("policy"),
                                   state=states.get(t.state.name, "failed"), value=t.value,
                                   seed_scores=list(t.user_attrs.get("seed_scores") or []), reason=t.user_attrs.get("reason"))
            end = t.datetime_complete or t.datetime_start
            if t.datetime_start is not None and t.datetime_complete is not None:
                outcome.seconds = (t.datetime_complete - t.datetime_start).total_seconds()
            payload = trial_payload(outcome, int(end.timestamp() * 1000) if end is not None else _now_ms(), worker_id())
            payload["experiment_id"] = self.experiment_id
            payload["tags"]["mlflow.parentRunId"] = self.parent_id
            log_trial(self.client, payload)  # one-time work: here, not through the writer
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


def trial_metric_rows(outcome: TrialOutcome, start_ms: int, end_ms: int) -> list[tuple[str, float, int, int]]:
    """Every metric of a trial as plain ``(key, value, timestamp_ms, step)`` rows (logged in batches, never
    one call per step; plain so they can be sent to the writer process as JSON).

    Per seed ``i``: ``train_loss{sfx}`` at steps 1..steps_done and ``val_loss{sfx}``/``val_acc{sfx}`` at the
    checkpoints. Timestamps place each seed's steps evenly over its own training time, the seeds back to
    back and ending at ``end_ms`` (the host only reads the losses at checkpoints, so per-step times are
    not measured; this keeps MLflow's wall-time axis truthful to within a seed). The init diagnostics at
    step 0 and ``start_ms``; ``score``, ``seed_score_s{i}``, ``seconds`` at ``end_ms``.
    """
    rows: list[tuple[str, float, int, int]] = [(k, v, start_ms, 0) for k, v in signal_metrics(outcome.signals)]
    curves = list(outcome.curves)
    after = [sum(c.seconds for c in curves[i + 1:]) for i in range(len(curves))]
    for i, curve in enumerate(curves):
        sfx = seed_suffix(i)
        t_end = end_ms - 1000.0 * after[i]
        t_start = max(float(start_ms), t_end - 1000.0 * curve.seconds)
        n = max(len(curve.train_loss), 1)

        def at(step: int) -> int:
            return int(t_start + (t_end - t_start) * min(step, n) / n)

        key = f"train_loss{sfx}"
        rows.extend((key, float(loss), at(j + 1), j + 1) for j, loss in enumerate(curve.train_loss))
        for step, loss, acc in zip(curve.val_steps, curve.val_loss, curve.val_acc):
            rows.append((f"val_loss{sfx}", float(loss), at(step), int(step)))
            rows.append((f"val_acc{sfx}", float(acc), at(step), int(step)))
    if outcome.value is not None:
        rows.append(("score", float(outcome.value), end_ms, 0))
    for i, value in enumerate(outcome.seed_scores):
        rows.append((f"seed_score_s{i}", float(value), end_ms, 0))
    rows.append(("seconds", float(outcome.seconds), end_ms, 0))
    return rows


def trial_metrics(outcome: TrialOutcome, start_ms: int, end_ms: int) -> list[Any]:
    """``trial_metric_rows`` as ``mlflow.entities.Metric``s."""
    from mlflow.entities import Metric

    return [Metric(k, v, ts, step) for k, v, ts, step in trial_metric_rows(outcome, start_ms, end_ms)]


def trial_payload(outcome: TrialOutcome, end_ms: int, worker: str) -> dict[str, Any]:
    """Everything the child run of a trial holds, as plain JSON-able data (``mlflow_writer.log_trial``).

    The run ids (``experiment_id``, tag ``mlflow.parentRunId``) are filled in later, once the study's
    start is logged. ``worker`` is the study process's ``worker_id`` (tag ``initsearch.worker``: a resume
    closes the runs a dead worker left RUNNING), also when the writer process logs the run.
    """
    start_ms = end_ms - int(round(outcome.seconds * 1000))
    texts: dict[str, str] = {}
    if outcome.policy is not None:
        texts["policy.json"] = _json(outcome.policy)
    rows = signal_rows(outcome.signals)
    if rows:
        texts["init_signals.json"] = _json(rows)
    return {
        "number": outcome.number,
        "experiment_id": None,
        "run_name": trial_run_name(outcome),
        "start_ms": start_ms,
        "end_ms": end_ms,
        "tags": {**trial_tags(outcome, ""), "initsearch.worker": worker},
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
