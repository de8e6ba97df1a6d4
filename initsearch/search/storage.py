"""The Optuna storage of ``storage=``: a journal file on one machine, an RDB (with heartbeats) across machines.

Optuna's own storages do the work; this module only picks one from the setting, gives RDBs the heartbeat
that lets a surviving worker fail and retry a dead one's trial, refuses a file that is not Optuna's before
Optuna writes to it, and turns every way of failing to open one into a single ``ConfigError`` line with the
password hidden.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import logging
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial

from initsearch.errors import ConfigError, first_line, hide_password_of, redact_url
from initsearch.search.settings import is_rdb
from initsearch.search.workers import enqueue_retry

log = logging.getLogger("initsearch")
T = TypeVar("T")

# The URL schemes of PostgreSQL: an unroutable host then fails after a connect timeout, not minutes of TCP retries.
POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg2://", "postgresql+psycopg://")
CONNECT_TIMEOUT_S = 10
JOURNAL_PROBE_BYTES = 4096  # what is read of an existing journal file to see that it is Optuna's
SQLITE_MAGIC = b"SQLite format 3\x00"
OWN_FILE = "give the study its own file (storage=sqlite:///optuna.db or a journal file)"
RECONNECT_S = 120.0  # how long a database that went away (restarted) is waited for before the worker gives up


def open_storage(
    url: str,
    *,
    heartbeat_interval: int = 60,
    grace_period: int = 180,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """An Optuna storage from ``storage=``: a URL with ``://`` is an RDB (SQLite for one process; PostgreSQL
    for several machines), anything else the path of a journal file (safe for several processes on one
    machine). RDBs get Optuna's heartbeats: a trial whose worker stopped beating for ``grace_period``
    seconds is failed and ``on_stale(study, trial)`` runs (default: enqueue it again once, ``retry_of``).
    A database that cannot be reached is one ``ConfigError`` line (at most ``CONNECT_TIMEOUT_S`` for
    PostgreSQL), password hidden."""
    check_storage_file(url)
    if not is_rdb(url):
        try:
            return JournalStorage(JournalFileBackend(url))
        except OSError as exc:
            raise ConfigError(f"storage: cannot open the journal file {url!r}: {exc.strerror or exc}") from None
    engine_kwargs = None
    if url.startswith(POSTGRES_SCHEMES):  # pre-ping: a connection a server restart broke is replaced, not used
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    # Optuna 4.9 renamed the stale-trial callback argument; older releases know only the first name.
    callback_arg = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in inspect.signature(
        RDBStorage.__init__).parameters else "failed_trial_callback"
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and what several machines need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return ReconnectingRDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                **{callback_arg: on_stale or retry_stale_trial},
            )
    except Exception as exc:  # sqlalchemy errors: unreachable server, bad URL, missing driver
        raise ConfigError(f"storage: cannot open {redact_url(url)}: {storage_problem(exc, url)}") from None


def storage_problem(exc: Exception, url: str) -> str:
    """The first line of a database error, the password hidden; a missing driver named with its package;
    ``postgres://`` answered with the scheme SQLAlchemy knows (it dropped that alias)."""
    missing = exc.__cause__ if isinstance(exc.__cause__, ModuleNotFoundError) else None
    if missing is not None:
        hint = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}.get(missing.name or "", missing.name)
        return f"its database driver is not installed (no module {missing.name!r}; pip install '{hint}')"
    hide_password_of(url)
    problem = f"{type(exc).__name__}: {first_line(exc)}"
    if url.startswith(("postgres://", "postgres+")):
        problem += " (write postgresql://...: SQLAlchemy does not know the postgres:// alias)"
    return problem


# ---- a file that is not the study's ----------------------------------------------------------------------------
def check_storage_file(url: str) -> None:
    """Before Optuna opens ``storage=``: an existing file it names must be Optuna's, since Optuna writes to
    whatever it is given (its tables into another SQLite database, a record appended to any file). A
    missing or empty file is a new study. One ``ConfigError`` line naming ``storage`` if not; the file is
    left as it was."""
    if is_rdb(url):
        path = sqlite_file(url)
        if path is not None:
            check_sqlite_storage(path)
        return
    try:
        with open(url, "rb") as file:
            head = file.read(JOURNAL_PROBE_BYTES)
    except OSError:
        return  # missing (a new study), or a folder: ``open_storage`` says what it cannot open
    if not head:
        return
    if head.startswith(SQLITE_MAGIC):
        check_sqlite_storage(url)  # another program's database says so first
        raise ConfigError(f"storage: {url} looks like a SQLite database, not an Optuna journal file; "
                          f"a database is given as storage=sqlite:///{url}")
    if not is_journal_record(head):
        raise ConfigError(f"storage: {url} is not an Optuna journal file (its first line is not a JSON record with "
                          f"an op_code); give a new path or the study's journal")


def is_journal_record(head: bytes) -> bool:
    """Whether ``head`` (the start of a file) begins with one of Optuna's journal records: a JSON object
    with ``op_code``. A first line cut short (another worker writing it, or longer than the probe) need
    only start as Optuna writes every record: ``{"op_code":``."""
    line, newline, _ = head.partition(b"\n")
    if not newline:
        return line.startswith(b'{"op_code":')
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        return False
    return isinstance(record, dict) and "op_code" in record


def sqlite_file(url: str) -> str | None:
    """The file of a ``sqlite:///`` URL (as given: relative to the working directory), else ``None``."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    try:
        path = make_url(url).database
    except Exception:  # a malformed URL: Optuna's own error says so
        return None
    return path if path and path != ":memory:" and not path.startswith("file:") else None


def check_sqlite_storage(path: str) -> None:
    """An existing SQLite file that holds tables must hold Optuna's (``studies``, ``version_info``): Optuna
    would add its tables to MLflow's store, or to any other program's database. Read only its table names
    (opened read-write, never created: see ``tracking.uri.check_sqlite_store``)."""
    if not Path(path).is_file() or Path(path).stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(Path(path).absolute().as_uri() + "?mode=rw", uri=True,
                                                timeout=10.0)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise ConfigError(f"storage: cannot open the SQLite database {path}: {type(exc).__name__}: "
                          f"{first_line(exc)}") from None
    if not tables or tables & {"studies", "version_info"}:
        return
    if "experiments" in tables:
        raise ConfigError(f"storage: {path} is an MLflow tracking store, not an Optuna database: {OWN_FILE}")
    raise ConfigError(f"storage: {path} is a database but not an Optuna one (no studies table; it has "
                      f"{', '.join(sorted(tables)[:4])}): {OWN_FILE}")


def _journal_internals(storage: Any) -> bool:
    """Whether ``storage`` is Optuna's ``JournalStorage`` with the internals ``one_append`` relies on."""
    return (type(storage) is JournalStorage and getattr(storage, "_replay_result", None) is not None
            and getattr(storage, "_thread_lock", None) is not None and hasattr(storage, "_backend")
            and hasattr(storage, "_sync_with_backend"))


def _append(storage: JournalStorage, logs: list[dict[str, Any]]) -> None:
    """Write ``logs`` in one append (one file lock, one ``fsync``), then replay them. A record that fails
    (the trial already ended elsewhere) stops Optuna's replay there: the rest is replayed now, so no later,
    unrelated storage call raises for them; the first failure is raised."""
    with storage._thread_lock:
        storage._backend.append_logs(logs)
        first_error = None
        for _ in range(len(logs) + 1):
            try:
                storage._sync_with_backend()
                break
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:
                first_error = first_error or exc
    if first_error is not None:
        raise first_error


def set_user_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """Several user attributes of a running trial: on a journal file in one append (one file lock and one
    ``fsync`` instead of one per key), each key its own record, exactly as ``Trial.set_user_attr`` writes
    and Optuna replays them; on any other storage (or an Optuna without these internals), one call per key.
    The trial reads them back at once either way."""
    storage = getattr(trial, "storage", None)
    if len(attrs) < 2 or not _journal_internals(storage):  # inside ``one_append`` too: it keeps them for its append
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    worker = storage._replay_result.worker_id
    _append(storage, [_user_attr_record(worker, trial._trial_id, key, value) for key, value in attrs.items()])
    trial._cached_frozen_trial.user_attrs.update(attrs)


def _user_attr_record(worker: str, trial_id: int, key: str, value: Any) -> dict[str, Any]:
    """The journal record ``Trial.set_user_attr`` writes, fields in Optuna's order."""
    from optuna.storages.journal._storage import JournalOperation

    return {"op_code": JournalOperation.SET_TRIAL_USER_ATTR, "worker_id": worker, "trial_id": trial_id,
            "user_attr": {key: value}}


class _Deferring:
    """The trial's storage while ``one_append`` is open: its parameters and user attributes are kept as
    the journal records Optuna would write (same fields, same order); every other call goes through."""

    def __init__(self, storage: JournalStorage, trial_id: int) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._worker = storage._replay_result.worker_id
        self.records: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any) -> None:
        if trial_id != self._trial_id:
            self._storage.set_trial_param(trial_id, param_name, param_value_internal, distribution)
            return
        from optuna.distributions import distribution_to_json
        from optuna.storages.journal._storage import JournalOperation

        self.records.append({"op_code": JournalOperation.SET_TRIAL_PARAM, "worker_id": self._worker,
                             "trial_id": trial_id, "param_name": param_name,
                             "param_value_internal": param_value_internal,
                             "distribution": distribution_to_json(distribution)})

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id != self._trial_id:
            self._storage.set_trial_user_attr(trial_id, key, value)
            return
        self.records.append(_user_attr_record(self._worker, trial_id, key, value))


@contextlib.contextmanager
def one_append(trial: optuna.Trial) -> Iterator[None]:
    """Within it, the parameters ``trial`` samples and the user attributes it is given reach a journal file
    in one append when the block ends (one file lock and one ``fsync`` instead of one per parameter and
    attribute): what a trial writes before it trains. The block ends before training starts, so they are
    as durable as before when training starts, and visible to the next trial's sampling (TPE's constant
    liar reads running trials); the trial itself reads its own values from its cache. On another storage
    (an RDB, or an Optuna without these internals) it changes nothing. When the block raises, what it recorded is still written (as one call
    per value would have), and a failure to write it is left behind the block's own error."""
    storage = getattr(trial, "storage", None)
    if isinstance(storage, _Deferring) or not _journal_internals(storage):
        yield
        return
    deferring = _Deferring(storage, trial._trial_id)
    trial.storage = deferring
    try:
        yield
    except BaseException:
        trial.storage = storage
        with contextlib.suppress(Exception):
            _write_records(storage, deferring.records)
        raise
    trial.storage = storage
    _write_records(storage, deferring.records)


def _write_records(storage: JournalStorage, records: list[dict[str, Any]]) -> None:
    """The records ``one_append`` kept, in one append (none: nothing written)."""
    if records:
        _append(storage, records)


def retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat failed ``trial`` (its worker went silent): run its parameters again, once."""
    enqueue_retry(study, trial.number, trial.params, trial.user_attrs, "worker lost: no heartbeat")


# ---- a disk that cannot be written -----------------------------------------------------------------------------
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def write_fault(exc: BaseException) -> OSError | None:
    """The ``OSError`` of a write that failed for lack of room or permission, found in ``exc`` or what
    caused it (Optuna raises its own error while handling a storage write that failed), or ``None``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def finished_trials(url: str, study_name: str) -> int | None:
    """How many finished trials the study holds, read again from its storage (``None`` when it cannot)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(url))
        return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
    except Exception:
        return None


# ---- a database server that restarts ---------------------------------------------------------------------------
def lost_connection(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it: Optuna wraps SQLAlchemy's errors) is a lost or refused
    connection to the database server, rather than a problem with what was asked."""
    import sqlalchemy.exc as sa

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (sa.OperationalError, sa.InterfaceError, sa.PendingRollbackError)):
            return True
        if isinstance(current, sa.DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


def reconnecting(call: Callable[..., T], what: str, url: str, *args: Any, on_retry: Callable[[], None] | None = None,
                 **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, tried again while the database server does not answer (restarting), for
    up to ``RECONNECT_S`` seconds: one warning when it went away, one line when it is back. ``on_retry``
    runs before each new try (drop a session the lost connection left unusable)."""
    deadline, pause, warned = time.monotonic() + RECONNECT_S, 0.5, False
    while True:
        try:
            result = call(*args, **kwargs)
        except Exception as exc:
            if not lost_connection(exc) or time.monotonic() >= deadline:
                raise
            if not warned:
                warned = True
                hide_password_of(url)
                root = exc
                while root.__cause__ is not None:  # Optuna's wrapper says less than the driver's error
                    root = root.__cause__
                root = getattr(root, "orig", None) or root  # SQLAlchemy's wrapper: the driver's own error
                log.warning("storage: lost the connection to %s (%s: %s); trying again for up to %.0f s",
                            redact_url(url), type(root).__name__, first_line(root, limit=200), RECONNECT_S)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
            if on_retry is not None:
                try:
                    on_retry()
                except Exception:
                    pass
            continue
        if warned:
            log.warning("storage: %s answers again (%s)", redact_url(url), what)
        return result


class ReconnectingRDBStorage(RDBStorage):
    """Optuna's ``RDBStorage`` whose calls ride out a database server restart (``reconnecting``): every
    worker waits for the server and goes on, instead of dying with its trial RUNNING. A call is retried
    only when its connection failed; the server aborts what it had not committed, so nothing is written
    twice."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._url = url
        self._calls = threading.local()  # per thread (the heartbeat has its own): inside a retried call
        super().__init__(url, **kwargs)

    def reconnecting(self, call: Callable[..., T], what: str, *args: Any) -> T:
        """``call(*args)`` (another use of this database, e.g. the study lock), retried the same way."""
        return reconnecting(call, what, self._url, *args)


def _reconnecting_method(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        calls = getattr(self, "_calls", None)
        if calls is None or getattr(calls, "inside", False):
            return method(self, *args, **kwargs)  # during __init__, or nested: the outer call retries
        calls.inside = True
        try:
            return reconnecting(method, name, self._url, self, *args, on_retry=self.remove_session, **kwargs)
        finally:
            calls.inside = False

    return call


# The public methods, and the private ones Optuna's cache in front of an RDBStorage calls directly.
_CALLED_BY_OPTUNA = ("_get_trials", "_get_best_trial_id", "_set_trial_param", "_create_new_trial", "_get_stale_trial_ids")
for _name in [n for n in dir(RDBStorage) if (not n.startswith("_") or n in _CALLED_BY_OPTUNA)
              and inspect.isfunction(getattr(RDBStorage, n))]:
    if _name not in ("remove_session", "get_heartbeat_interval", "get_failed_trial_callback"):
        setattr(ReconnectingRDBStorage, _name, _reconnecting_method(_name))
