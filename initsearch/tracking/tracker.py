"""MLflow tracking of a study: one parent run per study, one nested child run per trial.

Layout in MLflow (the experiment is named after the study):

- the **parent run** (tags ``initsearch.study=<name>``, ``initsearch.role=parent``) holds the composed config
  as params and as ``config.yaml``, and at the end the best scores, ``best_policy.json``, ``trials.csv`` and
  PNG plots. Re-running the same command (resume) finds it by those tags and attaches to it again;
- one **child run** per trial (tag ``mlflow.parentRunId``), baselines included (``initsearch.kind=baseline``,
  ``initsearch.baseline=<name>``; searched ones ``initsearch.kind=search``), with the sampled params, the
  per-step training loss, the validation checkpoints, the init diagnostics, the score and ``policy.json``.

``MlflowTracker`` implements the study's ``Tracker`` hooks. The study's thread only turns each
``TrialOutcome`` into a plain payload (``payload.trial_payload``) and queues it; everything else runs on the
tracker's logging thread (``delivery``), in order, and every MLflow call is made by the writer process
(``runs``: the study's start and end, each trial's run, what the figures read back), so the study's own
interpreter, which trains, never imports MLflow: the experiment and parent run (resume, closing dead
workers' runs, backfill) before any trial is sent; the trials; at the end of the study the results and
plots (drawn here from the curves the writer reads back). Without a writer, after it died or stopped
answering, and for the trials that probe a store that was down (``_log_here``), the thread makes the same
calls itself with its own client (importing MLflow then). A tracker that has a client anyway (a server's, opened
at start to check it) logs a queued trial itself while the study waits for the logs (``flush``,
``study_finished``) whenever the writer already has ``STEAL_BACKLOG`` trials in hand, so the last round of
a batched study is logged on both cores. ``close`` (also registered with ``atexit``) waits a bounded time.
Nothing here raises into the study: a failing MLflow call is one warning per outage (passwords of the
tracking URI shown as ``***``: MLflow quotes failing URLs); each MLflow call gives up after about
``tracking.retry_timeout`` seconds, and the trials MLflow misses wait in the spool (``spool``) for a later
try or a later run of the command, which logs each of them once (``_backfill``). ``make_tracker`` chooses the tracker of a ``tracking_uri`` and
fails early on a bad one.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from initsearch.errors import ConfigError, hide_password_of, redact_url
from initsearch.search.outcome import NullTracker, Tracker, TrialOutcome, trial_score
from initsearch.search.settings import StudySettings, TrackingSettings
from initsearch.search.workers import StudyLock, worker_alive, worker_id
from initsearch.tracking.delivery import (
    STALL_TIMEOUT_S,
    LoggingThread,
    WriterProcess,
    discard_prestarted_writer,
    writer_running_for,
)
from initsearch.tracking.payload import (
    SIGNALS_TABLE,
    TRAIN_LOSS,
    config_params,
    network_tags,
    parent_tags,
    redact_text,
    summary_metric_rows,
    summary_tags,
    trial_payload,
)
from initsearch.tracking.plots import (
    plot_importances,
    plot_init_signals,
    plot_scores,
    plot_training_curves,
    save_figure,
)
from initsearch.tracking.runs import STUDY_CALLS, ArtifactsNotLogged, log_trial, short_error
from initsearch.tracking.spool import Spool, spool_folder
from initsearch.tracking.uri import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    check_reachable,
    check_sqlite_store,
    default_artifact_location,
    is_http,
    make_parent_dir,
    open_client,
    resolve_tracking_uri,
    runs_page_url,
    ui_base,
)
from initsearch.tracking.writer import RETRY_EVERY_S, Outage, retry_env

log = logging.getLogger("initsearch")

CURVES_TOP = 3  # searched trials drawn against the baselines in training_curves.png
CLOSE_TIMEOUT_S = 60.0  # close() (interrupted, atexit): the longest wait for the queued logging
FINISH_TIMEOUT_S = 600.0  # study_finished: the same, with the end-of-study artifacts and plots
WRITER_EXIT_TIMEOUT_S = 45.0  # of which at most this long for the writer to log what it was sent
STEAL_BACKLOG = 2  # while the study waits: log a trial here when the writer holds this many unacknowledged
PROBE_S = 3.0  # an HTTP server's /health, asked before trying again after an outage
_RETRY_ENV_SET: set[str] = set()  # the MLflow retry variables this process set (the user's own are left alone)


def bound_retries(seconds: float) -> None:
    """Make MLflow's HTTP calls (here and in the writer, which inherits the environment) give up after
    about ``seconds`` instead of minutes (``writer.retry_env``); variables the user set are kept."""
    for key, value in retry_env(seconds).items():
        if key not in os.environ or key in _RETRY_ENV_SET:
            os.environ[key] = value
            _RETRY_ENV_SET.add(key)


def make_tracker(settings: StudySettings) -> Tracker:
    """The tracker of ``settings.tracking_uri``: ``NullTracker`` when off, else an ``MlflowTracker``.

    A local store that is not a readable MLflow database fails here, before any training (one ``ConfigError``
    line; one MLflow itself refuses later, e.g. of a newer schema, is an outage). An HTTP server that does
    not answer is one warning and the study runs: its trials wait in the spool and are logged when the
    server answers again (this run tries every ``RETRY_EVERY_S``, and the next run of the command logs
    what is left). A server that answers is opened here. A local SQLite store is only checked here, with
    the standard library (``check_sqlite_store``): the tracker's thread imports MLflow and opens it (created
    and migrated on first use, under the store's lock) while the first trials train, so a short study does
    not wait for MLflow at start. The writer process is started first, so that its MLflow import overlaps
    all this; it opens the store after this process has (nobody waits for that: the trials wait in the pipe).
    """
    uri = resolve_tracking_uri(settings.tracking_uri)
    if uri is None:
        discard_prestarted_writer()
        return NullTracker()
    hide_password_of(uri)  # MLflow's errors quote the failing request's URL: warnings show *** instead
    tracking = getattr(settings, "tracking", None) or TrackingSettings()
    bound_retries(tracking.retry_timeout)
    if is_http(uri):
        # A RestStore prints two "View run" lines per finished run; one link per study is enough (we log it).
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        try:
            check_reachable(uri, timeout=min(PROBE_S + 2.0, tracking.retry_timeout))
        except ConfigError as exc:
            return _offline(settings, uri, str(exc))
    elif uri.startswith("sqlite:///"):
        make_parent_dir(uri)
        check_sqlite_store(uri)
        writer = WriterProcess.launch(uri)  # importing MLflow there while the thread opens the store
        return MlflowTracker(None, uri, default_artifact_location(uri), writer=writer if writer is not None else False)
    writer = WriterProcess.launch(uri)  # importing MLflow there while this process opens the store
    try:
        client = open_client(uri)
    except BaseException as exc:
        if writer is not None:
            writer.kill()
        if is_http(uri) and isinstance(exc, ConfigError):
            return _offline(settings, uri, str(exc))
        raise
    return MlflowTracker(client, uri, default_artifact_location(uri), writer=writer if writer is not None else False)


def _offline(settings: StudySettings, uri: str, reason: str) -> MlflowTracker:
    """A tracker for a server that does not answer at start: one warning line; the study runs."""
    folder = spool_folder(settings)
    reason = reason.removeprefix("tracking_uri: ").removesuffix(" (start the server, or set tracking_uri=none)")
    log.warning("MLflow tracking: %s; the study runs without it: its trials are kept in %s and logged when the "
                "server answers (tried every %.0f s), or by the next run of this command", reason, folder,
                RETRY_EVERY_S)
    return MlflowTracker(None, uri, None, writer=True, down=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


class MlflowTracker:
    """Logs a study to MLflow through a writer process: the parent run and the trials' child runs
    (``writer=False``, or when the writer cannot start or dies: on a background thread of this process,
    with its own ``MlflowClient``).

    The three hooks only build plain payloads and enqueue them (with the wall-clock time they were called
    at, so the runs keep the trials' real start and end times); nothing here raises into the study.

    Outages: each trial is kept in the study's spool (``spool.Spool``) until MLflow has its run. The first
    failing call of an outage is one warning saying what happens; while the store is down (``Outage``)
    trials only go to the spool, and every ``RETRY_EVERY_S`` one is tried again (the study-level start
    too, when the server was down from the beginning). What is left is logged by the next run of the
    command (``_backfill``), each trial once; ``not_in_mlflow`` counts it at the end.
    """

    def __init__(self, client: Any, uri: str, artifact_location: str | None = None,
                 writer: bool | WriterProcess = True, down: bool = False) -> None:
        """``writer``: a started ``WriterProcess`` (``make_tracker`` starts it before opening the store, so
        its MLflow import overlaps that; it opens the store once this process has), ``True`` to start one
        when the study starts, ``False`` to log the trials on the thread. ``client`` ``None``: the thread
        opens it first (``_connected``). ``down``: the server did not answer at start (the client is opened
        when the server answers)."""
        self.client = client
        self.uri = uri
        self.artifact_location = artifact_location
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.runs_url: str | None = None  # the experiment's runs table in the MLflow UI, once the study started
        self.figures: list[Path] = []  # the end-of-study plots written into the run folder
        self.use_writer = bool(writer)
        self.writer: WriterProcess | None = None
        self.outage = Outage()
        if down:
            self.outage.failed()  # make_tracker warned
        self.spool: Spool | None = None
        self.flush_timeout: float | None = None  # tracking.flush_timeout, once the study started
        self.not_in_mlflow = 0  # trials of the study kept in the spool when the tracker closed
        self._thread = LoggingThread(on_failure=self._call_failed)
        self._worker_tag = worker_id()
        self._owner = uuid.uuid4().hex  # this tracker, in the spool: another one of this process is done
        self._start_args: tuple[Any, ...] | None = None
        self._study: Any = None
        self._orphans: list[dict[str, Any]] = []
        self._orphans_lock = threading.Lock()
        self._payload_cpu_s = 0.0  # the study's thread, building trial payloads
        self._here_cpu_s = 0.0  # the tracker's thread, logging trials itself (no writer)
        self._finished = False
        self._closed = False
        self._report = True  # say at the end how many trials MLflow misses (not in helper workers)
        self._artifacts_warned = False
        self._draining = False  # the study waits for the logs: the thread helps the writer (``_log_trial``)
        self.logged_here = 0  # trials this process logged itself (no writer, its orphans, or helping it)
        self.backfilled = 0  # trials an earlier run left out, logged by this one
        self._queued: set[int] = set()  # trials this tracker was given (``trial_finished``): never backfilled
        self._backfilled_numbers: set[int] = set()  # a trial given after its backfill is not logged twice
        self._logged_before: set[str] = set()  # trials with a finished run when the study (re)started
        self._writer_stalled = False  # the writer answered nothing for a while: study calls are made here
        atexit.register(self.close)
        if isinstance(writer, WriterProcess):
            self._attach_writer(writer)
            if client is not None:  # else once the thread has opened the store (``_connected``)
                writer.open_store(None)

    # -- hooks (the study's thread) --
    def study_started(self, settings: StudySettings, config_yaml: str, study: Any) -> None:
        self._worker_tag = worker_id()
        folder = spool_folder(settings)
        self.spool = Spool(folder) if folder is not None else None
        tracking = getattr(settings, "tracking", None)
        self.flush_timeout = getattr(tracking, "flush_timeout", None)
        if self.use_writer and self.writer is None:
            self._start_writer()
        self._start_args = (settings, config_yaml, study.study_name, _now_ms())
        self._study = study
        self._thread.submit(self._connect)

    def trial_finished(self, outcome: TrialOutcome) -> None:
        """Build the trial's payload here and queue it; the thread keeps it in the spool and sends it."""
        started = time.thread_time()
        try:
            payload = trial_payload(outcome, _now_ms(), self._worker_tag)
        except Exception as exc:
            log.warning("MLflow tracking: trial %s not logged (%s)", outcome.number,
                        short_error(exc))
            return
        finally:
            self._payload_cpu_s += time.thread_time() - started
        self._queued.add(outcome.number)
        self._thread.submit(self._log_trial, payload)

    def study_finished(self, study: Any, summary: Any, policy_path: Any) -> None:
        """Log the end-of-study results once every trial is logged (the training-curves plot reads them
        back), then stop the thread and the writer (this blocks, at most ``tracking.flush_timeout``)."""
        self._finished = True
        self._draining = True
        self._thread.submit(self._await_writer)
        self._thread.submit(self._redeliver)
        self._thread.submit(self._finish, study, summary, None if policy_path is None else Path(policy_path))
        self._close(FINISH_TIMEOUT_S, patient=True)

    def flush(self) -> bool:
        """Block until everything enqueued so far is logged (the writer's acknowledgements included), at most
        about ``STALL_TIMEOUT_S`` seconds longer than the writer keeps answering; ``False`` (and a warning)
        when it gave up waiting, e.g. for a stopped writer whose full pipe blocks the sending thread."""
        self._draining = True
        self._thread.submit(self._await_writer)
        if self._thread.drain(STALL_TIMEOUT_S + 1.0):
            return True
        log.warning("MLflow tracking: flush gave up after %.0f s; the writer is not taking the queued trials",
                    STALL_TIMEOUT_S + 1.0)
        return False

    @property
    def tracking_cpu_s(self) -> dict[str, float]:
        """CPU seconds spent so far, per kind: the tracker's thread per call (``_start``, ``_finish``...),
        ``trial_finished`` (the study's thread building payloads), ``_send_trial`` (the thread sending them),
        ``_log_trial`` (logging the trials: the writer's CPU for them, plus this process's when it logged
        some itself) and ``writer`` (the writer process in all, its start included)."""
        cpu = dict(self._thread.cpu_s)
        thread = cpu.pop("_log_trial", 0.0)  # the thread's step: send to the writer, or log here
        cpu["_send_trial"] = max(thread - self._here_cpu_s, 0.0)
        cpu["trial_finished"] = self._payload_cpu_s
        cpu["_log_trial"] = (self.writer.trial_cpu_s if self.writer is not None else 0.0) + self._here_cpu_s
        cpu["writer"] = self.writer.cpu_s if self.writer is not None else 0.0
        return cpu

    def detach(self, report: bool = False) -> None:
        """Drain and stop without touching the parent run (another process of the study finishes it);
        ``report``: say how many trials MLflow misses (a helper worker leaves that to its main process)."""
        self._finished = True
        self._report = report
        self.close()

    def close(self) -> None:
        """Drain and stop the thread and the writer (at most ``CLOSE_TIMEOUT_S``). A parent whose study did
        not finish (interrupted, or no trial finished) is marked KILLED; running the command again sets it
        RUNNING and continues it."""
        self._close(CLOSE_TIMEOUT_S)

    def _close(self, timeout: float, patient: bool = False) -> None:
        """Stop the thread and the writer, waiting at most ``tracking.flush_timeout`` (else ``timeout``);
        ``patient`` (the end of a study): as long as the store answers, up to ``timeout`` for the results."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        limit = timeout if self.flush_timeout is None else min(timeout, self.flush_timeout)
        if not self._finished:
            self._thread.submit(self._abandon)
        self._thread.submit(self._close_writer)
        started = time.monotonic()
        stopped = self._thread.stop(limit)
        while not stopped and patient and not self.outage.down and time.monotonic() - started < timeout:
            stopped = self._thread.join(1.0)
        timeout = time.monotonic() - started
        if not stopped:
            # The thread may be blocked writing to a stuck writer's pipe (holding its lock), or on a store
            # that does not answer: leave both; the pipe closes when this process exits, and the writer then
            # logs what it got and exits too. The spool keeps what MLflow did not get.
            log.warning("MLflow tracking: still busy after %.0f s; not waiting for it any longer", timeout)
        elif self.writer is not None and not self.writer.closing:
            self.writer.close_input()  # the thread skipped _close_writer: EOF
            self.writer.wait_exit(min(WRITER_EXIT_TIMEOUT_S, 5.0))  # and reap it (it only acknowledges by now)
        self._report_missing()

    def _report_missing(self) -> None:
        """One line at the end when trials of the study are not in MLflow yet (kept in the spool)."""
        if self.spool is None:
            return
        self.not_in_mlflow = len(self.spool)
        if self.not_in_mlflow and self._report:
            log.warning("MLflow tracking: %d trials not yet in MLflow (kept in %s); the next run of this command "
                        "with %s reachable logs them (tracking_only=true: without running trials)",
                        self.not_in_mlflow, self.spool.folder, redact_url(self.uri))

    # -- outages --
    def _went_down(self, what: str, error: str) -> None:
        """A failed call: the first of an outage is one warning saying what happens; the others debug."""
        if not self.outage.failed():
            log.debug("MLflow tracking: %s failed (%s)", what, error)
            return
        where = f"kept in {self.spool.folder}" if self.spool is not None and self.spool.broken is None else "kept"
        log.warning("MLflow tracking: %s failed (%s); the study goes on: the trials MLflow misses are %s and "
                    "logged when it answers (tried every %.0f s), or by the next run of this command",
                    what, error, where, RETRY_EVERY_S)

    def _call_failed(self, name: str, exc: Exception) -> None:
        self._went_down(name, short_error(exc))

    def _recovered(self) -> None:
        if self.outage.recovered():
            log.warning("MLflow tracking: %s answers again; logging the trials it missed", redact_url(self.uri))

    def _store_answers(self) -> bool:
        """Whether to try the store now: it is not known to be down, or it is time to try again and (an
        HTTP server) its /health answers. Each try that fails waits ``RETRY_EVERY_S`` for the next."""
        if not self.outage.down:
            return True
        if not self.outage.should_try():
            return False
        if is_http(self.uri):
            try:
                check_reachable(self.uri, timeout=PROBE_S)
            except ConfigError as exc:
                self._went_down("reaching the server", str(exc).removeprefix("tracking_uri: "))
                return False
        self.outage.next_try = time.monotonic() + self.outage.retry_every  # one try per interval
        return True

    def _artifacts_missing(self, error: str) -> None:
        if not self._artifacts_warned:
            self._artifacts_warned = True
            log.warning("MLflow tracking: %s; the trials' runs hold everything else", error)

    # -- the writer (study's thread to start it; the tracker's thread for the rest) --
    def _start_writer(self) -> None:
        writer = WriterProcess.launch(self.uri)
        if writer is not None:
            self._attach_writer(writer)

    def _attach_writer(self, writer: WriterProcess) -> None:
        self.writer = writer
        writer.bind(self._on_ack, self._on_writer_death)

    def _on_ack(self, ack: dict[str, Any]) -> None:
        """The reader thread: a delivered trial leaves the spool; a failure starts (or continues) an outage.
        (A study call's answer goes to its caller, ``_study_call``.)"""
        if ack.get("op") == "study":
            return
        number = ack.get("number")
        if ack.get("delivered", True):
            if number is not None and self.spool is not None:
                self.spool.drop(number)
            if ack.get("error"):
                self._artifacts_missing(str(ack["error"]))
            elif number is not None:
                self._recovered()
        elif ack.get("error"):
            self._went_down("logging", str(ack["error"]))

    def _on_writer_death(self, reason: str, orphans: list[dict[str, Any]]) -> None:
        """The writer ended unasked: one warning; what it did not acknowledge is logged here (the thread
        picks them up before its next trial, or in ``flush``/``close``), as are the later trials."""
        log.warning("MLflow tracking: the writer process (pid %s) %s; logging %s in this process instead",
                    self.writer.pid if self.writer is not None else "?", reason,
                    f"its {len(orphans)} unacknowledged trials and the next ones" if orphans else "the next trials")
        with self._orphans_lock:
            self._orphans.extend(orphans)

    def _log_trial(self, payload: dict[str, Any]) -> None:
        """The thread's step for one trial: keep it in the spool, fill in the run ids (known once the study's
        start is logged) and hand it to the writer, or log it here when there is none (``scripts/bench.py``
        times this method). While the store is down it stays in the spool."""
        if self.spool is not None:
            self.spool.keep(payload, self._worker_tag, self._owner)
        if not self._connected():
            return
        if payload["number"] in self._backfilled_numbers:  # a dead worker's trial, failed here and backfilled
            if self.spool is not None:
                self.spool.drop(payload["number"])
            return
        probe = self.outage.down
        if probe and not self._store_answers():
            return
        payload["experiment_id"] = self.experiment_id
        payload["tags"]["mlflow.parentRunId"] = self.parent_id
        self._log_orphans()
        helping = (self._draining and self.client is not None and self.writer is not None
                   and self.writer.unacknowledged >= STEAL_BACKLOG)
        if probe:
            payload["retry"] = True  # tried before the outage was seen? then it may be there
        if self.writer is None or helping or probe or not self.writer.send_trial(payload):
            self._log_here(payload)

    def _log_here(self, payload: dict[str, Any]) -> None:
        """Log one trial on this thread (``retry``: unless it already has a run); it leaves the spool."""
        started = time.thread_time()
        try:
            log_trial(self._local_client(), payload, check_existing=bool(payload.get("retry")))
        except ArtifactsNotLogged as exc:
            self._artifacts_missing(f"artifacts not stored ({exc})")
        finally:
            self._here_cpu_s += time.thread_time() - started
        self.logged_here += 1
        if self.spool is not None:
            self.spool.drop(payload["number"])
        self._recovered()

    def _log_orphans(self) -> None:
        """Log here the trials a dead writer did not acknowledge (a failure leaves them in the spool)."""
        while True:
            with self._orphans_lock:
                if not self._orphans:
                    return
                payload = self._orphans.pop(0)
            payload["retry"] = True
            try:
                self._log_here(payload)
            except Exception as exc:
                self._went_down(f"log_trial (trial {payload.get('number')})", short_error(exc))

    def _await_writer(self) -> None:
        """Wait until the writer acknowledged every trial sent (or died: then log the rest here)."""
        if self.writer is not None and not self.writer.wait_acknowledged():
            log.warning("MLflow tracking: the writer process (pid %d) answered nothing for %.0f s; not waiting "
                        "for its %d trials", self.writer.pid, STALL_TIMEOUT_S, self.writer.unacknowledged)
            self._writer_stalled = True  # the study's own calls are made here from now on
        self._log_orphans()
        self._draining = self._finished  # after a flush, later trials go to the writer again

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

    # -- connecting, and what earlier runs left out --
    def _connect(self) -> None:
        """The thread's first step: the study's start (experiment, parent run), then the backfill."""
        self._connected()

    def _connected(self) -> bool:
        """Whether the study's start is logged (the parent run known); when not, and the store may answer,
        log it now (the writer, or this process without one, opens the store, under its lock for a local
        one), then the backfill. ``False`` leaves the trials in the spool."""
        if self.parent_id is not None:
            return True
        if self._start_args is None or not self._store_answers():
            return False
        with StudyLock(self.uri, None, "mlflow") if self.starts_alone else contextlib.nullcontext():
            try:
                self._start(*self._start_args)
            except Exception as exc:
                self._went_down("logging the study's start", _why(exc))
                return False
            self._recovered()
            try:
                if self._backfill(self._study) and self.writer is not None:
                    self.writer.wait_acknowledged()  # logged before another worker, under the lock, looks
            except Exception as exc:  # the trials not logged stay where they are, for the next run
                log.warning("MLflow tracking: logging the trials earlier runs left out failed (%s)", _why(exc))
        return True

    def _study_call(self, call: str, /, stall_timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """One of ``runs.STUDY_CALLS`` (the parent run's start and end, the figures' data): made by the
        writer process, so this one never imports MLflow; here when there is no writer, it died, or it
        answered nothing for ``stall_timeout`` s (``STALL_TIMEOUT_S``), now or before."""
        if self.writer is not None and not self.writer.dead and not self._writer_stalled:
            try:
                ack = self.writer.call(call, args, STALL_TIMEOUT_S if stall_timeout is None else stall_timeout)
            except TimeoutError as exc:
                log.warning("MLflow tracking: %s; making the study's calls in this process", exc)
                self._writer_stalled = True
                ack = None
            if ack is not None:
                if not ack.get("delivered"):
                    raise WriterCallFailed(str(ack.get("error")))
                return ack.get("result") or {}
        return STUDY_CALLS[call](self._local_client(), **args)

    def _local_client(self) -> Any:
        """This process's own ``MlflowClient`` (importing MLflow here), opened on first use: logging without
        a writer, or after it died or stalled. Without a writer the first use is the study's start, which
        ``_connected`` makes under the store's lock (it creates a new store)."""
        if self.client is None:
            self.client = open_client(self.uri)
        return self.client

    def open_store_now(self, timeout: float = 30.0) -> None:
        """Have the writer open the store now and wait for it (up to ``timeout`` s), or open it here when
        there is no writer: what the start of the study does first otherwise. For ``scripts/bench.py``,
        which times a study without the store's opening (as it times the hand-written loop)."""
        with StudyLock(self.uri, None, "mlflow") if self.starts_alone else contextlib.nullcontext():
            if self.writer is not None and not self.writer.dead:
                self.writer.open_store(timeout)
            else:
                self._local_client()

    @property
    def starts_alone(self) -> bool:
        """Whether the study's start (creating the store, finding or creating the parent run, the backfill)
        is kept to one process at a time by the store's own lock: a local SQLite store, which only this
        machine's workers share. Then the study need not wait for it under the study lock (``flush`` in
        ``run_study``): its first trials train while the thread imports MLflow and opens the store."""
        return self.uri.startswith("sqlite:///")

    def _redeliver(self) -> None:
        """At the end of the study: this process's trials still in the spool (the store was down), logged
        now when it answers again."""
        if self.spool is None:
            return
        entries = [(n, e) for n, e in ((n, self.spool.load(n)) for n in self.spool.numbers())
                   if e is not None and e[1] == self._owner]
        if not entries or not self._connected() or not self._store_answers():
            return
        for number, entry in entries:
            payload = entry[2]
            payload["experiment_id"] = self.experiment_id
            payload["tags"]["mlflow.parentRunId"] = self.parent_id
            payload["retry"] = True
            self._log_here(payload)  # a failure ends the loop: the outage goes on

    # -- the logging thread's side --
    def _start(self, settings: StudySettings, config_yaml: str, name: str, started_ms: int) -> None:
        """Find or create the experiment and the parent run (started at ``started_ms``, when the study
        started) and log the config (``runs.start_study``). On resume, delete the child runs that dead
        workers left RUNNING, half logged (``_backfill`` then logs those trials again), and note which
        trials already have a run."""
        yaml_text = redact_text(config_yaml, (settings.storage, settings.tracking_uri or ""))
        started = self._study_call(
            "start_study", name=name, started_ms=started_ms, params=config_params(yaml_text), tags=parent_tags(settings),
            yaml_text=yaml_text, artifact_location=self.artifact_location,
            experiment_tags={"initsearch.study": name, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if started.get("artifact_error"):
            self._artifacts_missing(str(started["artifact_error"]))
        if started.get("restored"):
            log.warning("MLflow: experiment %r had been deleted; restored it to continue the study", name)
        self.experiment_id, self.parent_id = str(started["experiment_id"]), str(started["parent_id"])
        self.runs_url = runs_page_url(ui_base(self.uri), self.experiment_id, settings.score.direction)
        self._logged_before = set(started.get("logged") or [])
        dead = [run_id for run_id, worker in started.get("running_children") or []
                if worker and worker_alive(worker) is False and not writer_running_for(worker)]
        if dead:  # runs of live or remote workers stay
            self._study_call("delete_runs", run_ids=dead)
        log.info("MLflow: study %r %s parent run %s in %s (UI: %s)", name, "resumes" if started.get("resumed") else "->",
                 self.parent_id, redact_url(self.uri), self.runs_url)

    def _finish(self, study: Any, summary: Any, policy_path: Path | None) -> None:
        """Headline metrics, best_policy.json, trials.csv, selection.csv and the plots on the parent (the plots also next to
        the exported policy, in the run folder: ``figures`` lists them); parent FINISHED."""
        if not self._connected() or not self._store_answers():
            raise RuntimeError("the store is down; the next run of this command logs the end of the study")
        if self.parent_id is None:
            raise RuntimeError("no parent run (the study's start was not logged); end of study skipped")
        tags = {**summary_tags(summary), **network_tags(study)}
        with tempfile.TemporaryDirectory(prefix="initsearch-mlflow-") as tmp:
            folder = Path(tmp)
            if policy_path is not None and policy_path.is_file():
                (folder / "best_policy.json").write_bytes(policy_path.read_bytes())
                # written by the command, next to the policy (the front: a multi-objective study's)
                for written in (policy_path.with_suffix(".png"), policy_path.parent / "pareto_front.png",
                                policy_path.parent / "selection.csv"):
                    if written.is_file():
                        (folder / written.name).write_bytes(written.read_bytes())
            summary.table.to_csv(folder / "trials.csv", index=False)
            self._plots(study, summary, folder)
            if policy_path is not None and policy_path.parent.is_dir():
                for png in sorted(folder.glob("*.png")):
                    target = policy_path.parent / png.name
                    if target.exists():
                        continue
                    target.write_bytes(png.read_bytes())
                    self.figures.append(target)
            ended = self._study_call("finish_study", parent_id=self.parent_id, tags=tags, folder=str(folder),
                                     metrics=summary_metric_rows(summary, _now_ms()), end_ms=_now_ms())
            if ended.get("artifact_error"):
                self._artifacts_missing(str(ended["artifact_error"]))

    def _plots(self, study: Any, summary: Any, folder: Path) -> None:
        """Each plot on its own: one that cannot be drawn is skipped (debug log), the others still come.
        The curves and init signals are read back from the child runs (``runs.figure_data``): the best few
        complete searched trials that trained (one that re-proposed an already scored policy did not) and
        every baseline, so trials logged by an earlier, resumed process are drawn too."""
        table = summary.table
        searched = [int(n) for n in table[(table["kind"] == "search") & (table["state"] == "complete")]["trial"]]
        baselines = [[f"{kind} (baseline)", int(n)] for n, kind in zip(table["trial"], table["kind"]) if kind != "search"]
        shown = self._study_call("figure_data", experiment_id=self.experiment_id, parent_id=self.parent_id,
                                 searched=searched, baselines=baselines, top=CURVES_TOP, curve_key=TRAIN_LOSS,
                                 signals_file=SIGNALS_TABLE)
        plots: list[tuple[str, Callable[[], Any]]] = [
            ("score_by_trial.png", lambda: plot_scores(table, summary.metric, summary.direction)),
            ("training_curves.png", lambda: plot_training_curves(shown["curves"], summary.metric)),
            ("init_signals.png", lambda: plot_init_signals(shown["signals"])),
            ("param_importances.png", lambda: plot_importances(study, summary.metric)),
        ]
        for name, draw in plots:
            try:
                fig = draw()
            except Exception as exc:
                log.debug("MLflow: %s skipped (%s: %s)", name, type(exc).__name__, exc)
                continue
            if fig is not None:
                save_figure(fig, folder / name)

    # -- on resume: what earlier runs left behind --
    def _backfill(self, study: Any) -> int:
        """A child run for each finished trial that has none and whose worker process (and its writer) is
        gone: from the spool when the trial is there (everything, curves included), else from what the study
        stored (state, score, per-seed scores, params, reason, policy; no curves). Each trial once: a spool
        entry whose trial already has a finished run is only removed. Runs under the study lock (and waits
        for the writer to log them), so two workers starting together do not both log one. Returns how many
        it logged or sent."""
        if self.parent_id is None or study is None:
            return 0
        before = self.backfilled
        logged = set(self._logged_before)

        def gone(worker: str, owner: str = "") -> bool:
            """The process is gone with its writer (or it is this one, and the trial another, closed tracker's)."""
            if worker == self._worker_tag:
                return bool(owner) and owner != self._owner
            return worker_alive(worker) is False and not writer_running_for(worker)

        spooled: set[int] = set()
        for number in self.spool.numbers() if self.spool is not None else []:
            entry = self.spool.load(number)
            if entry is None:
                continue
            worker, owner, payload = entry
            if str(number) in logged:
                self.spool.drop(number)
                continue
            spooled.add(number)
            if gone(worker, owner):
                if not self._log_backfill(payload):  # (the writer's acknowledgement takes it out of the spool)
                    self.spool.drop(number)
                logged.add(str(number))
        states = {"COMPLETE": "complete", "PRUNED": "pruned"}
        for t in study.get_trials(deepcopy=False) if hasattr(study, "get_trials") else []:
            worker = t.user_attrs.get("worker")
            if (str(t.number) in logged or t.number in spooled or t.number in self._queued or not t.state.is_finished()
                    or not isinstance(worker, str)):
                continue  # (a trial given to this tracker is logged from its payload)
            if not gone(worker):
                continue  # a live (or remote) worker logs its own trials
            outcome = TrialOutcome(t.number, t.user_attrs.get("baseline"), dict(t.params), policy=t.user_attrs.get("policy"),
                                   state=states.get(t.state.name, "failed"), value=trial_score(t),
                                   seed_scores=list(t.user_attrs.get("seed_scores") or []), reason=t.user_attrs.get("reason"),
                                   n_params=t.user_attrs.get("n_params"))
            end = t.datetime_complete or t.datetime_start
            if t.datetime_start is not None and t.datetime_complete is not None:
                outcome.seconds = (t.datetime_complete - t.datetime_start).total_seconds()
            self._backfilled_numbers.add(t.number)
            self._log_backfill(trial_payload(outcome, int(end.timestamp() * 1000) if end is not None else _now_ms(), worker))
        return self.backfilled - before

    def _log_backfill(self, payload: dict[str, Any]) -> bool:
        """One trial an earlier run left out: sent to the writer (``True``) or logged here; in both cases
        unless it already has a finished run."""
        payload["experiment_id"] = self.experiment_id
        payload["tags"]["mlflow.parentRunId"] = self.parent_id
        payload["retry"] = True
        self.backfilled += 1
        if self.writer is not None and self.writer.send_trial(payload):
            return True
        try:
            log_trial(self._local_client(), payload, check_existing=True)
        except ArtifactsNotLogged as exc:
            self._artifacts_missing(f"artifacts not stored ({exc})")
        return False

    def _abandon(self) -> None:
        """The process ends without ``study_finished``: mark the parent KILLED (a resume sets it RUNNING),
        once the writer has logged the trials it holds (waiting for it at most ``WRITER_EXIT_TIMEOUT_S``,
        as for its exit; then here), so that a resume started after this process ended finds it KILLED."""
        if self.parent_id is not None and not self.outage.down:
            self._study_call("abandon_study", parent_id=self.parent_id, end_ms=_now_ms(),
                             stall_timeout=WRITER_EXIT_TIMEOUT_S)


class WriterCallFailed(Exception):
    """A study-level call the writer process made failed; the message is its one-line error."""


def _why(exc: Exception) -> str:
    """One line for a failed call: the writer's own line, or ``short_error``'s."""
    return str(exc) if isinstance(exc, WriterCallFailed) else short_error(exc)

