"""The MLflow writer: a separate process that logs a study's runs.

The study process (``tracking.delivery.WriterProcess``) starts it as ``python -m initsearch.tracking.writer``.
It imports only the standard library, MLflow and ``initsearch.errors`` (which imports nothing of initsearch;
``runs`` holds the MLflow calls): not torch. Its CPU (MLflow's import, its ORM) then runs on another core
instead of competing for the study process's GIL, and the study process does not import MLflow at all.

Protocol. stdin: one JSON object per line: ``{"op": "open", "seq": n}`` (open the store now),
``{"op": "trial", "seq": n, ...}`` (one child run; see ``runs.log_trial`` for the fields, built by
``payload.trial_payload``) and ``{"op": "study", "seq": n, "call": <name>, "args": {...}}`` (one of
``runs.STUDY_CALLS``: the parent run's start, end, the figures' data...; its answer in ``result``).
stdout: one JSON acknowledgement per message, in order, and ``seq`` 0 once MLflow is imported: ``{"seq": n,
"op": <the message's>, "cpu": <process CPU s>, "trial_cpu": <CPU s spent logging trials>, "error": <one line or null>, "delivered":
<done: the run is in MLflow>, "number": <the trial>, "result": <a study call's answer>}``. Anything else
MLflow or a library prints goes to stderr (fd 1 is pointed at fd 2; the acknowledgements use a private copy
of the original stdout). The writer runs at a lower priority (``NICE``).

Robustness. SIGINT and SIGHUP are ignored (Ctrl-C reaches the whole process group; the study process handles
it and closes this one; a hangup would lose what was sent). On EOF of stdin every line already sent is
logged, then the process exits, so the trials a SIGKILLed study process had sent still arrive. A failing
MLflow call is reported in the acknowledgement (the study process logs it as a warning), or as one line on
stderr when the study process is gone. After a failure the store counts as down (``Outage``): the next
trials are acknowledged at once as not delivered (the study process keeps them in its spool for a later
run) until, a third of ``RETRY_EVERY_S`` later, one is tried again (a study call is always tried: the study
process decides when). MLflow's own HTTP retries are bounded by the study process (``retry_env``, in the
environment this process inherits).

The study process imports this module too: ``Outage`` and ``retry_env`` (how both processes ride out a
store that is down).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from initsearch.errors import exit_without_teardown, first_line, hide_password_of
from initsearch.tracking.runs import STUDY_CALLS, ArtifactsNotLogged, log_trial, short_error

URI_ENV = "INITSEARCH_MLFLOW_WRITER_URI"
NICE = 10  # the writer's niceness: below the study's training when they share a core

# ---- an outage: bounded retries, then quiet until it is time to try again ---------------------------------
RETRY_EVERY_S = 30.0  # while the store is down: try one call again after this long (the others wait in the spool)


def retry_env(seconds: float) -> dict[str, str]:
    """MLflow's HTTP retry settings for calls that give up after about ``seconds`` (retries included)
    instead of MLflow's minutes: two retries, 1 s backoff (2 s before the second), and a request timeout
    that leaves room for three attempts."""
    timeout = max(1, int((seconds - 3) / 3))
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}


class Outage:
    """Whether the store is down: after a failure, calls are skipped (their trials wait in the spool)
    until ``retry_every`` seconds have passed; then one call tries again."""

    def __init__(self, retry_every: float = RETRY_EVERY_S) -> None:
        self.retry_every = retry_every
        self.since: float | None = None
        self.next_try = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def should_try(self) -> bool:
        return self.since is None or time.monotonic() >= self.next_try

    def failed(self) -> bool:
        """Record a failure; ``True`` when it starts an outage (the one to warn about)."""
        now = time.monotonic()
        first = self.since is None
        self.since = now if first else self.since
        self.next_try = now + self.retry_every
        return first

    def recovered(self) -> bool:
        """Record a success; ``True`` when it ends an outage."""
        was, self.since = self.since is not None, None
        return was


# ---- the process -------------------------------------------------------------------------------------------
class Writer:
    """Handles the messages in order. After a failure the store counts as down (``Outage``): the next
    trials are acknowledged at once as not logged (the study process keeps them in its spool) until it is
    time to try one again.

    ``open`` creates the ``MlflowClient`` (which creates or migrates a SQLite store: the study process sends
    the first message that opens it under the store's lock); ``trial`` logs one child run and ``study`` runs
    one of ``runs.STUDY_CALLS`` (each opening the client first if needed). Each acknowledgement says whether
    it was done (``delivered``), and carries a study call's answer (``result``).
    """

    def __init__(self, uri: str, acks: IO[str]) -> None:
        self.uri = uri
        self.client: Any = None
        self.acks: IO[str] | None = acks
        self.outage = Outage(RETRY_EVERY_S / 3)  # over before the study process tries again: it finds this one ready
        self.trial_cpu = 0.0

    def handle(self, message: Mapping[str, Any]) -> None:
        """Run one message and acknowledge it."""
        op, error, delivered, result = message.get("op"), None, False, None
        if op in ("open", "trial", "study"):
            started = time.process_time()
            if op != "study" and not self.outage.should_try():
                error = "skipped: the store is down"
            else:
                try:
                    if self.client is None:
                        from mlflow.tracking import MlflowClient

                        self.client = MlflowClient(tracking_uri=self.uri)
                    if op == "trial":
                        log_trial(self.client, message, check_existing=bool(message.get("retry")))
                    elif op == "study":
                        result = STUDY_CALLS[str(message.get("call"))](self.client, **dict(message.get("args") or {}))
                    delivered = True
                    self.outage.recovered()
                except ArtifactsNotLogged as exc:
                    delivered, error = True, f"artifacts not stored ({exc})"
                    self.outage.recovered()
                except Exception as exc:
                    self.outage.failed()
                    first = short_error(exc)
                    error = {"trial": f"trial {message.get('number')}: {first}", "open": f"opening the store: {first}",
                             "study": first}[op]
            if op == "trial":
                self.trial_cpu += time.process_time() - started
        self.ack(message.get("seq"), error, delivered, message.get("number"), op, result)

    def ack(self, seq: Any, error: str | None, delivered: bool = True, number: Any = None, op: Any = None,
            result: Any = None) -> None:
        """One acknowledgement line; when the study process is gone, a failure goes to stderr instead."""
        line = json.dumps({"seq": seq, "op": op, "cpu": time.process_time(), "trial_cpu": self.trial_cpu,
                           "error": error, "delivered": delivered, "number": number, "result": result})
        if self.acks is not None:
            try:
                self.acks.write(line + "\n")
                self.acks.flush()
                return
            except (OSError, ValueError):
                self.acks = None  # the study process is gone; keep logging what it sent
        if error is not None and not error.startswith("skipped"):
            print(f"initsearch: WARNING: MLflow tracking: {error}", file=sys.stderr, flush=True)


def _private_stdout() -> IO[str]:
    """The acknowledgement channel: a copy of fd 1; fd 1 itself (and ``sys.stdout``) then point at stderr,
    so whatever MLflow prints (``View run`` links...) cannot corrupt the protocol."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", encoding="utf-8", buffering=1)


URI_ON_STDIN = "--uri-on-stdin"  # started before the study knew its URI: the first line of stdin gives it


def main(argv: list[str]) -> int:
    """``python -m initsearch.tracking.writer [<tracking uri> | --uri-on-stdin]``: log the trials read from
    stdin until EOF. The study process passes the URI in the environment (``URI_ENV``), not on the command
    line, where any user could read a password in it (``ps``); or, when it started this process before it
    knew the URI (``delivery.prestart_writer``), as the first line of stdin (``{"op": "uri", "uri": ...,
    "env": <MLflow's variables>}``;
    EOF instead: the study does not track, and this process ends quietly).

    It lowers its own priority (``NICE``): logging is background work, and on a machine whose cores are
    all busy the study's training should not wait for it (the writer catches up between or after trials).
    It imports MLflow at once (while the study process starts), then acknowledges seq 0 (ready).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # a closed terminal, or an orphaned process group: EOF ends this process
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    later = argv == [URI_ON_STDIN]
    uri = "" if later else argv[0] if len(argv) == 1 else os.environ.get(URI_ENV, "")
    if len(argv) > 1 or not (uri or later):
        print(f"usage: python -m initsearch.tracking.writer <tracking uri> (or the URI in ${URI_ENV}, or "
              f"{URI_ON_STDIN})", file=sys.stderr)
        return 2
    if uri:
        hide_password_of(uri)
    try:
        os.nice(NICE)
    except (OSError, AttributeError):  # no os.nice on Windows
        pass
    acks = _private_stdout()
    try:
        import mlflow.entities
        import mlflow.tracking

        if later:  # the default store is a SQLite file: its store's import (about a second) while we wait
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except Exception as exc:
        print(f"initsearch: MLflow writer cannot start: {first_line(exc, with_type=True, limit=300)}", file=sys.stderr,
              flush=True)
        return 3
    lines = iter(sys.stdin.buffer)
    if later:
        uri = _uri_of(next(lines, b""))
        if not uri:
            return 0
        hide_password_of(uri)
    writer = Writer(uri, acks)
    writer.ack(0, None)
    for raw in lines:
        try:
            message = json.loads(raw)
        except ValueError:
            continue  # a torn last line of a killed study process
        if isinstance(message, dict):
            writer.handle(message)
    return 0


def _uri_of(line: bytes) -> str:
    """The URI of a ``{"op": "uri", "uri": ..., "env": {...}}`` line (its ``MLFLOW_*`` variables are set
    here, as a writer started with the URI inherits them); ``""`` for anything else (EOF)."""
    try:
        message = json.loads(line)
    except ValueError:
        return ""
    if not isinstance(message, dict) or message.get("op") != "uri":
        return ""
    env = message.get("env")
    for key, value in (env.items() if isinstance(env, dict) else ()):
        if str(key).startswith("MLFLOW_"):
            os.environ[str(key)] = str(value)
    return str(message.get("uri") or "")


if __name__ == "__main__":
    exit_without_teardown(lambda: main(sys.argv[1:]))  # nothing to free: the study process waits for this exit
