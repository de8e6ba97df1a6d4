"""Several machines (issue 7), for real: a PostgreSQL server on loopback, two workers on one study, one killed.

The fixture starts a throwaway server from the OS packages (``initdb`` into a temporary folder, ``postgres``
on a free port, as the ``postgres`` user when the tests run as root: the server refuses root), then runs
step 1 of the README's "Running on several machines" (``psql ... CREATE USER / CREATE DATABASE``). The test
runs step 3's command twice at once, as two "machines" (distinct ``INITSEARCH_WORKER_HOST``, so neither can
see the other's processes and only Optuna's heartbeats tell that a worker died), SIGKILLs one in the middle
of a trial, and checks the study: no trial twice, nothing lost, the stale trial failed and run again once.
MLflow is off here (``tracking_uri=none``): an ``mlflow server`` needs far longer to start than this test
may take; ``test_tracking.py`` covers a real MLflow server.

Where no server can be started (no PostgreSQL binaries, no unprivileged user), the test is SKIPPED with the
reason in pytest's summary (``-ra``), and ``.ci/run`` prints a warning line before the tests.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from initsearch.search.storage import open_storage
from initsearch.search.workers import counted
from tests.conftest import TINY
from tests.reliability_helpers import SlowMLP, start_cli, target, wait_until

PASSWORD = "change-me"  # the README's
LOUD = "PostgreSQL test NOT RUN (several machines untested): "


def _binaries() -> dict[str, str] | None:
    """initdb, postgres and psql: on PATH, or in Debian's /usr/lib/postgresql/<version>/bin."""
    found: dict[str, str] = {}
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for name in ("initdb", "postgres", "psql"):
        path = shutil.which(name) or next((f"{d}/{name}" for d in dirs if os.access(f"{d}/{name}", os.X_OK)), None)
        if path is None:
            return None
        found[name] = path
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, Any]]:
    """A running PostgreSQL server with the README's user and databases; yields its host, port, and
    ``restart(down_s)`` (stop it, fast shutdown, and start it again on the same port and data ``down_s``
    seconds later)."""
    bins = _binaries()
    if bins is None:
        pytest.skip(LOUD + "no initdb/postgres/psql found; install the Debian package postgresql (.ci/run does)")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(LOUD + "running as root and there is no 'postgres' user to start the server as")
        runuser = shutil.which("runuser")
        as_user = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
    folder = Path(tempfile.mkdtemp(prefix="initsearch-pg-"))  # under /tmp: the server user can reach it
    if owner is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, port, log = folder / "data", _free_port(), folder / "server.log"

    def as_server_user(cmd: list[str]) -> list[str]:
        if as_user and as_user[0] == "su":
            return as_user + [" ".join(cmd)]
        return as_user + cmd

    server = None

    def start() -> subprocess.Popen:
        with open(log, "a") as handle:
            return subprocess.Popen(as_server_user([bins["postgres"], "-D", str(data), "-p", str(port), "-k", str(folder),
                                                    "-h", "127.0.0.1", "-F", "-c", "fsync=off"]),
                                    stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        return subprocess.run(psql + ["-c", "SELECT 1"], capture_output=True).returncode == 0

    def restart(down_s: float = 0.0) -> None:
        nonlocal server
        os.killpg(server.pid, signal.SIGINT)  # "fast shutdown": open transactions are rolled back
        server.wait(30)
        time.sleep(down_s)
        server = start()
        deadline = time.monotonic() + 30
        while not up():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-500:]
            time.sleep(0.2)

    psql = [bins["psql"], "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]
    try:
        init = subprocess.run(as_server_user([bins["initdb"], "-D", str(data), "-U", "postgres", "-A", "trust",
                                              "-E", "UTF8", "--no-sync"]), capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            pytest.skip(LOUD + f"initdb failed: {(init.stderr or init.stdout).strip().splitlines()[-1:]}")
        server = start()
        deadline = time.monotonic() + 30
        while not up():
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.skip(LOUD + f"the server did not start: {log.read_text()[-300:]!r}")
            time.sleep(0.2)
        # README, step 1
        subprocess.run(psql + ["-c", f"CREATE USER initsearch PASSWORD '{PASSWORD}'",
                               "-c", "CREATE DATABASE initsearch OWNER initsearch",
                               "-c", "CREATE DATABASE mlflow OWNER initsearch"], check=True, capture_output=True)
        yield {"host": "127.0.0.1", "port": str(port), "restart": restart}
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)  # "fast shutdown"
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def test_two_machines_on_one_study_one_killed_mid_trial(postgres, tmp_path):
    storage = f"postgresql://initsearch:{PASSWORD}@{postgres['host']}:{postgres['port']}/initsearch"
    # README, step 3 (plus a tiny study, short heartbeats, and no MLflow)
    args = [o for o in TINY if not o.startswith("n_trials=")] + target(SlowMLP, delay=0.05) + [
        f"storage={storage}", "study_name=machines", "n_trials=4", "pruner=none",
        "heartbeat_interval=1", "grace_period=3"]
    a = start_cli(args, tmp_path, tmp_path / "a.log", INITSEARCH_WORKER_HOST="machine-a")
    b = start_cli(args, tmp_path, tmp_path / "b.log", INITSEARCH_WORKER_HOST="machine-b")

    opened = open_storage(storage)  # one engine for all the polling (each open would hold connections)

    def trials_now() -> list:
        try:
            return optuna.load_study(study_name="machines", storage=opened).get_trials(deepcopy=False)
        except KeyError:  # not created yet
            return []

    def b_runs_a_trial() -> bool:
        trials = trials_now()
        return any(t.state == TrialState.RUNNING and str(t.user_attrs.get("worker", "")).startswith("machine-b:")
                   for t in trials)

    try:
        wait_until(b_runs_a_trial, 120, "machine-b to run a trial", b)
        before = {t.number: (t.state, t.value, t.params) for t in trials_now()}
        os.killpg(b.pid, signal.SIGKILL)
        b.wait(30)
        assert a.wait(180) == 0, (tmp_path / "a.log").read_text()
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    trials = trials_now()
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # no trial twice, none missing
    for number, (state, value, params) in before.items():  # what either machine finished is kept as it was
        if state == TrialState.COMPLETE:
            assert (trials[number].state, trials[number].value, trials[number].params) == (state, value, params)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["worker"].startswith("machine-b:")  # the killed trial ...
    retries = [t for t in trials if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE  # ... run again once, by machine-a
    assert retries[0].params == failed[0].params
    assert retries[0].user_attrs.get("baseline") == failed[0].user_attrs.get("baseline")
    assert retries[0].user_attrs["retry_reason"].startswith("worker lost: no heartbeat")  # Optuna's heartbeat saw it
    assert retries[0].user_attrs["worker"].startswith("machine-a:")
    assert counted(trials) == 6 and len(trials) == 7
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    counted_baselines = sorted(t.user_attrs["baseline"] for t in trials
                               if t.user_attrs.get("baseline") and t.state != TrialState.FAIL)
    assert counted_baselines == ["he", "xavier"]



def test_a_database_restart_mid_study_two_workers_wait_and_every_trial_runs_once(postgres, tmp_path):
    storage = f"postgresql://initsearch:{PASSWORD}@{postgres['host']}:{postgres['port']}/initsearch"
    args = [o for o in TINY if not o.startswith("n_trials=")] + target(SlowMLP, delay=0.03) + [
        f"storage={storage}", "study_name=restart", "n_trials=6", "pruner=none",
        "heartbeat_interval=2", "grace_period=60"]
    a = start_cli(args, tmp_path, tmp_path / "a.log", INITSEARCH_WORKER_HOST="machine-a")
    b = start_cli(args, tmp_path, tmp_path / "b.log", INITSEARCH_WORKER_HOST="machine-b")
    opened = open_storage(storage)

    def trials_now() -> list:
        try:
            return optuna.load_study(study_name="restart", storage=opened).get_trials(deepcopy=False)
        except KeyError:
            return []

    try:
        wait_until(lambda: sum(t.state == TrialState.COMPLETE for t in trials_now()) >= 2, 120, "two trials", a)
        opened.engine.dispose()  # this test's own connections go with the server
        postgres["restart"](3.0)  # down for 3 s: the workers' next storage calls find no server
        assert a.wait(180) == 0, (tmp_path / "a.log").read_text()
        assert b.wait(60) == 0, (tmp_path / "b.log").read_text()
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert "storage: lost the connection to postgresql://initsearch:***@" in logs and "Traceback" not in logs
    trials = trials_now()
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]  # none left RUNNING
    assert counted(trials) == 8  # every trial, once
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(sum(r.user_attrs.get("retry_of") == f.number for r in trials) == 1 for f in failed)
    baselines = sorted(t.user_attrs["baseline"] for t in trials if t.user_attrs.get("baseline") and t.state != TrialState.FAIL)
    assert baselines == ["he", "xavier"]
