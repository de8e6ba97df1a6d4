"""The exceptions initsearch raises, and the few helpers that turn a problem into one safe line.

Each error carries one line that names the bad field or key and the value, so the commands can print it as
is; the commands share the last few helpers (``did_you_mean``, ``--help`` anywhere, a closed stdout pipe). This module imports nothing of initsearch (and nothing outside the standard library): every stage, and
the MLflow writer process, uses it.
"""
from __future__ import annotations

import atexit
import difflib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit


class InitSearchError(Exception):
    """Base class: an error in what the user gave us (a file, a config, a model), not a bug."""


class PolicyError(InitSearchError, ValueError):
    """A policy file or object is invalid, or cannot be applied to this model.

    The message names the field and the value, e.g. ``rules[2].scale: must be in (0, 100], got -1``.
    """


class ConfigError(InitSearchError, ValueError):
    """A composed Hydra config holds an invalid value; the message names the key."""


class DataError(InitSearchError):
    """A dataset is missing, corrupt, or refused (bad checksum, unsafe archive, bad batch file)."""


class DiskFault(InitSearchError):
    """A folder or file the study writes to cannot be written (full disk, read-only, no permission); the
    message says what is kept and how to go on."""


class StudyFailed(InitSearchError):
    """No trial of the study finished, so there is nothing to export."""


class StudyInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the study (a ``KeyboardInterrupt``, so Optuna fails the running trial and
    re-raises it). That trial is recorded failed, reason ``interrupted by SIGINT``, and enqueued again;
    ``study`` is the study so far (``None`` if it stopped before the study was open). The process should
    exit with ``exit_status`` (128 + the signal number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        self.study: Any = None  # an optuna.Study
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def interrupt_reason(exc: BaseException) -> str:
    """``interrupted by SIGINT`` (or the signal a ``StudyInterrupted`` carries): why a trial stopped."""
    return f"interrupted by {signal.Signals(getattr(exc, 'signum', signal.SIGINT)).name}"


# ---- one line per problem ----------------------------------------------------------------------------------
def first_line(exc: BaseException, *, with_type: bool = False, limit: int | None = None) -> str:
    """The first line of ``exc``'s message, passwords hidden (``hide_password_of``), at most ``limit``
    characters. ``with_type``: ``Type: first line`` (just ``Type`` when the message is empty)."""
    text = scrub(str(exc).strip())
    first = text.splitlines()[0] if text else ""
    if limit is not None:
        first = first[:limit]
    if with_type:
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return first


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is a finite float: an int beyond the float range is not (it is
    compared, never converted, so it cannot overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return -sys.float_info.max <= value <= sys.float_info.max
    return math.isfinite(value)


# ---- passwords never shown ---------------------------------------------------------------------------------
_SECRETS: set[str] = set()  # passwords of the store URLs in use: ``scrub`` hides them in any text


def url_password(url: str) -> str | None:
    """The password in ``scheme://user:password@host/...``, as written in the URL, or ``None``."""
    try:
        password = urlsplit(url).password
    except ValueError:  # a malformed port, say
        password = None
    if password is None:  # also a password with "/", "?" or "#", which SQLAlchemy accepts: read it by hand
        password = url.partition("://")[2].rpartition("@")[0].partition(":")[2] or None
    return password


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (``postgresql://user:***@host/db``)."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url


def hide_password_of(url: str) -> None:
    """Remember the password in ``url``, as written and decoded, so ``scrub`` and ``first_line`` hide it:
    database drivers and MLflow quote the failing URL in their errors, credentials included."""
    password = url_password(url)
    if password:
        _SECRETS.update({password, unquote(password)})


def scrub(text: str) -> str:
    """``text`` with every remembered password replaced by ``***``, the longest first (a password that
    holds another one must not be left half shown)."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# ---- the command line ----------------------------------------------------------------------------------------
HELP_FLAGS = ("--help", "-h")


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices`` to ``word`` (dotted keys compared whole and by their
    last part), or an empty string when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    if not close:
        last = word.rsplit(".", 1)[-1]
        by_last = {c.rsplit(".", 1)[-1]: c for c in choices if c.rsplit(".", 1)[0] == word.rpartition(".")[0]}
        near = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.75)
        close = [by_last[near[0]]] if near else []
    return f" (did you mean {close[0]}?)" if close else ""


def wants_help(args: Sequence[str]) -> bool:
    """``--help`` or ``-h`` anywhere among the arguments."""
    return any(arg in HELP_FLAGS for arg in args)


def exit_quietly_on_broken_pipe(main: Callable[[], Any]) -> Any:
    """Run ``main``; when the reader of stdout went away (``initsearch --help | head``), exit with 141 (the
    status of a process killed by SIGPIPE) and no traceback, as other command-line tools do."""
    try:
        return main()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush of stdout at exit would fail again
        sys.exit(141)


def exit_code(status: Any) -> int:
    """The exit status ``sys.exit(status)`` gives: ``None`` 0, an int itself, anything else printed to
    stderr and 1."""
    if status is None:
        return 0
    if isinstance(status, int):
        return status
    print(status, file=sys.stderr)
    return 1


def exit_without_teardown(main: Callable[[], Any]) -> NoReturn:
    """Run a command's ``main`` as the whole life of the process, then end the process without the
    interpreter's teardown.

    After a study, Python's finalization frees torch's, MLflow's, SQLAlchemy's and pandas' modules one
    object at a time: over a second (docs/performance.md) that the user waits for and nothing needs. The
    steps a normal exit takes first are taken here, in the same order: ``threading._shutdown`` (idle
    ``concurrent.futures`` workers woken, non-daemon threads joined), the ``atexit`` handlers (the MLflow
    tracker's close, ``weakref.finalize`` and temporary folders, logging's flush), stdout and stderr
    flushed; then ``os._exit`` with ``main``'s status (its return value or ``SystemExit``, as ``sys.exit``
    reads it). An exception other than ``SystemExit`` propagates
    and the process exits as Python always does (traceback, status 1). For a command run as a program
    only: in-process callers (the tests, the API) call ``main`` itself.
    """
    try:
        status = main()
    except SystemExit as exc:
        status = exc.code
    code = exit_code(status)
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:  # what a normal exit runs first: wakes idle pool workers, joins non-daemon threads
        shutdown()
    else:
        current = threading.current_thread()
        for thread in threading.enumerate():
            if thread is not current and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()  # then the atexit handlers (the tracker's close, logging's shutdown...)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (BrokenPipeError, ValueError, OSError):  # a reader gone: the status of SIGPIPE, not Python's 120
            code = 141 if stream is sys.stdout and code == 0 else code
    os._exit(code)
