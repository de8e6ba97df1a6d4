"""Where a study's MLflow runs go: the ``tracking_uri`` setting turned into a store, checked before any training.

``null`` = ``sqlite:///<working dir>/mlflow.db`` made absolute, with the artifacts in ``<dir of the db>/mlartifacts``;
any other ``sqlite:///`` path likewise; ``http(s)://host:port`` = a team ``mlflow server`` (its /health is probed
at start, so an unreachable server is one clear ``ConfigError``); ``none`` (or ``off``) = no tracking. The same
URI always means the same store, whichever folder a later run (a resume, the MLflow UI) starts in.
"""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from initsearch.errors import ConfigError, first_line, hide_password_of, redact_url, scrub
from initsearch.search.settings import DEFAULT_TRACKING_URI

OFF_VALUES = ("none", "off")
PROBE_TIMEOUT_S = 5.0
LOCAL_UI = "http://127.0.0.1:5000"  # where ``make ui`` (``mlflow ui --port 5000``) serves a local store
# MLflow 3.x shows an experiment as GenAI (traces overview) or as model training (the runs table). Older 3.x
# releases read the experiment tag below (set when a study creates its experiment); 3.17's UI ignores the
# tag and follows the browser's ``workflowType`` (the URL's query parameter, else the "GenAI / Model training"
# switch remembered in local storage, GenAI by default), so the link ``runs_page_url`` makes carries it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def resolve_tracking_uri(uri: str | None, cwd: Path | None = None) -> str | None:
    """The store to log to, stable across runs, or ``None`` when tracking is off.

    ``None``/empty -> ``DEFAULT_TRACKING_URI`` (``sqlite:///mlflow.db``); a relative SQLite path is made
    absolute against ``cwd`` (the working directory), so every run of the same command, and the MLflow UI
    started in that folder, see the same database; ``none``/``off`` -> ``None``; anything else (http,
    postgresql, ...) is kept as given. A plain path (no ``://``) or a ``file:`` URI is MLflow's file store,
    which MLflow 3 refuses (in a paragraph, after the study started): one ``ConfigError`` line here, unless
    ``MLFLOW_ALLOW_FILE_STORE=true`` opts back in (then a plain path becomes a ``file:`` URI).
    """
    text = DEFAULT_TRACKING_URI if uri is None or not str(uri).strip() else str(uri).strip()
    if text.lower() in OFF_VALUES:
        return None
    if (("://" not in text and text.lower() not in SCHEME_ONLY) or text.lower().startswith("file:")) \
            and not file_store_allowed():
        raise ConfigError(f"tracking_uri: {text} is an MLflow file store, which MLflow 3 refuses unless "
                          f"MLFLOW_ALLOW_FILE_STORE=true; give a database URL such as sqlite:///path/mlflow.db "
                          f"or a server http://host:port")
    base = Path.cwd() if cwd is None else cwd
    if text.startswith("sqlite:///"):
        path, sep, query = text[len("sqlite:///"):].partition("?")
        if path and path != ":memory:":
            full = Path(path).expanduser()
            full = full if full.is_absolute() else base / full
            return f"sqlite:///{full.absolute().as_posix()}{sep}{query}"
        return text
    if "://" not in text and text.lower() not in SCHEME_ONLY:
        full = Path(text).expanduser()
        return (full if full.is_absolute() else base / full).absolute().as_uri()
    return text.rstrip("/") if is_http(text) else text


SCHEME_ONLY = ("databricks", "databricks-uc", "uc")  # tracking URIs MLflow takes without "://": not folders


def file_store_allowed() -> bool:
    """Whether the user opted in to MLflow's file store (MLflow's own ``MLFLOW_ALLOW_FILE_STORE``)."""
    return os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1")


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go to ``mlartifacts/`` next to the database file (a ``file:`` URI), so
    they do not depend on the folder a later run starts in. Servers and other stores decide for themselves."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].partition("?")[0]
        if path and path != ":memory:":
            return (Path(path).parent / "mlartifacts").as_uri()
    return None


def ui_base(uri: str) -> str:
    """The address of the MLflow UI that shows ``uri``'s runs: the server itself, else ``make ui``'s."""
    return redact_url(uri.rstrip("/")) if is_http(uri) else LOCAL_UI


def runs_page_url(base: str, experiment_id: str, direction: str = "minimize") -> str:
    """The experiment's runs table in the MLflow UI, trials ranked by ``score`` (best first), flat (a sort
    un-nests the trials from their parent run), in the model-training view."""
    ascending = "true" if direction == "minimize" else "false"
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&orderByKey=metrics.%60score%60&orderByAsc={ascending}")


def is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Probe ``GET {uri}/health`` once with a short timeout; raise a one-line ``ConfigError`` when it fails.

    MLflow's own client would retry with backoff for minutes; this answers in at most ``timeout`` seconds.
    401/403 count as reachable (the server is there and wants credentials, which MLflow reads from
    ``MLFLOW_TRACKING_USERNAME``/``..._PASSWORD``).
    """
    shown = redact_url(uri)
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            resp.read(64)
        return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return
        reason = f"GET /health answered HTTP {exc.code}"
    except urllib.error.URLError as exc:
        reason = str(exc.reason)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, malformed URLs, bad ports
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    hide_password_of(uri)
    reason = scrub(reason)
    raise ConfigError(
        f"tracking_uri: cannot reach MLflow at {shown}: {reason} (start the server, or set tracking_uri=none)"
    ) from None


def make_parent_dir(uri: str) -> None:
    path = uri[len("sqlite:///"):].partition("?")[0]
    if path and path != ":memory:":
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"tracking_uri: cannot create the folder of {path}: {exc}") from None


def check_sqlite_store(uri: str) -> None:
    """Before any training, without importing MLflow (a second of a short study's start): a local SQLite
    store that exists must be a database this process can open and, when it holds any table, MLflow's (its
    ``experiments`` table: an Optuna database, say, is refused): one ``ConfigError`` line if not. A new or
    empty one is created by the first ``open_client``. Opened read-write (never created here): a process
    killed in the middle of a write leaves a journal that the next reader must roll back, which a read-only
    connection cannot ("attempt to write a readonly database")."""
    path = uri[len("sqlite:///"):].partition("?")[0]
    if not path or path == ":memory:" or not Path(path).exists():
        return
    import sqlite3
    from contextlib import closing

    try:
        with closing(sqlite3.connect(Path(path).absolute().as_uri() + "?mode=rw", uri=True, timeout=10.0)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise ConfigError(f"tracking_uri: cannot open MLflow store {redact_url(uri)}: {type(exc).__name__}: "
                          f"{first_line(exc)}") from None
    if tables and "experiments" not in tables:
        raise ConfigError(f"tracking_uri: {redact_url(uri)} is a database but not an MLflow store (no experiments "
                          f"table; it has {', '.join(sorted(tables)[:4])}); give MLflow a file of its own")


def open_client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri`` whose store has answered once (a one-line ``ConfigError`` if not)."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as exc:
        first = first_line(exc)
        raise ConfigError(
            f"tracking_uri: cannot open MLflow store {redact_url(uri)}: {type(exc).__name__}: {first}") from None
    return client
