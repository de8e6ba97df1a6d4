"""The selection stage: after the search, before export, judge the front-runners on seeds nobody searched.

A search picks its best trial on the study's few evaluation seeds, so the best score is partly luck (the
winner's curse). Here the ``select.top_k`` best complete searched trials and the ``select.baselines`` best
baselines train again, from scratch, on ``select.seeds`` new seeds (``seed * 1000 + 500 + i``: neither the
search's ``seed * 1000 + i`` nor ``validate``'s fresh seeds), every candidate on the same seeds, for
``select.steps`` steps (the search's by default). The exported policy is the candidate that diverged on the
fewest new seeds, then with the best mean over all its evidence: its search seeds and these, or these alone
when ``select.steps`` is another budget (scores at different budgets do not mix; a longer one sees a policy
diverge or be overtaken late). The summary reports the chosen policy's paired gain over the best baseline
on the selection seeds, with its 95% confidence interval. When no searched candidate beats the baselines on
that evidence, a baseline is exported, and the summary says so. The candidates of a seed train together as
one population (``select.batch_trials``, ``auto`` by default: they share the seed, so one batch per step
serves them all), which gives the curves of one at a time up to float rounding; ``1`` trains them one at a time.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from initsearch.contenders.baselines import contender_policy
from initsearch.init.policy import InitPolicy
from initsearch.proxy.scoring import interval, paired_gains, score_or_nan
from initsearch.search.outcome import trial_score
from initsearch.search.settings import StudySettings
from initsearch.search.trial import Proxy, population_size, train_contenders

SELECTION_SEED_OFFSET = 500  # seed * 1000 + 500 + i: past the search's seed * 1000 + i (i < score.seeds)


@dataclass
class Candidate:
    """One front-runner: its trial, what it is, and its scores (search seeds, then selection seeds)."""

    number: int
    kind: str  # "search" or the baseline's name
    search_scores: list[float]
    scores: list[float] = field(default_factory=list)  # on the selection seeds, NaN where it diverged
    search_counts: bool = True  # False when the selection trains at another budget than the search

    @property
    def evidence(self) -> list[float]:
        """Every finite score it has: the search's seeds (when at the selection's budget) and the selection's."""
        return [s for s in [*(self.search_scores if self.search_counts else []), *self.scores] if math.isfinite(s)]

    def mean(self) -> float:
        return statistics.fmean(self.evidence) if self.evidence else math.nan

    @property
    def diverged(self) -> int:
        """The selection seeds on which it diverged (no score)."""
        return sum(not math.isfinite(s) for s in self.scores)


def best_first(direction: str) -> Callable[[Candidate], tuple[int, float]]:
    """A sort key, best candidate first: fewer diverged selection seeds (a run that diverges is worse than
    any score, not a seed left out), then the better mean (none: last)."""
    sign = -1.0 if direction == "maximize" else 1.0
    def key(c: Candidate) -> tuple[int, float]:
        mean = c.mean()
        return c.diverged, sign * mean if math.isfinite(mean) else math.inf
    return key


@dataclass
class Selection:
    """What the stage found: the candidates, the chosen one, and the chosen one against the best baseline."""

    metric: str
    direction: str
    seeds: list[int]
    candidates: list[Candidate]
    chosen: Candidate
    best_baseline: Candidate | None
    gain: float  # paired, on the selection seeds (positive: the chosen one is better); NaN without a baseline
    half_width: float  # of its 95% confidence interval
    seconds: float
    steps: int  # training steps on the selection seeds
    search_steps: int  # the search's; when they differ only the selection seeds count

    def table(self) -> pd.DataFrame:
        """``selection.csv``: one row per candidate, best first, with its mean over the evidence the choice used,
        its scores on the selection seeds (space-separated, ``nan`` where it diverged), how many diverged,
        and which one was exported; the run folder and MLflow's parent run keep it."""
        return pd.DataFrame([{
            "trial": c.number, "kind": c.kind, "exported": c is self.chosen, f"{self.metric}_mean": c.mean(),
            "diverged": c.diverged, "selection_scores": " ".join(f"{s:.6g}" for s in c.scores),
            "search_scores_counted": c.search_counts, "steps": self.steps,
        } for c in sorted(self.candidates, key=best_first(self.direction))])

    def describe(self) -> str:
        """The summary's lines: each candidate's mean over all its evidence, the choice, the paired gain."""
        other_budget = self.steps != self.search_steps
        lines = [f"selection: the top {sum(c.kind == 'search' for c in self.candidates)} searched trials and "
                 f"{sum(c.kind != 'search' for c in self.candidates)} best baselines again on "
                 f"{len(self.seeds)} new seeds"
                 + (f" at {self.steps} steps, not the search's {self.search_steps}" if other_budget else "")
                 + f" ({self.seconds:.1f} s); mean {self.metric} over "
                 + ("these seeds (the search's scores, at another budget, do not count):" if other_budget
                    else "all their seeds:")]
        for c in sorted(self.candidates, key=best_first(self.direction)):
            mark = " <- exported" if c is self.chosen else ""
            mean = "diverged on every new seed" if not c.evidence else f"{c.mean():.4g}"
            if c.diverged and c.evidence:
                mean += f" (diverged on {c.diverged} of {len(c.scores)} new seeds)"
            lines.append(f"  trial {c.number} ({c.kind}): {mean}{mark}")
        if self.best_baseline is None:
            return "\n".join(lines)
        if self.chosen.kind != "search":
            lines.append(f"no searched policy beats the best baseline on all the evidence: the exported policy is "
                         f"the baseline {self.chosen.kind} (trial {self.chosen.number})")
        else:
            verdict = ("better" if self.gain - self.half_width > 0 else
                       "worse" if self.gain + self.half_width < 0 else "not distinguishable")
            lines.append(f"exported trial {self.chosen.number} vs {self.best_baseline.kind} on the selection seeds: "
                         f"paired gain {self.gain:+.3g} ± {self.half_width:.2g} (95% CI; {verdict})")
        return "\n".join(lines)


def selection_seeds(settings: StudySettings) -> list[int]:
    """The seeds the selection stage trains on: new to the search and to ``validate``."""
    return [settings.seed * 1000 + SELECTION_SEED_OFFSET + i for i in range(settings.select.seeds)]


def front_runners(study: optuna.Study, settings: StudySettings) -> list[tuple[FrozenTrial, str]]:
    """The ``top_k`` best complete searched trials with distinct policies (a policy scored more than once
    counts once, as its best-scoring trial; re-proposals, ``duplicate_of``, never) and the ``baselines`` best
    complete baselines, with kinds."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and trial_score(t) is not None]
    best_first = sorted(complete, key=trial_score, reverse=settings.score.direction == "maximize")
    searched, seen = [], set()
    for t in best_first:  # distinct policies only: a re-proposal (``duplicate_of``) repeats its twin's score
        policy = t.user_attrs.get("policy")
        key = json.dumps(policy, sort_keys=True)
        if t.user_attrs.get("baseline") or not policy or t.user_attrs.get("duplicate_of") is not None or key in seen:
            continue
        seen.add(key)
        searched.append(t)
    baselines = [t for t in best_first if t.user_attrs.get("baseline")]
    return ([(t, "search") for t in searched[: settings.select.top_k]]
            + [(t, t.user_attrs["baseline"]) for t in baselines[: settings.select.baselines]])


def run_selection(settings: StudySettings, proxy: Proxy, study: optuna.Study) -> Selection | None:
    """Train the front-runners on the selection seeds and choose the one to export; ``None`` when the stage is
    off (``select.top_k=0``), the study searches architectures too (each trial its own network), or there
    is nothing to choose between."""
    if settings.select.top_k == 0 or settings.space.arch is not None:
        return None
    runners = front_runners(study, settings)
    if len(runners) < 2:
        return None
    started = time.perf_counter()
    seeds = selection_seeds(settings)
    steps = settings.select.steps or settings.train.steps
    train = replace(settings.train, steps=steps)
    candidates, contenders = [], []
    for trial, kind in runners:
        candidates.append(Candidate(trial.number, kind, [float(s) for s in trial.user_attrs.get("seed_scores") or []],
                                    search_counts=steps == settings.train.steps))
        baseline = None if kind == "search" else kind
        contenders.append((InitPolicy.from_dict(trial.user_attrs["policy"]) if baseline is None
                           else contender_policy(baseline, settings.pretrained), baseline))
    together = population_size(settings, settings.model, proxy.data, proxy.device, "candidate(s) trained at once",
                               key="select.batch_trials", value=settings.select.batch_trials,
                               level=logging.DEBUG)  # (the stage's own summary follows; its default is quiet)
    for seed in seeds:  # every candidate on one seed, together when select.batch_trials > 1
        curves = train_contenders(settings.model, proxy.data, proxy.device, contenders, seed, train,
                                  proxy.example_x, proxy.discovery, together=together)
        for candidate, curve in zip(candidates, curves, strict=True):
            candidate.scores.append(score_or_nan(curve, settings.score.metric, budget=steps,
                                                 target_acc=settings.score.target_acc))
    rank = best_first(settings.score.direction)
    chosen = min(candidates, key=rank)  # ties (every candidate diverged everywhere): the search's best
    baselines = [c for c in candidates if c.kind != "search"]
    best_baseline = min(baselines, key=rank) if baselines else None
    gain, half = math.nan, math.nan
    if best_baseline is not None and chosen is not best_baseline:
        gain, half = interval(paired_gains(chosen.scores, best_baseline.scores, settings.score.direction))
    return Selection(settings.score.metric, settings.score.direction, seeds, candidates, chosen, best_baseline,
                     gain, half, time.perf_counter() - started, steps, settings.train.steps)

