"""A trial's user attributes written together: one journal append (one lock, one fsync), the same records."""
from __future__ import annotations

import json

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from initsearch.search.storage import open_storage, set_user_attrs


def test_several_attributes_are_one_append_of_one_record_each(tmp_path, monkeypatch):
    path = tmp_path / "s.journal"
    study = optuna.create_study(study_name="attrs", storage=open_storage(str(path)))
    trial = study.ask()
    appends = []
    backend = trial.storage._backend
    real = backend.append_logs
    monkeypatch.setattr(backend, "append_logs", lambda logs: appends.append(len(logs)) or real(logs))
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
