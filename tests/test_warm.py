"""Warm starts: earlier winners (policy files or studies) enqueued as the first searched trials, adapted through
their role selectors; earlier winners found through MLflow (``export list=true``)."""
from __future__ import annotations

import logging

import optuna
import pytest

from initsearch.cli import run
from initsearch.errors import ConfigError
from initsearch.export import main as export_main
from initsearch.init.policy import InitPolicy, load_policy, plan, save_policy
from initsearch.search.settings import settings_from_config
from initsearch.search.space import space_from_config
from initsearch.search.storage import open_storage
from initsearch.search.trial import prepare
from initsearch.search.warm import adapt, describe_network
from tests.conftest import TINY, compose_config


def _policy(*rules, lsuv=None) -> InitPolicy:
    data = {"format": "initsearch-policy", "version": 1, "rules": list(rules)}
    if lsuv:
        data["lsuv"] = lsuv
    return InitPolicy.from_dict(data)


@pytest.fixture(scope="module")
def deep():
    """A 4-layer tiny proxy and the grouped and hybrid spaces."""
    settings = settings_from_config(compose_config(TINY + ["model.depth=4", "search_space=grouped"]))
    proxy = prepare(settings)
    hybrid = space_from_config(compose_config(TINY + ["search_space=hybrid"])["search_space"])
    return proxy.layers, settings.space, hybrid


ROLES = _policy({"position": "first", "scheme": "orthogonal", "gain": "auto", "scale": 2.0, "bias": "pytorch_default"},
                {"position": "hidden", "scheme": "kaiming_uniform", "gain": "auto", "scale": 0.5, "bias": "pytorch_default"},
                {"position": "last", "scheme": "xavier_normal", "gain": "auto", "bias": "pytorch_default"})


@pytest.mark.parametrize("space_name", ["grouped", "hybrid"])
def test_a_role_policy_adapts_to_a_deeper_model_in_either_space(deep, space_name):
    layers, grouped, hybrid = deep
    space = grouped if space_name == "grouped" else hybrid
    params = adapt(ROLES, space, layers, None)
    again = space.sample(optuna.trial.FixedTrial(params), layers)
    got = {layer.name: (spec.scheme, round(spec.scale, 6), spec.bias) for layer, _, spec in plan(again, layers)}
    first, *hidden, last = [layer.name for layer in layers]
    assert got[first] == ("orthogonal", 2.0, "pytorch_default")
    assert all(got[name] == ("kaiming_uniform", 0.5, "pytorch_default") for name in hidden) and len(hidden) == 2
    assert got[last] == ("xavier_normal", 1.0, "pytorch_default")


@pytest.mark.parametrize("policy, why", [
    (_policy({"scheme": "kaiming_normal", "gain": "auto", "scale": 8.0}), "outside this space's 2^[-1, 1]"),
    (_policy({"position": "first", "scheme": "kaiming_normal", "bias": "pytorch_default"}, {"scheme": "kaiming_normal"}),
     "different bias inits"),
    (_policy({"scheme": "normal", "std": 0.01}), "'normal', not among this space's choices"),
    (_policy({"scheme": "kaiming_normal"}, lsuv={"enabled": True, "tol": 0.5}), "LSUV settings"),
    (_policy({"scheme": "delta_orthogonal"}), "does not fit layer"),
])
def test_a_policy_the_space_cannot_express_says_why(deep, policy, why):
    layers, grouped, _ = deep
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("^", r"\^")):
        adapt(policy, grouped, layers, None)


def test_hybrid_layer_names_do_not_map_onto_a_model_without_those_layers(deep):
    layers, grouped, _ = deep
    by_name = _policy({"layer": "net.99", "scheme": "zeros"}, {"scheme": "orthogonal", "gain": "auto"})
    params = adapt(by_name, grouped, layers, None)  # the unknown name matches nothing: the other rule decides
    assert {params[k] for k in params if k.startswith("scheme:")} == {"orthogonal"}


def test_a_misfit_with_a_rule_for_a_missing_layer_says_so_first(deep):
    layers, grouped, _ = deep
    named = _policy({"layer": "l9", "scheme": "kaiming_normal"})  # the default (keep) decides every layer
    with pytest.raises(ValueError) as info:
        adapt(named, grouped, layers, None)
    assert str(info.value).startswith("rules[0].layer 'l9' matches no layer of this model (its layers: fc1, fc2, "
                                      "fc3, out); without it, first gets 'keep', not among"), info.value


def test_describe_network_counts_depth_activations_and_types(deep):
    layers, _, _ = deep
    assert describe_network(layers) == {"depth": "4", "activations": "linear:1,relu:3", "layer_types": "Linear:4"}


def _tiny(in_tmp, *extra):
    return compose_config(TINY + [f"storage={in_tmp}/s.journal", "search_space=grouped", "model.depth=3", *extra])


def test_warm_starts_are_the_first_searched_trials_and_a_misfit_is_skipped(in_tmp, caplog):
    fitting = save_policy(_policy({"position": "first", "scheme": "orthogonal", "gain": "auto"},
                                  {"position": "last", "scheme": "xavier_normal", "gain": "auto"},
                                  {"scheme": "kaiming_uniform", "gain": "auto"}), in_tmp / "fits.json")
    misfit = save_policy(_policy({"scheme": "normal", "std": 0.01}), in_tmp / "misfit.json")
    run(_tiny(in_tmp, "study_name=earlier", "n_trials=2"), in_tmp / "out1")
    with caplog.at_level(logging.WARNING, logger="initsearch"):
        run(_tiny(in_tmp, "study_name=later", "n_trials=3", f"warm_start=[{fitting},{misfit},earlier]"), in_tmp / "out2")
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [f"warm start {misfit} skipped: first gets 'normal', not among this space's choices "
                       "(pytorch_default, xavier_uniform, lecun_normal, kaiming_normal, kaiming_uniform, orthogonal)"]
    study = optuna.load_study(study_name="later", storage=open_storage(str(in_tmp / "s.journal")))
    searched = [t for t in study.get_trials() if not t.user_attrs.get("baseline")]
    assert searched[0].user_attrs["warm_start"] == str(fitting)
    assert searched[0].params["scheme:first"] == "orthogonal" and searched[0].params["scheme:last"] == "xavier_normal"
    assert searched[0].params["scheme:hidden_linear_relu"] == "kaiming_uniform"
    assert searched[1].user_attrs["warm_start"].startswith("study earlier trial ")
    assert "warm_start" not in searched[2].user_attrs
    # a resume does not enqueue them again
    run(_tiny(in_tmp, "study_name=later", "n_trials=4", f"warm_start=[{fitting},earlier]"), in_tmp / "out3")
    study = optuna.load_study(study_name="later", storage=open_storage(str(in_tmp / "s.journal")))
    assert sum(1 for t in study.get_trials() if t.user_attrs.get("warm_start")) == 2


def test_missing_warm_start_source_is_one_line_and_writes_nothing(in_tmp):
    with pytest.raises(ConfigError) as err:
        run(_tiny(in_tmp, "study_name=fresh", "warm_start=[no_such_study]"), in_tmp / "out")
    assert str(err.value).startswith("warm_start[0]: 'no_such_study' is neither a policy file nor a study")
    storage = open_storage(str(in_tmp / "s.journal"))
    assert "fresh" not in optuna.get_all_study_names(storage)


def test_export_list_shows_earlier_winners_with_their_network(in_tmp, capsys):
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    run(_tiny(in_tmp, "study_name=logged", "n_trials=1", f"tracking_uri={uri}"), in_tmp / "out")
    capsys.readouterr()
    assert export_main(["list=true", f"tracking_uri={uri}"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.strip().startswith("logged"))
    assert "linear:1,relu:2" in line and "Linear:3" in line and "auc_loss" in line
    path = line.split()[-1]
    logged = load_policy(path)  # the logged best policy (a searched one or a baseline), readable where the list says
    assert logged.rules or logged.default.scheme != "keep"


def test_export_list_without_a_store_is_one_line(in_tmp, capsys):
    assert export_main(["list=true", f"tracking_uri=sqlite:///{in_tmp}/none.db"]) == 2
    assert "tracking_uri: no MLflow store" in capsys.readouterr().err
