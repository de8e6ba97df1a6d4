"""The reporting layer, tested by its results: the summary's best trials and headline percentage, the trial
``python -m initsearch.export`` writes, and the values MLflow receives are each computed here again from
planted scores and curves (or by training the logged policy again), never just checked for presence."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from initsearch.cli import run_settings
from initsearch.contenders.baselines import contender_policy
from initsearch.export import export_policy
from initsearch.init.policy import InitPolicy
from initsearch.search.report import summarize
from initsearch.search.settings import settings_from_config
from initsearch.search.trial import prepare, train_contender
from initsearch.tracking.payload import summary_metric_rows
from tests.conftest import TINY, compose_config

BASELINES = ("he", "xavier", "orthogonal")


def _policy(i: int) -> dict:
    """A distinct, valid policy per planted trial (its std says which trial it came from)."""
    return {"format": "initsearch-policy", "version": 1, "rules": [],
            "default": {"scheme": "normal", "std": round(0.01 * (i + 1), 4)}}


def _planted_study(direction: str, seed: int) -> tuple[optuna.Study, dict[int, float], dict[int, str]]:
    """An in-memory study of 12 complete trials (3 baselines, 9 searched) with random scores, plus a pruned
    and a failed trial whose partial values would beat them all. Returns the study, the complete trials'
    scores and their kinds."""
    rng = random.Random(seed)
    study = optuna.create_study(direction=direction, study_name=f"planted_{direction}")
    study.set_user_attr("metric", "auc_loss")
    scores, kinds = {}, {}
    for i in range(12):
        value = rng.uniform(0.5, 2.0)
        kind = BASELINES[i // 4] if i % 4 == 0 else "search"
        attrs = {"policy": _policy(i), "seed_scores": [value, value]}
        if kind != "search":
            attrs["baseline"] = kind
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs=attrs))
        scores[i], kinds[i] = value, kind
    better = -1.0 if direction == "minimize" else 10.0  # a partial score better than any complete one
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={1: better},
                                              user_attrs={"policy": _policy(12)}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"policy": _policy(13)}))
    return study, scores, kinds


def _arg_best(scores: dict[int, float], direction: str) -> int:
    ranked = sorted(scores, key=scores.get, reverse=direction == "maximize")
    return ranked[0]


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_best_trials_and_headline_percentage_from_planted_scores(direction, seed) -> None:
    study, scores, kinds = _planted_study(direction, seed)
    summary = summarize(study, "auc_loss")
    searched = {n: v for n, v in scores.items() if kinds[n] == "search"}
    baselines = {n: v for n, v in scores.items() if kinds[n] != "search"}
    best, best_search, best_baseline = _arg_best(scores, direction), _arg_best(searched, direction), _arg_best(baselines, direction)
    assert (summary.best.number, summary.best_search.number, summary.best_baseline.number) == (best, best_search, best_baseline)

    found, base = searched[best_search], baselines[best_baseline]
    expected_pct = 100.0 * ((base - found) if direction == "minimize" else (found - base)) / abs(base)
    assert summary.improvement_pct == pytest.approx(expected_pct, rel=1e-12)
    headline = summary.headline()
    assert f"{expected_pct:+.1f}%" in headline
    assert ("(better)" if expected_pct > 0 else "(not better)") in headline
    assert f"trial {best_search} {found:.4g} vs {kinds[best_baseline]} {base:.4g}" in headline

    ordered = summary.table[summary.table.state == "complete"]["trial"].tolist()
    assert ordered == sorted(scores, key=scores.get, reverse=direction == "maximize")  # the table, best first

    logged = {key: value for key, value, _, _ in summary_metric_rows(summary, now_ms=0)}  # what the parent run receives
    assert logged["best_score"] == pytest.approx(scores[best])
    assert logged["best_search_score"] == pytest.approx(found)
    assert logged["best_baseline_score"] == pytest.approx(base)
    assert logged["improvement_pct"] == pytest.approx(expected_pct)


def test_headline_says_not_better_when_a_baseline_wins() -> None:
    study = optuna.create_study(direction="minimize")
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={"baseline": "he", "policy": _policy(0)}))
    study.add_trial(optuna.trial.create_trial(value=1.25, user_attrs={"policy": _policy(1)}))
    summary = summarize(study, "auc_loss")
    assert summary.improvement_pct == pytest.approx(-25.0)
    assert "-25.0% (not better)" in summary.headline()
    assert summary.best.number == 0


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize("seed", [0, 1])
def test_export_writes_the_best_complete_trial_from_planted_scores(tmp_path, direction, seed) -> None:
    study, scores, _ = _planted_study(direction, seed)
    expected = _arg_best(scores, direction)
    written = json.loads(export_policy(study, tmp_path / "best.json").read_text())
    assert written["provenance"]["trial"] == expected
    assert written["provenance"]["score"] == pytest.approx(scores[expected])
    assert written["default"] == _policy(expected)["default"]  # the trial's own policy, not another's

    # the selection stage's choice, when there is one, is what export writes
    other = _arg_best({n: v for n, v in scores.items() if n != expected}, direction)
    study.set_user_attr("selected_trial", other)
    written = json.loads(export_policy(study, tmp_path / "selected.json").read_text())
    assert written["provenance"]["trial"] == other and written["default"] == _policy(other)["default"]


def test_mlflow_holds_the_curves_the_trials_trained_and_the_study_best(tmp_path, monkeypatch) -> None:
    """A tiny tracked study; then each trial's logged policy is trained again here on its seed: MLflow's
    ``curves/train_loss`` history must be that curve, its ``score`` the trial's value, and the parent's
    ``best_score`` the best complete value in the study's storage."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in TINY if not o.startswith("tracking_uri=")] + [
        f"storage={tmp_path / 's.journal'}", f"tracking_uri={uri}", "study_name=logged", "select.top_k=0",
        "pruner=none", "threads=1"]
    cfg = compose_config(overrides)
    settings = settings_from_config(cfg)
    finished = run_settings(settings, cfg, tmp_path / "out")
    trials = {t.number: t for t in finished.study.get_trials() if t.state == TrialState.COMPLETE}
    assert len(trials) == 4

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("logged")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("initsearch.role") == "parent")
    best = min(t.value for t in trials.values())  # auc_loss: lower is better
    assert parent.data.metrics["best_score"] == pytest.approx(best, rel=1e-9)

    proxy = prepare(settings)
    (seed,) = settings.eval_seeds
    checked = 0
    for child in (r for r in runs if "mlflow.parentRunId" in r.data.tags):
        number = int(child.data.tags["initsearch.trial"])
        trial = trials[number]
        assert child.data.metrics["score"] == pytest.approx(trial.value, rel=1e-9)
        if child.data.tags["initsearch.kind"] == "search":
            policy = InitPolicy.from_dict(json.loads(open(client.download_artifacts(child.info.run_id, "policy.json")).read()))
            baseline = None
        else:
            baseline = child.data.tags["initsearch.baseline"]
            policy = contender_policy(baseline)
        curve = train_contender(settings.model, proxy.data, proxy.device, policy, baseline, seed, settings.train,
                                proxy.example_x, proxy.discovery)
        history = sorted(client.get_metric_history(child.info.run_id, "curves/train_loss"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, settings.train.steps + 1))
        np.testing.assert_allclose([m.value for m in history], np.asarray(curve.train_loss, dtype=float), rtol=1e-5)
        logged_val = sorted(client.get_metric_history(child.info.run_id, "curves/val_loss"), key=lambda m: m.step)
        assert [m.step for m in logged_val] == list(curve.val_steps)
        np.testing.assert_allclose([m.value for m in logged_val], curve.val_loss, rtol=1e-5)
        assert all(math.isfinite(m.value) for m in history)
        checked += 1
    assert checked == 4
