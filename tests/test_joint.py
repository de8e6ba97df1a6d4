"""Joint architecture + init search: ``search_space=joint`` over MLPs and CNNs, ``arch.max_params``,
``best_model.yaml``, and the multi-objective study (``objectives=[score,params]``) with its Pareto front."""
from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from optuna.trial import TrialState

from initsearch.cli import run
from initsearch.errors import ConfigError
from initsearch.export import export_policy, pick_trial
from initsearch.init.layers import discover_layers
from initsearch.proxy.models import JointCNN, JointMLP, build_model, count_parameters
from initsearch.search.report import summarize
from initsearch.search.settings import settings_from_config
from initsearch.search.storage import open_storage
from initsearch.search.warm import source_policy
from initsearch.tracking.payload import summary_metric_rows
from initsearch.tracking.plots import plot_pareto_front
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


def test_joint_study_draws_networks_under_the_budget_and_exports_best_model_yaml(in_tmp, capsys):
    storage = str(in_tmp / "s.journal")
    budget = 20 * 16 + 16 + 16 * 4 + 4  # a depth-2 width-16 net fits; every depth-3 width-16 net is over
    path = run(compose_config(JOINT + [f"storage={storage}", "study_name=joint", "n_trials=6",
                                       f"arch.max_params={budget}", "sampler=random", "pruner=none"]), in_tmp / "out")
    listed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  best_model.yaml ")]
    assert listed and listed[0][1:4] == ["its", "network", "(a"]  # in the list of what the study wrote
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


def test_joint_cnn_has_the_drawn_stages_norms_and_residual_branch_ends():
    model = JointCNN((1, 8, 8), 10, stages=4, channels=8, activation="gelu", norm="layer", residual=True)
    layers = discover_layers(model, torch.randn(4, 1, 8, 8))
    assert [layer.name for layer in layers] == ["conv1", "norm1", "conv2", "norm2", "conv3", "norm3", "conv4",
                                                "norm4", "out"]
    assert {layer.name for layer in layers if layer.branch_last} == {"conv2", "conv3", "conv4"}
    assert isinstance(model.norm1, torch.nn.GroupNorm) and model.norm1.num_groups == 1
    assert isinstance(JointCNN((1, 8, 8), 10, norm="batch").norm1, torch.nn.BatchNorm2d)
    assert hasattr(model, "pool3") and not hasattr(model, "pool4")  # 8 -> 4 -> 2 -> 1, then no more pooling
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    plain = JointCNN((1, 8, 8), 10, stages=2, channels=8)
    assert count_parameters(plain) == (1 * 9 * 8 + 8) + (8 * 9 * 8 + 8) + (8 * 10 + 10)
    with pytest.raises(ConfigError, match="^model.input_shape"):
        JointCNN((20,), 3)


CNN_JOINT = ["study=digits_cnn", "search_space=joint", "train.steps=20", "train.eval_every=10", "score.seeds=1",
             "baselines=[he]", "arch.stages=[1,2]", "arch.channels=[4,8]", "tracking_uri=none", "pruner=none"]


def test_a_cnn_study_draws_cnns_and_its_best_model_yaml_validates(in_tmp):
    storage = str(in_tmp / "s.journal")
    run(compose_config(CNN_JOINT + [f"storage={storage}", "study_name=cnn", "n_trials=3", "sampler=random"]),
        in_tmp / "out")
    study = optuna.load_study(study_name="cnn", storage=open_storage(storage))
    searched = [t for t in study.get_trials() if not t.user_attrs.get("baseline")]
    assert searched and all({"arch:stages", "arch:channels", "arch:norm"} <= set(t.params) for t in searched)
    assert not any("arch:depth" in t.params for t in searched)
    trial = next(t for t in searched if t.state == TrialState.COMPLETE)
    model_cfg = trial.user_attrs["model"]
    assert model_cfg["_target_"] == "initsearch.proxy.models.JointCNN"
    assert trial.user_attrs["n_params"] == count_parameters(build_model(model_cfg, (1, 8, 8), 10))
    path = export_policy(study, in_tmp / "picked" / "best_policy.json", trial.number)
    overrides, found = model_file_override(["study=digits_cnn", f"model={path.parent / 'best_model.yaml'}"])
    cfg = compose_config(overrides)
    cfg.model = OmegaConf.load(found)
    model = build_model(settings_from_config(cfg).model, (1, 8, 8), 10)
    assert isinstance(model, JointCNN) and count_parameters(model) == trial.user_attrs["n_params"]


MULTI = JOINT + ["objectives=[score,params]", "sampler=random"]


def test_a_multi_objective_study_keeps_the_front_and_exports_its_best_score(in_tmp):
    storage = str(in_tmp / "s.journal")
    budget = 20 * 16 + 16 + 16 * 4 + 4  # one network over it: pruned before training, in this study too
    path = run(compose_config(MULTI + [f"storage={storage}", "study_name=mo", "n_trials=6",
                                       f"arch.max_params={budget}"]), in_tmp / "out")
    study = optuna.load_study(study_name="mo", storage=open_storage(storage))
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert any(t.user_attrs.get("baseline") == "he" for t in complete)  # the baseline is scored on both
    for t in complete:
        assert t.values[1] == t.user_attrs["n_params"] and t.values[0] == t.user_attrs["seed_scores"][0]
    for t in trials:  # the median pruner is off: only networks over the budget are pruned
        assert (t.state == TrialState.PRUNED) == (t.user_attrs["n_params"] > budget)
    assert any(t.state == TrialState.PRUNED for t in trials)
    front = study.best_trials
    best = min(front, key=lambda t: (t.values[0], t.values[1]))
    exported = json.loads(path.read_text())
    assert exported["provenance"]["trial"] == best.number and exported["provenance"]["score"] == best.values[0]
    assert pick_trial(study).number == best.number
    table = pd.read_csv(path.parent / "trials.csv")
    assert {int(n) for n in table.loc[table.state == "complete", "n_params"]} == {t.user_attrs["n_params"] for t in complete}
    assert (path.parent / "pareto_front.png").stat().st_size > 0
    summary = summarize(study, "auc_loss")  # what MLflow gets at the end: the front's best score
    assert {t.number for t in summary.front} == {t.number for t in front} and summary.best.number == best.number
    assert {key: value for key, value, _, _ in summary_metric_rows(summary, 0)}["best_score"] == best.values[0]
    assert "Pareto front (auc_loss against trainable parameters" in summary.format()
    # a later study can warm-start from this one: its best score's policy
    label, policy = source_policy("mo", open_storage(storage), 0)
    assert label == f"study mo trial {best.number}" and policy.to_dict()["rules"] == best.user_attrs["policy"]["rules"]
    # the same study name with one objective: one line, the study untouched
    with pytest.raises(ConfigError, match=r"^objectives: study 'mo' was run with 2 objective\(s\), got \[score\]"):
        run(compose_config(JOINT + [f"storage={storage}", "study_name=mo", "n_trials=8"]), in_tmp / "again")
    assert len(optuna.load_study(study_name="mo", storage=open_storage(storage)).get_trials()) == len(trials)


@pytest.mark.parametrize("overrides, message", [
    (MULTI + ["sampler=cmaes"], "sampler.name: cmaes cannot run a multi-objective study (objectives=[score,params]); "
                                "use one of tpe, random, gp"),
    (TINY + ["objectives=[score,params]"], "objectives: params needs search_space=joint"),
    (MULTI + ["objectives=[params,score]"], "objectives: must be [score] or [score, params]"),
    (CNN_JOINT + ["arch.max_params=50"], "arch.max_params: no architecture of the joint space fits 50 parameters; "
                                         "the smallest (1 conv stage(s) of 4 channels) has 90"),
])
def test_bad_multi_objective_or_cnn_settings_are_one_line_and_write_nothing(in_tmp, overrides, message):
    with pytest.raises(ConfigError) as err:
        run(compose_config(overrides + [f"storage={in_tmp}/s.journal"]), in_tmp / "out")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (in_tmp / "s.journal").exists()


def test_pick_trial_of_a_multi_objective_study_takes_the_best_score_then_the_smaller_network():
    study = optuna.create_study(directions=["minimize", "minimize"])
    for score, size in [(0.5, 300), (0.3, 900), (0.3, 700), (0.9, 100)]:
        study.add_trial(optuna.trial.create_trial(values=[score, size], user_attrs={"policy": {}}))
    assert pick_trial(study).values == [0.3, 700]


def test_pareto_plot_draws_the_front_and_nothing_without_sizes():
    table = pd.DataFrame({"trial": [0, 1, 2], "kind": ["he", "search", "search"], "state": ["complete"] * 3,
                          "auc_loss": [0.5, 0.4, 0.6], "n_params": [100, 200, 50]})
    fig = plot_pareto_front(table, [1, 2], "auc_loss", "minimize")
    assert fig is not None and fig.axes[0].get_xscale() == "log"
    assert plot_pareto_front(table.assign(n_params=None), [], "auc_loss", "minimize") is None


def test_the_summary_front_leaves_out_re_proposals_and_best_is_on_it():
    study = optuna.create_study(directions=["minimize", "minimize"])
    for score, size, attrs in [(0.3, 700, {}), (0.3, 700, {"duplicate_of": 0}), (0.2, 900, {}), (0.25, 950, {})]:
        study.add_trial(optuna.trial.create_trial(values=[score, size], user_attrs={"seed_scores": [score], **attrs}))
    summary = summarize(study, "auc_loss")
    assert [t.number for t in summary.front] == [0, 2] and summary.best.number == 2
    front_lines = summary.describe_front().splitlines()[1:]
    assert [line.split(":")[0].strip() for line in front_lines] == ["trial 0 (search)", "trial 2 (search)"]
    assert front_lines[1].endswith("<- best score")
