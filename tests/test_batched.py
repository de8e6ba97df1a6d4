"""Population studies (batch_trials=K): same counts, attributes, outcomes and scores as one trial at a time."""
from __future__ import annotations

import math

import optuna
import pytest
import torch
from optuna.trial import TrialState

import initsearch.search.batched as batched
import initsearch.search.trial as trial_module
from initsearch.errors import ConfigError
from initsearch.search.settings import settings_from_config
from initsearch.search.storage import open_storage
from initsearch.search.study import run_study
from initsearch.search.trial import prepare
from tests.conftest import TINY, compose_config


class Recorder:
    """A tracker that keeps every outcome."""

    def __init__(self) -> None:
        self.outcomes = []

    def study_started(self, settings, config_yaml, study) -> None:
        pass

    def trial_finished(self, outcome) -> None:
        self.outcomes.append(outcome)

    def study_finished(self, study, summary, policy_path) -> None:
        pass


def study_of(tmp_path, k: int, *extra: str, name: str = "b"):
    settings = settings_from_config(compose_config(TINY + [f"storage={tmp_path}/{name}.journal", f"study_name={name}",
                                                           f"batch_trials={k}", "pruner=none", *extra]))
    return settings, prepare(settings)


def test_batch_trials_is_validated_and_defaults_to_one():
    assert settings_from_config(compose_config(TINY)).batch_trials == 1
    with pytest.raises(ConfigError, match=r"^batch_trials: "):
        settings_from_config(compose_config(TINY + ["batch_trials=0"]))


def test_batched_study_counts_attributes_outcomes_and_resume(tmp_path):
    settings, proxy = study_of(tmp_path, 3, "n_trials=4")
    rec = Recorder()
    study = run_study(settings, proxy, rec)
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs.get("baseline") or "search" for t in trials) == ["he", "search", "search", "search",
                                                                                "search", "xavier"]
    for t in trials:
        assert t.user_attrs["kind"] == ("baseline" if t.user_attrs.get("baseline") else "search")
        assert t.user_attrs["policy"]["format"] == "initsearch-policy"
        assert t.user_attrs["seeds"] == settings.eval_seeds and len(t.user_attrs["seed_scores"]) == 1
        assert math.isclose(t.value, t.user_attrs["seed_scores"][0])
    assert sorted(o.number for o in rec.outcomes) == list(range(6))
    for o in rec.outcomes:
        assert o.state == "complete" and len(o.curves) == 1 and o.curves[0].steps_done == 20
        assert o.signals is not None and o.policy is not None and o.seconds > 0
    # resume with more trials: only the missing ones run, the baselines are not run again
    settings, proxy = study_of(tmp_path, 3, "n_trials=5")
    study = run_study(settings, proxy, Recorder())
    assert len(study.get_trials()) == 7
    assert sum(1 for t in study.get_trials() if t.user_attrs.get("baseline")) == 2


def test_baseline_scores_match_the_one_at_a_time_study(tmp_path):
    values = {}
    for k in (1, 2):
        settings, proxy = study_of(tmp_path, k, "n_trials=1", "baselines=[he,lecun]", name=f"k{k}")
        study = run_study(settings, proxy, Recorder())
        values[k] = {t.user_attrs["baseline"]: t.value for t in study.get_trials() if t.user_attrs.get("baseline")}
    assert values[1].keys() == values[2].keys() == {"he", "lecun"}
    for name in values[1]:
        assert values[2][name] == pytest.approx(values[1][name], rel=1e-4)


def test_a_failing_and_a_diverging_member_end_alone(tmp_path, monkeypatch):
    settings, proxy = study_of(tmp_path, 4, "n_trials=2")
    real_init = trial_module.init_contender  # the per-seed init both runners share (TrialRun.init_model)

    def init(model, policy, *, baseline, **kwargs):
        result = real_init(model, policy, baseline=baseline, **kwargs)
        if baseline == "xavier":  # finite weights, but the forward pass overflows: the loss is not finite
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1e30)
        if baseline == "he":  # this init cannot be applied
            raise ValueError("cannot apply this one")
        return result

    monkeypatch.setattr(trial_module, "init_contender", init)
    rec = Recorder()
    study = run_study(settings, proxy, rec)
    by_baseline = {t.user_attrs.get("baseline"): t for t in study.get_trials()}
    assert by_baseline["he"].state == TrialState.FAIL
    assert by_baseline["he"].user_attrs["reason"] == "ValueError: cannot apply this one"
    assert by_baseline["xavier"].state == TrialState.PRUNED
    assert by_baseline["xavier"].user_attrs["reason"].startswith("diverged on seed 0")
    searched = [t for t in study.get_trials() if not t.user_attrs.get("baseline")]
    assert len(searched) == 2 and all(t.state == TrialState.COMPLETE for t in searched)
    states = {o.baseline: o.state for o in rec.outcomes}
    assert states == {"he": "failed", "xavier": "pruned", None: "complete"}


def test_prescreen_prunes_members_before_training(tmp_path):
    settings, proxy = study_of(tmp_path, 3, "n_trials=1", "prescreen.enabled=true", "prescreen.low=1e6",
                               "prescreen.high=1e7")
    rec = Recorder()
    study = run_study(settings, proxy, rec)
    assert all(t.state == TrialState.PRUNED and t.user_attrs["reason"].startswith("pre-screen:")
               for t in study.get_trials())
    assert all(o.curves == [] and o.signals is not None for o in rec.outcomes)


def test_an_interrupt_fails_the_open_trials_enqueues_them_again_and_propagates(tmp_path, monkeypatch):
    settings, proxy = study_of(tmp_path, 3, "n_trials=2")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batched, "train_population", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(settings, proxy, Recorder())
    trials = optuna.load_study(study_name="b", storage=open_storage(f"{tmp_path}/b.journal")).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 3  # the first round
    assert all(t.user_attrs["reason"] == "interrupted by SIGINT" for t in failed)
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(t.number for t in failed)


def test_trials_carry_the_same_user_attrs_as_one_at_a_time(tmp_path):
    keys = {}
    for k in (1, 2):
        settings, proxy = study_of(tmp_path, k, "n_trials=1", "baselines=[he]", name=f"attrs{k}")
        study = run_study(settings, proxy, Recorder())
        keys[k] = {t.user_attrs.get("baseline") or "search": set(t.user_attrs) for t in study.get_trials()}
    assert keys[1] == keys[2]
    assert {"kind", "policy", "seeds", "seed_scores", "worker"} <= keys[2]["search"]


def test_batched_tpe_counts_running_trials_as_bad_so_a_round_spreads_out(tmp_path):
    settings, proxy = study_of(tmp_path, 2, "n_trials=1", "baselines=[]")
    study = run_study(settings, proxy, Recorder())
    assert isinstance(study.sampler, optuna.samplers.TPESampler) and study.sampler._constant_liar


def test_an_interrupt_while_policies_are_drawn_fails_the_round_and_enqueues_it_again(tmp_path, monkeypatch):
    settings, proxy = study_of(tmp_path, 3, "n_trials=3", "baselines=[]")
    real, calls = type(settings.space).sample, []

    def sample(self, trial, layers, pretrained=None):
        calls.append(trial.number)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, trial, layers, pretrained)

    monkeypatch.setattr(type(settings.space), "sample", sample)
    rec = Recorder()
    with pytest.raises(KeyboardInterrupt):
        run_study(settings, proxy, rec)
    trials = optuna.load_study(study_name="b", storage=open_storage(f"{tmp_path}/b.journal")).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 3 and not [t for t in trials if t.state == TrialState.RUNNING]
    assert all(t.user_attrs["reason"] == "interrupted by SIGINT" for t in failed)
    assert sorted(t.user_attrs["retry_of"] for t in trials if t.state == TrialState.WAITING) == [0, 1, 2]
    assert sorted(o.number for o in rec.outcomes) == [0, 1, 2] and all(o.state == "failed" for o in rec.outcomes)


def test_the_engine_of_the_population_is_logged_once_per_study(tmp_path, caplog):
    settings, proxy = study_of(tmp_path, 2, "n_trials=4", "baselines=[]")
    with caplog.at_level("INFO", logger="initsearch"):
        run_study(settings, proxy, Recorder())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Population training")]
    assert lines == [f"Population training: 2 members on {proxy.device}, engine: stacked"]


def test_batch_trials_auto_trains_populations_on_the_cpu(tmp_path, caplog):
    settings, proxy = study_of(tmp_path, "auto", "n_trials=3", "baselines=[]")
    with caplog.at_level("INFO", logger="initsearch"):
        study = run_study(settings, proxy, Recorder())
    assert len(study.get_trials()) == 3 and all(t.state == TrialState.COMPLETE for t in study.get_trials())
    messages = [r.getMessage() for r in caplog.records]
    assert "batch_trials=auto: 8 trial(s) per round on cpu" in messages
    assert "Population training: 3 members on cpu, engine: stacked" in messages
