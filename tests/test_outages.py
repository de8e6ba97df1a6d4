"""Nothing lost when a server goes away: a real MLflow server on loopback, down at start or killed in the
middle of a study and started again; every trial ends up in MLflow once, and the command never hangs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from initsearch.cli import run
from initsearch.search.workers import counted
from initsearch.tracking.payload import TRAIN_LOSS
from initsearch.tracking.spool import Spool, spool_folder
from tests.reliability_helpers import SlowMLP, cli_env, start_cli, target, wait_until
from tests.test_tracking import MLFLOW_BIN, STEPS, free_port, http_get, runs_of, tiny

FAST = ["tracking.retry_timeout=2", "tracking.flush_timeout=5"]


def serve(root: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on ``port`` with its runs in ``root/srv.db`` (the same store after a restart)."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(root / "server.log", "ab") as out:
        proc = subprocess.Popen([MLFLOW_BIN, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--backend-store-uri", f"sqlite:///{root}/srv.db", "--artifacts-destination",
                                 str(root / "art")], cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)

    def up() -> bool:
        try:
            return http_get(f"http://127.0.0.1:{port}/health")[0] == 200
        except OSError:
            return False

    wait_until(up, 90, "the MLflow server", proc)
    return proc


def kill_server(proc: subprocess.Popen) -> None:
    """SIGKILL the server's whole process group: it goes away mid-request, as a crashed host would."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def child_numbers(url: str, study: str) -> list[int]:
    if MlflowClient(url).get_experiment_by_name(study) is None:
        return []
    _, _, children = runs_of(MlflowClient(url), study)
    return sorted(int(c.data.tags["initsearch.trial"]) for c in children)


def test_server_down_at_start_the_study_runs_and_a_sync_logs_every_trial_once(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = tiny(tmp_path, f"tracking_uri={url}", "study_name=down", *FAST)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="initsearch"):
        run(cfg, tmp_path / "out")
    assert time.monotonic() - started < 60
    assert (tmp_path / "out" / "best_policy.json").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings[0].startswith(f"MLflow tracking: cannot reach MLflow at {url}: ")
    assert "the study runs without it" in warnings[0] and "\n" not in warnings[0]
    assert any("4 trials not yet in MLflow" in w for w in warnings), warnings
    spool = Spool(spool_folder(SimpleSettings(tmp_path)))
    assert spool.numbers() == [0, 1, 2, 3]
    assert len(spool.load(2)[2]["metrics"]) > STEPS  # the curves are kept, not only what Optuna stores

    server = serve(tmp_path, port)
    try:
        for _ in range(2):  # the second sync finds nothing left to log
            run(tiny(tmp_path, f"tracking_uri={url}", "study_name=down", "tracking_only=true", *FAST), tmp_path / "o2")
            assert child_numbers(url, "down") == [0, 1, 2, 3]
        client = MlflowClient(url)
        _, (parent,), children = runs_of(client, "down")
        assert parent.info.status == "FINISHED" and "best_score" in parent.data.metrics
        assert all(len(client.get_metric_history(c.info.run_id, TRAIN_LOSS)) == STEPS for c in children
                   if c.data.tags["initsearch.state"] == "complete")
        assert spool.numbers() == []
    finally:
        kill_server(server)


class SimpleSettings:
    """What ``spool_folder`` reads, for a tiny study on ``tmp/s.journal``."""

    def __init__(self, tmp: Path, study: str = "down") -> None:
        self.study_name, self.storage, self.tracking = study, str(tmp / "s.journal"), None


def test_server_killed_mid_study_then_restarted_every_trial_logged_once(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["data=synthetic", "model.depth=2", "model.width=16", f"train.steps={STEPS}", "train.eval_every=10",
            "n_trials=6", "baselines=[he,xavier]", "score.seeds=1", "pruner=none", "study_name=killed",
            f"storage={tmp_path}/s.journal", f"tracking_uri={url}", *FAST, *target(SlowMLP, delay=0.04)]
    server = serve(tmp_path, port)
    log = tmp_path / "run1.log"
    proc = start_cli(args, tmp_path, log)
    try:
        wait_until(lambda: len(child_numbers(url, "killed")) >= 2, 120, "two logged trials", proc)
        kill_server(server)
        killed_at = time.monotonic()
        assert proc.wait(120) == 0, log.read_text()
        waited = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_server(server)
    text = log.read_text()
    assert "Traceback" not in text, text
    down = [line for line in text.splitlines() if "the study goes on" in line]
    assert len(down) == 1, text  # one line for the outage, not one per trial
    assert "trials not yet in MLflow" in text
    assert waited < 90  # 6 trials of about 1 s, bounded retries, at most flush_timeout at exit

    server = serve(tmp_path, port)
    try:
        again = subprocess.run([*start_args(), *args], capture_output=True, text=True, cwd=tmp_path, env=cli_env(),
                               timeout=240)
        assert again.returncode == 0, again.stderr
        assert child_numbers(url, "killed") == list(range(8))  # each trial exactly once
        client = MlflowClient(url)
        _, (parent,), children = runs_of(client, "killed")
        assert parent.info.status == "FINISHED"
        assert all(c.info.status == "FINISHED" for c in children)
        assert all(len(client.get_metric_history(c.info.run_id, TRAIN_LOSS)) == STEPS for c in children)
        assert "not yet in MLflow" not in again.stderr
    finally:
        kill_server(server)


def start_args() -> list[str]:
    from tests.conftest import PYTHON

    return [PYTHON, "-m", "initsearch"]


def test_undelivered_trials_in_the_spool_are_json_with_their_worker(tmp_path):
    spool = Spool(tmp_path / "s")
    assert spool.numbers() == [] and len(spool) == 0
    assert spool.keep({"number": 3, "metrics": [["train_loss", 1.0, 0, 1]]}, "host:1:2")
    (tmp_path / "s" / "trial-x.json").write_text("{}")  # not a trial file: ignored
    (tmp_path / "s" / "trial-4.json").write_text("{torn")  # a torn file: skipped, never an error
    assert spool.numbers() == [3, 4] and spool.load(4) is None
    worker, owner, payload = spool.load(3)
    assert worker == "host:1:2" and owner == "" and payload["metrics"] == [["train_loss", 1.0, 0, 1]]
    assert json.loads((tmp_path / "s" / "trial-3.json").read_text())["worker"] == "host:1:2"
    spool.drop(3)
    spool.drop(3)  # twice: no error
    assert spool.numbers() == [4]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_spool_folder_that_cannot_be_written_is_one_warning(tmp_path, caplog):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    spool = Spool(folder / "study")
    with caplog.at_level("WARNING", logger="initsearch"):
        assert not spool.keep({"number": 0}, "w")
        assert not spool.keep({"number": 1}, "w")
    assert len(caplog.records) == 1 and "cannot keep undelivered trials" in caplog.records[0].getMessage()


# ---- disks and folders that cannot be written ---------------------------------------------------------------------
FILLS_UP = """
import errno, sys
from optuna.storages.journal import JournalFileBackend
append, calls, full = JournalFileBackend.append_logs, [], []
def fills_up(self, logs):  # the disk fills up after 40 journal writes, as a trial writes its end
    calls.append(1)
    if len(calls) > 40 and (full or any(log["op_code"] == 6 for log in logs)):  # SET_TRIAL_STATE_VALUES
        full.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")
    return append(self, logs)
JournalFileBackend.append_logs = fills_up
sys.argv = ["initsearch", *sys.argv[1:]]
from initsearch.__main__ import main
main()
"""


def test_a_full_disk_under_the_journal_is_one_line_and_the_finished_trials_are_kept(tmp_path):
    from tests.conftest import PYTHON
    from tests.reliability_helpers import cli, load_trials
    from tests.test_tracking import BASE

    args = [*BASE, f"storage={tmp_path}/s.journal", "n_trials=6", "study_name=full", "tracking_uri=none"]
    (tmp_path / "fills_up.py").write_text(FILLS_UP)
    full = subprocess.run([PYTHON, str(tmp_path / "fills_up.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=cli_env(), timeout=240)
    assert full.returncode == 2, full.stderr
    message = full.stderr.strip().splitlines()[-1]
    assert message.startswith(f"initsearch: error: storage: cannot write to {tmp_path}/s.journal: No space left on "
                              "device; the ") and "run the same command again to resume" in message
    assert "Traceback" not in full.stderr
    before = {t.number: t.value for t in load_trials(f"{tmp_path}/s.journal", "full") if t.state.is_finished()}
    assert before and f"the {len(before)} trials finished before are kept" in message
    again = cli(args, tmp_path)  # room again: the same command resumes
    assert again.returncode == 0, again.stderr
    after = load_trials(f"{tmp_path}/s.journal", "full")
    assert all(after[n].value == v for n, v in before.items())  # intact
    assert counted(after) == 8 and not any(t.state.name == "RUNNING" for t in after)  # the stopped trial ran again


def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_training(tmp_path, monkeypatch):
    from initsearch.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file where the output folder should be")
    with pytest.raises(ConfigError, match=r"^output folder .*taken/out: cannot write there \(") as info:
        run(tiny(tmp_path), tmp_path / "taken" / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "s.journal").exists()  # nothing trained, nothing written


def test_an_artifact_folder_that_cannot_be_written_is_one_warning_and_every_run_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlartifacts").write_text("a file where MLflow's artifact folder should be")
    with caplog.at_level("WARNING", logger="initsearch"):
        run(tiny(tmp_path, "tracking_uri=sqlite:///mlflow.db", "study_name=noart"), tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("MLflow tracking: artifacts not stored ("), warnings
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    _, (parent,), children = runs_of(client, "noart")
    assert parent.info.status == "FINISHED" and "best_score" in parent.data.metrics
    assert sorted(int(c.data.tags["initsearch.trial"]) for c in children) == [0, 1, 2, 3]
    assert all(c.info.status == "FINISHED" and "score" in c.data.metrics for c in children)
    assert Spool(spool_folder(SimpleSettings(tmp_path, "noart"))).numbers() == []  # nothing left to deliver


# ---- load -----------------------------------------------------------------------------------------------------------
def test_load_script_at_ci_size_every_trial_once_and_one_child_run_each():
    """scripts/load.py with 3 local workers and 6 trials (docs/performance.md has the 200-trial figures)."""
    from tests.conftest import PYTHON, REPO

    proc = subprocess.run([PYTHON, str(REPO / "scripts" / "load.py"), "--workers", "3", "--trials", "6"],
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every trial once, the baselines once, one MLflow child run per trial" in proc.stdout


# ---- settings ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("tracking.flush_timeout=-1", "tracking.flush_timeout: must be a number in [0, inf], got -1"),
    ("tracking.retry_timeout=fast", "tracking.retry_timeout: must be a number in [1, inf], got 'fast'"),
    ("tracking_only=maybe", "tracking_only: must be true or false, got 'maybe'"),
])
def test_bad_tracking_settings_are_one_line_naming_the_key(tmp_path, override, message):
    from initsearch.errors import ConfigError
    from initsearch.search.settings import settings_from_config

    with pytest.raises(ConfigError) as info:
        settings_from_config(tiny(tmp_path, override))
    assert str(info.value) == message


def test_tracking_only_on_a_study_that_does_not_exist_is_one_line_and_creates_nothing(tmp_path, monkeypatch):
    from initsearch.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.journal").touch()
    with pytest.raises(ConfigError, match=r"^tracking_only: no study named 'nothing' in "):
        run(tiny(tmp_path, "study_name=nothing", "tracking_only=true", "tracking_uri=sqlite:///mlflow.db"), tmp_path / "o")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "o").exists()


FILLS_UP_AFTER_A_CREATION = FILLS_UP.replace(
    "(full or any(log[\"op_code\"] == 6 for log in logs))", "(full or calls[-2:-1] == [4])").replace(
    "    calls.append(1)\n", "    calls.append(logs[0][\"op_code\"])\n")


def test_a_trial_names_its_worker_as_it_is_created_so_a_crash_right_after_is_seen_at_once(tmp_path):
    """The disk fills on the first write after a trial's creation: the trial stays RUNNING, and since its
    creation record named this process, the next run fails and retries it at once (its process is gone),
    not after grace_period without a heartbeat."""
    from tests.conftest import PYTHON
    from tests.reliability_helpers import cli, load_trials
    from tests.test_tracking import BASE

    args = [*BASE, f"storage={tmp_path}/s.journal", "n_trials=6", "study_name=full", "tracking_uri=none"]
    assert FILLS_UP_AFTER_A_CREATION != FILLS_UP
    (tmp_path / "fills_up.py").write_text(FILLS_UP_AFTER_A_CREATION)
    full = subprocess.run([PYTHON, str(tmp_path / "fills_up.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=cli_env(), timeout=240)
    assert full.returncode == 2, full.stderr
    [left] = [t for t in load_trials(f"{tmp_path}/s.journal", "full") if t.state.name == "RUNNING"]
    assert isinstance(left.user_attrs.get("worker"), str)  # named in the record that created it
    again = cli(args, tmp_path)
    assert again.returncode == 0, again.stderr
    [retry] = [t for t in load_trials(f"{tmp_path}/s.journal", "full") if t.user_attrs.get("retry_of") == left.number]
    assert retry.user_attrs["retry_reason"].startswith("worker died: process "), retry.user_attrs["retry_reason"]
