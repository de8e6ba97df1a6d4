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
tracker's logging thread (``delivery``), in order: the experiment and parent run (resume, closing dead
workers' runs, backfill) before any trial is sent; the trials, handed to the writer process; at the end
of the study, once the writer has acknowledged every trial (the training-curves plot reads them back),
the results and plots. While the study waits for the logs (``flush``, ``study_finished``) the thread logs a
queued trial itself whenever the writer already has ``STEAL_BACKLOG`` trials in hand, so the last round of
a batched study is logged on both cores. ``close`` (also registered with ``atexit``) waits a bounded time.
Nothing here raises into the study: a failing MLflow call is a warning (passwords of the tracking URI
shown as ``***``: MLflow quotes failing URLs), and after ``MAX_FAILURES`` failures in a row tracking turns
itself off for the rest of the process. ``make_tracker`` chooses the tracker of a ``tracking_uri`` and
fails early on a bad one.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from initsearch.errors import first_line, hide_password_of, redact_url
from initsearch.search.outcome import NullTracker, Tracker, TrialOutcome
from initsearch.search.settings import StudySettings
from initsearch.search.workers import worker_alive, worker_id
from initsearch.tracking.delivery import STALL_TIMEOUT_S, LoggingThread, WriterProcess, writer_running_for
from initsearch.tracking.payload import (
    SIGNALS_TABLE,
    TRAIN_LOSS,
    clip,
    config_params,
    network_tags,
    parent_tags,
    redact_text,
    summary_metrics,
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
from initsearch.tracking.uri import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    check_reachable,
    default_artifact_location,
    is_http,
    make_parent_dir,
    open_client,
    resolve_tracking_uri,
    runs_page_url,
    ui_base,
)
from initsearch.tracking.writer import MAX_FAILURES, MAX_TAG_VALUE, log_in_batches, log_trial

log = logging.getLogger("initsearch")

CURVES_TOP = 3  # searched trials drawn against the baselines in training_curves.png
CLOSE_TIMEOUT_S = 60.0  # close() (interrupted, atexit): the longest wait for the queued logging
FINISH_TIMEOUT_S = 600.0  # study_finished: the same, with the end-of-study artifacts and plots
WRITER_EXIT_TIMEOUT_S = 45.0  # of which at most this long for the writer to log what it was sent
STEAL_BACKLOG = 2  # while the study waits: log a trial here when the writer holds this many unacknowledged
WRITER_READY_TIMEOUT_S = 30.0  # make_tracker: the longest wait for the writer to import MLflow and open the store


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
    if is_http(uri):
        check_reachable(uri)
        # A RestStore prints two "View run" lines per finished run; one link per study is enough (we log it).
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    elif uri.startswith("sqlite:///"):
        make_parent_dir(uri)
    writer = WriterProcess.launch(uri)  # importing MLflow there while this process opens the store
    try:
        client = open_client(uri)
    except BaseException:
        if writer is not None:
            writer.kill()
        raise
    return MlflowTracker(client, uri, default_artifact_location(uri), writer=writer if writer is not None else False)


def _now_ms() -> int:
    return int(time.time() * 1000)


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
        self.runs_url: str | None = None  # the experiment's runs table in the MLflow UI, once the study started
        self.figures: list[Path] = []  # the end-of-study plots written into the run folder
        self.use_writer = bool(writer)
        self.writer: WriterProcess | None = None
        self._thread = LoggingThread()
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
        self._thread.submit(self._start, settings, config_yaml, study.study_name, _now_ms())
        self._thread.submit(self._backfill, study)

    def trial_finished(self, outcome: TrialOutcome) -> None:
        """Build the trial's payload here and queue it; the thread sends it to the writer."""
        if self._thread.disabled:
            return
        started = time.thread_time()
        try:
            payload = trial_payload(outcome, _now_ms(), self._worker_tag)
        except Exception as exc:
            log.warning("MLflow tracking: trial %s not logged (%s)", outcome.number,
                        first_line(exc, with_type=True, limit=300))
            return
        finally:
            self._payload_cpu_s += time.thread_time() - started
        self._thread.submit(self._log_trial, payload)

    def study_finished(self, study: Any, summary: Any, policy_path: Any) -> None:
        """Log the end-of-study results once every trial is logged (the training-curves plot reads them
        back), then stop the thread and the writer (this blocks, at most ``FINISH_TIMEOUT_S``)."""
        self._finished = True
        self._draining = True
        self._thread.submit(self._await_writer)
        self._thread.submit(self._eof_writer)  # nothing left to send: it exits while the plots are drawn
        self._thread.submit(self._finish, study, summary, None if policy_path is None else Path(policy_path))
        self._close(FINISH_TIMEOUT_S)

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

    def detach(self) -> None:
        """Drain and stop without touching the parent run (another process of the study finishes it)."""
        self._finished = True
        self.close()

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
        self._thread.submit(self._close_writer)
        if not self._finished:
            self._thread.submit(self._abandon)
        if not self._thread.stop(timeout):
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
            self._thread.disable(MAX_FAILURES)

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
            except Exception as exc:
                log.warning("MLflow tracking: log_trial failed (trial %s: %s)", payload.get("number"),
                            first_line(exc, with_type=True, limit=300))

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

    # -- the logging thread's side --
    def _start(self, settings: StudySettings, config_yaml: str, name: str, started_ms: int) -> None:
        """Find or create the experiment and the parent run (started at ``started_ms``, when the study
        started); log the config (params, tags, config.yaml). On resume, new config keys become params and
        changed ones are listed in the tag ``initsearch.resumed_with`` (MLflow params cannot change)."""
        client = self.client
        self.experiment_id = self._experiment(name)
        self.runs_url = runs_page_url(ui_base(self.uri), self.experiment_id, settings.score.direction)
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
            log.info("MLflow: study %r -> parent run %s in %s (UI: %s)", name, self.parent_id, redact_url(self.uri),
                     self.runs_url)
            return
        self.parent_id = parent.info.run_id
        client.update_run(self.parent_id, status="RUNNING")
        logged = parent.data.params
        new = [(k, v) for k, v in params if k not in logged]
        changed = [f"{k}={v}" for k, v in params if k in logged and logged[k] != v]
        tags["initsearch.resumed_with"] = clip(" ".join(changed) or "(same config)", MAX_TAG_VALUE)
        log_in_batches(client, self.parent_id, params=new, tags=tags)
        self._resumed = True
        self._close_dead_children()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        client.log_text(self.parent_id, yaml_text, f"resumes/config-{stamp}.yaml")
        log.info("MLflow: study %r resumes parent run %s in %s (UI: %s)", name, self.parent_id, redact_url(self.uri),
                 self.runs_url)

    def _experiment(self, name: str) -> str:
        """The experiment named after the study: found, restored when it was deleted, or created; marked as
        model development (``uri.EXPERIMENT_KIND_TAG``) so MLflow's UI shows its runs, not a GenAI page."""
        client = self.client
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=self.artifact_location,
                                                tags={"initsearch.study": name, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except Exception:
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            log.warning("MLflow: experiment %r was deleted; restoring it to continue the study", name)
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:  # created before initsearch set it
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    def _find_parent(self, name: str) -> Any:
        """The oldest active parent run of study ``name`` in the experiment, or ``None``."""
        runs = search_all(self.client, self.experiment_id, "tags.`initsearch.role` = 'parent'",
                          order_by=["attributes.start_time ASC"])
        matches = [r for r in runs if r.data.tags.get("initsearch.study") == name]
        return matches[0] if matches else None

    def _finish(self, study: Any, summary: Any, policy_path: Path | None) -> None:
        """Headline metrics, best_policy.json, trials.csv and the plots on the parent (the plots also next to
        the exported policy, in the run folder: ``figures`` lists them); parent FINISHED."""
        if self.parent_id is None:
            raise RuntimeError("no parent run (the study's start was not logged); end of study skipped")
        client = self.client
        tags = {**summary_tags(summary), **network_tags(study)}
        log_in_batches(client, self.parent_id, metrics=summary_metrics(summary, _now_ms()), tags=tags)
        with tempfile.TemporaryDirectory(prefix="initsearch-mlflow-") as tmp:
            folder = Path(tmp)
            if policy_path is not None and policy_path.is_file():
                (folder / "best_policy.json").write_bytes(policy_path.read_bytes())
                picture = policy_path.with_suffix(".png")  # drawn by the command, next to the policy
                if picture.is_file():
                    (folder / picture.name).write_bytes(picture.read_bytes())
            summary.table.to_csv(folder / "trials.csv", index=False)
            self._plots(study, summary, folder)
            if policy_path is not None and policy_path.parent.is_dir():
                for png in sorted(folder.glob("*.png")):
                    target = policy_path.parent / png.name
                    if target.exists():
                        continue
                    target.write_bytes(png.read_bytes())
                    self.figures.append(target)
            client.log_artifacts(self.parent_id, str(folder))
        client.set_terminated(self.parent_id, status="FINISHED", end_time=_now_ms())

    def _plots(self, study: Any, summary: Any, folder: Path) -> None:
        """Each plot on its own: one that cannot be drawn is skipped (debug log), the others still come."""
        runs = self._shown_runs(summary)
        plots: list[tuple[str, Callable[[], Any]]] = [
            ("score_by_trial.png", lambda: plot_scores(summary.table, summary.metric, summary.direction)),
            ("training_curves.png", lambda: plot_training_curves(self._curve_histories(runs), summary.metric)),
            ("init_signals.png", lambda: plot_init_signals(self._signal_rows(runs))),
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

    def _shown_runs(self, summary: Any) -> dict[str, Any]:
        """The runs the figures compare, by legend label: the best few complete searched trials that
        trained (one that re-proposed an already scored policy did not) and every baseline, read back from
        MLflow, so trials logged by an earlier, resumed process are drawn too."""
        table = summary.table
        children = search_all(self.client, self.experiment_id, f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                              order_by=["attributes.start_time ASC"])
        run_of: dict[int, Any] = {}
        for run in children:  # oldest first: a later run of the same trial number wins
            number = run.data.tags.get("initsearch.trial")
            if number is not None and number.isdigit() and TRAIN_LOSS in run.data.metrics:
                run_of[int(number)] = run
        shown: dict[str, Any] = {}
        searched = table[(table["kind"] == "search") & (table["state"] == "complete")]["trial"]
        for number in searched:  # best first
            if int(number) in run_of and len(shown) < CURVES_TOP:
                shown[f"trial {int(number)}"] = run_of[int(number)]
        for number, kind in zip(table["trial"], table["kind"]):
            if kind != "search" and int(number) in run_of:
                shown[f"{kind} (baseline)"] = run_of[int(number)]
        return shown

    def _curve_histories(self, runs: dict[str, Any]) -> dict[str, list[list[tuple[int, float]]]]:
        """``curves/train_loss`` of every evaluation seed of each run (``..._s1``, ``..._s2``, ...)."""
        curves: dict[str, list[list[tuple[int, float]]]] = {}
        for label, run in runs.items():
            keys = sorted((k for k in run.data.metrics if k == TRAIN_LOSS or k.startswith(TRAIN_LOSS + "_s")),
                          key=lambda k: (len(k), k))
            curves[label] = [sorted((m.step, m.value) for m in self.client.get_metric_history(run.info.run_id, k))
                             for k in keys]
        return curves

    def _signal_rows(self, runs: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """The per-layer init diagnostics table of each run, as rows (``payload.SIGNALS_TABLE``)."""
        out: dict[str, list[dict[str, Any]]] = {}
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per small download
        with tempfile.TemporaryDirectory(prefix="initsearch-signals-") as tmp:
            for label, run in runs.items():
                try:
                    path = self.client.download_artifacts(run.info.run_id, SIGNALS_TABLE, tmp)
                    table = json.loads(Path(path).read_text())
                except Exception as exc:  # a run logged without diagnostics (a backfilled trial)
                    log.debug("MLflow: no %s for %s (%s)", SIGNALS_TABLE, label, first_line(exc))
                    continue
                out[label] = [dict(zip(table["columns"], row)) for row in table["data"]]
        return out

    # -- on resume: what a killed process left behind --
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

    def _abandon(self) -> None:
        """The process ends without ``study_finished``: mark the parent KILLED (a resume sets it RUNNING)."""
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status="KILLED", end_time=_now_ms())


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
