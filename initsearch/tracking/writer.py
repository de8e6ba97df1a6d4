"""The MLflow writer: a separate process that logs the studies' per-trial child runs.

The study process (``tracking.delivery.WriterProcess``) starts it as ``python -m initsearch.tracking.writer``.
It imports only the standard library, MLflow and ``initsearch.errors`` (which imports nothing of initsearch):
not torch. Its CPU (MLflow's ORM) then runs on another core instead of competing for the study process's GIL.

Protocol. stdin: one JSON object per line: ``{"op": "open", "seq": n}`` (open the store now; the study
process sends it once it has created the store) and ``{"op": "trial", "seq": n, ...}`` (one child run; see
``log_trial`` for the fields, built by ``payload.trial_payload``). stdout: one JSON acknowledgement per
message, in order, and ``seq`` 0 once MLflow is imported: ``{"seq": n, "cpu": <process CPU s>,
"trial_cpu": <CPU s spent logging trials>, "error": <one line or null>, "delivered": <the run is in
MLflow>, "number": <the trial>}``. Anything
else MLflow or a library prints goes to stderr (fd 1 is pointed at fd 2; the acknowledgements use a
private copy of the original stdout). The writer runs at a lower priority (``NICE``).

Robustness. SIGINT and SIGHUP are ignored (Ctrl-C reaches the whole process group; the study process handles
it and closes this one; a hangup would lose what was sent). On EOF of stdin every line already sent is
logged, then the process exits, so the trials a SIGKILLed study process had sent still arrive. A failing
MLflow call is reported in the acknowledgement (the study process logs it as a warning), or as one line on
stderr when the study process is gone. After a failure the store counts as down (``Outage``): the next
trials are acknowledged at once as not delivered (the study process keeps them in its spool for a later
run) until, a third of ``RETRY_EVERY_S`` later, one is tried again. MLflow's own HTTP retries are bounded by the
study process (``retry_env``, in the environment this process inherits).

The study process imports this module too: ``log_trial`` for logging trials itself (no writer, or one
that died), ``log_in_batches`` for the study-level runs, ``Outage`` and ``retry_env`` (how both processes
ride out a store that is down), and the limits below.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

from initsearch.errors import first_line, hide_password_of

URI_ENV = "INITSEARCH_MLFLOW_WRITER_URI"
NICE = 10  # the writer's niceness: below the study's training when they share a core

# MLflow's limits (mlflow.utils.validation; the tests check these against the installed MLflow).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_BATCH_BYTES = 900_000  # under MLflow's 1 MB request limit, with room for the JSON framing


# ---- batching within MLflow's limits ---------------------------------------------------------------------
def batches(metrics: Sequence[Any] = (), params: Sequence[tuple[str, str]] = (),
            tags: Sequence[tuple[str, str]] = ()) -> Iterator[tuple[list[Any], list[tuple[str, str]], list[tuple[str, str]]]]:
    """Split into ``log_batch`` calls within MLflow's limits: <= 1000 metrics, <= 100 params, <= 100 tags,
    <= 1000 entities in all, and about <= 0.9 MB of keys and values per call. ``metrics`` are objects with
    a ``key`` (``mlflow.entities.Metric``)."""
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

    params = list(params.items()) if isinstance(params, Mapping) else [tuple(p) for p in params]
    tags = list(tags.items()) if isinstance(tags, Mapping) else [tuple(t) for t in tags]
    calls = 0
    for m, p, t in batches(metrics, params, tags):
        client.log_batch(run_id, metrics=m, params=[Param(k, v) for k, v in p], tags=[RunTag(k, v) for k, v in t])
        calls += 1
    return calls


# ---- an outage: bounded retries, then quiet until it is time to try again ---------------------------------
RETRY_EVERY_S = 30.0  # while the store is down: try one call again after this long (the others wait in the spool)


def retry_env(seconds: float) -> dict[str, str]:
    """MLflow's HTTP retry settings for calls that give up after about ``seconds`` (retries included)
    instead of MLflow's minutes: two retries, 1 s backoff (2 s before the second), and a request timeout
    that leaves room for three attempts."""
    timeout = max(1, int((seconds - 3) / 3))
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}


_NO_ANSWER = re.compile(r"API request to (\S+?)/api/\S* failed with exception .*?(Connection refused|Read timed out|"
                        r"Connection reset|Connection aborted|Name or service not known|timed out)", re.IGNORECASE)


def short_error(exc: BaseException) -> str:
    """One short line for a failed MLflow call: a server that did not answer is ``<url> did not answer
    (Connection refused)`` rather than MLflow's nested urllib3 message; anything else its first line."""
    text = first_line(exc, with_type=True, limit=4000)
    found = _NO_ANSWER.search(text)
    if found:
        return f"{found.group(1)} did not answer ({found.group(2)})"
    return text if len(text) <= 300 else text[:297] + "..."


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


# ---- one trial ---------------------------------------------------------------------------------------------
class ArtifactsNotLogged(Exception):
    """The trial's run is logged, but not its text artifacts (the artifact store refused them)."""


def finished_trial_run(client: Any, experiment_id: str, parent_id: str, number: Any) -> Any:
    """The finished (not RUNNING) child run of trial ``number`` under ``parent_id``, or ``None``."""
    runs = client.search_runs([str(experiment_id)], f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                              f"tags.`initsearch.trial` = '{number}'", max_results=10)
    done = [r for r in runs if r.info.status != "RUNNING"]
    return done[0] if done else None


def log_trial(client: Any, payload: Mapping[str, Any], check_existing: bool = False) -> str:
    """Log one trial's child run from its plain payload; return the run id.

    Fields: ``experiment_id``, ``run_name``, ``start_ms``, ``end_ms``, ``tags`` (``mlflow.parentRunId``
    included), ``params`` (``[key, value]`` pairs), ``metrics`` (``[key, value, timestamp_ms, step]``),
    ``texts`` (``{artifact file name: text}``), ``status`` (``FINISHED``/``KILLED``/``FAILED``). The run is
    created with the trial's start time, filled with one or a few ``log_batch`` calls, terminated with the
    trial's end time, then given its text artifacts. ``check_existing`` (a trial tried before): when the
    trial already has a finished run, that one is returned and nothing is logged, so each trial is logged
    once. When logging fails half-way the partial run is deleted (or, when that fails too, left RUNNING
    for the next run of the study to delete) and the error raised; a run whose artifacts could not be
    stored is kept and ``ArtifactsNotLogged`` raised.
    """
    from mlflow.entities import Metric

    tags = dict(payload["tags"])
    if check_existing:
        done = finished_trial_run(client, payload["experiment_id"], tags["mlflow.parentRunId"], payload["number"])
        if done is not None:
            return done.info.run_id
    run = client.create_run(str(payload["experiment_id"]), start_time=int(payload["start_ms"]),
                            run_name=payload["run_name"], tags=tags)
    run_id = run.info.run_id
    try:
        metrics = [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in payload["metrics"]]
        log_in_batches(client, run_id, metrics=metrics, params=payload["params"])
        client.set_terminated(run_id, status=str(payload["status"]), end_time=int(payload["end_ms"]))
    except Exception:
        try:
            client.delete_run(run_id)
        except Exception:
            pass
        raise
    for name, text in payload["texts"].items():
        try:
            client.log_text(run_id, text, name)
        except Exception as exc:
            raise ArtifactsNotLogged(f"{name} of trial {payload.get('number')}: "
                                     f"{first_line(exc, with_type=True, limit=300)}") from None
    return run_id


# ---- the process -------------------------------------------------------------------------------------------
class Writer:
    """Handles the messages in order. After a failure the store counts as down (``Outage``): the next
    trials are acknowledged at once as not logged (the study process keeps them in its spool) until it is
    time to try one again.

    ``open`` creates the ``MlflowClient`` (its store is opened, which the study process must have created
    and migrated first: it sends ``open`` after opening the store itself); ``trial`` logs one child run
    (opening the client first if needed). Each acknowledgement says whether the trial's run is in MLflow
    (``delivered``).
    """

    def __init__(self, uri: str, acks: IO[str]) -> None:
        self.uri = uri
        self.client: Any = None
        self.acks: IO[str] | None = acks
        self.outage = Outage(RETRY_EVERY_S / 3)  # over before the study process tries again: it finds this one ready
        self.trial_cpu = 0.0

    def handle(self, message: Mapping[str, Any]) -> None:
        """Run one message and acknowledge it."""
        op, error, delivered = message.get("op"), None, False
        if op in ("open", "trial"):
            started = time.process_time()
            if not self.outage.should_try():
                error = "skipped: the store is down"
            else:
                try:
                    if self.client is None:
                        from mlflow.tracking import MlflowClient

                        self.client = MlflowClient(tracking_uri=self.uri)
                    if op == "trial":
                        log_trial(self.client, message, check_existing=bool(message.get("retry")))
                    delivered = True
                    self.outage.recovered()
                except ArtifactsNotLogged as exc:
                    delivered, error = True, f"artifacts not stored ({exc})"
                    self.outage.recovered()
                except Exception as exc:
                    self.outage.failed()
                    first = short_error(exc)
                    error = (f"trial {message.get('number')}: {first}" if op == "trial" else f"opening the store: {first}")
            if op == "trial":
                self.trial_cpu += time.process_time() - started
        self.ack(message.get("seq"), error, delivered, message.get("number"))

    def ack(self, seq: Any, error: str | None, delivered: bool = True, number: Any = None) -> None:
        """One acknowledgement line; when the study process is gone, a failure goes to stderr instead."""
        line = json.dumps({"seq": seq, "cpu": time.process_time(), "trial_cpu": self.trial_cpu, "error": error,
                           "delivered": delivered, "number": number})
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


def main(argv: list[str]) -> int:
    """``python -m initsearch.tracking.writer [<tracking uri>]``: log the trials read from stdin until EOF.
    The study process passes the URI in the environment (``URI_ENV``), not on the command line, where any
    user could read a password in it (``ps``).

    It lowers its own priority (``NICE``): logging is background work, and on a machine whose cores are
    all busy the study's training should not wait for it (the writer catches up between or after trials).
    It imports MLflow at once (while the study process opens the store), then acknowledges seq 0 (ready).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # a closed terminal, or an orphaned process group: EOF ends this process
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    uri = argv[0] if len(argv) == 1 else os.environ.get(URI_ENV, "")
    if len(argv) > 1 or not uri:
        print(f"usage: python -m initsearch.tracking.writer <tracking uri> (or the URI in ${URI_ENV})", file=sys.stderr)
        return 2
    hide_password_of(uri)
    try:
        os.nice(NICE)
    except (OSError, AttributeError):  # no os.nice on Windows
        pass
    acks = _private_stdout()
    try:
        import mlflow.entities
        import mlflow.tracking  # noqa: F401
    except Exception as exc:
        print(f"initsearch: MLflow writer cannot start: {first_line(exc, with_type=True, limit=300)}", file=sys.stderr,
              flush=True)
        return 3
    writer = Writer(uri, acks)
    writer.ack(0, None)
    for raw in sys.stdin.buffer:
        try:
            message = json.loads(raw)
        except ValueError:
            continue  # a torn last line of a killed study process
        if isinstance(message, dict):
            writer.handle(message)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
