"""Joint architecture + init search: ``search_space=joint``, ``arch.max_params``, ``best_model.yaml``."""
from __future__ import annotations

import optuna
import pytest
import torch
from omegaconf import OmegaConf

from initsearch.cli import run
from initsearch.errors import ConfigError
from initsearch.init.layers import discover_layers
from initsearch.proxy.models import JointMLP, build_model, count_parameters
from initsearch.search.settings import settings_from_config
from initsearch.search.storage import open_storage
from initsearch.validate import model_file_override
from tests.conftest import TINY, compose_config

JOINT = TINY + ["search_space=joint", "arch.depth=[2,3]", "arch.width=[8,16]", "baselines=[he]"]


def test_joint_mlp_residual_layers_end_branches_and_names_match_the_mlp():
    model = JointMLP((20,), 3, depth=4, width=16, activation="tanh", norm="layer", residual=True)
    layers = discover_layers(model)
    assert [layer.name for layer in layers] == ["fc1", "norm1", "fc2", "norm2", "fc3", "norm3", "out"]
    assert {layer.name for layer in layers if layer.branch_last} == {"fc2", "fc3"}
    assert model(torch.randn(5, 20)).shape == (5, 3)
    plain = JointMLP((20,), 3, depth=4, width=16)
    assert not any(layer.branch_last for layer in discover_layers(plain))
    assert count_parameters(plain) == (20 * 16 + 16) + 2 * (16 * 16 + 16) + (16 * 3 + 3)


@pytest.mark.parametrize("override, message", [
    ("arch.max_params=10", "arch.max_params: no architecture of the joint space fits 10 parameters; the smallest"),
    ("arch.depth=[1,2]", "arch.depth: must be a non-empty list"),
    ("arch.norm=[none,group]", "arch.norm: must be a non-empty list"),
    ("batch_trials=4", "batch_trials: search_space=joint trains one network per trial"),
    ("warm_start=[earlier]", "warm_start: not available with search_space=joint"),
])
def test_bad_joint_settings_fail_before_the_study(in_tmp, override, message):
    with pytest.raises(ConfigError) as err:
        run(compose_config(JOINT + [override, f"storage={in_tmp}/s.journal"]), in_tmp / "out")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (in_tmp / "s.journal").exists()


def test_joint_study_draws_networks_under_the_budget_and_exports_best_model_yaml(in_tmp):
    storage = str(in_tmp / "s.journal")
    budget = 20 * 16 + 16 + 16 * 4 + 4  # a depth-2 width-16 net fits; every depth-3 width-16 net is over
    path = run(compose_config(JOINT + [f"storage={storage}", "study_name=joint", "n_trials=6",
                                       f"arch.max_params={budget}", "sampler=random", "pruner=none"]), in_tmp / "out")
    study = optuna.load_study(study_name="joint", storage=open_storage(storage))
    trials = study.get_trials()
    assert all({"arch:depth", "arch:width", "arch:activation", "arch:norm", "arch:residual"} <= set(t.params)
               for t in trials if t.params)
    for t in trials:  # the baseline (he) trains the configured 2-layer MLP, and says so
        assert t.user_attrs["n_params"] == count_parameters(build_model(t.user_attrs["model"], (20,), 4))
        over = t.user_attrs["n_params"] > budget
        assert (t.state == optuna.trial.TrialState.PRUNED) if over else t.state == optuna.trial.TrialState.COMPLETE
    assert {t.state for t in trials} == {optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE}
    model_file = path.parent / "best_model.yaml"
    assert OmegaConf.to_container(OmegaConf.load(model_file)) == study.best_trial.user_attrs["model"]
    # validate composes it in place of a conf/model preset
    overrides, found = model_file_override(["seed=1", f"model={model_file}"])
    assert overrides == ["seed=1"] and found == model_file
    cfg = compose_config(JOINT + overrides)
    cfg.model = OmegaConf.load(found)
    settings = settings_from_config(cfg)
    assert isinstance(build_model(settings.model, (20,), 4), JointMLP)


def test_model_file_that_does_not_exist_is_one_line():
    with pytest.raises(ConfigError, match="^model: no model config file 'nope.yaml'$"):
        model_file_override(["model=nope.yaml"])
