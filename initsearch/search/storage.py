"""The Optuna storage of ``storage=``: a journal file on one machine, an RDB (with heartbeats) across machines.

Optuna's own storages do the work; this module only picks one from the setting, gives RDBs the heartbeat
that lets a surviving worker fail and retry a dead one's trial, and turns every way of failing to open one
into a single ``ConfigError`` line with the password hidden.
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial

from initsearch.errors import ConfigError, first_line, hide_password_of, redact_url
from initsearch.search.settings import is_rdb
from initsearch.search.workers import enqueue_retry

# The URL schemes of PostgreSQL: an unroutable host then fails after a connect timeout, not minutes of TCP retries.
POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg2://", "postgresql+psycopg://")
CONNECT_TIMEOUT_S = 10


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
    if not is_rdb(url):
        try:
            return JournalStorage(JournalFileBackend(url))
        except OSError as exc:
            raise ConfigError(f"storage: cannot open the journal file {url!r}: {exc.strerror or exc}") from None
    engine_kwargs = None
    if url.startswith(POSTGRES_SCHEMES):
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    # Optuna 4.9 renamed the stale-trial callback argument; older releases know only the first name.
    callback_arg = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in inspect.signature(
        RDBStorage.__init__).parameters else "failed_trial_callback"
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and what several machines need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                **{callback_arg: on_stale or retry_stale_trial},
            )
    except Exception as exc:  # sqlalchemy errors: unreachable server, bad URL, missing driver
        raise ConfigError(f"storage: cannot open {redact_url(url)}: {storage_problem(exc, url)}") from None


def storage_problem(exc: Exception, url: str) -> str:
    """The first line of a database error, the password hidden; a missing driver named with its package."""
    missing = exc.__cause__ if isinstance(exc.__cause__, ModuleNotFoundError) else None
    if missing is not None:
        hint = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}.get(missing.name or "", missing.name)
        return f"its database driver is not installed (no module {missing.name!r}; pip install '{hint}')"
    hide_password_of(url)
    return f"{type(exc).__name__}: {first_line(exc)}"


def retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat failed ``trial`` (its worker went silent): run its parameters again, once."""
    enqueue_retry(study, trial.number, trial.params, trial.user_attrs, "worker lost: no heartbeat")
