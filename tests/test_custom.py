"""Your own network, data and loss: from the command line as the README types it, and from Python.

The user code is ``examples/mynets.py`` (what README points to): a residual CNN with its own argument names
and no ``input_shape``, a regression MLP on scikit-learn's diabetes, a token-sequence classifier.
"""
from __future__ import annotations

import copy
import json
import math
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initsearch
from examples import mynets
from initsearch.cli import with_custom_groups
from initsearch.errors import ConfigError, DataError
from initsearch.proxy.losses import LOSSES, output_size, resolve_loss
from initsearch.proxy.models import build_model
from initsearch.proxy.population import train_population
from initsearch.proxy.train import TrainConfig, train_run
from initsearch.proxy.userdata import load_user_data
from tests.conftest import PYTHON, REPO, TensorData
from tests.reliability_helpers import cli_env

QUICK = ["n_trials=2", "train.steps=20", "train.eval_every=10", "score.seeds=1", "tracking_uri=none"]


def run_cli(module: str, args: list[str], cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", module, *args], capture_output=True, text=True, env=cli_env(), cwd=cwd,
                          timeout=timeout)


def trials_of(storage: str, name: str) -> list:
    import optuna

    from initsearch.search.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(deepcopy=False)


# ---- the command line, as typed in the README ------------------------------------------------------------------
def test_with_custom_groups_selects_the_custom_group_and_names_the_study() -> None:
    assert with_custom_groups(["study=digits_cnn", "model._target_=pkg.Net", "+model.c=4"]) == [
        "study=digits_cnn", "model=custom", "model._target_=pkg.Net", "+model.c=4", "study_name=Net"]
    assert with_custom_groups(["+data._target_=pkg.load", "model._target_=pkg.Net", "study_name=mine"]) == [
        "data=custom", "data._target_=pkg.load", "model=custom", "model._target_=pkg.Net", "study_name=mine"]
    assert with_custom_groups(["model=custom", "model._target_=pkg.Net"])[:2] == ["model=custom", "model._target_=pkg.Net"]
    assert with_custom_groups(["n_trials=3"]) == ["n_trials=3"]


def test_cfg_job_shows_exactly_what_the_class_receives(tmp_path) -> None:
    proc = run_cli("initsearch", ["--cfg", "job", "study=cifar_cnn", "model._target_=examples.mynets.TinyResNet",
                                  "+model.c=8"], REPO)
    assert proc.returncode == 0, proc.stderr
    import yaml

    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"] == {"name": "custom", "_target_": "examples.mynets.TinyResNet", "width_multiplier": 1.0,
                            "width_arg": None, "c": 8}
    assert cfg["study_name"] == "TinyResNet" and cfg["data"]["name"] == "cifar10"


def test_a_users_class_runs_through_the_cli_as_the_readme_types_it(tmp_path) -> None:
    """No ``+`` on ``model._target_``, a preset whose model keys (channels...) must not reach the class, and
    a class without input_shape that would raise on any unexpected keyword."""
    storage = str(tmp_path / "s.journal")
    proc = run_cli("initsearch", ["study=digits_cnn", "model._target_=examples.mynets.TinyResNet", "+model.c=4",
                                  "+model.n_blocks=1", f"storage={storage}", "baselines=[he]",
                                  f"hydra.run.dir={tmp_path / 'out'}", *QUICK], REPO)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "best_policy.json").is_file()
    trials = trials_of(storage, "TinyResNet")
    assert len(trials) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    policy = initsearch.load_policy(tmp_path / "out" / "best_policy.json")
    model = mynets.TinyResNet(c=4, n_blocks=1)
    report = initsearch.apply_policy(model, policy, example_batch=torch.randn(8, 1, 8, 8), seed=0)
    assert {r.name for r in report.layers} >= {"stem", "head"}


def test_the_same_study_name_with_another_network_is_refused_before_any_trial(tmp_path) -> None:
    storage = str(tmp_path / "s.journal")
    tiny = ["data=synthetic", "model.depth=2", "model.width=8", *QUICK[1:4]]
    initsearch.search(None, None, n_trials=1, study_name="shared", storage=storage, tracking_uri="none",
                      out_dir=tmp_path / "a", baselines=["he"], overrides=tiny)
    with pytest.raises(ConfigError) as info:
        initsearch.search(mynets.Regressor, None, n_trials=1, study_name="shared", storage=storage,
                          tracking_uri="none", out_dir=tmp_path / "b", baselines=["he"], overrides=tiny[:1] + tiny[3:])
    assert str(info.value).startswith("study_name: study 'shared' holds trials of the model mlp, and this command's "
                                      "model is examples.mynets.Regressor")
    with pytest.raises(ConfigError, match=r"^study_name: study 'shared' holds trials on the data synthetic"):
        initsearch.search(None, mynets.diabetes, n_trials=1, study_name="shared", storage=storage,
                          tracking_uri="none", out_dir=tmp_path / "c", baselines=["he"], overrides=tiny[1:])
    assert len(trials_of(storage, "shared")) == 2


def test_regression_on_diabetes_end_to_end_with_validate(tmp_path) -> None:
    """Float targets with train.loss=auto: MSE, no accuracy anywhere, the search and validate complete."""
    storage = str(tmp_path / "s.journal")
    common = ["model._target_=examples.mynets.Regressor", "data._target_=examples.mynets.diabetes"]
    proc = run_cli("initsearch", [*common, "model.width_multiplier=0.5", f"storage={storage}",
                                  "baselines=[xavier,lsuv]", f"hydra.run.dir={tmp_path / 'out'}", *QUICK], REPO)
    assert proc.returncode == 0, proc.stderr
    trials = trials_of(storage, "Regressor_diabetes")
    assert [t.state.name for t in trials].count("COMPLETE") >= 3
    table = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert set(table["kind"]) >= {"xavier", "lsuv", "search"} and table["auc_loss"].notna().all()
    val = run_cli("initsearch.validate", [f"policy={tmp_path / 'out' / 'best_policy.json'}", *common, "seeds=2",
                                          "steps=20", "baselines=[xavier]", f"out={tmp_path / 'val'}",
                                          "tracking_uri=none"], REPO)
    assert val.returncode == 0, val.stderr
    rows = pd.read_csv(tmp_path / "val" / "validation.csv")
    assert list(rows["contender"]) == ["policy", "xavier"]
    assert "final_val_loss_mean" in rows and "final_val_acc_mean" not in rows
    assert rows["auc_loss_mean"].notna().all() and (rows["diverged"] == "0/2").all()


def test_accuracy_metrics_on_a_regression_study_are_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^score.metric: val_acc_at_budget needs accuracy"):
        initsearch.search(mynets.Regressor, mynets.diabetes(), storage=str(tmp_path / "s.journal"),
                          tracking_uri="none", overrides=["score.metric=val_acc_at_budget", *QUICK[1:]])
    assert not (tmp_path / "s.journal").exists()


# ---- Python ------------------------------------------------------------------------------------------------
def test_search_from_python_with_a_class_and_tensors(tmp_path) -> None:
    data = mynets.tokens(n_train=256, n_val=64)
    result = initsearch.search(mynets.TokenClassifier, data, n_trials=2, storage=str(tmp_path / "s.journal"),
                               tracking_uri="none", out_dir=tmp_path / "out", baselines=["he", "lsuv"],
                               overrides=["train.steps=20", "train.eval_every=10", "score.seeds=1", "+model.dim=8"])
    assert result.study.study_name == "TokenClassifier_data"
    assert result.policy_path == tmp_path / "out" / "best_policy.json"
    assert isinstance(result.policy, initsearch.InitPolicy)
    assert len(result.trials) == 4 and set(result.trials["kind"]) == {"search", "he", "lsuv"}
    assert "best found vs best baseline" in result.summary
    best = result.trials.sort_values("auc_loss").iloc[0]
    assert math.isclose(best["auc_loss"], result.study.best_value)
    # the policy applies to the user's model on integer inputs (token ids)
    model = mynets.TokenClassifier(num_classes=3, dim=8)
    initsearch.apply_policy(model, result.policy, example_batch=data[0][0][:32], seed=0)
    table = initsearch.validate_policy(result.policy, mynets.TokenClassifier, data, seeds=2, steps=20,
                                       baselines=["he"], overrides=["+model.dim=8"], tracking_uri="none")
    assert list(table["contender"]) == ["policy", "he"] and "final_val_acc_mean" in table
    assert table.attrs["verdict"].startswith("the policy ")


def test_search_from_python_with_a_factory_and_a_dataset_of_pairs(tmp_path) -> None:
    (x, y), (xv, yv) = mynets.tokens(n_train=200, n_val=60)

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])

    def factory() -> nn.Module:
        return nn.Sequential(nn.Embedding(64, 8), nn.Flatten(), nn.Linear(16 * 8, 16), nn.ReLU(), nn.Linear(16, 3))

    result = initsearch.search(factory, (Pairs(x, y), Pairs(xv, yv)), n_trials=1, study_name="pairs",
                               storage=str(tmp_path / "s.journal"), tracking_uri="none", out_dir=tmp_path / "out",
                               baselines=["he"], overrides=QUICK[1:4])
    assert len(result.trials) == 2 and result.policy_path.is_file()


def test_a_local_class_cannot_go_to_several_workers(tmp_path) -> None:
    class Local(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.fc = nn.Linear(10, num_classes)

    with pytest.raises(ConfigError, match=r"^n_workers: several worker processes need the model"):
        initsearch.search(Local, mynets.diabetes(), n_workers=2, storage=str(tmp_path / "s.journal"))


def test_unknown_settings_and_bad_overrides_are_one_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^n_trails: no such key \(did you mean n_trials\?\)$"):
        initsearch.search(mynets.Regressor, mynets.diabetes(), n_trails=3)
    with pytest.raises(ConfigError, match=r"^xyzzy: unknown setting; expected a top-level key"):
        initsearch.search(mynets.Regressor, mynets.diabetes(), xyzzy=3)
    with pytest.raises(ConfigError, match=r"^overrides: train.stepz: no such key \(did you mean train.steps\?\)$"):
        initsearch.search(mynets.Regressor, mynets.diabetes(), overrides=["train.stepz=3"])


# ---- what the class receives -----------------------------------------------------------------------------------
class Recorder(nn.Module):
    def __init__(self, input_shape, num_classes, c: int = 8, width_multiplier: float = 1.0) -> None:
        super().__init__()
        self.got = {"input_shape": input_shape, "num_classes": num_classes, "c": c, "width_multiplier": width_multiplier}
        self.fc = nn.Linear(int(np.prod(input_shape)), num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Plain(nn.Module):
    def __init__(self, c: int = 8, channels: list[int] | None = None) -> None:
        super().__init__()
        self.c, self.channels = c, channels
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_the_class_receives_its_own_keys_and_the_implied_ones_it_names() -> None:
    model = build_model({"name": "custom", "_target_": Recorder, "width_multiplier": 0.5, "width_arg": None, "c": 3},
                        (1, 8, 8), 10)
    assert model.got == {"input_shape": (1, 8, 8), "num_classes": 10, "c": 3, "width_multiplier": 0.5}


def test_width_arg_scales_the_named_width_and_a_class_without_one_is_refused() -> None:
    narrow = build_model({"_target_": Plain, "width_multiplier": 0.5, "width_arg": "c", "c": 10}, (1, 8, 8), 10)
    assert narrow.c == 5
    wide = build_model({"_target_": Plain, "width_multiplier": 0.5, "width_arg": "channels", "channels": [8, 16]},
                       (1, 8, 8), 10)
    assert wide.channels == [4, 8]
    with pytest.raises(ConfigError, match=r"^model.width_multiplier: 0.5 asks for a narrower proxy"):
        build_model({"_target_": Plain, "width_multiplier": 0.5}, (1, 8, 8), 10)


def test_builtin_keys_never_reach_a_class_given_on_a_builtin_group() -> None:
    # ``+model._target_`` on the mlp group: depth/width/activation are the proxy's, not the class's
    model = build_model({"name": "mlp", "depth": 4, "width": 128, "activation": "relu", "_target_": Plain, "c": 2},
                        (1, 8, 8), 10)
    assert model.c == 2


def test_the_validation_proxy_is_full_width_and_the_search_proxy_narrower(tmp_path) -> None:
    from dataclasses import replace

    from initsearch.api import _compose
    from initsearch.search.trial import prepare

    _, settings = _compose(mynets.Regressor, mynets.diabetes(), ["model.width_multiplier=0.5"], tracking_uri="none")
    proxy = prepare(settings)
    assert [layer.fan_out for layer in proxy.layers][:2] == [32, 32]
    full = prepare(replace(settings, model={**settings.model, "width_multiplier": 1.0}))
    assert [layer.fan_out for layer in full.layers][:2] == [64, 64]


# ---- bad input: one line naming the key, before any trial is written -------------------------------------------
def _raises(_: int = 0):
    raise RuntimeError("the data server is down")


def _mismatch():
    return (torch.randn(10, 3), torch.randn(9)), (torch.randn(4, 3), torch.randn(4))


def _nan():
    x = torch.randn(10, 3)
    x[7, 1] = math.nan
    return (x, torch.randn(10)), (torch.randn(4, 3), torch.randn(4))


def _inf_target():
    y = torch.randn(4)
    y[2] = math.inf
    return (torch.randn(10, 3), torch.randn(10)), (torch.randn(4, 3), y)


def _empty():
    return (torch.randn(10, 3), torch.randn(10)), (torch.randn(0, 3), torch.randn(0))


def _one_split():
    return (torch.randn(10, 3), torch.randn(10))


class NotAModule:
    def __init__(self, **_) -> None:
        pass


BAD = {
    "data function raises": ({"data": _raises}, DataError, "data._target_: "),
    "x and y lengths differ": ({"data": _mismatch}, DataError, "data.train: x has 10 examples but y has 9"),
    "NaN in x": ({"data": _nan}, DataError, "data.train.x: holds NaN or Inf (first in example 7)"),
    "Inf in y": ({"data": _inf_target}, DataError, "data.val.y: holds NaN or Inf (first in example 2)"),
    "empty split": ({"data": _empty}, DataError, "data.val: the split is empty"),
    "not (train, val)": ({"data": _one_split}, DataError, "data._target_: "),
    "float labels with cross_entropy": ({"overrides": ["train.loss=cross_entropy"]}, DataError,
                                        "train.loss: cross_entropy needs integer class labels"),
    "not an nn.Module": ({"model": NotAModule}, ConfigError, "model._target_: "),
    "module path that does not import": ({"model": "no_such_pkg_xyz.Net"}, ConfigError,
                                         "model._target_: cannot import 'no_such_pkg_xyz.Net': No module named "
                                         "'no_such_pkg_xyz'"),
    "class a module does not have": ({"model": "examples.mynets.NoSuchNet"}, ConfigError,
                                     "model._target_: cannot import 'examples.mynets.NoSuchNet': module "
                                     "'examples.mynets' has no attribute 'NoSuchNet'"),
    "data path that does not import": ({"data": "no_such_pkg_xyz.load"}, DataError,
                                       "data._target_: cannot import 'no_such_pkg_xyz.load': No module named "
                                       "'no_such_pkg_xyz'"),
    "model that does not fit the data": ({"model": mynets.TinyResNet}, ConfigError,
                                         "model._target_: examples.mynets.TinyResNet failed on a batch of "),
    "unknown argument": ({"overrides": ["+model.nope=1"]}, ConfigError,
                         "model.nope: examples.mynets.Regressor takes no argument 'nope'"),
    "more outputs than targets": ({"model": "tests.test_custom.TwoOutputs"}, ConfigError,
                                  "model._target_: tests.test_custom.TwoOutputs gives outputs of shape (2,) per "
                                  "example, but the targets have shape ()"),
    "fewer logits than classes": ({"model": mynets.TokenClassifier, "data": mynets.tokens,
                                   "overrides": ["+model.num_classes=2"]}, ConfigError,
                                  "model._target_: examples.mynets.TokenClassifier gives outputs of shape (2,) per "
                                  "example, but the data have 3 classes"),
    "negative labels": ({"model": mynets.TokenClassifier, "data": "tests.test_custom._negative_labels"}, DataError,
                        "data: class labels must be 0, 1, 2, ...; got -1"),
    "width_arg and width_multiplier": ({"overrides": ["model.width_arg=hidden"]}, ConfigError,
                                       "model.width_arg: examples.mynets.Regressor takes width_multiplier itself"),
    "data arguments with (train, val)": ({"data": ((torch.randn(4, 3), torch.randn(4)),) * 2,
                                          "overrides": ["+data.seed=1"]}, DataError,
                                         "data: +data.seed is an argument for a data function"),
}


class TwoOutputs(nn.Module):
    def __init__(self, input_shape, num_classes) -> None:
        super().__init__()
        self.fc = nn.Linear(input_shape[0], 2)

    def forward(self, x):
        return self.fc(x)


def _negative_labels():
    (x, y), (xv, yv) = mynets.tokens(n_train=64, n_val=16)
    return (x, y - 1), (xv, yv - 1)


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_naming_the_key_before_any_trial(case, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default output folder, outputs/<study>/<date>/, is made here
    given, error, start = BAD[case]
    model = given.get("model", mynets.Regressor)
    data = given.get("data", mynets.diabetes)
    with pytest.raises(error) as info:
        initsearch.search(model, data, n_trials=1, storage=str(tmp_path / "s.journal"), tracking_uri="none",
                          overrides=given.get("overrides", []))
    message = str(info.value)
    assert message.startswith(start) and "\n" not in message, message
    assert not (tmp_path / "s.journal").exists()
    assert not (tmp_path / "outputs").exists()  # no empty output folder left behind


def test_a_path_that_does_not_import_leaves_out_hydras_error_log(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^model._target_: cannot import 'no_such_pkg_xyz.Net': No module named "
                                          r"'no_such_pkg_xyz'$"):
        initsearch.search("no_such_pkg_xyz.Net", mynets.diabetes, n_trials=1, storage=str(tmp_path / "s.journal"),
                          tracking_uri="none")
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("hydra")]


def test_a_bad_input_removes_only_the_folders_the_call_made(tmp_path) -> None:
    (tmp_path / "results").mkdir()  # the user's own, empty: kept
    with pytest.raises(DataError):
        initsearch.search(mynets.Regressor, _nan, n_trials=1, storage=str(tmp_path / "s.journal"),
                          tracking_uri="none", out_dir=tmp_path / "results" / "run1" / "a")
    assert (tmp_path / "results").is_dir() and not (tmp_path / "results" / "run1").exists()


def test_the_cli_prints_a_bad_data_function_as_one_line(tmp_path) -> None:
    proc = run_cli("initsearch", ["data._target_=tests.test_custom._mismatch", "model._target_=examples.mynets.Regressor",
                                  f"storage={tmp_path / 's.journal'}", f"hydra.run.dir={tmp_path / 'out'}", *QUICK], REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "initsearch: error: data.train: x has 10 examples but y has 9"
    assert not (tmp_path / "s.journal").exists()


def test_data_that_does_not_fit_is_refused_before_it_is_read() -> None:
    class Huge(torch.utils.data.Dataset):
        reads = 0

        def __len__(self):
            return 10_000_000

        def __getitem__(self, i):
            Huge.reads += 1
            return torch.zeros(3, 32, 32), 0

    with pytest.raises(DataError, match=r"^data.max_bytes: data.train alone needs about"):
        load_user_data((Huge(), Huge()), max_bytes=10**9)
    assert Huge.reads == 1


# ---- the losses --------------------------------------------------------------------------------------------------
def test_losses_match_torch_and_auto_picks_by_target_dtype() -> None:
    out, y = torch.randn(6, 1), torch.randn(6)
    assert resolve_loss("auto", y).name == "mse"
    assert resolve_loss("auto", torch.tensor([0, 2, 1])).name == "cross_entropy"
    torch.testing.assert_close(LOSSES["mse"].mean(out, y), F.mse_loss(out.squeeze(1), y))
    torch.testing.assert_close(LOSSES["l1"].mean(out, y), F.l1_loss(out.squeeze(1), y))
    labels = torch.randint(0, 2, (6, 3)).float()
    logits = torch.randn(6, 3)
    torch.testing.assert_close(LOSSES["bce_with_logits"].mean(logits, labels),
                               F.binary_cross_entropy_with_logits(logits, labels))
    hits = LOSSES["bce_with_logits"].hits(logits, labels)
    torch.testing.assert_close(hits, ((logits > 0) == (labels > 0.5)).double().mean(1))
    assert output_size(LOSSES["cross_entropy"], torch.tensor([0, 4, 1])) == 5
    assert output_size(LOSSES["mse"], torch.randn(5)) == 1 and output_size(LOSSES["mse"], torch.randn(5, 3)) == 3
    with pytest.raises(DataError, match=r"^train.loss: mse needs float targets"):
        resolve_loss("mse", torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match=r"^train.loss: must be one of"):
        TrainConfig(loss="hinge").validate()


def _regression_data(k: int = 1) -> TensorData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    w = torch.randn(6, k, generator=g)
    y = (x @ w).squeeze(1) if k == 1 else x @ w
    return TensorData(x[:200], y[:200], x[200:], y[200:], k, (6,))


@pytest.mark.parametrize("mode", ["stacked", "vmap"])
@pytest.mark.parametrize("loss, k", [("mse", 1), ("l1", 3), ("bce_with_logits", 2)])
def test_a_population_on_a_regression_loss_matches_solo_runs(mode, loss, k) -> None:
    data = _regression_data(k)
    if loss == "bce_with_logits":
        data.y_train, data.y_val = (data.y_train > 0).float(), (data.y_val > 0).float()
    cfg = TrainConfig(steps=30, batch_size=32, lr=0.02, eval_every=10, loss=loss)
    models = []
    for i in range(3):
        torch.manual_seed(i)
        models.append(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, k)))
    alone = [train_run(copy.deepcopy(m), data, cfg, seed=s) for m, s in zip(models, [1, 2, 3])]
    result = train_population(models, data, cfg, seeds=[1, 2, 3], mode=mode)
    assert result.engine == mode
    together = result.curves
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.val_loss, b.val_loss, rtol=1e-4, atol=1e-5)
        if loss == "bce_with_logits":
            assert all(0 <= v <= 1 for v in a.val_acc)
        else:
            assert all(math.isnan(v) for v in a.val_acc)
    assert together[0].train_loss[-1] < together[0].train_loss[0]  # it learns


def test_a_regression_curve_serializes_and_reports_no_accuracy(tmp_path) -> None:
    from initsearch.proxy.train import Curve

    data = _regression_data()
    torch.manual_seed(0)
    curve = train_run(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)), data,
                      TrainConfig(steps=20, batch_size=16, eval_every=10, lr=0.01), seed=0)
    encoded = json.loads(json.dumps(curve.to_dict()))
    assert encoded["val_acc"] == [None, None]
    assert Curve.from_dict(encoded).val_loss == pytest.approx(curve.val_loss)


@pytest.mark.parametrize("baseline", ["gradinit", "metainit"])
def test_learned_baselines_minimize_the_regression_loss(baseline) -> None:
    """GradInit and MetaInit get the study's loss (MSE here), and MetaInit the real batch: its random class
    labels mean nothing for float targets."""
    from initsearch.contenders.baselines import contender_policy, init_contender

    data = _regression_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    policy, result = init_contender(model, contender_policy(baseline), baseline=baseline, seed=0,
                                    example_x=data.x_train[:32], train_x=data.x_train, train_y=data.y_train,
                                    train=TrainConfig(batch_size=32, loss="auto"))
    assert result is not None and all(math.isfinite(v) for v in result.scales.values())
    assert isinstance(policy, initsearch.InitPolicy)


def test_data_as_a_list_and_settings_as_a_dict_and_the_subset_counted_before_the_size(tmp_path) -> None:
    from initsearch.api import _compose

    train, val = mynets.diabetes()
    _, settings = _compose(mynets.Regressor, [train, val], [], score={"seeds": 3}, tracking_uri="none")
    assert settings.score.seeds == 3 and settings.score.metric == "auc_loss"  # the rest of score is kept
    ds = load_user_data([train, val])
    assert len(ds.x_train) == len(train[0]) and ds.num_classes == 1
    size = sum(t.numel() * t.element_size() for t in (*train, *val))
    with pytest.raises(DataError, match=r"^data.max_bytes: "):
        load_user_data((train, val), max_bytes=size - 1)
    small = load_user_data((train, val), max_bytes=size - 1, subset=100, seed=0)
    assert len(small.x_train) == 100 and len(small.x_val) == len(val[0])


def test_a_resumed_study_knows_its_network_under_another_spelling() -> None:
    from initsearch.search.study import network

    assert network({"_target_": "torch.nn.Linear"}) == network({"_target_": "torch.nn.modules.linear.Linear"})
    assert network({"_target_": "examples.mynets.Regressor"}) == network({"_target_": mynets.Regressor.__module__ +
                                                                         ".Regressor"})
    assert network({"_target_": "torch.nn.Linear"}) != network({"_target_": "torch.nn.Conv2d"})


def test_a_custom_model_without_its_target_is_one_line(tmp_path) -> None:
    proc = run_cli("initsearch", ["model=custom", f"hydra.run.dir={tmp_path / 'out'}", f"storage={tmp_path / 's.journal'}",
                                  *QUICK], REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "initsearch: error: model._target_: give your class as model._target_=package.module.Class")
