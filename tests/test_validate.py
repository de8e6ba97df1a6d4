"""python -m initsearch.validate: fresh seeds, every baseline, CSV + PNG + MLflow runs, a plain verdict."""
from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from initsearch.cli import run
from initsearch.validate import FRESH_SEED_OFFSET, main
from tests.conftest import TINY, compose_config


def test_validate_end_to_end_on_a_tiny_budget(in_tmp, capsys):
    tracking = f"sqlite:///{in_tmp}/mlflow.db"
    overrides = [o for o in TINY if not o.startswith("tracking_uri")] + [f"tracking_uri={tracking}", "study_name=val"]
    policy = run(compose_config(overrides), in_tmp / "study_out")
    capsys.readouterr()
    out = in_tmp / "val"
    code = main([f"policy={policy}", "seeds=2", "steps=30", f"out={out}", *overrides])
    assert code == 0
    printed = capsys.readouterr().out
    assert "the policy" in printed and "best baseline" in printed
    table = pd.read_csv(out / "validation.csv")
    assert list(table.contender) == ["policy", "he", "xavier"]
    assert set(table.reached_target) <= {"0/2", "1/2", "2/2"} and (table.diverged == "0/2").all()
    assert (out / "validation.png").stat().st_size > 10_000
    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("val")
    runs = client.search_runs([exp.experiment_id], "tags.`initsearch.role` = 'validation'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    history = client.get_metric_history(children[0].info.run_id, "train_loss_mean")
    assert len(history) == 30
    seeds = parents[0].data.params["seeds"].split()
    assert all(int(s) >= FRESH_SEED_OFFSET for s in seeds)


def test_validate_needs_a_policy(capsys):
    assert main(["study=digits_mlp"]) == 2
    assert "policy: required" in capsys.readouterr().err


def test_validate_refuses_a_bad_policy_file(in_tmp, capsys):
    bad = in_tmp / "p.json"
    bad.write_text("{not json")
    assert main([f"policy={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("initsearch.validate: error:") and "json" in err.lower()
