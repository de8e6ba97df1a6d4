"""Portable policies: a per-layer winner rewritten with role selectors applies to deeper variants and trains."""
from __future__ import annotations

import math

import optuna
import pytest
import torch
import torch.nn.functional as F

from initsearch.export import export_policy, main
from initsearch.init.apply import apply_policy
from initsearch.init.layers import discover_layers
from initsearch.init.policy import load_policy, plan
from initsearch.init.portable import portable_policy
from initsearch.proxy.data import load_digits, normalize_dataset
from initsearch.proxy.models import build_model
from initsearch.search.space import space_from_config
from initsearch.search.storage import open_storage
from tests.conftest import compose_config

SHAPE = (1, 8, 8)


def _layers(depth: int, width: int = 64):
    model = build_model({"name": "mlp", "depth": depth, "width": width, "activation": "relu"}, SHAPE, 10)
    return model, discover_layers(model, torch.randn(4, *SHAPE)).layers


def _hybrid_winner(layers, hidden: dict[str, str] | None = None):
    """The deep_mlp winner (He first layer, identity hidden layers, LSUV) as the hybrid space writes it:
    one rule per layer name."""
    space = space_from_config(dict(compose_config(["search_space=hybrid"]).search_space))
    params = {"lsuv": True, "bias": "zeros"}
    for layer in layers:
        scheme = "kaiming_normal" if layer.position == "first" else "orthogonal" if layer.position == "last" else "identity"
        params[f"scheme:{layer.name}"] = (hidden or {}).get(layer.name, scheme)
    return space.sample(optuna.trial.FixedTrial(params), layers)


def test_a_per_layer_winner_becomes_role_rules_that_reproduce_it():
    _, layers = _layers(32)
    winner = _hybrid_winner(layers)
    assert all(rule.layer is not None for rule in winner.rules)
    result = portable_policy(winner, layers)
    assert result.differing == ()
    rules = result.policy.rules
    assert [rule.position for rule in rules] == ["first", "last", "hidden"] and all(r.layer is None for r in rules)
    assert [spec for _, _, spec in plan(result.policy, layers)] == [spec for _, _, spec in plan(winner, layers)]
    assert result.policy.lsuv == winner.lsuv


def _final_train_loss(model, steps: int = 250, lr: float = 0.01) -> float:
    """Train on digits with SGD (momentum 0.9, batch 128, as study=deep_mlp); mean loss of the last 20 steps."""
    data = normalize_dataset(load_digits(seed=0))
    x, y = data.x_train, data.y_train
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


@pytest.mark.parametrize("depth", [16, 64])
def test_the_portable_deep_mlp_winner_trains_at_other_depths(depth):
    """Found on depth 32, applied unchanged at depths 16 and 64: loss far below chance (ln 10) in 250 steps,
    where PyTorch's default init at that depth stays near chance."""
    _, found_on = _layers(32)
    policy = portable_policy(_hybrid_winner(found_on), found_on).policy
    data = normalize_dataset(load_digits(seed=0))
    torch.manual_seed(0)
    model, _ = _layers(depth)
    report = apply_policy(model, policy, example_batch=data.x_train[:256], seed=0)
    assert all(r.rule is not None for r in report.layers) and len(report.layers) == depth
    assert _final_train_loss(model) < 0.3 * math.log(10)
    torch.manual_seed(0)
    default, _ = _layers(depth)
    assert _final_train_loss(default) > 0.8 * math.log(10)  # the test can tell training from not training


def test_a_role_whose_layers_differ_is_named():
    _, layers = _layers(6)
    mixed = _hybrid_winner(layers, hidden={"fc3": "orthogonal"})
    result = portable_policy(mixed, layers)
    assert result.policy is None
    assert len(result.differing) == 1
    assert result.differing[0].startswith("the hidden linear relu layers got 2 different inits (fc2: scheme identity")
    assert "fc3: scheme orthogonal" in result.differing[0]


def _tiny_digits_study(tmp_path, space: str):
    storage = str(tmp_path / "s.journal")
    from initsearch.cli import run

    overrides = ["model.depth=4", "model.width=16", "train.steps=10", "train.eval_every=10", "n_trials=1",
                 "baselines=[he]", "score.seeds=1", "select.top_k=0", "tracking_uri=none", "progress=false",
                 "threads=1", f"search_space={space}", f"storage={storage}", "study_name=port"]
    run(compose_config(overrides), tmp_path / "out")
    return storage, optuna.load_study(study_name="port", storage=open_storage(storage))


def test_export_portable_writes_roles_or_names_the_differing_role(tmp_path, capsys):
    storage, study = _tiny_digits_study(tmp_path, "hybrid")
    he = next(t for t in study.trials if t.user_attrs.get("baseline") == "he")
    path = export_policy(study, tmp_path / "p.json", trial=he.number, portable=True)
    written = load_policy(path)
    assert all(rule.layer is None for rule in written.rules)
    assert [rule.position for rule in written.rules] == ["first", "last", "hidden"]
    assert {rule.init.scheme for rule in written.rules} == {"kaiming_normal"}
    assert written.provenance["trial"] == he.number
    # a deeper model gets He everywhere too
    _, deeper = _layers(9, 16)
    assert {spec.scheme for _, _, spec in plan(written, deeper)} == {"kaiming_normal"}
    # a trial whose hidden layers differ: one line naming the role, exit 2, nothing written
    mixed = _hybrid_winner(_layers(4, 16)[1], hidden={"fc3": "orthogonal"})
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={"policy": mixed.to_dict()}))
    out = tmp_path / "q.json"
    code = main(["study_name=port", f"storage={storage}", f"out={out}", f"trial={len(study.trials) - 1}", "portable=true"])
    # (only the command's own lines: in a full run, logging may report on a stream an earlier test closed)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("initsearch.export")]
    assert code == 2 and not out.exists() and len(said) == 1
    assert said[0].startswith("initsearch.export: error: portable: the hidden linear relu layers got 2 different inits")
    assert main(["study_name=port", f"storage={storage}", "portable=maybe"]) == 2
    assert "portable: must be true or false" in capsys.readouterr().err
