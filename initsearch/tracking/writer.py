"""The MLflow writer: a separate process that logs the studies' per-trial child runs.

The study process (``tracking.delivery.WriterProcess``) starts it as ``python -m initsearch.tracking.writer``.
It imports only the standard library, MLflow and ``initsearch.errors`` (which imports nothing of initsearch):
not torch. Its CPU (MLflow's ORM) then runs on another core instead of competing for the study process's GIL.

Protocol. stdin: one JSON object per line: ``{"op": "open", "seq": n}`` (open the store now; the study
process sends it once it has created the store) and ``{"op": "trial", "seq": n, ...}`` (one child run; see
``log_trial`` for the fields, built by ``payload.trial_payload``). stdout: one JSON acknowledgement per
message, in order, and ``seq`` 0 once MLflow is imported: ``{"seq": n, "cpu": <process CPU s>,
"trial_cpu": <CPU s spent logging trials>, "error": <one line or null>, "disabled": <bool>}``. Anything
else MLflow or a library prints goes to stderr (fd 1 is pointed at fd 2; the acknowledgements use a
private copy of the original stdout). The writer runs at a lower priority (``NICE``).

Robustness. SIGINT and SIGHUP are ignored (Ctrl-C reaches the whole process group; the study process handles
it and closes this one; a hangup would lose what was sent). On EOF of stdin every line already sent is
logged, then the process exits, so the trials a SIGKILLed study process had sent still arrive. A failing
MLflow call is reported in the acknowledgement (the study process logs it as a warning), or as one line on
stderr when the study process is gone; after ``MAX_FAILURES`` failures in a row the writer stops calling
MLflow and only acknowledges.

The study process imports this module too: ``log_trial`` for logging trials itself (no writer, or one
that died), ``log_in_batches`` for the study-level runs, and the limits below.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

from initsearch.errors import first_line, hide_password_of

MAX_FAILURES = 3
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


# ---- one trial ---------------------------------------------------------------------------------------------
def log_trial(client: Any, payload: Mapping[str, Any]) -> str:
    """Log one trial's child run from its plain payload; return the run id.

    Fields: ``experiment_id``, ``run_name``, ``start_ms``, ``end_ms``, ``tags`` (``mlflow.parentRunId``
    included), ``params`` (``[key, value]`` pairs), ``metrics`` (``[key, value, timestamp_ms, step]``),
    ``texts`` (``{artifact file name: text}``), ``status`` (``FINISHED``/``KILLED``/``FAILED``). The run is
    created with the trial's start time, filled with one or a few ``log_batch`` calls and the text
    artifacts, then terminated with the trial's end time; when logging fails half-way it is terminated
    ``FAILED`` (``KILLED`` stays) and the error is raised.
    """
    from mlflow.entities import Metric

    run = client.create_run(str(payload["experiment_id"]), start_time=int(payload["start_ms"]),
                            run_name=payload["run_name"], tags=dict(payload["tags"]))
    run_id = run.info.run_id
    status = str(payload["status"])
    try:
        metrics = [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in payload["metrics"]]
        log_in_batches(client, run_id, metrics=metrics, params=payload["params"])
        for name, text in payload["texts"].items():
            client.log_text(run_id, text, name)
    except Exception:
        status = "FAILED" if status == "FINISHED" else status
        raise
    finally:
        client.set_terminated(run_id, status=status, end_time=int(payload["end_ms"]))
    return run_id


# ---- the process -------------------------------------------------------------------------------------------
class Writer:
    """Handles the messages in order; counts failures in a row and gives up after ``MAX_FAILURES``.

    ``open`` creates the ``MlflowClient`` (its store is opened, which the study process must have created
    and migrated first: it sends ``open`` after opening the store itself); ``trial`` logs one child run
    (opening the client first if needed).
    """

    def __init__(self, uri: str, acks: IO[str]) -> None:
        self.uri = uri
        self.client: Any = None
        self.acks: IO[str] | None = acks
        self.failures = 0
        self.disabled = False
        self.trial_cpu = 0.0

    def handle(self, message: Mapping[str, Any]) -> None:
        """Run one message and acknowledge it."""
        op, error = message.get("op"), None
        if op in ("open", "trial") and not self.disabled:
            started = time.process_time()
            try:
                if self.client is None:
                    from mlflow.tracking import MlflowClient

                    self.client = MlflowClient(tracking_uri=self.uri)
                if op == "trial":
                    log_trial(self.client, message)
                self.failures = 0
            except Exception as exc:
                self.failures += 1
                first = first_line(exc, with_type=True, limit=300)
                error = (f"log_trial failed (trial {message.get('number')}: {first})" if op == "trial"
                         else f"opening the store failed ({first})")
                self.disabled = self.failures >= MAX_FAILURES
            finally:
                if op == "trial":
                    self.trial_cpu += time.process_time() - started
        self.ack(message.get("seq"), error)

    def ack(self, seq: Any, error: str | None) -> None:
        """One acknowledgement line; when the study process is gone, a failure goes to stderr instead."""
        line = json.dumps({"seq": seq, "cpu": time.process_time(), "trial_cpu": self.trial_cpu, "error": error,
                           "disabled": self.disabled})
        if self.acks is not None:
            try:
                self.acks.write(line + "\n")
                self.acks.flush()
                return
            except (OSError, ValueError):
                self.acks = None  # the study process is gone; keep logging what it sent
        if error is not None:
            print(f"initsearch: WARNING: MLflow tracking: {error}"
                  + ("; tracking is off" if self.disabled else ""), file=sys.stderr, flush=True)


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
