"""Searching with pre-trained weights: ``pretrained=PATH``, the checkpoint option per role, its two baselines,
and ``data.classes`` (a task on some classes of a dataset)."""
from __future__ import annotations

import json
import pickle

import optuna
import pytest
import torch

from initsearch.cli import run
from initsearch.contenders.baselines import contender_policy
from initsearch.errors import ConfigError, DataError
from initsearch.init.apply import apply_policy
from initsearch.init.checkpoints import save_state_dict
from initsearch.proxy.data import Dataset, keep_classes
from initsearch.search.settings import settings_from_config
from initsearch.search.space import Pretrained, space_from_config
from initsearch.search.storage import open_storage
from initsearch.search.trial import fresh_model, prepare
from tests.conftest import TINY, compose_config

GROUPED = ["search_space=grouped"]


def _settings(overrides: list[str]):
    return settings_from_config(compose_config(TINY + overrides))


@pytest.fixture
def weights(in_tmp):
    """A state dict of the tiny study's proxy (as if pre-trained), saved in the test's folder."""
    settings = _settings([])
    proxy = prepare(settings)
    model = fresh_model(settings.model, proxy.data, proxy.device, seed=123)
    path = in_tmp / "weights" / "proxy.pt"
    save_state_dict(model, path)
    return path, model


# ---------------------------------------------------------------------------------------------- settings


def test_pretrained_adds_its_two_baselines_and_pins_the_file(weights):
    path, _ = weights
    s = _settings([f"pretrained={path}"])
    assert s.baselines == ("he", "xavier", "checkpoint", "checkpoint_fresh_head")
    assert s.pretrained.path == str(path.resolve()) and len(s.pretrained.sha256) == 64


@pytest.mark.parametrize("override, message", [
    ("pretrained=nowhere.pt", "pretrained: no such file: "),
    ("baselines=[he,checkpoint]", "baselines[1]: 'checkpoint' needs pre-trained weights: pretrained=PATH"),
])
def test_bad_pretrained_settings_are_one_line(in_tmp, override, message):
    with pytest.raises(ConfigError) as err:
        run(compose_config(TINY + [override, f"storage={in_tmp}/s.journal"]), in_tmp / "out")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (in_tmp / "s.journal").exists()


@pytest.mark.parametrize("content, message", [
    ([torch.zeros(2)], "pretrained: not a state dict"),
    ({"0.weight": torch.zeros(3, 3)}, "pretrained: no layer of the proxy fits"),
])
def test_unusable_pretrained_file_fails_before_the_study(in_tmp, content, message):
    path = in_tmp / "bad.pt"
    torch.save(content, path)
    with pytest.raises(ConfigError) as err:
        run(compose_config(TINY + [f"pretrained={path}", f"storage={in_tmp}/s.journal"]), in_tmp / "out")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (in_tmp / "s.journal").exists()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_in_pretrained_never_runs(in_tmp):
    marker = in_tmp / "payload-ran"
    path = in_tmp / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"0.weight": _Payload(str(marker))}, handle)
    with pytest.raises(ConfigError, match="pretrained: refused, the file needs pickle beyond tensors"):
        run(compose_config(TINY + [f"pretrained={path}", f"storage={in_tmp}/s.journal"]), in_tmp / "out")
    assert not marker.exists() and not (in_tmp / "s.journal").exists()


# ---------------------------------------------------------------------------------------------- the space


class _FixedTrial:
    """Answers every categorical with the option named in ``picks`` (by parameter name), else the first."""

    def __init__(self, picks: dict[str, str]) -> None:
        self.picks, self.offered = picks, {}

    def suggest_categorical(self, name, options):
        self.offered[name] = list(options)
        return self.picks.get(name, options[0])

    def suggest_float(self, name, low, high):
        return 0.0


def test_each_role_that_fits_is_offered_the_checkpoint(weights):
    path, source = weights
    settings = _settings([f"pretrained={path}", *GROUPED])
    proxy = prepare(settings)
    space = space_from_config(compose_config(TINY + GROUPED)["search_space"])
    trial = _FixedTrial({"scheme:first": "checkpoint"})
    policy = space.sample(trial, proxy.layers, proxy.pretrained)
    assert all("checkpoint" in options for name, options in trial.offered.items() if name.startswith("scheme:"))
    assert policy.to_dict()["version"] == 2 and policy.rules[0].init.scheme == "checkpoint"
    model = fresh_model(settings.model, proxy.data, proxy.device, seed=5)
    report = apply_policy(model, policy, example_batch=proxy.example_x, seed=5)
    first = report.layers[0].name
    assert torch.equal(dict(model.named_modules())[first].weight, dict(source.named_modules())[first].weight)
    assert report.layers[-1].source is None
    # without pre-trained weights the same space never offers it
    plain = _FixedTrial({})
    assert space.sample(plain, proxy.layers).to_dict()["version"] == 1
    assert not any("checkpoint" in options for options in plain.offered.values())


def test_a_role_that_does_not_fit_is_not_offered(weights):
    path, _ = weights
    settings = _settings([f"pretrained={path}", *GROUPED])
    proxy = prepare(settings)
    last = proxy.layers[-1].name
    partial = Pretrained(proxy.pretrained.weights, proxy.pretrained.layers - {last})
    trial = _FixedTrial({})
    space_from_config(compose_config(TINY + GROUPED)["search_space"]).sample(trial, proxy.layers, partial)
    assert "checkpoint" not in trial.offered["scheme:last"] and "checkpoint" in trial.offered["scheme:first"]


def test_checkpoint_baselines_copy_all_or_all_but_the_head(weights):
    path, source = weights
    settings = _settings([f"pretrained={path}"])
    proxy = prepare(settings)
    names = [layer.name for layer in proxy.layers]
    for baseline, copied in (("checkpoint", names), ("checkpoint_fresh_head", names[:-1])):
        model = fresh_model(settings.model, proxy.data, proxy.device, seed=9)
        apply_policy(model, contender_policy(baseline, settings.pretrained), seed=9)
        got, want = dict(model.named_modules()), dict(source.named_modules())
        assert [n for n in names if torch.equal(got[n].weight, want[n].weight)] == copied


def test_study_with_pretrained_runs_both_baselines_and_exports_a_version_2_policy(in_tmp, weights):
    path, _ = weights
    storage = str(in_tmp / "s.journal")
    exported = run(compose_config(TINY + [f"pretrained={path}", f"storage={storage}", "study_name=pt", *GROUPED,
                                          "n_trials=3"]), in_tmp / "out")
    study = optuna.load_study(study_name="pt", storage=open_storage(storage))
    by_baseline = {t.user_attrs.get("baseline"): t for t in study.get_trials()}
    for name in ("checkpoint", "checkpoint_fresh_head"):
        trial = by_baseline[name]
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.user_attrs["policy"]["checkpoints"]["pretrained"]["path"] == str(path.resolve())
    assert json.loads(exported.read_text())["format"] == "initsearch-policy"
    # other weights under the same path: the checkpoint trials' scores would not compare, so no resume
    before = len(study.get_trials())
    settings = _settings([])
    save_state_dict(fresh_model(settings.model, prepare(settings).data, torch.device("cpu"), seed=7), path)
    with pytest.raises(ConfigError, match=r"^pretrained: study 'pt' was run with '[0-9a-f]{64}', this command has "
                                          r"'[0-9a-f]{64}'; their scores would not compare"):
        run(compose_config(TINY + [f"pretrained={path}", f"storage={storage}", "study_name=pt", *GROUPED,
                                   "n_trials=4"]), in_tmp / "out2")
    assert len(optuna.load_study(study_name="pt", storage=open_storage(storage)).get_trials()) == before


# ---------------------------------------------------------------------------------------------- data.classes


def _toy() -> Dataset:
    y = torch.arange(20) % 5
    return Dataset("toy", torch.randn(20, 3), y, torch.randn(10, 3), torch.arange(10) % 5, 5)


def test_keep_classes_filters_and_relabels_in_order():
    ds = _toy()
    kept = keep_classes(ds, [3, 1])
    assert kept.num_classes == 2 and len(kept.y_train) == 8 and len(kept.y_val) == 4
    assert torch.equal(kept.x_train[kept.y_train == 0], ds.x_train[ds.y_train == 3])
    assert torch.equal(kept.x_train[kept.y_train == 1], ds.x_train[ds.y_train == 1])


@pytest.mark.parametrize("classes", [[1], [1, 1], [0, 5], "01", [0, True]])
def test_keep_classes_refuses_bad_lists(classes):
    with pytest.raises(DataError, match=r"^data.classes: must be a list of at least two distinct labels in \[0, 5\)"):
        keep_classes(_toy(), classes)
