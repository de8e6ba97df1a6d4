"""Reliability (issue 7): faults inside trials, hostile inputs at the command line, stops (SIGINT, SIGTERM,
SIGKILL) and resume, several workers on the default journal storage, and determinism across processes.

Studies are TINY (synthetic data, 2 baselines + 2 searched trials of 20 steps); where a trial must last long
enough to be stopped, the proxy is ``tests.reliability_helpers.SlowMLP`` (it sleeps in each training step).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import initsearch.search.sequential as sequential_module
from initsearch.__main__ import main
from initsearch.cli import report_error, run
from initsearch.errors import ConfigError, PolicyError, StudyFailed, StudyInterrupted
from initsearch.search.settings import settings_from_config
from initsearch.search.storage import open_storage
from initsearch.search.study import run_study
from initsearch.search.trial import prepare
from initsearch.search.workers import StudyLock, counted, worker_alive, worker_id
from tests.conftest import TINY, compose_config
from tests.reliability_helpers import (
    AlwaysBroken,
    BrokenInTraining,
    ExplodingWeights,
    NanLoss,
    SlowMLP,
    cli,
    fresh_running_trial,
    load_trials,
    one_line_error,
    start_cli,
    target,
    wait_until,
)

COMPLETE, PRUNED, FAIL, RUNNING, WAITING = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                            TrialState.RUNNING, TrialState.WAITING)
NO_TRACKING = [o for o in TINY if not o.startswith("tracking_uri=")]


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(storage: str, name: str, *extra: str):
    return compose_config(TINY + [f"storage={storage}", f"study_name={name}", *extra])


# ---- faults during a trial ---------------------------------------------------------------------------------------
def test_nan_loss_prunes_every_trial_and_nothing_is_exported(in_tmp):
    with pytest.raises(StudyFailed) as info:
        run(tiny("s.journal", "nanloss", *target(NanLoss)), in_tmp / "out")
    assert "every one failed or was pruned" in str(info.value) and "loss is nan at step 1" in str(info.value)
    trials = load_trials("s.journal", "nanloss")
    assert len(trials) == 4  # the study went on after each
    assert all(t.state == PRUNED and t.user_attrs["reason"].startswith("diverged on seed") for t in trials)
    assert not (in_tmp / "out" / "best_policy.json").exists() and not (in_tmp / "out" / "trials.csv").exists()


def test_weights_that_turn_non_finite_prune_the_trial_naming_the_weight(in_tmp):
    with pytest.raises(StudyFailed):
        run(tiny("s.journal", "boom", *target(ExplodingWeights)), in_tmp / "out")
    reasons = {t.user_attrs["reason"] for t in load_trials("s.journal", "boom")}
    assert reasons == {"non-finite weights in drift after training (seed 0)"}


def test_cuda_out_of_memory_fails_that_trial_empties_the_cache_and_the_study_goes_on(in_tmp, monkeypatch):
    settings = settings_from_config(tiny("s.journal", "oom"))
    proxy = prepare(settings)
    real, calls, emptied = sequential_module.train_run, [], []

    def second_run_is_out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential_module, "train_run", second_run_is_out_of_memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    study = run_study(settings, proxy)
    trials = study.get_trials()
    assert [t.state for t in trials] == [COMPLETE, FAIL, COMPLETE, COMPLETE]
    assert trials[1].user_attrs["reason"] == "CUDA out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert emptied == [1]


def test_after_cuda_out_of_memory_the_failed_model_is_gone_when_the_cache_is_emptied(in_tmp, monkeypatch):
    """The cache is handed back only once nothing holds the failed trial's model any more."""
    import weakref

    settings = settings_from_config(tiny("s.journal", "oom-free"))
    proxy = prepare(settings)
    models, alive_at_empty = [], []

    def out_of_memory(model, *args, **kwargs):
        models.append(weakref.ref(model))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(sequential_module, "train_run", out_of_memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: alive_at_empty.append(models[-1]() is not None))
    run_study(settings, proxy)
    assert alive_at_empty and not any(alive_at_empty)


def test_a_study_where_every_trial_fails_is_one_line_and_status_2_in_a_real_process(in_tmp):
    proc = cli(TINY + target(BrokenInTraining) + ["study_name=broken"], in_tmp)
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc.stderr)
    assert line.startswith("initsearch: error: no trial of study 'broken' finished: every one failed or was pruned")
    assert "RuntimeError: user model exploded in forward" in line
    assert not list(in_tmp.glob("outputs/**/best_policy.json"))
    trials = load_trials(str(in_tmp / "initsearch.journal"), "broken")
    assert len(trials) == 4
    assert all(t.state == FAIL and t.user_attrs["reason"] == "RuntimeError: user model exploded in forward" for t in trials)


def test_verbose_shows_the_traceback(in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["initsearch", *TINY, *target(AlwaysBroken), "verbose=true"])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith(
        "initsearch: error: model._target_: tests.reliability_helpers.AlwaysBroken failed")
    assert report_error(ConfigError("x: bad"), verbose=False) == 2
    assert capsys.readouterr().err == "initsearch: error: x: bad\n"


# ---- hostile or broken inputs: one line, status 2, nothing written ------------------------------------------------
HOSTILE = {
    "unknown preset": (["study=nope"], "In 'config': Could not find 'study/nope' (available: cifar_cnn, "),
    "override syntax": (["n_trials=[1"], "override 'n_trials=[1': "),
    "unknown key": (["nokey=1"], "nokey: no such key (a new key, e.g. an argument of your own model, is added as +nokey=...)"),
    "misspelt key": (["n_trails=1"], "n_trails: no such key (did you mean n_trials?)"),
    "n_trials=abc": (["n_trials=abc"], "n_trials: must be a whole number >= 1, got 'abc'"),
    "train.lr=fast": (["train.lr=fast"], "train.lr: must be a finite number > 0, got 'fast'"),
    "model.depth=[1]": (["model.depth=[1]"], "model.depth: must be an integer >= 1, got [1]"),
    "n_workers=two": (["n_workers=two"], "n_workers: must be a whole number >= 1, got 'two'"),
    "grace under interval": (["heartbeat_interval=30", "grace_period=20"], "grace_period: must be longer than"),
    "missing data files": (["data=cifar10", "data.root=empty", "data.download=false"], "CIFAR-10 not found"),
    "model that cannot run": (target(AlwaysBroken), "model._target_: tests.reliability_helpers.AlwaysBroken failed on a batch of synthetic data: "
                                                    "ValueError: this model cannot run"),
    "unreachable storage": (["storage=postgresql://user:s3cret@127.0.0.1:{port}/db"],
                            "storage: cannot open postgresql://user:***@127.0.0.1:{port}/db: OperationalError: "),
    "journal in a missing folder": (["storage=no/such/s.journal"], "storage: the folder of the journal file "),
    "postgres:// alias": (["storage=postgres://user:s3cret@127.0.0.1:{port}/db"],
                          "storage: cannot open postgres://user:***@127.0.0.1:{port}/db: NoSuchModuleError: Can't load "
                          "plugin: sqlalchemy.dialects:postgres (write postgresql://...: SQLAlchemy does not know"),
    "tracking to a folder": (["tracking_uri=no/such/ml"], "tracking_uri: no/such/ml is an MLflow file store, which "
                             "MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true; give a database URL"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_inputs_are_one_line_and_status_2(case, in_tmp, monkeypatch, capsys):
    args, expected = HOSTILE[case]
    port = free_port()
    (in_tmp / "empty").mkdir()
    args = [a.format(port=port) for a in args]
    monkeypatch.setattr(sys, "argv", ["initsearch", *TINY, *args])
    started = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("initsearch: error: " + expected.format(port=port)), err
    assert "s3cret" not in err
    assert not (in_tmp / "initsearch.journal").exists() and not (in_tmp / "mlflow.db").exists()
    assert time.monotonic() - started < 30  # unreachable stores fail fast, not after minutes of retries


def sqlite_with(path: Path, *tables: str) -> Path:
    """A SQLite file holding empty ``tables`` (``experiments``: as MLflow's store does)."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(path)) as conn:
        for table in tables:
            conn.execute(f"CREATE TABLE {table} (id INTEGER)")
        conn.commit()
    return path


FOREIGN_FILES = {  # storage=..., the file it names, the line
    "MLflow's store as the database": ("sqlite:///m.db", lambda d: sqlite_with(d / "m.db", "experiments", "runs"),
                                       "storage: m.db is an MLflow tracking store, not an Optuna database: give the "
                                       "study its own file (storage=sqlite:///optuna.db or a journal file)"),
    "another program's database": ("sqlite:///o.db", lambda d: sqlite_with(d / "o.db", "notes"),
                                   "storage: o.db is a database but not an Optuna one (no studies table; it has notes)"),
    "MLflow's store as a journal": ("m.db", lambda d: sqlite_with(d / "m.db", "experiments"),
                                    "storage: m.db is an MLflow tracking store, not an Optuna database"),
    "a database as a journal": ("o.db", lambda d: sqlite_with(d / "o.db", "studies", "version_info"),
                                "storage: o.db looks like a SQLite database, not an Optuna journal file; a database is "
                                "given as storage=sqlite:///o.db"),
    "a text file as a journal": ("notes.txt", lambda d: d.joinpath("notes.txt").write_text("hi\n") and d / "notes.txt",
                                 "storage: notes.txt is not an Optuna journal file (its first line is not a JSON record "
                                 "with an op_code); give a new path or the study's journal"),
    "a policy file as a journal": ("p.json", lambda d: d.joinpath("p.json").write_text('{"format": "x"}') and d / "p.json",
                                   "storage: p.json is not an Optuna journal file"),
}


@pytest.mark.parametrize("case", list(FOREIGN_FILES))
def test_a_file_that_is_not_optunas_is_refused_untouched(case, in_tmp, monkeypatch, capsys):
    """Optuna writes into whatever ``storage=`` names (its tables, a journal record): a file that is not
    Optuna's is one line naming ``storage`` before anything opens it, and keeps its bytes."""
    storage, make, expected = FOREIGN_FILES[case]
    path = make(in_tmp)
    before = path.read_bytes()
    monkeypatch.setattr(sys, "argv", ["initsearch", *TINY, f"storage={storage}"])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("initsearch: error: " + expected), err
    assert path.read_bytes() == before
    assert [p.name for p in in_tmp.iterdir() if p.name != "empty"] == [path.name]  # nothing else written either


@pytest.mark.parametrize("storage", ["sqlite:///mlflow.db", "mlflow.db"])
def test_the_study_and_mlflow_never_share_one_file(storage, in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["initsearch", *TINY, f"storage={storage}", "tracking_uri=sqlite:///mlflow.db"])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"initsearch: error: storage: {storage} is also the MLflow store (tracking_uri=sqlite:///"), err
    assert not (in_tmp / "mlflow.db").exists()


def test_a_new_an_empty_and_a_real_journal_pass_the_check(in_tmp):
    """What the journal check must let through: a new path, an empty file, Optuna's own journal (resume),
    and one whose first record another worker is still writing."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from initsearch.search.storage import check_storage_file

    check_storage_file("new.journal")
    (in_tmp / "empty.journal").write_bytes(b"")
    check_storage_file("empty.journal")
    optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend("real.journal")))
    check_storage_file("real.journal")
    (in_tmp / "torn.journal").write_bytes((in_tmp / "real.journal").read_bytes()[:20])
    check_storage_file("torn.journal")
    assert not (in_tmp / "new.journal").exists()


def test_hydra_errors_are_one_line_and_status_2_in_a_real_process(in_tmp):
    proc = cli(["study=nope", "tracking_uri=none"], in_tmp, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("initsearch: error: In 'config': Could not find 'study/nope'")


def test_a_policy_for_another_model_is_refused_and_leaves_the_model_untouched(tmp_path):
    from initsearch import apply_policy, load_policy, save_policy
    from initsearch.proxy.models import build_model

    path = save_policy({"format": "initsearch-policy", "version": 1, "rules": [
        {"layer": "fc1", "scheme": "orthogonal"}, {"layer": "conv1", "scheme": "kaiming_normal"}]}, tmp_path / "p.json")
    assert load_policy(path).rules[1].layer == "conv1"  # a valid file ...
    mlp = build_model({"name": "mlp", "depth": 2, "width": 8}, (20,), 4)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(PolicyError, match=r"rules\[1\]\.layer: 'conv1' matches no layer of the model"):
        apply_policy(mlp, path, example_batch=torch.randn(4, 20), seed=0)  # ... for another model
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    apply_policy(mlp, path, example_batch=torch.randn(4, 20), seed=0, strict=False)  # allowed when asked
    assert not torch.equal(before["fc1.weight"], mlp.state_dict()["fc1.weight"])


# ---- stops and resume ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_trial_exports_the_best_so_far_and_the_same_command_resumes(signum, in_tmp, monkeypatch, capsys):
    real, calls = sequential_module.train_run, []

    def signal_during_the_third_trial(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler interrupts this
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential_module, "train_run", signal_during_the_third_trial)
    cfg = tiny("s.journal", "sig")
    with pytest.raises(StudyInterrupted) as info:
        run(cfg, in_tmp / "out1")
    assert info.value.exit_status == 128 + signum  # 130, 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    out, err = capsys.readouterr()
    exported = in_tmp / "out1" / "best_policy.json"
    assert f"best policy so far: {exported.resolve()}" in out and exported.exists()
    assert f"stopped by {signal.Signals(signum).name} after 2 complete trials" in err
    trials = load_trials("s.journal", "sig")
    assert [t.state for t in trials] == [COMPLETE, COMPLETE, FAIL, WAITING]
    assert trials[2].user_attrs["reason"] == f"interrupted by {signal.Signals(signum).name}"
    assert trials[3].user_attrs["retry_of"] == 2
    from initsearch.export import main as export_main  # the failed trial is not exported

    assert export_main(["study_name=sig", "storage=s.journal", "trial=2", "out=t2.json"]) == 2
    assert f"did not finish (state FAIL: interrupted by {signal.Signals(signum).name})" in capsys.readouterr().err
    assert not (in_tmp / "t2.json").exists()

    monkeypatch.setattr(sequential_module, "train_run", real)
    run(cfg, in_tmp / "out2")
    trials = load_trials("s.journal", "sig")
    assert [t.state for t in trials][:4] == [COMPLETE, COMPLETE, FAIL, COMPLETE]
    assert trials[3].params == trials[2].params and trials[3].params  # the same policy, tried again once
    assert counted(trials) == 4 and len(trials) == 5
    assert sorted(t.user_attrs.get("baseline") or "" for t in trials) == ["", "", "", "he", "xavier"]


def test_optuna_logs_a_failed_trial_but_not_an_interrupted_one(in_tmp, monkeypatch):
    real, calls, records = sequential_module.train_run, [], []

    def fail_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        if len(calls) == 2:
            raise StudyInterrupted(signal.SIGINT)
        return real(*args, **kwargs)

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    monkeypatch.setattr(sequential_module, "train_run", fail_then_interrupt)
    keep, optuna_logger = Keep(), logging.getLogger("optuna")
    optuna_logger.addHandler(keep)
    try:
        with pytest.raises(StudyInterrupted):
            run(tiny("s.journal", "quiet"), in_tmp / "out")
    finally:
        optuna_logger.removeHandler(keep)
    failed = [m for m in records if " failed with " in m]
    assert len(failed) == 2 and "RuntimeError('boom')" in failed[0], records  # the real failure: both lines
    assert failed[1] == "Trial 0 failed with value None."
    assert not [m for m in records if "Trial 1 " in m or "StudyInterrupted" in m], records


def test_sigint_then_sigkill_then_the_same_command_keeps_every_trial_once(in_tmp):
    """The real thing, in processes: Ctrl-C (SIGINT) mid-trial, then SIGKILL mid-trial, then the same
    command finishes the study; MLflow (local SQLite) holds one run per trial, none left RUNNING."""
    from mlflow.tracking import MlflowClient

    journal = str(in_tmp / "initsearch.journal")
    args = [o for o in TINY if not o.startswith(("tracking_uri=", "n_trials="))] + target(SlowMLP, delay=0.15) + [
        "study_name=stops", "n_trials=2", "pruner=none"]  # trials of >= 3 s
    # 1. SIGINT in the middle of a trial after the first: exit 130, the best so far exported, the trial
    #    recorded failed ("interrupted by SIGINT") and enqueued again
    proc = start_cli(args, in_tmp, in_tmp / "run1.log")
    wait_until(lambda: fresh_running_trial(journal, "stops", after=0) is not None, 120, "a fresh trial > 0", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    log1 = (in_tmp / "run1.log").read_text()
    assert "Traceback" not in log1 and "best policy so far: " in log1, log1
    assert Path(log1.split("best policy so far: ")[1].split()[0]).is_file()
    [stopped] = [t for t in load_trials(journal, "stops") if t.user_attrs.get("reason") == "interrupted by SIGINT"]
    assert stopped.state == FAIL
    # 2. the same command; SIGKILL in the middle of a trial, once another one completed
    proc = start_cli(args, in_tmp, in_tmp / "run2.log")
    wait_until(lambda: any(t.state == COMPLETE and t.number > stopped.number for t in load_trials(journal, "stops")),
               120, "a trial to complete after the resume", proc)
    wait_until(lambda: fresh_running_trial(journal, "stops", after=stopped.number) is not None, 120,
               "a fresh trial", proc)
    before = {t.number: (t.state, t.value, t.params) for t in load_trials(journal, "stops")}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    [killed] = [t for t in load_trials(journal, "stops") if t.state == RUNNING]
    # 3. the same command again finishes the study
    proc = cli(args, in_tmp)
    assert proc.returncode == 0, proc.stderr
    trials = load_trials(journal, "stops")
    by_number = {t.number: t for t in trials}
    for number, (state, value, params) in before.items():  # every trial finished before the kill is kept as it was
        if state in (COMPLETE, PRUNED):
            assert (by_number[number].state, by_number[number].value, by_number[number].params) == (state, value, params)
    dead = by_number[killed.number]
    assert dead.state == FAIL and dead.user_attrs["reason"].startswith("worker died: process ")
    retries = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    assert set(retries) == {stopped.number, dead.number}  # the interrupted and the killed trial, each tried again once
    for original in (stopped, dead):
        again = retries[original.number]
        assert again.state == COMPLETE and again.params == original.params
        assert again.user_attrs.get("baseline") == original.user_attrs.get("baseline")
    assert not [t for t in trials if t.state in (RUNNING, WAITING)]
    assert counted(trials) == 4 and len(trials) == 6
    assert sorted(t.user_attrs["baseline"] for t in trials if t.user_attrs.get("baseline") and t.state != FAIL) == [
        "he", "xavier"]
    # MLflow: one parent, finished; one child run per trial, none left RUNNING; the two stopped ones FAILED
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stops").experiment_id])
    parents = [r for r in runs if r.data.tags.get("initsearch.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("initsearch.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(r.data.tags["initsearch.trial"]) for r in children) == sorted(by_number)
    status = {int(r.data.tags["initsearch.trial"]): r.info.status for r in children}
    assert status[stopped.number] == "FAILED" and status[dead.number] == "FAILED"
    assert "RUNNING" not in status.values()


# ---- several workers on the default (journal) storage -------------------------------------------------------------
def test_two_copies_of_the_command_share_the_study(in_tmp):
    from mlflow.tracking import MlflowClient

    journal = str(in_tmp / "initsearch.journal")
    args = [o for o in TINY if not o.startswith(("tracking_uri=", "n_trials="))] + target(SlowMLP, delay=0.05) + [
        "study_name=pair", "n_trials=3", "pruner=none"]
    procs = [start_cli(args, in_tmp, in_tmp / f"copy{i}.log") for i in range(2)]
    for i, proc in enumerate(procs):
        assert proc.wait(240) == 0, (in_tmp / f"copy{i}.log").read_text()
    trials = load_trials(journal, "pair")
    assert len(trials) == 5 and counted(trials) == 5  # exactly the total, no trial beyond it
    assert sorted(t.number for t in trials) == list(range(5))
    assert sorted(t.user_attrs.get("baseline") or "search" for t in trials) == ["he", "search", "search", "search",
                                                                               "xavier"]
    study = optuna.load_study(study_name="pair", storage=open_storage(journal))
    assert study.user_attrs["starts"] == 2
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pair").experiment_id])
    assert sum(1 for r in runs if r.data.tags.get("initsearch.role") == "parent") == 1
    assert sorted(int(r.data.tags["initsearch.trial"]) for r in runs if r.data.tags.get("initsearch.role") == "trial") == list(range(5))


def test_n_workers_runs_helper_processes_on_the_same_study(in_tmp, caplog):
    cfg = compose_config(NO_TRACKING + target(SlowMLP, delay=0.05) + ["tracking_uri=none", "storage=s.journal",
                                                                     "study_name=helpers", "n_workers=2", "n_trials=4",
                                                                     "pruner=none"])
    path = run(cfg, in_tmp / "out")
    trials = load_trials("s.journal", "helpers")
    assert path.exists() and len(trials) == 6 and counted(trials) == 6
    assert sorted(t.user_attrs.get("baseline") or "search" for t in trials).count("search") == 4
    assert not [r for r in caplog.records if "helper worker" in r.getMessage()]  # it exited with status 0
    assert optuna.load_study(study_name="helpers", storage=open_storage("s.journal")).user_attrs["starts"] == 2


def test_ctrl_c_with_n_workers_stops_the_helpers_too_and_leaves_no_trial_running(in_tmp, monkeypatch):
    """SIGINT to the main process of ``n_workers=2``: it stops its helper (SIGTERM), whose trial is recorded
    as interrupted and enqueued again; nothing stays RUNNING, the helper is gone, the exit status is 130."""
    import threading

    from initsearch import cli as cli_module

    cfg = compose_config(NO_TRACKING + target(SlowMLP, delay=0.15) + [
        "tracking_uri=none", "storage=s.journal", "study_name=ctrlc", "n_workers=2", "n_trials=6", "pruner=none"])
    started_helpers = []
    real_start = cli_module.Helpers.start
    done = threading.Event()

    def remember(*args, **kwargs):
        helpers = real_start(*args, **kwargs)
        started_helpers.append(helpers)
        return helpers

    def helper_trial_running() -> bool:
        trial = fresh_running_trial("s.journal", "ctrlc", max_age=1.5)
        return trial is not None and f":{os.getpid()}:" not in trial.user_attrs["worker"]

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline:
            if helper_trial_running():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)

    monkeypatch.setattr(cli_module.Helpers, "start", remember)
    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    try:
        with pytest.raises(StudyInterrupted) as info:
            run(cfg, in_tmp / "out")
    finally:
        done.set()
        presser.join()
    assert info.value.exit_status == 130
    assert not any(p.is_alive() for h in started_helpers for p in h.procs)
    assert [p.exitcode for h in started_helpers for p in h.procs] == [143]
    trials = load_trials("s.journal", "ctrlc")
    assert not [t for t in trials if t.state == RUNNING]
    helper_stops = [t for t in trials if t.user_attrs.get("reason") == "interrupted by SIGTERM"]
    assert len(helper_stops) == 1 and f":{os.getpid()}:" not in helper_stops[0].user_attrs["worker"]
    assert any(t.user_attrs.get("retry_of") == helper_stops[0].number for t in trials)  # it runs again on resume


def test_the_study_lock_excludes_other_processes(tmp_path):
    """The lock is held across processes: a second process waits for it until the first lets go."""
    import subprocess

    from tests.reliability_helpers import cli_env

    journal = str(tmp_path / "s.journal")
    lock = StudyLock(journal, None, "x")
    code = ("import sys, time; from initsearch.search.workers import StudyLock; l = StudyLock(sys.argv[1], None, 'x'); "
            "print('ready', flush=True); t = time.monotonic(); l.acquire(); print(time.monotonic() - t, flush=True)")
    with lock:
        with lock:  # reentrant within a process
            proc = subprocess.Popen([sys.executable, "-c", code, journal], stdout=subprocess.PIPE, text=True,
                                    env=cli_env())
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(1.0)
            assert proc.poll() is None  # still waiting for the lock
        assert lock.held
    assert not lock.held
    waited = float(proc.communicate(timeout=60)[0])
    assert waited > 0.9


def test_worker_liveness():
    assert worker_alive(worker_id()) is True
    host, pid, start = worker_id().split(":")
    assert worker_alive(f"{host}:{pid}:{int(start or 0) + 1}") is False  # a later process that reused the pid
    assert worker_alive(f"another-host:{pid}:{start}") is None
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child_id = f"{host}:{child.pid}:"
    child.wait()
    assert worker_alive(child_id) is False


# ---- determinism -----------------------------------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_trials_and_policy_in_a_fresh_process(in_tmp):
    proc = cli(TINY + ["study_name=det", "storage=a.journal", "hydra.run.dir=out_a"], in_tmp)
    assert proc.returncode == 0, proc.stderr
    run(tiny("b.journal", "det"), in_tmp / "out_b")
    a, b = load_trials("a.journal", "det"), load_trials("b.journal", "det")
    assert [(t.state, t.value, t.params) for t in a] == [(t.state, t.value, t.params) for t in b]
    pa, pb = (json.loads((in_tmp / d / "best_policy.json").read_text()) for d in ("out_a", "out_b"))
    for p in (pa, pb):
        p["provenance"].pop("created")
    assert pa == pb


def test_heartbeat_counts_the_trial_start_as_the_first_beat(monkeypatch):
    from datetime import datetime

    from initsearch.search.workers import Heartbeat

    class FakeTrial:
        def __init__(self, number: int, start: float) -> None:
            self.number, self.datetime_start, self.user_attrs = number, datetime.fromtimestamp(start), {}

        def set_user_attr(self, key, value):
            self.user_attrs[key] = value

    clock = [1000.0]
    monkeypatch.setattr("initsearch.search.workers.time.time", lambda: clock[0])
    beat = Heartbeat(60)
    short = FakeTrial(0, 1000.0)
    for clock[0] in (1010.0, 1050.0):  # a trial shorter than the interval writes nothing
        beat(short)
    assert short.user_attrs == {}
    long = FakeTrial(1, 1055.0)
    for clock[0] in (1100.0, 1116.0, 1150.0, 1175.0):
        beat(long)
    assert long.user_attrs == {"heartbeat": 1116.0}  # 61 s after its start; the next beat is due at 1176
    clock[0] = 1178.0
    beat(long)
    assert long.user_attrs == {"heartbeat": 1178.0}


def test_ctrl_c_while_waiting_for_the_helpers_exports_this_process_s_finished_study(in_tmp, monkeypatch):
    from initsearch import cli as cli_module

    class WaitingHelpers:  # this process's trials are all done; Ctrl-C comes while it waits for its helpers
        def join(self):
            raise StudyInterrupted(signal.SIGINT)

        def stop(self, signum):
            pass

    monkeypatch.setattr(cli_module.Helpers, "start", classmethod(lambda cls, cfg, settings: WaitingHelpers()))
    cfg = compose_config(TINY + ["storage=s.journal", "study_name=joined"])
    with pytest.raises(StudyInterrupted) as info:
        run(cfg, in_tmp / "out")
    assert info.value.study is not None
    assert (in_tmp / "out" / "best_policy.json").is_file() and (in_tmp / "out" / "trials.csv").is_file()


def test_a_worker_waiting_for_trials_running_elsewhere_says_so_once(tmp_path, caplog):
    """No room for another trial while another worker's trial runs: the worker waits (up to grace_period
    for a lost one), and says why once, instead of sitting silent."""
    import logging
    import time

    from initsearch.search.storage import open_storage
    from initsearch.search.workers import StudyLock, TrialGate

    url = str(tmp_path / "s.journal")
    storage = open_storage(url)
    study = optuna.create_study(study_name="busy", storage=storage)
    study.ask()  # RUNNING, under no worker of this process
    gate = TrialGate(StudyLock(url, storage, "busy"), total=1, poll_s=0.05, deadline=time.monotonic() + 0.4)
    with caplog.at_level(logging.INFO, logger="initsearch"):
        assert gate.admit(study) is False
    said = [r.getMessage() for r in caplog.records if "still RUNNING under other workers" in r.getMessage()]
    assert said == ["study 'busy': waiting for 1 trial(s) still RUNNING under other workers; one whose worker is "
                    "gone is failed and run again (its process not found on this machine, or no heartbeat for "
                    "grace_period)"]
