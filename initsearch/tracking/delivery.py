"""How a trial's payload reaches MLflow: through the writer process, or on the tracker's logging thread.

``WriterProcess`` is the study process's end of the writer (``initsearch.tracking.writer``): a separate
process, started with this interpreter, that imports MLflow but not torch and runs at a lower priority.
Logging a child run is mostly MLflow's ORM work; there it runs on another core instead of under the
study's GIL (which pays off only while a second core is free: on a busy machine it competes with training
again). The study process writes one JSON line per trial and keeps the payload until the writer
acknowledges it. A writer that cannot start or dies is one warning: the trials it had not acknowledged,
and the later ones, are logged by the tracker itself (at least once, never lost). The writer logs what it
was sent even after the study process is gone (``writer_running_for`` tells a resume to leave those
trials to it).

``LoggingThread`` is the tracker's background thread: it runs the tracker's calls in order (the study-level
runs, sending the trials to the writer, or logging them itself without one), so no MLflow call runs on
the study's thread; a failing call is handed to the tracker, which keeps the trials in its spool while
the store is down.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import site
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from initsearch.errors import first_line
from initsearch.search.workers import running_with_env, worker_id
from initsearch.tracking.writer import URI_ENV, URI_ON_STDIN

log = logging.getLogger("initsearch")

WRITER_FOR_ENV = "INITSEARCH_MLFLOW_WRITER_FOR"  # in the writer's environment: the worker_id() that started it
STALL_TIMEOUT_S = 300.0  # flush(): give up when the writer acknowledged nothing for this long
PACKAGE_ROOT = str(Path(os.path.abspath(__file__)).parents[2])  # the folder that holds this initsearch package


def writer_running_for(worker: str) -> bool:
    """Whether a writer process started by study process ``worker`` (a ``worker_id``) still runs on this
    machine: after its study process was killed it logs what it had been sent, so a resume must not log
    those trials a second time."""
    return running_with_env(WRITER_FOR_ENV, worker)


# ---- the logging thread ------------------------------------------------------------------------------------
class LoggingThread:
    """One daemon thread running submitted calls in order. A failing call goes to ``on_failure(name,
    exc)`` (the tracker: one warning per outage), or is a warning of its own when there is none."""

    def __init__(self, on_failure: Callable[[str, Exception], None] | None = None) -> None:
        self._queue: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.on_failure = on_failure
        self.cpu_s: dict[str, float] = {}  # CPU seconds spent per kind of call (scripts/tracking_overhead.py)

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
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

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s more for a stopped thread to end; ``True`` when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._run(*item)
            finally:
                self._queue.task_done()

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        started = time.thread_time()
        try:
            fn(*args)
        except Exception as exc:
            name = fn.__name__.strip("_")
            if self.on_failure is not None:
                self.on_failure(name, exc)
            else:
                log.warning("MLflow tracking: %s failed (%s)", name, first_line(exc, with_type=True, limit=300))
        finally:
            name = fn.__name__
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + time.thread_time() - started


# ---- the writer process ------------------------------------------------------------------------------------
def writer_command() -> list[str]:
    """How the writer is started: this interpreter running ``initsearch.tracking.writer`` as a module (it
    imports MLflow and ``initsearch.errors``, not torch). The tracking URI goes in the environment
    (``writer_env``), out of sight of ``ps``. ``-P``: the working directory is not put on ``sys.path``, so a
    user's ``json.py`` there cannot shadow a module the writer imports (``writer_env`` sets the path)."""
    return [sys.executable, "-P", "-m", "initsearch.tracking.writer"]


def writer_env(uri: str | None) -> dict[str, str]:
    """The writer's environment: this process's, plus the URI (``writer.URI_ENV``), this process's
    ``worker_id`` (``WRITER_FOR_ENV``) and, when this ``initsearch`` does not come from a site directory,
    ``PYTHONPATH`` with the folder that holds it first, so the writer imports the same package even when it
    is not installed. A site directory is left where it is: ahead of the standard library, a module there
    (a ``pathlib`` backport, say) would shadow the standard one."""
    env = {**os.environ, WRITER_FOR_ENV: worker_id()}
    if uri is not None:
        env[URI_ENV] = uri
    if PACKAGE_ROOT not in _site_dirs():
        path = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, path]) if path else PACKAGE_ROOT
    return env


def _site_dirs() -> set[str]:
    """This interpreter's site-packages folders (and the user's), as absolute paths."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return {os.path.abspath(d) for d in dirs}


_prestarted: subprocess.Popen | None = None  # a writer started before the study knew its tracking URI


def prestart_writer() -> None:
    """Start a writer now, before the command has composed its config (``python -m initsearch`` calls this
    first thing): it imports MLflow on another core while this process imports torch and builds the study,
    so a short study does not wait for that at its end. ``WriterProcess.launch`` adopts it and sends it the
    URI; a study that does not track closes it (``discard_prestarted_writer``), and so does this process's
    exit."""
    global _prestarted
    if _prestarted is not None:
        return
    try:
        _prestarted = subprocess.Popen([*writer_command(), URI_ON_STDIN], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, close_fds=True, env=writer_env(None))
    except (OSError, ValueError):
        _prestarted = None  # WriterProcess.launch tries again, and warns


def discard_prestarted_writer() -> None:
    """End the writer ``prestart_writer`` started (EOF: it exits without logging anything)."""
    global _prestarted
    proc, _prestarted = _prestarted, None
    if proc is not None and proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _adopt_prestarted(uri: str) -> subprocess.Popen | None:
    """The prestarted writer, told its URI and MLflow's settings in this process's environment now (the
    retry bounds ``tracker.bound_retries`` set after it started); ``None`` when there is none or it is gone."""
    global _prestarted
    proc, _prestarted = _prestarted, None
    if proc is None or proc.poll() is not None or proc.stdin is None:
        return None
    try:
        env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}  # set since (bound_retries...)
        proc.stdin.write(json.dumps({"op": "uri", "uri": uri, "env": env}).encode() + b"\n")
        proc.stdin.flush()
    except (OSError, ValueError):
        return None
    return proc


class WriterProcess:
    """The study process's end of the writer process (``initsearch.tracking.writer``).

    ``send_trial`` (from the tracker's thread) writes one JSON line per trial and keeps the payload until
    the writer acknowledges it; a reader thread reads the acknowledgements (``{"seq", "cpu", "trial_cpu",
    "error", "delivered", "number"}``; seq 0 = ready) and hands each to ``on_ack``. When the writer ends without
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
        self._answers: dict[int, dict[str, Any] | None] = {}  # study calls waiting for their acknowledgement
        self._reader = threading.Thread(target=self._read, name="initsearch-mlflow-acks", daemon=True)
        self._reader.start()

    @classmethod
    def launch(cls, uri: str) -> WriterProcess | None:
        """Start the writer on ``uri`` (or adopt the one ``prestart_writer`` started); ``None`` and a warning
        when it cannot be started at all."""
        prestarted = _adopt_prestarted(uri)
        if prestarted is not None:
            return cls(prestarted)
        try:
            proc = subprocess.Popen(writer_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                                    env=writer_env(uri))
        except (OSError, ValueError) as exc:
            log.warning("MLflow tracking: cannot start the writer process (%s); logging the trials in this "
                        "process instead", first_line(exc, with_type=True, limit=300))
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
        return self._send("trial", payload) is not None

    def open_store(self, timeout: float | None) -> bool:
        """Have the writer open its client on the store (after this process created it); wait for that up
        to ``timeout`` s (``None``: do not wait). ``False`` when it is not done by then (the trials then
        wait in the pipe)."""
        if self._send("open", None) is None:
            return False
        return True if timeout is None else self.wait_acknowledged(stall_timeout=timeout)

    def call(self, name: str, args: dict[str, Any], stall_timeout: float = STALL_TIMEOUT_S) -> dict[str, Any] | None:
        """Run ``runs.STUDY_CALLS[name](client, **args)`` in the writer and wait for its acknowledgement
        (``{"result", "error", "delivered"}``); ``None`` when the writer is gone or goes before answering
        (the caller then makes the call itself). A writer that answers nothing for ``stall_timeout`` s is a
        ``TimeoutError``."""
        seq = self._send("study", {"call": name, "args": args}, keep=False, answer=True)
        if seq is None:
            return None
        with self._cond:
            since = time.monotonic()
            while self._answers.get(seq) is None and not self.dead:
                acked = self._acked
                self._cond.wait(min(1.0, stall_timeout))
                if self._acked != acked:
                    since = time.monotonic()
                elif time.monotonic() - since >= stall_timeout:
                    self._answers.pop(seq, None)
                    raise TimeoutError(f"the writer process (pid {self.pid}) answered nothing for {stall_timeout:.0f} s")
            return self._answers.pop(seq, None)

    def _send(self, op: str, payload: dict[str, Any] | None, keep: bool = True, answer: bool = False) -> int | None:
        """Write one message; its ``seq``, or ``None`` when the writer is gone. ``keep``: the payload is
        handed back (``on_death``) if the writer dies before acknowledging it. ``answer``: its
        acknowledgement is kept for ``call``."""
        with self._cond:
            if self.dead or self.closing:
                return None
            seq = self._sent + 1
            line = json.dumps({"op": op, "seq": seq, **(payload or {})}).encode() + b"\n"  # may raise: nothing pending
            self._sent = seq
            self._pending[seq] = payload if keep else None
            if answer:
                self._answers[seq] = None
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            self._died(f"cannot be written to ({first_line(exc, with_type=True, limit=300)})")
        return seq

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
                self.cpu_s = float(ack.get("cpu") or 0.0)
                self.trial_cpu_s = float(ack.get("trial_cpu") or 0.0)
                on_ack = self._on_ack
            on_ack(ack)  # (the spool is updated) before anyone waiting for this acknowledgement goes on
            with self._cond:
                if ack["seq"] in self._answers:
                    self._answers[ack["seq"]] = ack
                self._acked = max(self._acked, ack["seq"])
                self._cond.notify_all()
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

