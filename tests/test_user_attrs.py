"""What a trial writes before it trains, written together: one journal append (one lock, one fsync), the
same records as one call per value."""
from __future__ import annotations

import json

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from initsearch.search.storage import one_append, open_storage, set_user_attrs


def _count_appends(trial, monkeypatch):
    appends = []
    backend = trial.storage._backend
    real = backend.append_logs
    monkeypatch.setattr(backend, "append_logs", lambda logs: appends.append(len(logs)) or real(logs))
    return appends


def test_several_attributes_are_one_append_of_one_record_each(tmp_path, monkeypatch):
    path = tmp_path / "s.journal"
    study = optuna.create_study(study_name="attrs", storage=open_storage(str(path)))
    trial = study.ask()
    appends = _count_appends(trial, monkeypatch)
    set_user_attrs(trial, {"policy": {"layers": [1, 2]}, "seeds": [0], "kind": "search"})
    assert appends == [3]
    assert trial.user_attrs == {"policy": {"layers": [1, 2]}, "seeds": [0], "kind": "search"}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["user_attr"] for r in records if "user_attr" in r] == [
        {"policy": {"layers": [1, 2]}}, {"seeds": [0]}, {"kind": "search"}]  # as set_user_attr writes them
    study.tell(trial, 1.0)
    again = optuna.load_study(study_name="attrs", storage=JournalStorage(JournalFileBackend(str(path))))
    assert again.trials[0].user_attrs == {"policy": {"layers": [1, 2]}, "seeds": [0], "kind": "search"}


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_other_storages_get_one_call_per_attribute(tmp_path, storage, monkeypatch):
    url = None if storage == "memory" else f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(storage=url)
    trial = study.ask()
    calls = []
    real = optuna.trial.Trial.set_user_attr
    monkeypatch.setattr(optuna.trial.Trial, "set_user_attr", lambda self, k, v: calls.append(k) or real(self, k, v))
    set_user_attrs(trial, {"a": 1, "b": [2]})
    assert calls == ["a", "b"] and study.trials[0].user_attrs == {"a": 1, "b": [2]}


def test_a_trial_ended_by_another_worker_raises_once_and_leaves_no_error_behind(tmp_path):
    """Another worker failed the trial (its heartbeat went stale): the write raises, as ``set_user_attr``
    does, and every record of the append is replayed, so no later storage call raises for one of them."""
    path = str(tmp_path / "s.journal")
    mine = JournalStorage(JournalFileBackend(path))
    theirs = JournalStorage(JournalFileBackend(path))
    study = optuna.create_study(study_name="x", storage=mine)
    trial = study.ask()
    theirs.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_user_attrs(trial, {"seed_scores": [1.0], "seeds": [0], "duplicate_of": 3})
    for _ in range(3):
        assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.FAIL]


def _sample(trial):
    trial.suggest_categorical("lsuv", [False, True])
    trial.suggest_float("log2_scale:fc1", -1.0, 1.0)
    trial.suggest_int("width", 8, 64, log=True)
    set_user_attrs(trial, {"kind": "search", "policy": {"layers": [1]}})


def test_sampled_parameters_and_attributes_are_one_append_with_the_same_records(tmp_path, monkeypatch):
    """Three parameters and two attributes: one append of five records, the records (and so the study
    read back) the same as one call per value writes them."""
    paths = {}
    for batched in (False, True):
        paths[batched] = path = tmp_path / f"{batched}.journal"
        study = optuna.create_study(study_name="s", storage=open_storage(str(path)),
                                    sampler=optuna.samplers.RandomSampler(seed=3))
        trial = study.ask()
        appends = _count_appends(trial, monkeypatch)
        if batched:
            with one_append(trial):
                _sample(trial)
                assert appends == [] and trial.params["width"] >= 8  # the trial reads its own values at once
        else:
            _sample(trial)
        assert appends == ([5] if batched else [1, 1, 1, 2])
        study.tell(trial, 0.5)
    def records(path):
        return [{k: v for k, v in json.loads(line).items() if k not in ("worker_id", "datetime_start", "datetime_complete")}
                for line in path.read_text().splitlines()]
    assert records(paths[True]) == records(paths[False])
    again = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(paths[True]))))
    assert again.trials[0].params == study.trials[0].params
    assert again.trials[0].user_attrs == {"kind": "search", "policy": {"layers": [1]}}


def test_written_before_the_block_ends_and_seen_by_the_next_trials_sampler(tmp_path):
    """What the block recorded is in the storage when it ends (another process reading the journal sees
    it), so a sampler that reads running trials (TPE's constant liar) sees the previous trial's values."""
    path = str(tmp_path / "s.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(path))
    trial = study.ask()
    with one_append(trial):
        trial.suggest_float("x", 0.0, 1.0)
        other = JournalStorage(JournalFileBackend(path))
        assert other.get_trial(trial._trial_id).params == {}
    other = JournalStorage(JournalFileBackend(path))
    assert other.get_trial(trial._trial_id).params == trial.params
    assert study.get_trials(states=(optuna.trial.TrialState.RUNNING,))[0].params == trial.params


def test_a_block_that_raises_still_writes_what_it_recorded(tmp_path):
    study = optuna.create_study(study_name="s", storage=open_storage(str(tmp_path / "s.journal")))
    trial = study.ask()
    with pytest.raises(RuntimeError, match="no candidate"):
        with one_append(trial):
            trial.suggest_float("x", 0.0, 1.0)
            raise RuntimeError("no candidate scheme fits")
    assert study.trials[0].params == trial.params and "x" in trial.params
    assert trial.storage is study._storage  # the trial writes directly again


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_one_append_changes_nothing_on_other_storages(tmp_path, storage):
    url = None if storage == "memory" else f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(storage=url)
    trial = study.ask()
    with one_append(trial):
        assert trial.storage is study._storage
        _sample(trial)
    assert study.trials[0].params == trial.params and study.trials[0].user_attrs["kind"] == "search"
