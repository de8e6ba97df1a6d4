"""Progress while a study or a validation runs (lines when stderr is not a terminal), and the summary at the
end: reused trials marked, times rounded, every file written, and a study that was already complete."""
from __future__ import annotations

import io
import re
from datetime import datetime, timedelta

import optuna
import pytest
from optuna.trial import create_trial

from initsearch.cli import run
from initsearch.search.outcome import TrialOutcome
from initsearch.search.progress import Progress, Steps, format_duration
from initsearch.search.report import format_seconds, summarize
from initsearch.search.settings import settings_from_config
from tests.conftest import TINY, compose_config

LINE = re.compile(r"^(\d+)/4 trials( · best auc_loss [\d.e+-]+ \(trial \d+\))?( · best baseline (he|xavier) [\d.e+-]+)?"
                  r"( · ETA \d+(s|m\d\ds))?$")


def test_a_study_not_on_a_terminal_prints_progress_lines_then_the_summary_and_every_file(in_tmp, capsys):
    cfg = compose_config(TINY + [f"storage={in_tmp}/s.journal", "study_name=progress"])
    run(cfg, in_tmp / "out")
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if "trials" in line]
    assert lines and all(LINE.match(line) for line in lines), err
    assert lines[0].startswith("1/4 trials") and "ETA" in lines[0]
    assert lines[-1].startswith("4/4 trials · best auc_loss") and "best baseline" in lines[-1] and "ETA" not in lines[-1]
    assert "study already complete" not in out
    assert f"wrote into {(in_tmp / 'out').resolve()}/:" in out
    assert re.search(r"^  best_policy\.json +the best policy", out, re.M) and re.search(r"^  trials\.csv +every trial", out, re.M)
    assert re.search(r"^  best_policy\.png +what the best policy does", out, re.M)
    assert (in_tmp / "out" / "best_policy.png").stat().st_size > 5_000
    assert not re.search(r"\d\.\d{5,}", out)  # no raw floats: scores and times are rounded

    run(cfg, in_tmp / "again")  # the same command: nothing left to run
    out, err = capsys.readouterr()
    assert out.startswith("study already complete: 2 searched trials (n_trials=2;")
    assert "trials ·" not in err


def test_progress_false_is_quiet(in_tmp, capsys):
    run(compose_config(TINY + [f"storage={in_tmp}/s.journal", "study_name=quiet", "progress=false"]), in_tmp / "out")
    assert "trials ·" not in capsys.readouterr().err


def _outcome(number: int, value: float, baseline: str | None = None, state: str = "complete") -> TrialOutcome:
    return TrialOutcome(number, baseline, {}, state=state, value=value)


def test_progress_lines_first_then_every_interval_then_last():
    settings = settings_from_config(compose_config(TINY + ["n_trials=3"]))  # 2 baselines + 3 = 5 trials
    stream = io.StringIO()
    progress = Progress(None, settings, stream=stream, enabled=True, interval_s=3600)
    progress.study_started(settings, "", optuna.create_study())
    for outcome in (_outcome(0, 0.5, "he"), _outcome(1, 0.4, "xavier"), _outcome(2, 0.45),
                    _outcome(3, 9.0, state="pruned"), _outcome(4, 0.3)):
        progress.trial_finished(outcome)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the first, then nothing for an hour, and the last
    assert re.match(r"^1/5 trials · best baseline he 0\.5 · ETA \d+s$", lines[0]), lines[0]
    assert lines[1] == "5/5 trials · best auc_loss 0.3 (trial 4) · best baseline xavier 0.4"
    assert progress.ran == 5


def test_steps_progress_for_validate():
    stream = io.StringIO()
    steps = Steps(3, "training runs", stream=stream, interval_s=3600)
    for what in ("policy, seed 1", "policy, seed 2", "he, seed 1"):
        steps.step(what)
    lines = stream.getvalue().splitlines()
    assert re.match(r"^1/3 training runs · policy, seed 1 · ETA \d+s$", lines[0]) and lines[1] == "3/3 training runs · he, seed 1"


def test_summary_marks_reused_trials_and_rounds_times():
    study = optuna.create_study()
    start = datetime(2026, 1, 1)
    trials = [create_trial(value=0.123456789, user_attrs={"seed_scores": [0.12, 0.13]}),
              create_trial(value=0.123456789, user_attrs={"duplicate_of": 0, "seed_scores": [0.12, 0.13]}),
              create_trial(value=0.2, user_attrs={"baseline": "he", "seed_scores": [0.2]})]
    for t, seconds in zip(trials, (12.3456, 0.0213, 75.0)):
        t.datetime_start, t.datetime_complete = start, start + timedelta(seconds=seconds)
        study.add_trial(t)
    text = summarize(study, "auc_loss").format()
    assert re.search(r"^ +0 +search +complete +0\.1235 .* 12 s *$", text, re.M), text
    assert re.search(r"^ +1 +search +complete +0\.1235 .* 0\.021 s = trial 0$", text, re.M), text
    assert re.search(r"^ +2 +he +complete +0\.2 .* 1m15s *$", text, re.M), text
    assert "= trial N: the sampler proposed trial N's policy again" in text
    assert "0.123456789" not in text and "12.3456" not in text


@pytest.mark.parametrize("seconds, text", [(0.0213, "0.021 s"), (4.24, "4.2 s"), (42.4, "42 s"), (70.2, "1m10s"),
                                            (7500, "2h05m"), (None, "")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_format_duration():
    assert [format_duration(s) for s in (5, 70, 7500)] == ["5s", "1m10s", "2h05m"]
