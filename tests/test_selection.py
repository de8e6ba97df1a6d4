"""The selection stage: the front-runners again on new seeds; a lucky candidate is not exported."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics

import numpy as np
import optuna
import pandas as pd
import pytest

from initsearch.cli import run_settings
from initsearch.errors import ConfigError
from initsearch.export import pick_trial
from initsearch.proxy.scoring import score_or_nan
from initsearch.search.selection import Candidate, best_first, front_runners, run_selection, selection_seeds
from initsearch.search.settings import settings_from_config
from initsearch.search.study import open_study
from initsearch.search.trial import prepare
from initsearch.tracking.payload import summary_metric_rows, summary_tags
from tests.conftest import TINY, compose_config, spy_populations

ZEROS = {"format": "initsearch-policy", "version": 1, "rules": [], "default": {"scheme": "zeros"}}
T975 = {1: 12.706204736174707, 2: 4.302652729749464}  # Student's t, 97.5th percentile, by degrees of freedom


def _settings(tmp_path, *extra: str):
    overrides = [o for o in TINY if not o.startswith("n_trials=")] + [
        "n_trials=2", f"storage={tmp_path / 's.journal'}", "study_name=sel", "select.top_k=2", "select.seeds=3",
        "select.baselines=2", "pruner=none", *extra]
    cfg = compose_config(overrides)
    return cfg, settings_from_config(cfg)


def _plant_lucky(study: optuna.Study) -> int:
    """A searched trial whose search score beat every other by 3% (a lucky seed), with a policy that cannot
    train at all (every weight zero)."""
    lucky = 0.97 * study.best_value
    study.add_trial(optuna.trial.create_trial(value=lucky, user_attrs={"policy": ZEROS, "seed_scores": [lucky],
                                                                       "kind": "search"}))
    return study.get_trials(deepcopy=False)[-1].number


def test_a_planted_lucky_candidate_loses_on_new_seeds_and_is_not_exported(tmp_path, capsys) -> None:
    cfg, settings = _settings(tmp_path)
    run_settings(settings, cfg, tmp_path / "first")  # a tiny real study: 2 searched trials, he and xavier
    study = open_study(settings)
    lucky = _plant_lucky(study)
    assert study.best_trial.number == lucky  # on the search's own evidence it is the best
    proxy = prepare(settings)
    selection = run_selection(settings, proxy, study)
    assert selection is not None and selection.seeds == [1000 * settings.seed + 500 + i for i in range(3)]
    assert set(selection.seeds).isdisjoint(settings.eval_seeds)
    by_number = {c.number: c for c in selection.candidates}
    assert lucky in by_number and len(selection.candidates) == 4  # top 2 searched (the lucky one too) + 2 baselines
    # all zeros cannot learn: chance-level loss, ln(4), on every new seed
    assert all(s == pytest.approx(math.log(4), abs=0.02) for s in by_number[lucky].scores)
    # the choice, computed here from the raw scores: the lowest mean over search and selection seeds
    means = {n: statistics.fmean([*c.search_scores, *c.scores]) for n, c in by_number.items()}
    expected = min(means, key=means.get)
    assert selection.chosen.number == expected != lucky
    # the paired gain against the best baseline, computed here
    baselines = [c for c in selection.candidates if c.kind != "search"]
    best = min(baselines, key=lambda c: means[c.number])
    assert selection.best_baseline is best
    if selection.chosen is not best:
        gains = np.array(best.scores) - np.array(selection.chosen.scores)
        assert selection.gain == pytest.approx(gains.mean())
        assert selection.half_width == pytest.approx(T975[2] * gains.std(ddof=1) / np.sqrt(3))


def test_the_study_command_exports_the_selected_trial_and_says_so(tmp_path, capsys) -> None:
    cfg, settings = _settings(tmp_path)
    run_settings(settings, cfg, tmp_path / "first")
    lucky = _plant_lucky(open_study(settings))
    capsys.readouterr()
    finished = run_settings(settings, cfg, tmp_path / "second")  # complete: nothing runs, selection and export
    printed = capsys.readouterr().out
    exported = json.loads(finished.policy_path.read_text())
    selected = finished.study.user_attrs["selected_trial"]
    assert exported["provenance"]["trial"] == selected != lucky
    [lucky_line] = [line for line in printed.splitlines() if line.startswith(f"  trial {lucky} (search): ")]
    [exported_line] = [line for line in printed.splitlines() if line.endswith("<- exported")]
    assert exported_line.startswith(f"  trial {selected} ") and lucky_line != exported_line
    assert pick_trial(finished.study).number == selected  # python -m initsearch.export picks the same
    # the summary's winner, the parent run's tags and best_score: the exported trial, not the lucky best score
    assert f"winner: trial {selected} (" in printed
    assert f"the best search score is trial {lucky} (search)" in printed
    assert finished.summary.best.number == lucky and finished.summary.winner.number == selected
    assert summary_tags(finished.summary)["initsearch.best_trial"] == str(selected)
    rows = {key: value for key, value, _, _ in summary_metric_rows(finished.summary, 0)}
    assert rows["best_score"] == finished.study.trials[selected].value
    # the stage off on a later run: the best score is exported, not the earlier run's choice
    off = dataclasses.replace(settings, select=dataclasses.replace(settings.select, top_k=0))
    again = run_settings(off, cfg, tmp_path / "third")
    assert json.loads(again.policy_path.read_text())["provenance"]["trial"] == lucky == again.summary.winner.number
    # selection.csv beside the policy: every candidate, its mean recomputed here from the study's search
    # scores and the table's selection scores, best first, the exported one marked
    table = pd.read_csv(tmp_path / "second" / "selection.csv")
    assert table.loc[table["exported"], "trial"].tolist() == [selected]
    for row in table.itertuples():
        scores = [float(v) for v in row.selection_scores.split()]
        assert len(scores) == 3 and row.diverged == sum(not math.isfinite(v) for v in scores)
        search = finished.study.trials[row.trial].user_attrs["seed_scores"]
        assert row.auc_loss_mean == pytest.approx(statistics.fmean([*search, *scores]), rel=1e-5)
    assert table["diverged"].sum() == 0 and list(table["auc_loss_mean"]) == sorted(table["auc_loss_mean"])
    assert "selection.csv" in printed
    if finished.study.trials[selected].user_attrs.get("baseline"):
        assert "no searched policy beats the best baseline on all the evidence" in printed


def test_select_top_k_0_turns_the_stage_off(tmp_path) -> None:
    cfg, settings = _settings(tmp_path, "select.top_k=0")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "selection.csv").write_text("an earlier study's table\n")  # out= reused
    finished = run_settings(settings, cfg, tmp_path / "out")
    assert "selected_trial" not in finished.study.user_attrs
    assert not (tmp_path / "out" / "selection.csv").exists()  # nothing stale beside this export
    assert selection_seeds(settings) == [500, 501, 502]


def test_front_runners_are_distinct_policies(tmp_path) -> None:
    """Re-proposals of the best policy (``duplicate_of``, the twin's score reused) and a policy trained twice
    take one place among the front-runners, not three: the stage compares different policies."""
    _, settings = _settings(tmp_path)
    study = optuna.create_study(study_name="sel")
    def searched(value, policy, **attrs):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"policy": policy, "seed_scores": [value],
                                                                           "kind": "search", **attrs}))
        return study.trials[-1].number
    best = {**ZEROS, "default": {"scheme": "he_normal"}}
    first = searched(0.5, best)
    searched(0.5, best, duplicate_of=first)  # re-proposed: its score is the first one's
    searched(0.5, dict(best))  # the same policy trained again (not marked)
    second = searched(0.6, {**ZEROS, "default": {"scheme": "xavier_normal"}})
    third = searched(0.7, ZEROS)
    study.add_trial(optuna.trial.create_trial(value=0.8, user_attrs={"baseline": "he", "seed_scores": [0.8]}))
    runners = front_runners(study, settings)
    assert [(t.number, kind) for t, kind in runners] == [(first, "search"), (second, "search"), (5, "he")]
    assert third not in [t.number for t, _ in runners]  # top_k=2


def _select_batch(settings, value):
    return dataclasses.replace(settings, select=dataclasses.replace(settings.select, batch_trials=value))


def test_select_batch_trials_trains_the_candidates_of_a_seed_together_with_the_same_scores(tmp_path, monkeypatch,
                                                                                           caplog) -> None:
    cfg, settings = _settings(tmp_path)
    assert settings.select.batch_trials == "auto" and settings.batch_trials == 1  # the defaults
    run_settings(settings, cfg, tmp_path / "first")
    study = open_study(settings)
    proxy = prepare(settings)
    seen = spy_populations(monkeypatch)
    alone = run_selection(_select_batch(settings, 1), proxy, study)
    assert seen == []  # select.batch_trials=1: one at a time
    together = run_selection(_select_batch(settings, 3), proxy, study)
    # 4 candidates on each of 3 seeds: a stacked population of 3, then the fourth alone (train_run)
    assert seen == [("stacked", 3)] * 3
    assert [c.number for c in together.candidates] == [c.number for c in alone.candidates]
    for a, b in zip(alone.candidates, together.candidates):
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-4)
    assert together.chosen.number == alone.chosen.number
    seen.clear()
    with caplog.at_level(logging.INFO, logger="initsearch"):
        by_default = run_selection(settings, proxy, study)  # auto: all 4 of a seed at once (the study's batch_trials=1)
    assert seen == [("stacked", 4)] * 3
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in said if "batch_trials" in m], said  # the default says nothing of it
    for a, b in zip(alone.candidates, by_default.candidates):
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-4)
    assert by_default.chosen.number == alone.chosen.number


def test_select_batch_trials_is_auto_or_a_whole_number(tmp_path) -> None:
    assert _settings(tmp_path, "select.batch_trials=2")[1].select.batch_trials == 2
    with pytest.raises(ConfigError, match=r"^select\.batch_trials: must be auto or a whole number >= 1, got 0"):
        _settings(tmp_path, "select.batch_trials=0")


def test_select_steps_trains_the_new_seeds_longer_and_only_they_count(tmp_path, monkeypatch, capsys) -> None:
    """At another budget than the search's (``select.steps``) every candidate trains that long, is scored at
    that budget, and its search scores (at the search's budget) are left out of the choice."""
    cfg, settings = _settings(tmp_path, "select.steps=40")
    assert settings.select.steps == 40 and settings.train.steps == 20
    run_settings(settings, cfg, tmp_path / "first")
    study = open_study(settings)
    study.add_trial(optuna.trial.create_trial(  # a search score no real run reaches, with a policy that cannot train
        value=-100.0, user_attrs={"policy": ZEROS, "seed_scores": [-100.0], "kind": "search"}))
    planted = study.trials[-1].number
    import initsearch.search.selection as selection_module
    by_seed = []
    real = selection_module.train_contenders
    def spy(*args, **kwargs):
        by_seed.append(real(*args, **kwargs))
        return by_seed[-1]
    monkeypatch.setattr(selection_module, "train_contenders", spy)
    selection = run_selection(settings, prepare(settings), study)
    assert len(by_seed) == 3 and {len(c.train_loss) for curves in by_seed for c in curves} == {40}
    at = {budget: [[score_or_nan(curves[i], "auc_loss", budget=budget) for curves in by_seed]
                   for i in range(len(selection.candidates))] for budget in (20, 40)}
    assert [c.scores for c in selection.candidates] == at[40] != at[20]  # scored over the 40 steps, not 20
    by_number = {c.number: c for c in selection.candidates}
    assert planted in by_number
    assert all(c.evidence == [s for s in c.scores if math.isfinite(s)] for c in selection.candidates)
    means = {n: statistics.fmean(c.scores) for n, c in by_number.items()}
    with_search = {n: statistics.fmean([*c.search_scores, *c.scores]) for n, c in by_number.items()}
    assert min(with_search, key=with_search.get) == planted  # the search's scores would have chosen it
    assert selection.chosen.number == min(means, key=means.get) != planted
    assert by_number[planted].scores == pytest.approx([math.log(4)] * 3, abs=0.02)  # chance, scored at 40 steps
    text = selection.describe()
    assert "3 new seeds at 40 steps, not the search's 20" in text
    assert "the search's scores, at another budget, do not count" in text


def test_select_steps_must_be_a_positive_whole_number(tmp_path) -> None:
    from initsearch.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^select.steps: must be a whole number >= 1, got 0$"):
        _settings(tmp_path, "select.steps=0")


def test_select_steps_equal_to_the_search_s_still_counts_its_scores(tmp_path) -> None:
    cfg, settings = _settings(tmp_path, "select.steps=20")  # train.steps is 20 too
    run_settings(settings, cfg, tmp_path / "first")
    selection = run_selection(settings, prepare(settings), open_study(settings))
    for c in selection.candidates:
        assert c.search_scores and c.evidence == [*c.search_scores, *c.scores]
    assert "all their seeds:" in selection.describe() and "not the search's" not in selection.describe()


def test_a_candidate_that_diverged_on_new_seeds_ranks_below_one_that_trained_on_all() -> None:
    """A diverged seed counts against a candidate (validate's rule: diverging on any seed beats nothing), it
    is not left out: one good score on the seed it survived does not outrank five worse ones."""
    lucky = Candidate(1, "search", [], [0.20, math.nan, math.nan, math.nan, math.nan], search_counts=False)
    steady = Candidate(2, "pytorch_default", [], [0.48, 0.45, 0.50, 0.52, 0.47], search_counts=False)
    lost = Candidate(3, "he", [], [math.nan] * 5, search_counts=False)
    assert lucky.mean() < steady.mean()  # on its survivors alone it looks best
    assert sorted([lost, lucky, steady], key=best_first("minimize")) == [steady, lucky, lost]
    up = [Candidate(4, "search", [], [0.9, math.nan], search_counts=False), Candidate(5, "he", [], [0.5, 0.6])]
    assert sorted(up, key=best_first("maximize"))[0].number == 5


def test_the_selection_does_not_export_a_policy_that_diverged_on_new_seeds(tmp_path, monkeypatch, capsys) -> None:
    """The study's best searched trial gets the best score on the first new seed and diverges on the other
    two; the stage exports another candidate and says how often it diverged."""
    cfg, settings = _settings(tmp_path, "select.steps=40")
    run_settings(settings, cfg, tmp_path / "first")
    study = open_study(settings)
    import initsearch.search.selection as selection_module
    runners = front_runners(study, settings)
    calls = []
    def planted(curve, metric, **kwargs):  # the first front-runner's scores: 1e-3, then diverged twice
        calls.append(curve)
        if (len(calls) - 1) % len(runners) == 0:
            return 1e-3 if len(calls) == 1 else math.nan
        return score_or_nan(curve, metric, **kwargs)
    monkeypatch.setattr(selection_module, "score_or_nan", planted)
    selection = run_selection(settings, prepare(settings), study)
    first = selection.candidates[0]
    assert first.number == runners[0][0].number and first.scores[0] == 1e-3 and first.diverged == 2
    assert first.mean() == min(c.mean() for c in selection.candidates)  # the best mean, on its one survivor
    assert selection.chosen is not first and selection.chosen.diverged == 0
    assert f"  trial {first.number} ({first.kind}): 0.001 (diverged on 2 of 3 new seeds)" in selection.describe()
