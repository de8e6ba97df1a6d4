"""Validate a policy on the full-size target, on fresh seeds, for longer than the search looked.

    python -m initsearch.validate policy=PATH [study=...] [seeds=5] [steps=N] [out=DIR] [subset=N] [overrides...]

Trains the target model (the study's model at ``width_multiplier=1``) from the policy and from every baseline
of the study, over ``seeds`` seeds none of which the search used, for ``steps`` steps (default 5x the search's),
and reports per contender: mean +- std of the study's score at that budget, steps to the target accuracy,
validation accuracy at the end. It prints the table, saves ``validation.csv`` and ``validation.png`` (mean curves
with their spread), logs all of it to MLflow under a validation parent run, and says plainly whether the policy
beats the best baseline, by the paired difference over the seeds and its 95% confidence interval. With
``batch_trials=K`` the contenders of a seed train K at a time as one population (by default ``auto``: K for
the model and device; ``1``: one at a time).
"""
from __future__ import annotations

import logging
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf, open_dict

from initsearch.contenders.baselines import contender_policy
from initsearch.errors import ConfigError, InitSearchError, PolicyError
from initsearch.init.policy import UNMATCHED_RULE_HINT, CheckpointRef, InitPolicy, load_policy
from initsearch.proxy.data import Dataset
from initsearch.proxy.losses import resolve_loss
from initsearch.proxy.scoring import interval, paired_gains, score_or_nan
from initsearch.proxy.train import Curve
from initsearch.search.progress import Steps
from initsearch.search.settings import StudySettings, settings_from_config
from initsearch.search.study import network
from initsearch.search.threads import choose_threads, use_threads
from initsearch.search.trial import population_size, prepare, train_contenders

log = logging.getLogger("initsearch")

STUDY_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")  # a provenance's study name validate takes as its own
FRESH_SEED_OFFSET = 1_000_000  # the search scores on seed*1000 + i (i < score.seeds): these never collide
POLICY = "policy"


@dataclass
class ContenderResult:
    """One contender (the policy, or a baseline) over every validation seed."""

    name: str
    seeds: list[int] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # nan for a diverged seed
    steps_to_target: list[int | None] = field(default_factory=list)
    final_acc: list[float] = field(default_factory=list)

    @property
    def diverged(self) -> int:
        return sum(1 for c in self.curves if c.diverged)

    def add(self, seed: int, curve: Curve, metric: str, budget: int, target_acc: float) -> None:
        """Record one seed's run: its curve, score (nan when it did not train), steps to ``target_acc`` and
        final validation accuracy."""
        self.seeds.append(seed)
        self.curves.append(curve)
        self.scores.append(score_or_nan(curve, metric, budget=budget, target_acc=target_acc))
        self.steps_to_target.append(_steps_to_target(curve, target_acc))
        self.final_acc.append(curve.val_acc[-1] if curve.val_acc else math.nan)

    @property
    def final_val_losses(self) -> list[float]:
        """Per seed, the validation loss at the end (nan where it diverged or never validated)."""
        return [c.val_loss[-1] if c.val_loss and not c.diverged else math.nan for c in self.curves]

    def mean_score(self) -> float:
        ok = [s for s in self.scores if math.isfinite(s)]
        return statistics.fmean(ok) if ok else math.nan

    def row(self, metric: str, accuracy: bool = True) -> dict[str, Any]:
        """The table's row; without ``accuracy`` (regression) the final validation loss replaces the
        accuracy columns."""
        ok = [s for s in self.scores if math.isfinite(s)]
        reached = [s for s in self.steps_to_target if s is not None]
        row: dict[str, Any] = {
            "contender": self.name,
            f"{metric}_mean": self.mean_score(),
            f"{metric}_std": statistics.pstdev(ok) if len(ok) > 1 else 0.0,
            f"{metric}_ci95": interval(ok)[1],
        }
        if accuracy:
            accs = [a for a in self.final_acc if math.isfinite(a)]
            row.update({
                "steps_to_target_mean": statistics.fmean(reached) if reached else math.nan,
                "reached_target": f"{len(reached)}/{len(self.seeds)}",
                "final_val_acc_mean": statistics.fmean(accs) if accs else math.nan,
                "final_val_acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            })
        else:
            finals = [c.val_loss[-1] for c in self.curves if c.val_loss and math.isfinite(c.val_loss[-1])]
            row.update({
                "final_val_loss_mean": statistics.fmean(finals) if finals else math.nan,
                "final_val_loss_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            })
        row["diverged"] = f"{self.diverged}/{len(self.seeds)}"
        return row


@dataclass
class ValidationReport:
    metric: str
    direction: str
    steps: int
    seeds: list[int]
    target_acc: float
    results: list[ContenderResult]
    accuracy: bool = True  # whether the study's loss has an accuracy (classification)
    is_baseline: str | None = None  # the baseline the policy is (its provenance's kind): not compared with itself

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([r.row(self.metric, self.accuracy) for r in self.results])

    def verdict(self) -> str:
        """One plain sentence: does the policy beat the best baseline (the best mean on these fresh seeds), by
        the paired difference over the seeds both trained on and its 95% confidence interval (Student's t):
        "beats" only when the whole interval is a gain, "is worse" when it is all a loss, else "not
        distinguishable". A policy that diverged on any seed does not beat anything."""
        policy = next(r for r in self.results if r.name == POLICY)
        baselines = [r for r in self.results
                     if r.name not in (POLICY, self.is_baseline) and math.isfinite(r.mean_score())]
        note = (f"the policy is the baseline {self.is_baseline} (its provenance says so), so it is compared with the "
                "other baselines: " if self.is_baseline else "")
        if not baselines:
            return note + "no baseline finished: nothing to compare the policy with"
        sentence, lost = self._against(policy, baselines)
        return note + sentence + ("" if lost else self._held_out(policy, baselines))

    def _held_out(self, policy: ContenderResult, baselines: list[ContenderResult]) -> str:
        """A second sentence when the score is the training loss's area (``auc_loss``), on which the policy
        did not lose, and it ends with a validation loss worse than the best baseline's there, over the whole
        95% interval: a faster fit of the training data that generalizes worse. Empty otherwise."""
        if self.metric != "auc_loss":
            return ""
        finals = {r.name: [v for v in r.final_val_losses if math.isfinite(v)] for r in baselines}
        ranked = [r for r in baselines if finals[r.name]]
        if not ranked:
            return ""
        best = min(ranked, key=lambda r: statistics.fmean(finals[r.name]))
        gains = paired_gains(policy.final_val_losses, best.final_val_losses, "minimize")
        gain, half = interval(gains)
        if len(gains) < 2 or not gain + half < 0:
            return ""
        ours = statistics.fmean(v for v in policy.final_val_losses if math.isfinite(v))
        return (f". But on the validation data it ends worse: final validation loss {ours:.4g} against "
                f"{best.name}'s {statistics.fmean(finals[best.name]):.4g} (paired {gain:+.3g} ± {half:.2g}): it "
                "fits the training data faster and generalizes worse")

    def _against(self, policy: ContenderResult, baselines: list[ContenderResult]) -> tuple[str, bool]:
        """The verdict's sentence against the best baseline, and whether the policy lost (diverged, or worse)."""
        pick = min if self.direction == "minimize" else max
        best = pick(baselines, key=lambda r: r.mean_score())
        p, b = policy.mean_score(), best.mean_score()
        n = len(self.seeds)
        if not math.isfinite(p):
            return f"the policy does NOT beat the best baseline ({best.name}): it diverged on every one of {n} fresh seeds", True
        gains = paired_gains(policy.scores, best.scores, self.direction)
        gain, half = interval(gains)
        pct = 100.0 * gain / abs(b) if b else math.nan
        paired = (f"paired gain {gain:+.3g} ± {half:.2g} (95% CI) over {len(gains)} seeds; "
                  f"policy {p:.4g}, {best.name} {b:.4g}; {self.steps} steps")
        if policy.diverged:
            return (f"the policy does NOT beat the best baseline ({best.name}): it diverged on "
                    f"{policy.diverged}/{n} fresh seeds ({paired})"), True
        if len(gains) > 1 and gain - half > 0:
            return f"the policy beats the best baseline ({best.name}) by {pct:.1f}% on {self.metric} ({paired})", False
        if len(gains) > 1 and gain + half < 0:
            return f"the policy is worse than the best baseline ({best.name}) by {-pct:.1f}% on {self.metric} ({paired})", True
        return (f"the policy is not distinguishable from the best baseline ({best.name}) on {self.metric}: "
                f"{pct:+.1f}% ({paired})"), False


def _steps_to_target(curve: Curve, target: float) -> int | None:
    return next((s for s, a in zip(curve.val_steps, curve.val_acc) if a >= target), None)


def contender_policies(policy: InitPolicy, baselines: Sequence[str],
                       pretrained: CheckpointRef | None = None) -> dict[str, InitPolicy]:
    return {POLICY: policy, **{name: contender_policy(name, pretrained) for name in baselines}}


def full_size(model_cfg: dict) -> dict:
    """The study's model config at ``width_multiplier=1``: the target validate trains, not the proxy."""
    return {**model_cfg, "width_multiplier": 1.0}


def validation_budget(settings: StudySettings, steps: int | None) -> int:
    """Training steps per run: ``steps``, or 5x the search's."""
    return steps or settings.train.steps * 5


def run_validation(
    settings: StudySettings,
    policy: InitPolicy,
    *,
    seeds: int = 5,
    steps: int | None = None,
    data: Dataset | None = None,
    example: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> ValidationReport:
    """Train the full-size target from the policy and from each baseline over ``seeds`` fresh seeds."""
    if seeds < 1:
        raise ConfigError(f"seeds: must be a whole number >= 1, got {seeds}")
    budget = validation_budget(settings, steps)
    if budget < 1:
        raise ConfigError(f"steps: must be a whole number >= 1, got {steps}")
    target_model = full_size(settings.model)
    train_cfg = replace(settings.train, steps=budget)
    if data is None or example is None or device is None:
        proxy = prepare(replace(settings, model=target_model))
        data, example, device = proxy.data, (proxy.example_x, proxy.example_y), proxy.device
    accuracy = resolve_loss(settings.train.loss, data.y_train).has_accuracy
    fresh = [FRESH_SEED_OFFSET + settings.seed * 1000 + i for i in range(seeds)]
    contenders = contender_policies(policy, settings.baselines, settings.pretrained)
    results = [ContenderResult(name) for name in contenders]
    inits = [(pol, None if name == POLICY else name) for name, pol in contenders.items()]
    together = population_size(settings, target_model, data, device, fit_memory=True)
    progress = Steps(len(contenders) * len(fresh), "training runs", enabled=settings.progress)
    for seed in fresh:  # every contender on one seed, together when batch_trials > 1

        def done(i: int, curve: Curve, seed: int = seed) -> None:
            results[i].add(seed, curve, settings.score.metric, budget, settings.score.target_acc)
            progress.step(f"{results[i].name}, seed {seed}")

        train_contenders(target_model, data, device, inits, seed, train_cfg, example[0], together=together,
                         on_done=done)
    kind = (policy.provenance or {}).get("kind")
    return ValidationReport(settings.score.metric, settings.score.direction, budget, fresh, settings.score.target_acc,
                            results, accuracy, is_baseline=kind if kind in contenders and kind != POLICY else None)


# ---- outputs ---------------------------------------------------------------------------------------------------
def plot_validation(report: ValidationReport) -> Any:
    """Mean training loss (smoothed) and mean validation accuracy per contender, with min-max bands; each
    contender's legend entry carries its score (the mean over seeds), since a log-scaled curve can look best
    late while the score, e.g. the mean loss over every step, ranks it otherwise."""
    from initsearch.tracking.plots import pyplot

    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in report.results:
        full = [c for c in r.curves if len(c.train_loss) == report.steps]
        if full:
            losses = np.stack([_smooth(c.train_loss) for c in full])
            x = np.arange(1, losses.shape[1] + 1)
            width = 2.5 if r.name == POLICY else 1.2
            (line,) = ax_loss.plot(x, losses.mean(0), label=f"{r.name}: {report.metric} {r.mean_score():.4g}", lw=width)
            ax_loss.fill_between(x, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.15)
            steps = full[0].val_steps
            accs = np.array([c.val_acc if report.accuracy else c.val_loss for c in full if c.val_steps == steps])
            ax_acc.plot(steps, accs.mean(0), marker="o", label=r.name, lw=width, color=line.get_color())
            ax_acc.fill_between(steps, accs.min(0), accs.max(0), color=line.get_color(), alpha=0.15)
    ax_loss.set(xlabel="step", ylabel="training loss (mean over seeds, smoothed)", yscale="log", title="training loss")
    if report.accuracy:
        ax_acc.set(xlabel="step", ylabel="validation accuracy", title=f"validation accuracy (target {report.target_acc})")
        ax_acc.axhline(report.target_acc, color="grey", ls=":", lw=1)
    else:
        ax_acc.set(xlabel="step", ylabel="validation loss", yscale="log", title="validation loss")
    ax_loss.legend(fontsize=8, title=f"{report.metric}, mean over seeds ({'lower' if report.direction == 'minimize' else 'higher'} is better)",
                   title_fontsize=8)
    fig.suptitle(f"{len(report.seeds)} fresh seeds, {report.steps} steps; bands = min..max over seeds")
    fig.tight_layout()
    return fig


def _smooth(values: np.ndarray, window: int = 10) -> np.ndarray:
    if len(values) < window:
        return np.asarray(values, dtype=float)
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def log_validation(settings: StudySettings, report: ValidationReport, csv_path: Path, png_path: Path, policy_path: str) -> str | None:
    """A validation parent run in the study's experiment, one child per contender; returns the parent's id."""
    from mlflow.entities import Metric

    from initsearch.tracking.runs import log_in_batches
    from initsearch.tracking.uri import check_reachable, default_artifact_location, open_client, resolve_tracking_uri

    uri = resolve_tracking_uri(settings.tracking_uri)
    if uri is None:
        return None
    if uri.lower().startswith(("http://", "https://")):
        check_reachable(uri)
    client = open_client(uri)
    exp = client.get_experiment_by_name(settings.study_name)
    exp_id = exp.experiment_id if exp else client.create_experiment(settings.study_name, artifact_location=default_artifact_location(uri))
    parent = client.create_run(exp_id, run_name="validation", tags={
        "initsearch.study": settings.study_name, "initsearch.role": "validation", "initsearch.policy": policy_path,
        "initsearch.verdict": report.verdict()[:5000]})
    pid = parent.info.run_id
    now = int(datetime.now().timestamp() * 1000)
    log_in_batches(client, pid, params={"seeds": " ".join(map(str, report.seeds)), "steps": str(report.steps),
                                        "metric": report.metric})
    client.log_artifact(pid, str(csv_path))
    client.log_artifact(pid, str(png_path))
    for r in report.results:
        child = client.create_run(exp_id, run_name=f"validate {r.name}", tags={
            "mlflow.parentRunId": pid, "initsearch.role": "validation", "initsearch.contender": r.name})
        metrics = [Metric(k, float(v), now, 0) for k, v in r.row(report.metric, report.accuracy).items()
                   if isinstance(v, float) and math.isfinite(v)]
        metrics += [Metric(f"seed_score_s{i}", s, now, 0) for i, s in enumerate(r.scores) if math.isfinite(s)]
        full = [c for c in r.curves if len(c.train_loss) == report.steps]
        if full:
            mean = np.stack([c.train_loss for c in full]).mean(0)
            metrics += [Metric("train_loss_mean", float(v), now, i + 1) for i, v in enumerate(mean) if math.isfinite(v)]
        log_in_batches(client, child.info.run_id, metrics=metrics)
        client.set_terminated(child.info.run_id)
    client.set_terminated(pid)
    return pid


# ---- command line ----------------------------------------------------------------------------------------------
OWN_KEYS = ("policy", "seeds", "steps", "out", "subset")


def _split_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    own: dict[str, str] = {}
    overrides: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    return own, overrides


def together_unless_told(settings: StudySettings, overrides: Sequence[str], told: bool = False) -> StudySettings:
    """``batch_trials`` for validating: as given (``told``, or ``batch_trials=`` among ``overrides``), else
    ``auto``: the contenders of a seed share it, so they train together as one population, with the curves
    of one at a time up to float rounding, in less time. (The study's default, one trial at a time, is for
    its search's rounds, of which validating has none.)"""
    told = told or any(o.lstrip("+~").partition("=")[0] == "batch_trials" for o in overrides)
    return settings if told else replace(settings, batch_trials="auto")


def _whole(own: dict[str, str], key: str, default: int | None) -> int | None:
    value = own.get(key)
    if value is None or value == "":
        return default
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{key}: must be a whole number >= 1, got {value!r}")
    return int(value)


def model_file_override(overrides: list[str]) -> tuple[list[str], Path | None]:
    """``model=PATH.yaml`` names a model config file (a joint search's ``best_model.yaml``), not a preset of
    ``conf/model``: taken out of the overrides and returned, to replace the composed ``model``."""
    rest, found = [], None
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key == "model" and value.endswith((".yaml", ".yml")):
            if not Path(value).is_file():
                raise ConfigError(f"model: no model config file {value!r}")
            found = Path(value)
        else:
            rest.append(arg)
    return rest, found


HELP = """\
initsearch.validate: check a policy on the full-size model, on seeds the search never saw, for longer than
the search looked, against every baseline of the study; says plainly whether the policy beats the best one.

Usage: python -m initsearch.validate policy=PATH [study=NAME] [key=value ...]

  policy=PATH       the policy file (best_policy.json of a study, or python -m initsearch.export's)
  study=NAME        the study preset whose model, data and baselines to use (default digits_mlp)
  seeds=N           fresh seeds per contender (default 5)
  steps=N           training steps (default 5x the search's train.steps)
  out=DIR           where validation.csv and validation.png go (default outputs/<study>/validate_<date_time>)
  study_name=NAME   the MLflow experiment and output folder's study (default: the study the policy's
                    provenance names, else the preset's)
  subset=N          train on the first N examples only
  baselines=[...]   the contenders besides the policy (also gradinit, metainit, gradinit_paper, metainit_paper)
  batch_trials=K    train the contenders of a seed K at a time as one population (default auto, whatever
                    the study's config says: K for the model and device; 1 = one at a time; the same
                    curves up to float rounding)
  threads=auto|N    torch threads (auto: measured at start, as for a study)
  any other key=value of python -m initsearch (train.lr=..., tracking_uri=..., verbose=true)

Examples:
  python -m initsearch.validate policy=outputs/digits_mlp/<date_time>/best_policy.json seeds=5
  python -m initsearch.validate policy=policy.json study=cifar_cnn steps=2000 baselines=[he,lsuv,gradinit]
"""


def main(argv: Sequence[str] | None = None) -> int:
    from initsearch.errors import exit_quietly_on_broken_pipe, wants_help

    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        return exit_quietly_on_broken_pipe(lambda: print(HELP, end="") or 0)
    return exit_quietly_on_broken_pipe(lambda: _validate(args))


def for_this_command(message: str, policy: InitPolicy, settings: StudySettings) -> str:
    """A policy error as the command line should say it: it has no ``strict=False`` (``apply_policy``'s way
    past a rule that matches nothing), so the hint is the model the policy's provenance names, when that is
    not the one this command trains."""
    searched_on = (policy.provenance or {}).get("model")
    named, trained = (network(searched_on) if isinstance(searched_on, dict) else None), network(settings.model)
    if named is not None and named != trained:
        hint = (f"the policy was searched on {named} (its provenance), this command trains {trained}: pass "
                + (f"model._target_={named} and its arguments" if searched_on.get("_target_") else f"model={named}"))
    else:
        hint = "fix the name in the policy file"
    return message.replace(UNMATCHED_RULE_HINT, hint)


def _validate(args: list[str]) -> int:
    from hydra import compose, initialize_config_dir

    from initsearch.cli import compose_problem, config_dir, report_error, report_unexpected, with_custom_groups
    from initsearch.tracking.uri import resolve_tracking_uri

    verbose = "verbose=true" in args
    try:
        own, overrides = _split_args(args)
        overrides, model_file = model_file_override(with_custom_groups(overrides))
        problem = compose_problem(overrides, extra_keys=OWN_KEYS)
        if problem is not None:
            raise ConfigError(problem)
        if "policy" not in own:
            raise ConfigError("policy: required (python -m initsearch.validate policy=PATH [study=...] [seeds=N]; --help)")
        policy = load_policy(own["policy"])
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        if model_file is not None:
            with open_dict(cfg):
                cfg.model = OmegaConf.load(model_file)
        searched_in = (policy.provenance or {}).get("study")
        if (isinstance(searched_in, str) and STUDY_NAME.fullmatch(searched_in) and ".." not in searched_in
                and not any(o.lstrip("+~").startswith("study_name=") for o in overrides)):
            cfg.study_name = searched_in  # its MLflow experiment and output folder (a plain name only: a path part)
        settings = together_unless_told(settings_from_config(cfg), overrides)
        subset = _whole(own, "subset", None)
        settings = replace(settings, data={**settings.data, "subset": subset})
        seeds, steps = _whole(own, "seeds", 5), _whole(own, "steps", None)
        resolve_tracking_uri(settings.tracking_uri)  # a store MLflow refuses is one line before any training
        alone = replace(settings, model=full_size(settings.model), n_workers=1)  # what it trains, on every core
        target = prepare(alone)
        planned = (1 + len(settings.baselines)) * seeds * validation_budget(settings, steps)
        threads = choose_threads(alone, target, planned=planned)
        log.info("%s", threads.describe())
        with use_threads(threads):
            try:
                report = run_validation(settings, policy, seeds=seeds, steps=steps, data=target.data,
                                        example=(target.example_x, target.example_y), device=target.device)
            except PolicyError as exc:
                raise PolicyError(for_this_command(str(exc), policy, settings)) from None
        out = Path(own.get("out") or f"outputs/{settings.study_name}/validate_{datetime.now():%Y-%m-%d_%H-%M-%S}")
        out.mkdir(parents=True, exist_ok=True)
        table = report.table()
        csv_path, png_path = out / "validation.csv", out / "validation.png"
        table.to_csv(csv_path, index=False)
        fig = plot_validation(report)
        fig.savefig(png_path, dpi=110)
        run_id = log_validation(settings, report, csv_path, png_path, str(own["policy"]))
    except InitSearchError as exc:
        return report_error(exc, verbose, prefix="initsearch.validate")
    except Exception as exc:
        return report_unexpected(exc, verbose, prefix="initsearch.validate")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False))
    print(report.verdict())
    print(f"wrote {csv_path} and {png_path}" + (f"; MLflow run {run_id}" if run_id else ""))
    return 0


if __name__ == "__main__":
    from initsearch.errors import exit_without_teardown

    exit_without_teardown(main)
