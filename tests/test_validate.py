"""python -m initsearch.validate: fresh seeds, every baseline, CSV + PNG + MLflow runs, a plain verdict."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from initsearch.cli import run
from initsearch.validate import FRESH_SEED_OFFSET, main
from tests.conftest import TINY, compose_config, spy_populations


def orthogonal_policy(folder):
    """A policy file in ``folder``: every layer orthogonal."""
    import json

    path = folder / "p.json"
    path.write_text(json.dumps({"format": "initsearch-policy", "version": 1, "rules": [],
                                "default": {"scheme": "orthogonal"}}))
    return path


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


def test_validate_logs_into_the_study_the_policy_came_from_unless_told(in_tmp, capsys):
    """Without study_name=, the validation run and the default output folder take the study of the
    policy's provenance, not the preset's (digits_mlp)."""
    import json

    path = orthogonal_policy(in_tmp)
    path.write_text(json.dumps({**json.loads(path.read_text()), "provenance": {"study": "elsewhere", "trial": 3}}))
    tracking = f"sqlite:///{in_tmp}/mlflow.db"
    overrides = [o for o in TINY if not o.startswith("tracking_uri")] + [f"tracking_uri={tracking}", "baselines=[he]"]
    assert main([f"policy={path}", "seeds=1", "steps=10", *overrides]) == 0
    assert [p.name for p in (in_tmp / "outputs").iterdir()] == ["elsewhere"]
    client = MlflowClient(tracking_uri=tracking)
    assert {e.name for e in client.search_experiments()} - {"Default"} == {"elsewhere"}
    assert main([f"policy={path}", "seeds=1", "steps=10", "study_name=mine", *overrides]) == 0
    assert {e.name for e in client.search_experiments()} - {"Default"} == {"elsewhere", "mine"}
    capsys.readouterr()


def test_validate_needs_a_policy(capsys):
    assert main(["study=digits_mlp"]) == 2
    assert "policy: required" in capsys.readouterr().err


def test_validate_refuses_a_bad_policy_file(in_tmp, capsys):
    bad = in_tmp / "p.json"
    bad.write_text("{not json")
    assert main([f"policy={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("initsearch.validate: error:") and "json" in err.lower()


# ---- the verdict, from planted scores (no training): every figure computed here independently ---------------
def _report(scores: dict[str, list[float]], direction: str = "minimize"):
    from initsearch.validate import ContenderResult, ValidationReport

    results = []
    for name, values in scores.items():
        r = ContenderResult(name)
        r.seeds = list(range(len(values)))
        r.scores = list(values)
        results.append(r)
    return ValidationReport("auc_loss", direction, 100, list(range(len(next(iter(scores.values()))))), 0.9, results,
                            accuracy=False)


T975 = {4: 2.7764451051977987, 5: 2.5705818366147395}  # Student's t, 97.5th percentile, by degrees of freedom


def _expected(policy: list[float], baseline: list[float], sign: float) -> tuple[float, float]:
    gains = np.array([sign * (b - p) for p, b in zip(policy, baseline)])
    return gains.mean(), T975[len(gains) - 1] * gains.std(ddof=1) / np.sqrt(len(gains))


def test_the_verdict_picks_the_best_baseline_and_the_paired_interval_decides() -> None:
    policy = [0.50, 0.52, 0.49, 0.51, 0.50]
    planted = {"policy": policy, "worse": [0.90, 0.91, 0.92, 0.89, 0.90],
               "best": [0.60, 0.61, 0.58, 0.62, 0.60], "middle": [0.70, 0.71, 0.69, 0.72, 0.70]}
    verdict = _report(planted).verdict()
    best = min((k for k in planted if k != "policy"), key=lambda k: np.mean(planted[k]))
    gain, half = _expected(policy, planted[best], +1.0)
    pct = 100 * gain / np.mean(planted[best])
    assert best == "best" and gain - half > 0
    assert verdict.startswith(f"the policy beats the best baseline (best) by {pct:.1f}% on auc_loss ")
    assert f"paired gain {gain:+.3g} ± {half:.2g} (95% CI) over 5 seeds" in verdict


def test_the_verdict_says_worse_and_not_distinguishable_and_flips_for_maximized_metrics() -> None:
    base = [0.60, 0.61, 0.58, 0.62, 0.60]
    worse = [0.70, 0.72, 0.69, 0.71, 0.70]
    verdict = _report({"policy": worse, "he": base}).verdict()
    gain, half = _expected(worse, base, +1.0)
    assert gain + half < 0 and verdict.startswith("the policy is worse than the best baseline (he) by ")
    noisy = [0.55, 0.66, 0.57, 0.64, 0.60]  # mean 0.604 against 0.602: inside the interval
    gain, half = _expected(noisy, base, +1.0)
    assert abs(gain) < half
    assert _report({"policy": noisy, "he": base}).verdict().startswith(
        "the policy is not distinguishable from the best baseline (he) on auc_loss: ")
    slightly_better = [b - d for b, d in zip(base, [0.05, -0.04, 0.02, -0.01, 0.01])]  # mean gain > 0, CI spans 0
    gain, half = _expected(slightly_better, base, +1.0)
    assert 0 < gain < half
    assert _report({"policy": slightly_better, "he": base}).verdict().startswith(
        "the policy is not distinguishable from the best baseline (he) on auc_loss: +")
    # accuracy-like scores: higher is better, so the same numbers read the other way round
    verdict = _report({"policy": worse, "he": base, "low": [0.1] * 5}, direction="maximize").verdict()
    gain, half = _expected(worse, base, -1.0)
    assert gain - half > 0 and verdict.startswith("the policy beats the best baseline (he) by ")


def test_a_policy_that_diverged_on_a_seed_beats_nothing_and_pairs_skip_that_seed() -> None:
    import math

    policy = [0.40, math.nan, 0.41, 0.39, 0.40]
    report = _report({"policy": policy, "he": [0.60, 0.61, 0.58, 0.62, 0.60]})
    report.results[0].curves = [type("C", (), {"diverged": math.isnan(s), "val_loss": []})() for s in policy]
    verdict = report.verdict()
    assert verdict.startswith("the policy does NOT beat the best baseline (he): it diverged on 1/5 fresh seeds")
    assert "over 4 seeds" in verdict
    table = report.table()
    half = float(table.loc[table.contender == "he", "auc_loss_ci95"].iloc[0])
    he = np.array([0.60, 0.61, 0.58, 0.62, 0.60])
    assert half == pytest.approx(T975[4] * he.std(ddof=1) / np.sqrt(5))


def _with_final_val_losses(report, finals: dict[str, list[float]]):
    """Give each contender of a planted report curves that end at these validation losses."""
    from initsearch.proxy.train import Curve

    for r in report.results:
        r.curves = [Curve(train_loss=np.zeros(1), val_steps=[100], val_loss=[v], val_acc=[0.5]) for v in finals[r.name]]
    return report


def test_a_policy_that_is_a_baseline_is_compared_with_the_other_baselines() -> None:
    lsuv = [0.50, 0.52, 0.49, 0.51, 0.50]
    planted = {"policy": lsuv, "lsuv": lsuv, "he": [0.60, 0.61, 0.58, 0.62, 0.60]}
    report = _report(planted)
    assert report.verdict().startswith("the policy is not distinguishable from the best baseline (lsuv)")
    report.is_baseline = "lsuv"
    gain, half = _expected(lsuv, planted["he"], +1.0)
    assert report.verdict().startswith("the policy is the baseline lsuv (its provenance says so), so it is compared "
                                       "with the other baselines: the policy beats the best baseline (he) by ")
    assert f"paired gain {gain:+.3g} ± {half:.2g}" in report.verdict()
    alone = _report({"policy": lsuv, "lsuv": lsuv})
    alone.is_baseline = "lsuv"
    assert alone.verdict().endswith("no baseline finished: nothing to compare the policy with")


def test_run_validation_knows_a_baseline_by_the_policys_provenance() -> None:
    from dataclasses import replace

    from initsearch.contenders.baselines import contender_policy
    from initsearch.search.settings import settings_from_config
    from initsearch.validate import run_validation

    settings = settings_from_config(compose_config([*TINY, "baselines=[he,xavier]", "progress=false"]))
    settings = replace(settings, batch_trials=1)
    he = contender_policy("he").with_provenance(kind="he", study="s", trial=0)
    report = run_validation(settings, he, seeds=2, steps=10)
    assert report.is_baseline == "he"
    rows = report.table().set_index("contender")
    assert rows.loc["policy", "auc_loss_mean"] == rows.loc["he", "auc_loss_mean"]  # the same init, the same runs
    assert "(he)" not in report.verdict() and "the best baseline (xavier)" in report.verdict()
    searched = contender_policy("he").with_provenance(kind="search", study="s", trial=3)
    assert run_validation(settings, searched, seeds=1, steps=10).is_baseline is None


def test_the_verdict_says_when_the_policy_ends_worse_on_the_validation_data() -> None:
    """A policy that lowers the training loss faster (the score) but ends with a worse validation loss than
    the best baseline there, over the whole interval, gets a second sentence; within the interval, none."""
    fast = [0.30, 0.31, 0.29, 0.30, 0.32]
    planted = {"policy": fast, "he": [0.60, 0.61, 0.58, 0.62, 0.60], "xavier": [0.70, 0.71, 0.69, 0.72, 0.70]}
    overfit = {"policy": [1.10, 1.20, 1.15, 1.25, 1.18], "he": [0.60, 0.58, 0.61, 0.57, 0.60],
               "xavier": [0.55, 0.56, 0.54, 0.57, 0.55]}
    verdict = _with_final_val_losses(_report(planted), overfit).verdict()
    gain, half = _expected(overfit["policy"], overfit["xavier"], +1.0)
    assert verdict.startswith("the policy beats the best baseline (he)")
    assert verdict.endswith(f". But on the validation data it ends worse: final validation loss "
                            f"{np.mean(overfit['policy']):.4g} against xavier's {np.mean(overfit['xavier']):.4g} "
                            f"(paired {gain:+.3g} ± {half:.2g}): it fits the training data faster and generalizes worse")
    close = {**overfit, "policy": [0.50, 0.62, 0.54, 0.60, 0.58]}  # mean 0.568 against 0.554: inside the interval
    assert "validation data" not in _with_final_val_losses(_report(planted), close).verdict()
    for metric in ("final_val_loss", "val_acc_at_budget"):  # scores read on the validation data themselves
        scored_there = _with_final_val_losses(_report(planted), overfit)
        scored_there.metric = metric
        assert "validation data" not in scored_there.verdict()
    slow = {**planted, "policy": [0.80, 0.81, 0.79, 0.80, 0.82]}  # worse on the score too: no "But"
    verdict = _with_final_val_losses(_report(slow), overfit).verdict()
    assert verdict.startswith("the policy is worse than the best baseline (he)") and "validation data" not in verdict


def test_batch_trials_trains_the_contenders_of_a_seed_together_with_the_same_results(monkeypatch):
    """Every contender of a seed in one stacked population: the same table as one at a time (float rounding)."""
    import dataclasses

    from initsearch.init.policy import InitPolicy
    from initsearch.search.settings import settings_from_config
    from initsearch.validate import run_validation

    settings = settings_from_config(compose_config([*TINY, "baselines=[he,xavier,lecun]", "progress=false"]))
    policy = InitPolicy.from_dict({"format": "initsearch-policy", "version": 1, "rules": [],
                                   "default": {"scheme": "orthogonal"}})
    seen = spy_populations(monkeypatch)
    alone = run_validation(settings, policy, seeds=2, steps=30)
    assert seen == []
    together = run_validation(dataclasses.replace(settings, batch_trials=4), policy, seeds=2, steps=30)
    assert seen == [("stacked", 4), ("stacked", 4)]  # policy + 3 baselines, on each of the 2 seeds
    assert [r.name for r in together.results] == [r.name for r in alone.results] == ["policy", "he", "xavier", "lecun"]
    for a, b in zip(alone.results, together.results):
        assert a.seeds == b.seeds
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-4)
        np.testing.assert_allclose(b.final_acc, a.final_acc, atol=1.5 / 48)
    assert together.verdict().split(":")[0] == alone.verdict().split(":")[0]


@pytest.mark.parametrize(("given", "populations"), [([], [("stacked", 3)] * 2), (["batch_trials=1"], []),
                                                    (["batch_trials=2"], [("stacked", 2)] * 2)])
def test_validate_trains_a_seeds_contenders_together_unless_told(in_tmp, monkeypatch, given, populations):
    """The command's default is ``batch_trials=auto`` whatever the study's (its search's rounds are not
    validate's business): the policy and 2 baselines of a seed in one population; ``batch_trials=K`` as given."""
    seen = spy_populations(monkeypatch)
    code = main([f"policy={orthogonal_policy(in_tmp)}", "seeds=2", "steps=10", f"out={in_tmp / 'v'}", *TINY, *given,
                 "tracking_uri=none", "progress=false"])
    assert code == 0
    assert seen == populations  # (batch_trials=2: the policy and he together, then xavier alone on each seed)


def test_validate_policy_from_python_trains_together_unless_told(monkeypatch):
    """``initsearch.validate_policy`` has the command's default, and takes ``batch_trials`` as a setting."""
    import torch
    from torch import nn

    import initsearch

    seen = spy_populations(monkeypatch)
    g = torch.Generator().manual_seed(0)
    data = ((torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)),
            (torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)))
    policy = {"format": "initsearch-policy", "version": 1, "rules": [], "default": {"scheme": "orthogonal"}}
    net = lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))  # noqa: E731
    common = dict(seeds=1, steps=6, overrides=["baselines=[he]", "train.eval_every=3", "progress=false",
                                               "tracking_uri=none"])
    initsearch.validate_policy(policy, net, data, **common)
    assert len(seen) == 1 and seen[0][1] == 2  # the policy and he in one population
    seen.clear()
    initsearch.validate_policy(policy, net, data, batch_trials=1, **common)
    assert seen == []


def test_a_fixed_batch_trials_is_capped_at_what_fits_on_cuda_for_the_full_size_target(monkeypatch):
    """validate trains the full-size target: a K sized for the proxy is capped at what the free memory holds
    (``fit_memory``); the study's own rounds keep the K asked for, and the CPU is not capped."""
    import dataclasses

    import torch
    from torch import nn

    import initsearch.search.trial as trial_mod
    from initsearch.search.settings import settings_from_config

    settings = dataclasses.replace(settings_from_config(compose_config(TINY)), batch_trials=8)
    data = trial_mod.prepare(settings).data
    monkeypatch.setattr(trial_mod, "fresh_model", lambda *a, **k: nn.Linear(2, 2))  # no CUDA needed here
    monkeypatch.setattr(trial_mod, "auto_population_size", lambda *a, **k: 3)  # "3 fit in the free memory"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert trial_mod.population_size(settings, settings.model, data, cuda) == 8
    assert trial_mod.population_size(settings, settings.model, data, cuda, fit_memory=True) == 3
    assert trial_mod.population_size(settings, settings.model, data, cpu, fit_memory=True) == 8
    two = dataclasses.replace(settings, batch_trials=2)
    assert trial_mod.population_size(two, settings.model, data, cuda, fit_memory=True) == 2
    one = dataclasses.replace(settings, batch_trials=1)
    assert trial_mod.population_size(one, settings.model, data, cuda, fit_memory=True) == 1


@pytest.mark.parametrize(("threads", "batch_trials", "trainer", "runs"), [
    (1, "1", "train_run", 4), (2, "1", "train_run", 4),  # the policy and he, on 2 seeds
    (1, "auto", "train_population", 2),  # the default: one population of the two per seed
])
def test_validate_trains_on_the_thread_count_it_is_given(in_tmp, monkeypatch, threads, batch_trials, trainer, runs):
    """``threads=N`` applies to validate's training as to a study's (it was once read and ignored), one at a
    time or together, and the caller's count is back afterwards."""
    import torch

    import initsearch.search.trial as trial_module

    seen = []
    real = getattr(trial_module, trainer)

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(trial_module, trainer, spy)
    before = torch.get_num_threads()
    other = 3 if threads != 3 else 4
    torch.set_num_threads(other)
    try:
        code = main([f"policy={orthogonal_policy(in_tmp)}", "seeds=2", "steps=10", f"out={in_tmp / 'v'}", *TINY,
                     f"batch_trials={batch_trials}", "tracking_uri=none", "baselines=[he]", f"threads={threads}",
                     "progress=false"])
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(before)
    assert code == 0
    assert seen == [threads] * runs


def test_validate_auto_threads_times_the_full_size_target_on_every_core(in_tmp, monkeypatch):
    """``threads=auto`` measures the model validate trains (``width_multiplier=1``, not the search's proxy),
    on the cores of this machine (validate runs alone: the study's ``n_workers`` do not share them), when
    the steps it plans are enough to pay for the measurement."""
    import initsearch.search.threads as threads_module

    timed = []

    def fake(settings, proxy, n, **kwargs):
        timed.append((n, settings.model["width_multiplier"], settings.n_workers))
        return 1.0 / n

    monkeypatch.setattr(threads_module, "time_proxy", fake)
    monkeypatch.setattr(threads_module.os, "sched_getaffinity", lambda pid: {0, 1})
    args = [f"policy={orthogonal_policy(in_tmp)}", "seeds=2", f"out={in_tmp / 'v'}", *TINY, "tracking_uri=none", "baselines=[he]",
            "threads=auto", "progress=false", "model.width_multiplier=0.5", "n_workers=2"]
    assert main([*args, "steps=10"]) == 0  # 40 steps planned: not worth measuring
    assert timed == []
    assert main([*args, "steps=800"]) == 0  # 2 contenders x 2 seeds x 800 steps: measured
    assert timed == [(1, 1.0, 1), (2, 1.0, 1)]


def test_the_validation_figure_names_each_contenders_score_in_its_legend() -> None:
    """The training-loss panel is log-scaled; the legend carries the score the verdict ranks by."""
    from initsearch.proxy.train import Curve
    from initsearch.tracking.plots import pyplot
    from initsearch.validate import plot_validation

    report = _report({"policy": [0.31, 0.29], "he": [0.47, 0.48]})
    for r in report.results:
        r.curves = [Curve(train_loss=np.linspace(2.0, 0.1, 100), val_steps=[50, 100], val_loss=[0.9, 0.6],
                          val_acc=[0.5, 0.7]) for _ in r.scores]
    fig = plot_validation(report)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["policy: auc_loss 0.3", "he: auc_loss 0.475"]
    assert legend.get_title().get_text() == "auc_loss, mean over seeds (lower is better)"
    pyplot().close(fig)
