"""MLflow tracking: the runs a study leaves in MLflow (local SQLite, resume, a real server, the UI command),
the limits every call respects, and that tracking stays off the study's critical path."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace

import mlflow.utils.validation as mlflow_limits
import numpy as np
import optuna
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from initsearch.cli import run
from initsearch.errors import ConfigError, first_line, scrub
from initsearch.proxy.train import Curve
from initsearch.search.outcome import NullTracker, TrialOutcome
from initsearch.search.settings import settings_from_config
from initsearch.search.workers import worker_id
from initsearch.tracking import delivery
from initsearch.tracking import tracker as tracking
from initsearch.tracking.delivery import writer_running_for
from initsearch.tracking.payload import config_params, redact_text, trial_metric_rows
from initsearch.tracking.plots import plot_importances
from initsearch.tracking.runs import (
    MAX_BATCH_BYTES,
    MAX_ENTITIES_PER_BATCH,
    MAX_KEY,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VALUE,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VALUE,
    batches,
    metric_entities,
)
from initsearch.tracking.uri import check_reachable, default_artifact_location, resolve_tracking_uri, runs_page_url
from tests.conftest import TINY, compose_config

MLFLOW_BIN = str(Path(sys.executable).with_name("mlflow"))
BASE = [o for o in TINY if not o.startswith("tracking_uri=")]  # 2 baselines (he, xavier) + 2 searched trials
STEPS = 20  # train.steps in TINY


# ---- helpers -----------------------------------------------------------------------------------------------
def sqlite_tables(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def free_port() -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(tmp: Path, *extra: str):
    return compose_config(BASE + [f"storage={tmp}/s.journal", *extra])


def http_get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def http_post_json(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def start_server(args: list[str], cwd: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start an MLflow server on a free loopback port in its own process group; wait for /health."""
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([MLFLOW_BIN, *args, "--port", str(port)], cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if http_get(url + "/health")[0] == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"mlflow did not answer /health within 90 s: {log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """End the server and its workers: the process group this test started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def runs_of(client: MlflowClient, study: str):
    """(experiment, parents, children) of study ``study``."""
    exp = client.get_experiment_by_name(study)
    assert exp is not None, f"no experiment named {study!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("initsearch.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return exp, parents, children


def check_study_structure(client: MlflowClient, study: str, n_children: int) -> None:
    """What every tracked tiny study must leave in MLflow, whatever the store."""
    exp, parents, children = runs_of(client, study)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["initsearch.study"] == study
    assert {"initsearch.version.torch", "initsearch.version.mlflow", "initsearch.device", "initsearch.storage"} <= set(parent.data.tags)
    assert parent.data.params["model.width"] == "16" and parent.data.params["train.steps"] == str(STEPS)
    assert "best_score" in parent.data.metrics
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "best_policy.json", "best_policy.png", "trials.csv", "score_by_trial.png",
            "training_curves.png", "init_signals.png"} <= parent_files
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    best = json.loads(Path(client.download_artifacts(parent.info.run_id, "best_policy.json")).read_text())
    assert best["format"] == "initsearch-policy"

    assert len(children) == n_children
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    numbers = sorted(int(c.data.tags["initsearch.trial"]) for c in children)
    assert numbers == list(range(n_children))  # exactly one child per trial
    baselines = {c.data.tags.get("initsearch.baseline") for c in children if c.data.tags["initsearch.kind"] == "baseline"}
    assert baselines == {"he", "xavier"}
    assert sum(c.data.tags["initsearch.kind"] == "search" for c in children) == n_children - 2
    trained = 0
    for child in children:
        run_id = child.info.run_id
        assert child.data.params["trial"] == child.data.tags["initsearch.trial"]
        history = client.get_metric_history(run_id, "curves/train_loss")
        if child.data.tags["initsearch.state"] == "complete":
            assert child.info.status == "FINISHED"
            assert math.isfinite(child.data.metrics["score"])
            assert child.info.start_time <= child.info.end_time
            policy = json.loads(Path(client.download_artifacts(run_id, "policy.json")).read_text())
            assert policy["format"] == "initsearch-policy"
            if child.data.tags.get("initsearch.reason", "").startswith("same policy as trial"):
                continue  # the sampler re-proposed a scored policy: the study reused its score, nothing trained
            trained += 1
            assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # one point per step
            assert sorted(m.step for m in client.get_metric_history(run_id, "curves/val_loss")) == [10, 20]
            assert not any(k.startswith("init_") for k in child.data.metrics)  # no metric per layer...
            assert {"init/loss", "init/grad_ratio"} <= set(child.data.metrics)
            table = json.loads(Path(client.download_artifacts(run_id, "init_signals.json")).read_text())
            assert [row[table["columns"].index("name")] for row in table["data"]] == ["fc1", "out"]  # ...one table
            assert "grad_norm" in table["columns"] and "output_std" in table["columns"]
            assert json.loads(child.data.tags["mlflow.loggedArtifacts"]) == [{"path": "init_signals.json", "type": "table"}]
        if child.data.tags["initsearch.kind"] == "search":
            assert any(k.startswith("scheme") for k in child.data.params)  # the sampled params
    assert trained >= 3  # both baselines and at least the first searched trial trained


# ---- the default local store, shared by the structure and UI tests ------------------------------------------
@pytest.fixture(scope="module")
def local_study(tmp_path_factory):
    """A tiny study run with the default tracking_uri (null) in a fresh working directory."""
    tmp = tmp_path_factory.mktemp("local")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        run(tiny(tmp, "tracking_uri=null", "study_name=tiny_local"), tmp / "out")
    return tmp


def test_default_store_is_an_absolute_sqlite_file_in_the_working_dir_with_artifacts_beside_it(local_study):
    assert (local_study / "mlflow.db").is_file()
    assert not (local_study / "mlruns").exists()
    client = MlflowClient(f"sqlite:///{local_study}/mlflow.db")
    exp, parents, _ = runs_of(client, "tiny_local")
    assert exp.artifact_location == (local_study / "mlartifacts").as_uri()
    assert (local_study / "mlartifacts" / parents[0].info.run_id / "artifacts" / "trials.csv").is_file()


def test_local_study_leaves_one_parent_and_one_child_per_trial(local_study):
    check_study_structure(MlflowClient(f"sqlite:///{local_study}/mlflow.db"), "tiny_local", n_children=4)


def test_the_parent_run_keeps_the_selection_table_the_run_folder_has(local_study):
    client = MlflowClient(f"sqlite:///{local_study}/mlflow.db")
    _, parents, _ = runs_of(client, "tiny_local")
    logged = Path(client.download_artifacts(parents[0].info.run_id, "selection.csv")).read_text()
    assert logged == (local_study / "out" / "selection.csv").read_text()
    exported = json.loads((local_study / "out" / "best_policy.json").read_text())["provenance"]["trial"]
    rows = [line.split(",") for line in logged.strip().splitlines()]
    header, body = rows[0], rows[1:]
    assert [r[header.index("trial")] for r in body if r[header.index("exported")] == "True"] == [str(exported)]


def test_readme_ui_command_serves_the_page_and_lists_the_runs(local_study):
    proc, url = start_server(["ui", "--backend-store-uri", "sqlite:///mlflow.db", "--workers", "1"],
                             cwd=local_study, log_path=local_study / "ui.log")
    try:
        status, ctype, body = http_get(url + "/")
        assert status == 200 and "text/html" in ctype and b"<html" in body.lower()
        exp = http_get(url + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny_local")[2]
        exp_id = json.loads(exp)["experiment"]["experiment_id"]
        runs = http_post_json(url + "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 100})["runs"]
        roles = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "initsearch.role") for r in runs)
        assert roles == ["parent"] + ["trial"] * 4
        parent = next(r for r in runs if any(t["value"] == "parent" for t in r["data"]["tags"]))
        listing = json.loads(http_get(f"{url}/api/2.0/mlflow/artifacts/list?run_id={parent['info']['run_id']}")[2])
        assert "best_policy.json" in {f["path"] for f in listing["files"]}
        page = rendered_page(runs_page_url(url, exp_id), local_study / "chromium")
        if page is None:
            warnings.warn("chromium not found: the MLflow UI page itself was not checked (apt-get install chromium)")
            return
        # The runs table, trials ranked by score, not MLflow's GenAI overview (traces, latency, tokens).
        for name in (">he (trial 0)<", ">xavier (trial 1)<", ">trial 2<", ">trial 3<", "<strong>5</strong> matching runs"):
            assert name in page, f"{name!r} not on the experiment's page"
        assert "Sort: score" in page
        assert "Detect Issues" not in page and "Traces</span>" not in page.split("Runs")[0]
    finally:
        stop_server(proc)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_page(url: str, profile: Path) -> str | None:
    """The DOM of ``url`` after headless Chromium ran its scripts (a fresh profile: nothing remembered from
    earlier visits), or ``None`` without Chromium."""
    if CHROMIUM is None:
        return None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=20000", "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# ---- resume ---------------------------------------------------------------------------------------------------
def test_resume_attaches_to_the_same_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run(tiny(tmp_path, f"tracking_uri={uri}", "study_name=tiny_resume"), tmp_path / "out1")
    client = MlflowClient(uri)
    _, (first,), _ = runs_of(client, "tiny_resume")
    run(tiny(tmp_path, f"tracking_uri={uri}", "study_name=tiny_resume", "n_trials=3"), tmp_path / "out2")
    check_study_structure(client, "tiny_resume", n_children=5)
    _, (parent,), children = runs_of(client, "tiny_resume")
    assert parent.info.run_id == first.info.run_id
    assert parent.info.start_time == first.info.start_time
    newest = [c for c in children if c.data.tags["initsearch.trial"] == "4"]
    assert len(newest) == 1 and newest[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "n_trials=3" in parent.data.tags["initsearch.resumed_with"]
    assert parent.data.params["n_trials"] == "2"  # params cannot change; the first config stays
    # trials.csv on the parent now covers both processes' trials
    rows = Path(client.download_artifacts(parent.info.run_id, "trials.csv")).read_text().strip().splitlines()
    assert len(rows) == 1 + 5


# ---- a real MLflow server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    proc, url = start_server(
        ["server", "--host", "127.0.0.1", "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp}/srv.db",
         "--artifacts-destination", str(tmp / "art")],
        cwd=tmp, log_path=tmp / "server.log")
    try:
        yield SimpleNamespace(url=url, root=tmp)
    finally:
        stop_server(proc)


def test_study_against_a_tracking_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(tiny(tmp_path, f"tracking_uri={mlflow_server.url}", "study_name=tiny_server"), tmp_path / "out")
    check_study_structure(MlflowClient(mlflow_server.url), "tiny_server", n_children=4)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
    assert list((mlflow_server.root / "art").rglob("best_policy.json"))  # uploaded through the server


# ---- an unreachable server or tracking off -------------------------------------------------------------------
def test_unreachable_server_is_one_warning_and_a_tracker_that_keeps_the_trials(tmp_path, monkeypatch, caplog):
    """(The whole study against a server that is down: tests/test_outages.py.)"""
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="initsearch"):
        tracker = tracking.make_tracker(settings_from_config(tiny(tmp_path, f"tracking_uri={uri}")))
    assert time.monotonic() - started < 10
    assert tracker.client is None and tracker.outage.down
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"MLflow tracking: cannot reach MLflow at {uri}: ") and "the study runs without it" in message
    tracker.close()


def test_a_local_store_that_is_not_a_database_is_one_line_before_any_training(tmp_path, monkeypatch):
    """The store is opened on the tracker's thread; what can be checked without MLflow fails at once."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.db").write_bytes(b"this is not a database" * 100)
    settings = settings_from_config(tiny(tmp_path, f"tracking_uri=sqlite:///{tmp_path}/bad.db"))
    with pytest.raises(ConfigError, match=r"^tracking_uri: cannot open MLflow store sqlite:///.*bad\.db: DatabaseError: "):
        tracking.make_tracker(settings)


def test_a_store_a_killed_process_left_mid_write_is_opened(tmp_path, monkeypatch):
    """SIGKILL in the middle of an MLflow write (a study's process group killed while its writer logs) leaves
    a hot journal beside the store; the next run rolls it back instead of refusing the store."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    for i in range(300):
        client.create_experiment(f"experiment {i}")
    killed = ("import os, signal, sqlite3\n"
              f"db = sqlite3.connect({str(tmp_path / 'mlflow.db')!r}, isolation_level=None)\n"
              "db.execute('PRAGMA cache_size=1'); db.execute('BEGIN IMMEDIATE')\n"
              "db.execute(\"UPDATE experiments SET name = name || ' with a long suffix that fills pages'\")\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", killed], timeout=60)
    assert (tmp_path / "mlflow.db-journal").is_file()  # the write it was killed in
    tracker = tracking.make_tracker(settings_from_config(tiny(tmp_path, f"tracking_uri={uri}")))
    tracker.close()
    assert MlflowClient(uri).get_experiment_by_name("experiment 7") is not None  # rolled back


def test_an_optuna_database_as_the_mlflow_store_is_one_line_before_any_training(tmp_path, monkeypatch):
    """Optuna and MLflow never share one SQLite file: a database without MLflow's tables is refused at once."""
    monkeypatch.chdir(tmp_path)
    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path}/optuna.db")
    settings = settings_from_config(tiny(tmp_path, f"tracking_uri=sqlite:///{tmp_path}/optuna.db"))
    with pytest.raises(ConfigError, match=r"^tracking_uri: sqlite:///.*optuna\.db is a database but not an MLflow "
                                          r"store \(no experiments table; it has .*\); give MLflow a file of its own$"):
        tracking.make_tracker(settings)


def test_a_local_store_is_opened_by_the_writer_and_the_study_does_not_wait_for_it(tmp_path, monkeypatch):
    """A SQLite store starts alone (under its own lock): make_tracker opens no client; the writer process
    creates the store and the parent run, and this process never opens one."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = settings_from_config(tiny(tmp_path, f"tracking_uri={uri}", "study_name=alone"))
    tracker = tracking.make_tracker(settings)
    try:
        assert tracker.client is None and tracker.starts_alone
        tracker.study_started(settings, "study_name: alone\n", SimpleNamespace(study_name="alone"))
        assert tracker.flush()
        assert tracker.client is None and tracker.parent_id is not None
    finally:
        tracker.close()
    assert [r.info.run_id for r in MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("alone").experiment_id])] == [tracker.parent_id]


def test_open_store_now_opens_it_before_the_study_starts(tmp_path, monkeypatch):
    """What scripts/bench.py uses to keep a fresh store's opening out of a study's timing."""
    monkeypatch.chdir(tmp_path)
    settings = settings_from_config(tiny(tmp_path, f"tracking_uri=sqlite:///{tmp_path}/mlflow.db"))
    tracker = tracking.make_tracker(settings)
    try:
        tracker.open_store_now()
        assert tracker.client is None and tracker.parent_id is None  # opened in the writer process
        assert tracker.writer is not None and tracker.writer.wait_acknowledged(stall_timeout=0.1)
        assert "experiments" in sqlite_tables(tmp_path / "mlflow.db")
    finally:
        tracker.close()


MLFLOW_SPY = """import atexit, os, sys
atexit.register(lambda: open(os.path.join(os.environ["MLFLOW_SPY"], ("writer" if sys.argv[0].endswith("writer.py")
    else "study") + f"-{os.getpid()}.txt"), "w").write(
    " ".join(sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow."))[:2]) or "none"))
"""


def test_a_study_with_a_local_store_never_imports_mlflow_in_its_own_process(tmp_path):
    """The writer process makes every MLflow call of the study (the parent run, the trials, the figures'
    data, the end): the study's interpreter, which trains, does not import MLflow at all. Yet everything
    is logged: the parent run FINISHED with its artifacts, one child run per trial."""
    (tmp_path / "sitecustomize.py").write_text(MLFLOW_SPY)
    spy = tmp_path / "spy"
    spy.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])]),
           "MLFLOW_SPY": str(spy)}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "initsearch", *BASE, f"tracking_uri={uri}", "study_name=no_mlflow_here",
                           f"storage={tmp_path}/study.journal", f"hydra.run.dir={tmp_path}/out", "progress=false"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    (study,) = spy.glob("study-*.txt")
    (writer,) = spy.glob("writer-*.txt")  # one writer: started before the config was composed, then adopted
    assert study.read_text() == "none" and writer.read_text().startswith("mlflow ")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("no_mlflow_here").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("initsearch.role") == "parent"]
    assert parent.info.status == "FINISHED" and "best_score" in parent.data.metrics
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_policy.json", "trials.csv", "config.yaml", "training_curves.png", "score_by_trial.png"} <= names
    assert sorted(r.data.tags["initsearch.trial"] for r in runs if r is not parent) == ["0", "1", "2", "3"]
    assert (tmp_path / "out" / "training_curves.png").is_file()


def test_a_prestarted_writer_is_adopted_by_the_tracker_or_ended_when_the_study_does_not_track(tmp_path, monkeypatch):
    """``python -m initsearch`` starts the writer before it knows the URI; ``make_tracker`` hands it the URI
    (and MLflow's settings of this process since) and logs through it; ``tracking_uri=none`` ends it."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = settings_from_config(tiny(tmp_path, f"tracking_uri={uri}", "study_name=adopted"))
    delivery.prestart_writer()
    prestarted = delivery._prestarted
    assert prestarted is not None and prestarted.poll() is None
    tracker = tracking.make_tracker(settings)
    try:
        assert tracker.writer is not None and tracker.writer.pid == prestarted.pid and delivery._prestarted is None
        tracker.study_started(settings, "study_name: adopted\n", SimpleNamespace(study_name="adopted"))
        tracker.trial_finished(a_trial(0))
        assert tracker.flush() and tracker.parent_id is not None and tracker.logged_here == 0
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # what the adopted writer was given too
    finally:
        tracker.close()
    _, _, children = runs_of(MlflowClient(uri), "adopted")
    assert [c.data.tags["initsearch.trial"] for c in children] == ["0"]

    delivery.prestart_writer()
    unused = delivery._prestarted
    assert isinstance(tracking.make_tracker(settings_from_config(tiny(tmp_path, "tracking_uri=none"))), NullTracker)
    assert unused.wait(60) == 0 and delivery._prestarted is None
    assert unused.stdout.read() == b""  # ended quietly: not even its ready line


@pytest.mark.parametrize(("args", "tracks"), [
    ([], True), (["study=digits_cnn", "n_trials=3"], True), (["tracking_uri=http://host:5000"], True),
    (["tracking_uri=none"], False), (["tracking_uri=OFF"], False), (["+tracking_uri='none'"], False),
    (["--help"], False), (["-h"], False), (["--cfg", "job"], False), (["-m", "seed=0,1"], False),
    (["--hydra-help"], False),
])
def test_the_writer_is_prestarted_only_for_a_study_that_may_track(args, tracks):
    from initsearch.__main__ import may_track

    assert may_track(args) is tracks


def test_may_track_knows_every_value_that_turns_tracking_off():
    """``may_track`` writes out ``uri.OFF_VALUES`` (it must not import that module): the two stay equal."""
    from initsearch.__main__ import may_track
    from initsearch.tracking.uri import OFF_VALUES, resolve_tracking_uri

    for value in OFF_VALUES:
        assert resolve_tracking_uri(value) is None and may_track([f"tracking_uri={value}"]) is False


def test_end_of_study_files_the_artifact_store_refuses_are_one_warning_and_the_run_still_finishes(tmp_path, monkeypatch,
                                                                                                  caplog):
    """(Without a writer, so that the refusal can be planted in this process: the same call runs there.)"""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(delivery.WriterProcess, "launch", classmethod(lambda cls, uri: None))

    def refuse(self, run_id, local_dir, artifact_path=None):
        raise OSError("the artifact store is read-only")

    monkeypatch.setattr(MlflowClient, "log_artifacts", refuse)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with caplog.at_level(logging.WARNING, logger="initsearch"):
        run(tiny(tmp_path, f"tracking_uri={uri}", "study_name=refused"), tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["MLflow tracking: artifacts not stored (the study's run: OSError: the artifact store is "
                        "read-only); the trials' runs hold everything else"]
    _, (parent,), children = runs_of(MlflowClient(uri), "refused")
    assert parent.info.status == "FINISHED" and "best_score" in parent.data.metrics and len(children) == 4


def test_tracking_none_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = settings_from_config(tiny(tmp_path, "tracking_uri=none"))
    assert isinstance(tracking.make_tracker(settings), NullTracker)
    assert not (tmp_path / "mlflow.db").exists()


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.as_posix()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///sub/x.db", tmp_path) == f"sqlite:///{tmp_path.as_posix()}/sub/x.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000/", tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("None", tmp_path) is None
    for folder in ("/nonexistent/dir/ml", "mlruns", "file:///tmp/mlruns"):  # MLflow 3 refuses a file store
        with pytest.raises(ConfigError, match=f"^tracking_uri: {folder} is an MLflow file store, which MLflow 3 "
                                              "refuses unless MLFLOW_ALLOW_FILE_STORE=true; give a database URL such as "
                                              "sqlite:///path/mlflow.db or a server http://host:port$"):
            resolve_tracking_uri(folder, tmp_path)
    assert resolve_tracking_uri("databricks", tmp_path) == "databricks"  # a scheme MLflow takes alone, not a folder
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in still works
    assert resolve_tracking_uri("mlruns", tmp_path) == (tmp_path / "mlruns").as_uri()
    assert default_artifact_location(f"sqlite:///{tmp_path}/x.db") == (tmp_path / "mlartifacts").as_uri()
    assert default_artifact_location("http://127.0.0.1:5000") is None


# ---- MLflow's limits and the batching -------------------------------------------------------------------------
def test_limits_are_within_mlflows():
    assert MAX_PARAM_VALUE <= mlflow_limits.MAX_PARAM_VAL_LENGTH
    assert MAX_TAG_VALUE <= mlflow_limits.MAX_TAG_VAL_LENGTH
    assert MAX_KEY <= mlflow_limits.MAX_ENTITY_KEY_LENGTH
    assert MAX_METRICS_PER_BATCH <= mlflow_limits.MAX_METRICS_PER_BATCH
    assert MAX_PARAMS_TAGS_PER_BATCH <= mlflow_limits.MAX_PARAMS_TAGS_PER_BATCH
    assert MAX_ENTITIES_PER_BATCH <= mlflow_limits.MAX_ENTITIES_PER_BATCH
    assert MAX_BATCH_BYTES < mlflow_limits.MAX_BATCH_LOG_REQUEST_SIZE


def test_batches_respect_every_limit_and_keep_everything_in_order():
    metrics = [Metric("train_loss", float(i), 0, i) for i in range(2500)]
    params = [(f"p{i}", "v" * (5000 if i < 150 else 1)) for i in range(250)]
    tags = [(f"t{i}", "x") for i in range(130)]
    chunks = list(batches(metrics, params, tags))
    for m, p, t in chunks:
        assert len(m) <= 1000 and len(p) <= 100 and len(t) <= 100 and len(m) + len(p) + len(t) <= 1000
        size = sum(len(k) + len(v) for k, v in p + t) + sum(len(x.key) for x in m)
        assert size <= MAX_BATCH_BYTES
    assert [x for c in chunks for x in c[0]] == metrics
    assert [x for c in chunks for x in c[1]] == params
    assert [x for c in chunks for x in c[2]] == tags


def test_config_params_flatten_truncate_and_redact():
    yaml_text = (
        "study_name: s\nstorage: postgresql://bob:secret@db/optuna\nmodel:\n  depth: 2\n  activation: [relu, tanh]\n"
        f"long: {'a' * 7000}\nhydra:\n  run:\n    dir: x\n"
    )
    clean = redact_text(yaml_text, ["postgresql://bob:secret@db/optuna"])
    assert "secret" not in clean
    params = dict(config_params(clean))
    assert params["model.depth"] == "2" and params["model.activation"] == '["relu", "tanh"]'
    assert params["storage"] == "postgresql://bob:***@db/optuna"
    assert len(params["long"]) == MAX_PARAM_VALUE and params["long"].endswith("[truncated]")
    assert not any(k.startswith("hydra") for k in params)


def test_trial_metrics_keys_steps_and_seed_suffixes():
    def curve(n: int) -> Curve:
        return Curve(train_loss=np.linspace(2.0, 1.0, n), val_steps=[n // 2, n], val_loss=[1.5, 1.2],
                     val_acc=[0.4, 0.6], steps_done=n, seconds=0.5)

    signals = [{"name": "fc1", "output_std": 0.9, "grad_norm": 0.1}, {"name": "out", "output_std": 1.1, "grad_norm": 0.2}]
    outcome = TrialOutcome(3, None, {"bias": "zeros"}, value=1.1, seed_scores=[1.0, 1.1], seeds=[0, 1],
                           curves=[curve(10), curve(10)], signals=signals, state="complete", seconds=1.5)
    metrics = metric_entities(trial_metric_rows(outcome, start_ms=1_000, end_ms=2_500))  # as runs.log_trial logs them
    by_key: dict[str, list[Metric]] = {}
    for m in metrics:
        by_key.setdefault(m.key, []).append(m)
    assert [m.step for m in by_key["curves/train_loss"]] == list(range(1, 11))
    assert [m.step for m in by_key["curves/train_loss_s1"]] == list(range(1, 11))
    assert [m.step for m in by_key["curves/val_acc_s1"]] == [5, 10]
    assert set(by_key) == {"curves/train_loss", "curves/train_loss_s1", "curves/val_loss", "curves/val_loss_s1", "curves/val_acc", "curves/val_acc_s1",
                           "init/grad_ratio", "score", "seed_score_s0", "seed_score_s1", "seconds"}
    assert by_key["init/grad_ratio"][0].value == pytest.approx(2.0) and by_key["init/grad_ratio"][0].step == 0
    assert [m.key for m in metrics][0] == "curves/train_loss"  # the curves come first
    assert all(1_000 <= m.timestamp <= 2_500 for m in metrics)
    assert by_key["curves/train_loss"][-1].timestamp <= by_key["curves/train_loss_s1"][0].timestamp  # seeds back to back


# ---- off the critical path, and never raising into the study ----------------------------------------------------
class _BlockingClient:
    """A stand-in MlflowClient whose first call waits until the test releases it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.release.wait(timeout=30)
            self.calls.append(name)
            raise RuntimeError(f"{name} is down")

        return call


def test_hooks_only_enqueue_and_worker_failures_are_warnings(tmp_path, caplog):
    client = _BlockingClient()
    tracker = tracking.MlflowTracker(client, "http://127.0.0.1:1", writer=False)  # every call on the thread
    outcome = TrialOutcome(0, "he", {}, state="complete", value=1.0)
    settings = settings_from_config(tiny(tmp_path, "study_name=s"))
    started = time.monotonic()
    tracker.study_started(settings, "", SimpleNamespace(study_name="s"))
    tracker.trial_finished(outcome)
    assert time.monotonic() - started < 1 and client.calls == []  # nothing ran on the caller's thread
    client.release.set()
    with caplog.at_level(logging.WARNING, logger="initsearch"):
        tracker.flush()
        tracker.close()
    assert client.calls  # the worker did try
    assert any("MLflow tracking" in r.getMessage() for r in caplog.records)


def test_pruned_trials_end_finished_with_their_state_and_failed_ones_failed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    tracker = tracking.MlflowTracker(client, uri, default_artifact_location(uri))
    settings = settings_from_config(tiny(tmp_path, f"tracking_uri={uri}", "study_name=states"))
    tracker.study_started(settings, "study_name: states\n", SimpleNamespace(study_name="states"))
    diverged = Curve(train_loss=np.array([1.0, float("nan")]), steps_done=2, diverged=True, reason="loss is nan at step 2")
    tracker.trial_finished(TrialOutcome(0, None, {"bias": "zeros"}, state="pruned", curves=[diverged],
                                        reason="diverged on seed 0: loss is nan at step 2", seconds=0.2))
    tracker.trial_finished(TrialOutcome(1, None, {}, state="failed", reason="RuntimeError: boom", seconds=0.1))
    tracker.flush()
    _, (parent,), children = runs_of(client, "states")
    assert tracker.writer is not None and not tracker.writer.dead  # logged by the writer process...
    assert tracker.tracking_cpu_s["_log_trial"] > 0 and tracker.writer.trial_cpu_s == tracker.tracking_cpu_s["_log_trial"]
    assert {c.data.tags["initsearch.worker"] for c in children} == {worker_id()}  # ...as this process's trials
    by_trial = {c.data.tags["initsearch.trial"]: c for c in children}
    assert by_trial["0"].info.status == "FINISHED" and by_trial["0"].data.tags["initsearch.state"] == "pruned"
    assert by_trial["0"].data.tags["initsearch.reason"].startswith("diverged")
    history = client.get_metric_history(by_trial["0"].info.run_id, "curves/train_loss")
    assert [m.step for m in history] == [1, 2] and math.isnan(sorted(history, key=lambda m: m.step)[1].value)
    assert by_trial["1"].info.status == "FAILED" and by_trial["1"].data.tags["initsearch.reason"] == "RuntimeError: boom"
    tracker.close()  # the study never finished: the parent is marked KILLED
    assert client.get_run(parent.info.run_id).info.status == "KILLED"


def test_param_importances_need_two_complete_searched_trials():
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    study = optuna.create_study()
    dists = {"bias": CategoricalDistribution(["zeros", "pytorch_default"]), "log2_scale": FloatDistribution(-1, 1)}
    for value, name in ((1.0, "he"), (1.1, "xavier")):  # baselines: no params
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"baseline": name}))
    study.add_trial(optuna.trial.create_trial(value=0.9, params={"bias": "zeros", "log2_scale": 0.5}, distributions=dists))
    assert plot_importances(study) is None  # one searched trial: skipped, no error
    study.add_trial(optuna.trial.create_trial(value=0.8, params={"bias": "pytorch_default", "log2_scale": -0.5},
                                              distributions=dists))
    study.add_trial(optuna.trial.create_trial(value=0.7, params={"bias": "zeros", "log2_scale": 0.1}, distributions=dists))
    fig = plot_importances(study)
    assert fig is not None and fig.axes


# ---- the writer process ------------------------------------------------------------------------------------------
def a_trial(number: int, steps: int = 30) -> TrialOutcome:
    curve = Curve(train_loss=np.linspace(2.0, 1.0, steps), val_steps=[steps], val_loss=[1.1], val_acc=[0.5],
                  steps_done=steps, seconds=0.05)
    return TrialOutcome(number, None, {"bias": "zeros"}, policy={"format": "initsearch-policy", "layers": []},
                        state="complete", value=1.0 + number, seed_scores=[1.0 + number], seeds=[0], curves=[curve],
                        seconds=0.1)


def sqlite_tracker(tmp: Path, study: str):
    """``make_tracker`` on a fresh SQLite store in ``tmp``, the study's start logged (the parent run exists)."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    settings = settings_from_config(tiny(tmp, f"tracking_uri={uri}", f"study_name={study}"))
    tracker = tracking.make_tracker(settings)
    tracker.study_started(settings, f"study_name: {study}\n", SimpleNamespace(study_name=study))
    tracker.flush()
    return tracker, MlflowClient(uri)


def process_gone(pid: int) -> bool:
    """No process ``pid``, or only its zombie (an orphan this container's init has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_writer_is_a_light_process_that_ignores_sigint_and_sighup(tmp_path, caplog):
    tracker, client = sqlite_tracker(tmp_path, "sigint")
    writer = tracker.writer
    assert writer is not None and writer.proc.poll() is None
    maps = Path(f"/proc/{writer.pid}/maps").read_text()
    assert "libtorch" not in maps  # started with -m: MLflow, the standard library and initsearch.errors, not torch
    assert "mlflow.db" not in Path(f"/proc/{writer.pid}/cmdline").read_text()  # the URI is not shown by ps
    os.kill(writer.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the whole process group
    os.kill(writer.pid, signal.SIGHUP)  # a closed terminal, or an orphaned process group with a stopped member
    time.sleep(0.3)
    with caplog.at_level(logging.WARNING, logger="initsearch"):
        for i in range(2):
            tracker.trial_finished(a_trial(i))
        tracker.flush()
    assert writer.proc.poll() is None and not writer.dead  # still there, and it logged both trials
    assert not [r for r in caplog.records if r.name == "initsearch" and r.levelno >= logging.WARNING]
    _, _, children = runs_of(client, "sigint")
    assert sorted(c.data.tags["initsearch.trial"] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" for c in children)
    tracker.close()
    assert writer.proc.returncode == 0  # EOF: it exits by itself, cleanly


KILLED_STUDY = """
import os, pickle, signal, sys
from types import SimpleNamespace
import numpy as np
from initsearch.tracking import tracker as tracking
from initsearch.search.outcome import TrialOutcome
from initsearch.search.workers import worker_id
from initsearch.proxy.train import Curve

def a_trial(number):
    curve = Curve(train_loss=np.linspace(2.0, 1.0, 30), val_steps=[30], val_loss=[1.1], val_acc=[0.5], steps_done=30,
                  seconds=0.05)
    return TrialOutcome(number, None, {"bias": "zeros"}, policy={"format": "initsearch-policy"}, state="complete",
                        value=1.0, curves=[curve], seconds=0.1)

settings = pickle.loads(bytes.fromhex(sys.argv[1]))
tracker = tracking.make_tracker(settings)
tracker.study_started(settings, "study_name: killed\\n", SimpleNamespace(study_name="killed"))
tracker.flush()  # the parent run exists
os.kill(tracker.writer.pid, signal.SIGSTOP)  # the writer logs nothing before this process is gone
for i in range(3):
    tracker.trial_finished(a_trial(i))
tracker._thread.drain()  # the three trials are in the writer's pipe
print(tracker.writer.pid, worker_id(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit
"""


def test_the_writer_logs_what_it_was_sent_after_the_study_process_is_killed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = settings_from_config(tiny(tmp_path, f"tracking_uri={uri}", "study_name=killed"))
    script = tmp_path / "killed.py"
    script.write_text(KILLED_STUDY)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with open(tmp_path / "out.txt", "wb") as out, open(tmp_path / "err.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script), pickle.dumps(settings).hex()], cwd=tmp_path,
                                stdout=out, stderr=err, env=env)
        assert proc.wait(120) == -signal.SIGKILL, (tmp_path / "err.txt").read_text()
    writer_pid, dead_worker = (tmp_path / "out.txt").read_text().split()
    writer_pid = int(writer_pid)
    try:
        client = MlflowClient(uri)
        assert runs_of(client, "killed")[2] == []  # nothing was logged while the study process lived
        # The same command again, at once: its resume must leave these trials to the dead worker's writer.
        assert writer_running_for(dead_worker) and not writer_running_for(dead_worker + "0")
        trials = [optuna.trial.create_trial(value=1.0, user_attrs={"worker": dead_worker}) for _ in range(3)]
        for number, trial in enumerate(trials):
            trial.number = number
        resumed = SimpleNamespace(study_name="killed", get_trials=lambda deepcopy=False: trials)
        again = tracking.make_tracker(settings)
        again.study_started(settings, "study_name: killed\n", resumed)
        again.flush()
        again.close()
        assert runs_of(client, "killed")[2] == []  # no backfill of trials a live writer is logging
        os.kill(writer_pid, signal.SIGCONT)
        wait_for(lambda: process_gone(writer_pid), 60, "the writer to log the trials and exit at EOF")
    finally:
        if not process_gone(writer_pid):
            os.kill(writer_pid, signal.SIGKILL)
    _, (parent,), children = runs_of(client, "killed")
    assert sorted(c.data.tags["initsearch.trial"] for c in children) == ["0", "1", "2"]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert len(client.get_metric_history(child.info.run_id, "curves/train_loss")) == 30
    assert "Traceback" not in (tmp_path / "err.txt").read_text()


def test_a_writer_that_cannot_start_is_a_warning_and_the_trials_are_logged_here(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(delivery, "writer_command", lambda: [str(tmp_path / "no-such-python")])
    with caplog.at_level(logging.WARNING, logger="initsearch"):
        tracker, client = sqlite_tracker(tmp_path, "nowriter")
        assert tracker.writer is None
        tracker.trial_finished(a_trial(0))
        tracker.flush()
    assert any("cannot start the writer process" in r.getMessage() for r in caplog.records)
    _, _, children = runs_of(client, "nowriter")
    assert [c.data.tags["initsearch.trial"] for c in children] == ["0"] and children[0].info.status == "FINISHED"
    tracker.close()


def test_a_writer_that_dies_is_a_warning_and_the_study_still_logs_every_trial(tmp_path, caplog):
    tracker, client = sqlite_tracker(tmp_path, "died")
    writer = tracker.writer
    tracker.trial_finished(a_trial(0))
    tracker.flush()
    with caplog.at_level(logging.WARNING, logger="initsearch"):
        os.kill(writer.pid, signal.SIGSTOP)
        tracker.trial_finished(a_trial(1))  # sent, never acknowledged
        tracker._thread.drain()
        os.kill(writer.pid, signal.SIGKILL)
        writer.proc.wait(10)
        wait_for(lambda: writer.dead, 10, "the tracker to notice")
        tracker.trial_finished(a_trial(2))  # after the death
        tracker.flush()
        tracker.close()
    deaths = [r for r in caplog.records if "writer process" in r.getMessage()]
    assert len(deaths) == 1 and "exited with status -9" in deaths[0].getMessage()
    _, (parent,), children = runs_of(client, "died")
    assert sorted(c.data.tags["initsearch.trial"] for c in children) == ["0", "1", "2"]  # each exactly once
    assert all(c.info.status == "FINISHED" for c in children)
    assert client.get_run(parent.info.run_id).info.status == "KILLED"  # close() without study_finished


def test_close_waits_a_bounded_time_for_a_stuck_writer_which_finishes_on_its_own(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tracking, "WRITER_EXIT_TIMEOUT_S", 1.0)
    tracker, client = sqlite_tracker(tmp_path, "stuck")
    writer = tracker.writer
    os.kill(writer.pid, signal.SIGSTOP)
    try:
        tracker.trial_finished(a_trial(0))
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="initsearch"):
            tracker.close()  # the interrupted-study path (also what atexit runs)
        assert time.monotonic() - started < 10
        assert any("still has 1 trials to log" in r.getMessage() for r in caplog.records)
        assert any("answered nothing for 1 s; making the study's calls in this process" in r.getMessage()
                   for r in caplog.records)
        _, (parent,), children = runs_of(client, "stuck")
        assert children == [] and parent.info.status == "KILLED"  # marked here when the writer did not answer
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    writer.proc.wait(60)  # it got EOF: it logs the trial, then exits
    _, _, children = runs_of(client, "stuck")
    assert [c.data.tags["initsearch.trial"] for c in children] == ["0"] and children[0].info.status == "FINISHED"


def test_flush_gives_up_on_a_stopped_writer_whose_pipe_is_full(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tracking, "STALL_TIMEOUT_S", 2.0)
    monkeypatch.setattr(tracking, "WRITER_EXIT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(tracking, "CLOSE_TIMEOUT_S", 2.0)
    tracker, client = sqlite_tracker(tmp_path, "full")
    writer = tracker.writer
    os.kill(writer.pid, signal.SIGSTOP)
    try:
        for i in range(8):
            tracker.trial_finished(a_trial(i, steps=2000))  # about 100 KB each: more than the pipe holds
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="initsearch"):
            assert tracker.flush() is False
        assert time.monotonic() - started < 15
        assert any("flush gave up" in r.getMessage() for r in caplog.records)
        tracker.close()
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    writer.proc.wait(60)  # resumed, it takes the rest, gets EOF from the closing thread and exits
    assert len(runs_of(client, "full")[2]) == 8


def test_while_the_study_waits_this_process_helps_the_writer_and_logs_each_trial_once(tmp_path):
    """A batched round ends with K trials at once: when the study waits for them (flush/study_finished),
    the tracker's thread logs queued trials itself while the writer has a backlog, when it has a client
    of its own (a server's; a local store's is only opened without a writer: importing MLflow for this
    would cost more than it saves)."""
    tracker, client = sqlite_tracker(tmp_path, "helping")
    assert tracker.client is None
    tracker.client = client
    writer = tracker.writer
    os.kill(writer.pid, signal.SIGSTOP)
    result: list[bool] = []
    try:
        for i in range(12):  # about 15 KB each, as a 300-step trial: the pipe takes a few, the rest wait
            tracker.trial_finished(a_trial(i, steps=300))
        flushing = threading.Thread(target=lambda: result.append(tracker.flush()))
        flushing.start()
        wait_for(lambda: tracker._draining, 10, "flush to start")
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    flushing.join(120)
    assert result == [True]
    sent_to_writer = 12 - tracker.logged_here
    assert tracker.logged_here >= 1 and sent_to_writer >= 2
    tracker.close()
    _, _, children = runs_of(client, "helping")
    assert sorted(int(c.data.tags["initsearch.trial"]) for c in children) == list(range(12))  # each exactly once
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(len(client.get_metric_history(c.info.run_id, "curves/train_loss")) == 300 for c in children)


def test_passwords_of_the_tracking_uri_never_show_in_messages():
    uri = "http://alice:s3cret%21pw@127.0.0.1"  # no port: urllib raises http.client.InvalidURL
    with pytest.raises(ConfigError) as info:
        check_reachable(uri, timeout=2)
    assert "s3cret" not in str(info.value) and "tracking_uri: cannot reach MLflow" in str(info.value)
    failure = RuntimeError("API request to http://alice:s3cret%21pw@127.0.0.1:5000/api/2.0/mlflow/runs/create failed")
    assert "s3cret" not in first_line(failure, with_type=True, limit=300)
    assert "alice:***@127.0.0.1:5000" in first_line(failure, with_type=True, limit=300)
    assert "s3cret" not in scrub("password s3cret!pw, decoded")
