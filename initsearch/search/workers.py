"""Several workers on one study: the study lock, who runs a trial, dead workers' trials, and retries.

Workers are processes running the same study against the same storage: ``n_workers=N`` on one machine, or
the same command started again (in another terminal, or on another machine against a PostgreSQL storage).

- **The study lock** (``StudyLock``) serializes the few decisions that must not interleave between workers:
  enqueueing the baselines, finding or creating the MLflow parent run, failing dead workers' trials, and
  "is there room for one more trial? then create it". A journal file or SQLite database is locked with
  ``fcntl.flock`` on a sidecar file next to it (``<file>.initsearch-lock``; Optuna's own ``<file>.lock`` is
  a different file); PostgreSQL with a session advisory lock, MySQL with ``GET_LOCK``. The kernel or the
  server drops the lock when its holder dies, so a SIGKILL never leaves it held.
- **Who runs a trial**: each trial gets the user attribute ``worker = "<host>:<pid>:<process start>"`` and
  ``heartbeat`` (Unix time), refreshed at the training checkpoints (at most every ``heartbeat_interval``).
- **Dead workers' trials**: a RUNNING trial is *stale* when its worker is on this host and that process is
  gone (or is another process that reused the pid: the start time differs, or a zombie); on another host
  when its last heartbeat is older than ``grace_period``. Stale trials are failed with the reason in
  ``user_attrs["reason"]``. RDB storages also run Optuna's own heartbeat, which fails them the same way.
- **Retries**: a trial that failed because its worker stopped (killed, interrupted) is enqueued again once,
  with the same parameters and ``user_attrs["retry_of"] = <its number>`` (a baseline again as that baseline).
  A failed trial that has such a retry does not count towards the study's total; a retry is never retried.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from initsearch.search.outcome import Tracker, TrialOutcome, safely

log = logging.getLogger("initsearch")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
LOCK_SUFFIX = ".initsearch-lock"


# ---- worker identity and liveness ----------------------------------------------------------------------------
def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3, the state, first), or ``None``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the name (field 2) is in parentheses and may hold spaces


def running_with_env(name: str, value: str) -> bool:
    """Whether a live process of this machine (not a zombie) was started with ``name=value`` in its
    environment, as read from ``/proc/<pid>/environ`` (``False`` where there is no ``/proc``)."""
    marker = f"\0{name}={value}\0".encode()
    proc = Path("/proc")
    if not proc.is_dir():
        return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or another user's process
            continue
        if marker in b"\0" + environ:
            fields = _proc_stat(int(entry.name))
            if fields and fields[0] not in ("Z", "X"):
                return True
    return False


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); '' off Linux."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else ""


def host_name() -> str:
    """This machine's name in worker ids: ``INITSEARCH_WORKER_HOST`` when set (machines that share a host
    name, e.g. cloned containers, must set distinct ones), else the host name."""
    return os.environ.get("INITSEARCH_WORKER_HOST") or socket.gethostname()


def worker_id() -> str:
    """``host:pid:start`` of this process: the start time tells a pid reused by a later process apart."""
    return f"{host_name()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def worker_alive(worker: str) -> bool | None:
    """Whether the process ``worker`` (a ``worker_id``) still runs: ``None`` for another host (unknown here).

    A zombie (killed, not yet reaped by its parent) counts as dead.
    """
    host, _, rest = worker.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != host_name() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    fields = _proc_stat(pid)
    if fields is None:
        return os.name != "posix" or not Path("/proc/self/stat").exists()  # no /proc: trust kill(0)
    if fields[0] in ("Z", "X"):
        return False
    return not start or (len(fields) > 19 and fields[19] == start)


def name_new_trials(storage: optuna.storages.BaseStorage) -> None:
    """A journal storage's new trials name this process as their worker in the record that creates them.
    Otherwise the worker is written next: a process that died between the two writes would leave a RUNNING
    trial that names no worker, which only ``grace_period`` without a heartbeat can fail. Enqueued trials
    (a template given) and other storages are left as they are (an RDB has Optuna's heartbeats)."""
    if not isinstance(storage, optuna.storages.JournalStorage):
        return
    create = storage.create_new_trial

    def create_new_trial(study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is None:
            template_trial = FrozenTrial(
                number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
                datetime_complete=None, params={}, distributions={}, user_attrs={"worker": worker_id()},
                system_attrs={}, intermediate_values={}, trial_id=-1)
        return create(study_id, template_trial)

    storage.create_new_trial = create_new_trial  # type: ignore[method-assign]


def mark_worker(trial: optuna.Trial) -> None:
    """Record this process as the one running ``trial``. Its first heartbeat is the trial's own start time
    (``stale_reason`` reads ``datetime_start`` while there is no ``heartbeat``): one storage write less per trial."""
    trial.set_user_attr("worker", worker_id())


class Heartbeat:
    """Refreshes ``user_attrs["heartbeat"]`` of the running trial once ``interval`` seconds have passed since
    its last beat (called at training checkpoints; each refresh is one storage write). A trial's start is its
    first beat, so a trial shorter than ``interval`` writes none."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._trial: int | None = None
        self._last = 0.0

    def __call__(self, trial: optuna.Trial) -> None:
        now = time.time()
        if trial.number != self._trial:
            start = getattr(trial, "datetime_start", None)
            self._trial, self._last = trial.number, start.timestamp() if start is not None else now
        if now - self._last >= self.interval:
            trial.set_user_attr("heartbeat", round(now, 3))
            self._last = now


def stale_reason(trial: FrozenTrial, grace_period: float, now: float | None = None,
                 other_hosts: bool = True) -> str | None:
    """Why the RUNNING ``trial`` is abandoned, or ``None`` while its worker may still be on it.

    A worker of this host is asked directly (is the process there?). Others (or a trial that names no
    worker) are judged by the age of the last heartbeat, only when ``other_hosts`` (an RDB leaves that to
    Optuna's own heartbeat).
    """
    now = time.time() if now is None else now
    worker = trial.user_attrs.get("worker")
    if isinstance(worker, str):
        alive = worker_alive(worker)
        if alive is False:
            return f"worker died: process {worker} is gone"
        if alive is True:
            return None
    if not other_hosts:
        return None
    beat = trial.user_attrs.get("heartbeat")
    if not isinstance(beat, (int, float)):
        start = trial.datetime_start
        beat = start.timestamp() if start is not None else now
    if now - beat > grace_period:
        who = f"worker {worker}" if isinstance(worker, str) else "its worker"
        return f"worker lost: no heartbeat from {who} for {now - beat:.0f} s (grace_period {grace_period:g} s)"
    return None


# ---- counting and retries ------------------------------------------------------------------------------------
def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of the trials that have a retry (any trial with ``retry_of`` pointing at them)."""
    return {int(t.user_attrs["retry_of"]) for t in trials if isinstance(t.user_attrs.get("retry_of"), int)}


def counted(trials: list[FrozenTrial]) -> int:
    """Finished trials that count towards the study's total: complete, pruned, and failed ones, except a
    failure that was retried (its worker stopped; the retry stands for it)."""
    retried = retried_numbers(trials)
    return sum(1 for t in trials if t.state in FINISHED and not (t.state == TrialState.FAIL and t.number in retried))


def running(trials: list[FrozenTrial]) -> int:
    return sum(1 for t in trials if t.state == TrialState.RUNNING)


def enqueue_retry(study: optuna.Study, number: int, params: Mapping[str, Any], user_attrs: Mapping[str, Any],
                  reason: str) -> bool:
    """Enqueue trial ``number`` again with the same parameters (a baseline as the same baseline), once.

    Nothing happens for a trial that is itself a retry, or that already has one. Returns whether it enqueued.
    """
    if user_attrs.get("retry_of") is not None:
        log.warning("trial %d (a retry of trial %s) stopped too: not retried again", number, user_attrs["retry_of"])
        return False
    if number in retried_numbers(study.get_trials(deepcopy=False)):
        return False
    attrs: dict[str, Any] = {"retry_of": number, "retry_reason": reason[:500]}
    if user_attrs.get("baseline"):
        attrs["baseline"] = user_attrs["baseline"]
    study.enqueue_trial(dict(params), user_attrs=attrs)
    log.warning("trial %d will run again (%s)", number, reason)
    return True


def fail_stale_trials(study: optuna.Study, grace_period: float,
                      on_failed: Callable[[FrozenTrial, str], None] | None = None,
                      other_hosts: bool = True) -> list[FrozenTrial]:
    """Fail the study's stale RUNNING trials (``stale_reason``), enqueue each one's retry, and call
    ``on_failed(trial, reason)`` for each (e.g. to close its MLflow run). Returns the failed trials.

    Call it under the ``StudyLock``: two workers must not fail and retry the same trial twice.
    """
    storage = study._storage  # the study's own storage object (Optuna keeps no public handle to it)
    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(trial, grace_period, now, other_hosts)
        if reason is None:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "reason", reason)
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # it finished (or another worker failed it) meanwhile
        frozen = storage.get_trial(trial._trial_id)
        log.warning("trial %d was left RUNNING: %s; marked failed", frozen.number, reason)
        enqueue_retry(study, frozen.number, frozen.params, frozen.user_attrs, reason)
        failed.append(frozen)
        if on_failed is not None:
            on_failed(frozen, reason)
    return failed


class StaleTrials:
    """Fails trials left RUNNING by dead workers (``fail_stale_trials``; on RDBs also Optuna's heartbeat
    check) and tells the tracker about each one as a failed trial, so its MLflow run is closed FAILED."""

    def __init__(self, tracker: Tracker, grace_period: float, heartbeats: bool) -> None:
        self.tracker = tracker
        self.grace_period = grace_period
        self.heartbeats = heartbeats  # an RDB: Optuna's heartbeat judges the workers of other hosts

    def check(self, study: optuna.Study) -> None:
        if self.heartbeats:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # calls on_rdb_stale for each
        fail_stale_trials(study, self.grace_period, self._log, other_hosts=not self.heartbeats)

    def on_rdb_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reason = f"worker lost: no heartbeat for {self.grace_period:g} s"
        enqueue_retry(study, trial.number, trial.params, trial.user_attrs, reason)
        self._log(trial, reason)

    def _log(self, trial: FrozenTrial, reason: str) -> None:
        outcome = TrialOutcome(trial.number, trial.user_attrs.get("baseline"), dict(trial.params),
                               policy=trial.user_attrs.get("policy"), state="failed", reason=reason)
        if trial.datetime_start is not None and trial.datetime_complete is not None:
            outcome.seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        safely(self.tracker.trial_finished, outcome)


# ---- the study lock ------------------------------------------------------------------------------------------
def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for a PostgreSQL advisory lock (the same in every process and machine)."""
    return int.from_bytes(hashlib.sha256(f"initsearch:{name}".encode()).digest()[:8], "big", signed=True)


class StudyLock:
    """A lock shared by every worker of one study, reentrant within a process (``with lock:`` nests).

    ``url`` is the storage as given (a journal path, or an RDB URL); ``storage`` the opened storage (its
    SQLAlchemy engine serves the database locks).
    """

    def __init__(self, url: str, storage: Any, study_name: str) -> None:
        self.url = url
        self.storage = storage
        self.study_name = study_name
        self._depth = 0
        self._fd: int | None = None
        self._conn: Any = None
        self._kind = self._choose()

    def _choose(self) -> str:
        if "://" not in self.url:
            return "file"
        scheme = self.url.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme == "sqlite":
            return "file" if self._sqlite_path() else "none"
        if scheme in ("postgresql", "postgres") and hasattr(self.storage, "engine"):
            return "postgresql"
        if scheme == "mysql" and hasattr(self.storage, "engine"):
            return "mysql"
        log.warning("storage %s: no study lock for this kind of database; start parallel workers one at a time",
                    scheme)
        return "none"

    def _sqlite_path(self) -> str | None:
        path = self.url.split("://", 1)[1].partition("?")[0]
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel.db -> rel.db; sqlite:////abs -> /abs
        return None if path in ("", ":memory:") else path

    def _file(self) -> str:
        return (self.url if "://" not in self.url else self._sqlite_path() or "") + LOCK_SUFFIX

    def acquire(self) -> None:
        if self._depth == 0:
            if self._kind == "file":
                self._acquire_file()
            elif self._kind in ("postgresql", "mysql"):
                self._acquire_db()
        self._depth += 1

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            if self._fd is not None:
                self._release_file()
            if self._conn is not None:
                self._release_db()

    @property
    def held(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _acquire_file(self) -> None:
        import fcntl

        path = self._file()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _release_file(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # The database's own locks, per kind: (statement to take it, statement to let it go), and their key.
    _DB_LOCKS = {
        "postgresql": ("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"),
        "mysql": ("SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)"),
    }

    def _db_lock(self, conn: Any, release: bool) -> None:
        """Take or let go of the database lock on ``conn`` (PostgreSQL advisory lock, MySQL ``GET_LOCK``)."""
        from sqlalchemy import text

        key = _lock_key(self.study_name) if self._kind == "postgresql" else f"initsearch:{self.study_name}"[:64]
        conn.execute(text(self._DB_LOCKS[self._kind][int(release)]), {"k": key})
        conn.commit()

    def _acquire_db(self) -> None:
        """Take the lock on a connection of its own (through a database restart: ``storage.reconnecting``)."""
        retry = getattr(self.storage, "reconnecting", None)
        self._conn = retry(self._connect_locked, "study lock") if retry is not None else self._connect_locked()

    def _connect_locked(self) -> Any:
        conn = self.storage.engine.connect()
        try:
            self._db_lock(conn, release=False)
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        return conn

    def _release_db(self) -> None:
        conn, self._conn = self._conn, None
        try:
            self._db_lock(conn, release=True)
        except Exception as exc:
            log.debug("study lock: release failed (%s); dropping the connection", exc)
            conn.invalidate()
        finally:
            conn.close()


# ---- admission: one more trial only while there is room -------------------------------------------------------
class TrialGate:
    """Lets this worker start a trial only while the study holds fewer than ``total`` trials that count
    plus running ones, and makes "check, then create the trial" one step across workers.

    ``admit`` takes the study lock, runs ``before_check`` (failing stale trials), and when there is room
    keeps holding the lock: Optuna then creates the trial, and the objective calls ``entered`` once the
    trial exists and names its worker, which lets the lock go. When there is no room only because other
    workers' trials still run, it waits (``poll_s``) until they end: one may fail or die (then it is retried,
    and this worker may be the one to run it). It gives up at ``deadline`` (``time.monotonic()``).
    Also an Optuna callback: after each trial it admits the next one or stops this worker's loop. ``close``
    lets go of a lock still held (the loop ended for another reason: timeout, ``n_trials``, an exception).
    """

    def __init__(self, lock: StudyLock, total: int, before_check: Callable[[optuna.Study], None] | None = None,
                 poll_s: float = 5.0, deadline: float | None = None) -> None:
        self.lock = lock
        self.total = total
        self.before_check = before_check
        self.poll_s = poll_s
        self.deadline = deadline
        self._holding = False

    def admit(self, study: optuna.Study) -> bool:
        if self._holding:
            return True
        said = False
        while True:
            room, others = self._check(study)
            if room or not others or (self.deadline is not None and time.monotonic() + self.poll_s > self.deadline):
                return room
            if not said:  # a wait can last up to grace_period: say why the command seems idle
                log.info("study %r: waiting for %d trial(s) still RUNNING under other workers; one whose worker "
                         "is gone is failed and run again (its process not found on this machine, or no heartbeat "
                         "for grace_period)", study.study_name, others)
                said = True
            time.sleep(self.poll_s)

    def _check(self, study: optuna.Study) -> tuple[bool, int]:
        """(room for one more trial, how many trials run now); holds the lock on return when there is room."""
        self.lock.acquire()
        try:
            if self.before_check is not None:
                self.before_check(study)
            trials = study.get_trials(deepcopy=False)
            now_running = running(trials)
            room = counted(trials) + now_running < self.total
        except BaseException:
            self.lock.release()
            raise
        if room:
            self._holding = True
        else:
            self.lock.release()
        return room, now_running

    def entered(self) -> None:
        if self._holding:
            self._holding = False
            self.lock.release()

    def close(self) -> None:
        self.entered()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not self.admit(study):
            study.stop()
