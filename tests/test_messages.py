"""What a user reads: --help of the three commands, one line (no traceback) for every bad argument, "did you
mean" for a misspelt key, a quiet exit when stdout's reader goes away, no output folder left by a failure,
and what export says about the trial it wrote (or refuses to)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from initsearch import export
from initsearch import validate as validate_module
from initsearch.__main__ import main as study_main
from initsearch.errors import did_you_mean
from initsearch.search.storage import open_storage
from tests.conftest import PYTHON, TINY, subprocess_env

POLICY = {"format": "initsearch-policy", "version": 1, "rules": [{"layer": "fc1", "scheme": "orthogonal"}]}


def command(module: str, args: list[str], cwd, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", module, *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                          env=subprocess_env(), cwd=cwd, timeout=180)


def one_error_line(err: str, prefix: str) -> None:
    assert err.count("\n") == 1 and err.startswith(prefix + ": error: ") and "Traceback" not in err, err


# ---- --help ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--help"], ["-h"], ["n_trails=3", "--help"], ["study=nope", "-h"]])
def test_study_help_says_what_the_tool_does_with_examples_wherever_the_flag_is(args, in_tmp):
    proc = command("initsearch", args, in_tmp)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    assert out.startswith("initsearch: find how to initialize a network's weights")
    assert "Usage: python -m initsearch [key=value ...]" in out and "Examples:" in out
    assert "n_trials=N" in out and "outputs/<study>/<date_time>/" in out and "--hydra-help" in out
    assert "powered by Hydra" not in out
    assert not (in_tmp / "outputs").exists()


def test_hydras_own_help_stays_reachable(in_tmp):
    proc = command("initsearch", ["--hydra-help"], in_tmp)
    assert proc.returncode == 0 and "Hydra" in proc.stdout and "--cfg" in proc.stdout


@pytest.mark.parametrize("module, first", [(export, "initsearch.export: write the init policy"),
                                           (validate_module, "initsearch.validate: check a policy")])
@pytest.mark.parametrize("args", [["--help"], ["-h"], ["policy=x.json", "trial=-1", "--help"]])
def test_export_and_validate_help(module, first, args, capsys):
    assert module.main(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith(first) and "Usage: python -m " in out and "Examples:" in out and err == ""


def test_a_closed_stdout_is_a_quiet_exit_not_a_traceback(in_tmp):
    """``initsearch --help | head``: the reader is gone before the help is written."""
    for module in ("initsearch", "initsearch.export", "initsearch.validate"):
        read, write = os.pipe()
        os.close(read)
        try:
            proc = command(module, ["--help"], in_tmp, stdout=write)
        finally:
            os.close(write)
        assert proc.returncode == 141 and proc.stderr == "", (module, proc.stderr)


# ---- bad arguments -------------------------------------------------------------------------------------------------
STUDY_ERRORS = {
    "misspelt key": (["n_trails=5"], "n_trails: no such key (did you mean n_trials?)"),
    "misspelt nested key": (["train.stepz=5"], "train.stepz: no such key (did you mean train.steps?)"),
    "wrong study": (["study=nope"], "In 'config': Could not find 'study/nope' (available: cifar_cnn, cifar_mlp, "),
    "bad override syntax": (["a=b=c"], "override 'a=b=c': mismatched input '='"),
    "bad value": (["n_trials=0"], "n_trials: must be a whole number >= 1, got 0"),
    # found after the run's log has its first line (the thread count)
    "missing warm start": (["warm_start=[nosuch]"], "warm_start[0]: 'nosuch' is neither a policy file nor a study"),
}


@pytest.mark.parametrize("case", list(STUDY_ERRORS))
def test_study_errors_are_one_line_with_status_2_and_leave_no_output_folder(case, in_tmp, monkeypatch, capsys):
    args, expected = STUDY_ERRORS[case]
    monkeypatch.setattr(sys, "argv", ["initsearch", *TINY, f"storage={in_tmp}/s.journal", *args])
    with pytest.raises(SystemExit) as info:
        study_main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    one_error_line(err, "initsearch")
    assert err.startswith("initsearch: error: " + expected), err
    assert not (in_tmp / "outputs").exists()  # Hydra's run folder of a failed start is removed


@pytest.mark.parametrize("args, expected", [
    (["model._target_=nosuch_pkg.Net"], "model._target_: cannot import 'nosuch_pkg.Net': No module named 'nosuch_pkg'"),
    (["model._target_=torch.nn.NoSuchNet"],
     "model._target_: cannot import 'torch.nn.NoSuchNet': module 'torch.nn' has no attribute 'NoSuchNet'"),
    (["data._target_=nosuch_pkg.load"], "data._target_: cannot import 'nosuch_pkg.load': No module named 'nosuch_pkg'"),
])
def test_a_target_that_does_not_import_is_one_line_saying_why(args, expected, in_tmp, monkeypatch, capsys):
    tiny = [arg for arg in TINY if not arg.startswith(("model", "data"))]
    monkeypatch.setattr(sys, "argv", ["initsearch", *tiny, f"storage={in_tmp}/s.journal", *args])
    with pytest.raises(SystemExit) as info:
        study_main()
    out, err = capsys.readouterr()
    assert info.value.code == 2 and err == f"initsearch: error: {expected}\n", err
    assert "Error getting object" not in out + err  # Hydra's own ERROR line


def test_did_you_mean_picks_the_closest_key_or_nothing():
    keys = ["n_trials", "train.steps", "train.lr", "model.width", "score.seeds"]
    assert did_you_mean("n_trails", keys) == " (did you mean n_trials?)"
    assert did_you_mean("model.widht", keys) == " (did you mean model.width?)"
    assert did_you_mean("score.seed", keys) == " (did you mean score.seeds?)"
    assert did_you_mean("banana", keys) == ""


VALIDATE_ERRORS = {
    "no policy": (["study=digits_mlp"], "policy: required"),
    "wrong study": (["policy=p.json", "study=nope"], "In 'config': Could not find 'study/nope'"),
    "bad override syntax": (["policy=", "a=b=c"], "override 'a=b=c': mismatched input '='"),
    "misspelt own key": (["polcy=p.json"], "polcy: no such key (did you mean policy?)"),
    "misspelt config key": (["policy=p.json", "train.stpes=3"], "train.stpes: no such key (did you mean train.steps?)"),
    "bad count": (["policy=p.json", "seeds=0"], "seeds: must be a whole number >= 1, got '0'"),
    "file store": (["policy=p.json", "tracking_uri=mlruns"], "tracking_uri: mlruns is an MLflow file store"),
}


def test_validate_names_the_policy_file_of_a_rule_for_a_missing_layer(in_tmp):
    (in_tmp / "p.json").write_text(json.dumps({**POLICY, "rules": [{"layer": "l9", "scheme": "orthogonal"}]}))
    proc = command("initsearch.validate", ["policy=p.json", *TINY, "seeds=1", "steps=5"], in_tmp)
    err = proc.stderr
    assert proc.returncode == 2
    one_error_line(err, "initsearch.validate")
    assert err.startswith("initsearch.validate: error: p.json: rules[0].layer: 'l9' matches no layer of the model"), err
    assert "strict=False" not in err and err.rstrip().endswith("fix the name in the policy file")  # no such option here
    provenance = {"study": "odd", "model": {"_target_": "mymods.OddCNN", "width": 8}}
    (in_tmp / "p.json").write_text(json.dumps({**POLICY, "rules": [{"layer": "stem", "scheme": "orthogonal"}],
                                               "provenance": provenance}))
    err = command("initsearch.validate", ["policy=p.json", *TINY, "seeds=1", "steps=5"], in_tmp).stderr
    one_error_line(err, "initsearch.validate")
    assert err.rstrip().endswith("the policy was searched on mymods.OddCNN (its provenance), this command trains mlp: "
                                 "pass model._target_=mymods.OddCNN and its arguments"), err


@pytest.mark.parametrize("case", list(VALIDATE_ERRORS))
def test_validate_errors_are_one_line_with_status_2(case, in_tmp, capsys):
    (in_tmp / "p.json").write_text(json.dumps(POLICY))
    args, expected = VALIDATE_ERRORS[case]
    assert validate_module.main(args) == 2
    err = capsys.readouterr().err
    one_error_line(err, "initsearch.validate")
    assert err.startswith("initsearch.validate: error: " + expected), err


# ---- export ----------------------------------------------------------------------------------------------------
@pytest.fixture
def small_study(in_tmp):
    """A stored study with a complete searched trial, a baseline, a pruned and a failed trial."""
    storage = str(in_tmp / "s.journal")
    study = optuna.create_study(study_name="small", storage=open_storage(storage), direction="minimize")
    study.set_user_attr("metric", "auc_loss")
    dist = {"bias": CategoricalDistribution(["zeros", "normal"])}
    study.add_trial(create_trial(value=0.5, params={"bias": "zeros"}, distributions=dist,
                                 user_attrs={"policy": POLICY, "seed_scores": [0.5, 0.45]}))
    study.add_trial(create_trial(value=0.6, user_attrs={"policy": POLICY, "baseline": "he"}))
    study.add_trial(create_trial(state=TrialState.PRUNED, value=0.4, params={"bias": "normal"}, distributions=dist,
                                 user_attrs={"policy": POLICY}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"reason": "RuntimeError: boom"}))
    return storage


def test_export_says_which_trial_of_what_kind_and_score_it_wrote(small_study, capsys):
    assert export.main(["study_name=small", f"storage={small_study}", "out=p.json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("trial 0 (search, complete) · auc_loss 0.5 · per seed 0.5 0.45")
    assert out[1] == "wrote p.json"


def test_export_refuses_a_pruned_or_failed_trial_unless_forced(small_study, in_tmp, capsys):
    assert export.main(["study_name=small", f"storage={small_study}", "trial=2"]) == 2
    err = capsys.readouterr().err
    one_error_line(err, "initsearch.export")
    assert "trial 2 of study 'small' was pruned (its score is partial)" in err and "force=true" in err
    assert not (in_tmp / "best_policy.json").exists()
    assert export.main(["study_name=small", f"storage={small_study}", "trial=3", "force=true"]) == 2
    assert "did not finish (state FAIL: RuntimeError: boom); it has no policy to export" in capsys.readouterr().err
    assert export.main(["study_name=small", f"storage={small_study}", "trial=2", "force=true"]) == 0
    assert capsys.readouterr().out.startswith("trial 2 (search, pruned) · auc_loss 0.4")
    assert json.loads((in_tmp / "best_policy.json").read_text())["provenance"]["trial"] == 2


@pytest.mark.parametrize("args, expected", [
    (["stdy_name=small"], "stdy_name: no such key (did you mean study_name?)"),
    (["study_name=small", "--verbose"], "--verbose: expected key=value"),
    (["study_name=small", "force=yes"], "force: must be true or false, got 'yes'"),
])
def test_export_argument_errors_are_one_line(args, expected, small_study, capsys):
    assert export.main([*args, f"storage={small_study}"]) == 2
    err = capsys.readouterr().err
    one_error_line(err, "initsearch.export")
    assert err.startswith("initsearch.export: error: " + expected), err


def test_export_refuses_a_file_that_is_not_a_journal_and_leaves_it_untouched(in_tmp, capsys):
    (in_tmp / "notes.txt").write_text("hi\n")
    assert export.main(["study_name=small", "storage=notes.txt"]) == 2
    err = capsys.readouterr().err
    one_error_line(err, "initsearch.export")
    assert err.startswith("initsearch.export: error: storage: notes.txt is not an Optuna journal file"), err
    assert (in_tmp / "notes.txt").read_text() == "hi\n"


def test_an_error_after_trials_trained_keeps_the_runs_folder_and_its_log(in_tmp, monkeypatch, capsys):
    """Only a start that trained nothing leaves no folder: a bad value found after trials ran (here, by the
    selection stage) keeps the run's folder and its log."""
    from initsearch.errors import ConfigError

    def refuses(*args, **kwargs):
        raise ConfigError("select.batch_trials: refused late, for this test")

    monkeypatch.setattr("initsearch.cli.run_selection", refuses)
    monkeypatch.setattr(sys, "argv", ["initsearch", *TINY, f"storage={in_tmp}/s.journal"])
    with pytest.raises(SystemExit) as info:
        study_main()
    assert info.value.code == 2
    err = capsys.readouterr().err  # the progress lines, then the error
    assert err.strip().splitlines()[-1] == "initsearch: error: select.batch_trials: refused late, for this test"
    logs = list((in_tmp / "outputs").glob("*/*/__main__.log"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0
