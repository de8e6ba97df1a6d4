"""Subnormal floats are flushed to zero wherever initsearch trains on the CPU (the study's trials, the
selection stage, validate) and not after: the setting is process-wide, and the user's process gets it back off."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from initsearch.init.policy import InitPolicy
from initsearch.proxy.train import subnormals_flushed
from initsearch.search.settings import settings_from_config
from tests.conftest import TINY, compose_config

if not torch.set_flush_denormal(False):
    pytest.skip("this CPU cannot flush subnormal floats", allow_module_level=True)

TINIEST = 1e-39  # a float32 subnormal (the smallest normal float32 is about 1.18e-38)


def flushing() -> bool:
    """Whether the CPU flushes subnormals now: a subnormal times one comes out as zero."""
    return (torch.tensor([TINIEST], dtype=torch.float32) * 1.0).item() == 0.0


def test_the_block_flushes_is_reentrant_and_turns_flushing_off_after() -> None:
    assert not flushing()
    with subnormals_flushed():
        assert flushing()
        with subnormals_flushed():
            assert flushing()
        assert flushing()  # the inner block's end leaves the outer one's setting
    assert not flushing()
    with pytest.raises(RuntimeError), subnormals_flushed():
        raise RuntimeError("a training run that fails")
    assert not flushing()


def _spy_training(monkeypatch) -> list[bool]:
    """Record, for every model trained (alone or in a population), whether subnormals were flushed."""
    import initsearch.search.batched as batched_module
    import initsearch.search.sequential as sequential_module
    import initsearch.search.trial as trial_module
    from initsearch.proxy.population import train_population
    from initsearch.proxy.train import train_run

    seen: list[bool] = []

    def run(*args, **kwargs):
        seen.append(flushing())
        return train_run(*args, **kwargs)

    def population(models, *args, **kwargs):
        seen.extend(flushing() for _ in models)
        return train_population(models, *args, **kwargs)

    for module in (trial_module, sequential_module):  # the selection stage and validate; the study's trials
        monkeypatch.setattr(module, "train_run", run)
    for module in (trial_module, batched_module):
        monkeypatch.setattr(module, "train_population", population)
    return seen


@pytest.mark.parametrize("batch_trials", [1, 3])
def test_validate_trains_with_subnormals_flushed(monkeypatch, batch_trials) -> None:
    from initsearch.validate import run_validation

    settings = settings_from_config(compose_config(
        [*TINY, "baselines=[he,xavier]", "progress=false", f"batch_trials={batch_trials}"]))
    policy = InitPolicy.from_dict({"format": "initsearch-policy", "version": 1, "rules": [],
                                   "default": {"scheme": "orthogonal"}})
    seen = _spy_training(monkeypatch)
    run_validation(settings, policy, seeds=2, steps=10)
    assert seen == [True] * 6  # 3 contenders on 2 seeds
    assert not flushing()


def test_the_selection_stage_trains_with_subnormals_flushed(tmp_path, monkeypatch) -> None:
    from initsearch.cli import run_settings
    from initsearch.search.selection import run_selection
    from initsearch.search.study import open_study
    from initsearch.search.trial import prepare

    overrides = [o for o in TINY if not o.startswith("n_trials=")] + [
        "n_trials=2", f"storage={tmp_path / 's.journal'}", "study_name=sub", "select.top_k=0",
        "select.seeds=2", "select.baselines=1", "pruner=none", "tracking_uri=none"]
    cfg = compose_config(overrides)
    settings = settings_from_config(cfg)
    seen = _spy_training(monkeypatch)
    run_settings(settings, cfg, tmp_path / "out")  # the study itself, without a selection stage
    assert seen and all(seen)
    assert not flushing()
    seen.clear()
    select = dataclasses.replace(settings.select, top_k=2)
    selection = run_selection(dataclasses.replace(settings, select=select), prepare(settings), open_study(settings))
    assert selection is not None
    assert seen == [True] * (2 * len(selection.candidates))
    assert not flushing()
