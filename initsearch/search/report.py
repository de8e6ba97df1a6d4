"""The end-of-study summary: a pandas table of every trial, led by "best found vs best baseline"."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from initsearch.search.outcome import score_direction, trial_score


@dataclass
class StudySummary:
    """The table (one row per trial, best first) and the headline figures."""

    table: pd.DataFrame
    metric: str
    direction: str
    best: FrozenTrial | None  # best complete trial, baseline or searched
    best_search: FrozenTrial | None
    best_baseline: FrozenTrial | None
    front: list[FrozenTrial] | None = None  # a multi-objective study's Pareto front (score, parameters), smallest first
    # the trial the selection stage chose on new seeds (``selected_trial``), whose policy is exported; None: ``best``
    selected: FrozenTrial | None = None

    @property
    def winner(self) -> FrozenTrial | None:
        """The trial whose policy is exported: the selection stage's choice, else the best score."""
        return self.selected or self.best

    @property
    def improvement_pct(self) -> float | None:
        """How much better the best searched trial is than the best baseline, in percent of the baseline's
        score (positive = better, whatever the direction). ``None`` when either is missing."""
        if self.best_search is None or self.best_baseline is None:
            return None
        found, base = trial_score(self.best_search), trial_score(self.best_baseline)
        if base == 0 or not (math.isfinite(found) and math.isfinite(base)):
            return None
        gain = (base - found) if self.direction == "minimize" else (found - base)
        return 100.0 * gain / abs(base)

    def headline(self) -> str:
        if self.best_search is None or self.best_baseline is None:
            return "best found vs best baseline: n/a (no complete " + ("searched trial)" if self.best_search is None else "baseline)")
        pct = self.improvement_pct
        verdict = "better" if pct is not None and pct > 0 else "not better"
        pct_s = "n/a" if pct is None else f"{pct:+.1f}%"
        return (
            f"best found vs best baseline: {pct_s} ({verdict}) on {self.metric}: "
            f"trial {self.best_search.number} {trial_score(self.best_search):.4g} vs "
            f"{self.best_baseline.user_attrs.get('baseline')} {trial_score(self.best_baseline):.4g}"
        )

    def format(self, top: int = 10) -> str:
        """The headline, the winner's per-seed scores, and the table of the best searched trials plus every baseline."""
        lines = [self.headline()]
        winner = self.winner
        if winner is not None:
            seeds = winner.user_attrs.get("seed_scores") or []
            lines.append(
                f"winner: trial {winner.number} ({_kind(winner)}), {self.metric} per seed: "
                + ", ".join(f"{v:.4g}" for v in seeds)
            )
            if self.best is not None and winner.number != self.best.number:
                lines.append(f"  (the selection stage's choice on new seeds; the best search score is trial "
                             f"{self.best.number} ({_kind(self.best)}), {trial_score(self.best):.4g})")
        t = self.table
        shown = pd.concat([t[t.kind == "search"].head(top), t[t.kind != "search"]]).drop(columns=["reason", "same_as"])
        shown[self.metric] = [_round(v) for v in shown[self.metric]]
        for column in ("seed_mean", "seed_std"):
            shown[column] = [_round(v) for v in shown[column]]
        shown["seconds"] = [format_seconds(v) for v in shown["seconds"]]
        shown["note"] = [f"= trial {int(n)}" if pd.notna(n) else "" for n in t.loc[shown.index, "same_as"]]
        reused = (shown["note"] != "").any()
        if not reused:
            shown = shown.drop(columns="note")
        with pd.option_context("display.width", 160, "display.max_columns", 20, "display.max_colwidth", 48):
            lines.append(shown.to_string(index=False))
        if reused:
            lines.append("= trial N: the sampler proposed trial N's policy again; its score was reused, nothing trained")
        if self.front:
            lines.append(self.describe_front())
        return "\n".join(lines)

    def describe_front(self) -> str:
        """The Pareto front of a multi-objective study, one trial a line, smallest network first."""
        lines = [f"Pareto front ({self.metric} against trainable parameters; no other trial is both smaller and "
                 f"better), {len(self.front)} trial(s):"]
        for t in self.front:
            mark = "  <- best score" if self.best is not None and t.number == self.best.number else ""
            lines.append(f"  trial {t.number} ({_kind(t)}): {int(t.values[1])} parameters, {self.metric} "
                         f"{t.values[0]:.4g}, {_network(t.user_attrs.get('model'))}{mark}")
        return "\n".join(lines)


def _round(value: float | None) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.4g}"


def format_seconds(seconds: float | None) -> str:
    """A duration for people: ``0.03 s``, ``4.2 s``, ``1m10s``, ``2h05m``; empty when unknown."""
    if seconds is None or pd.isna(seconds):
        return ""
    if seconds < 10:
        return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _kind(t: FrozenTrial) -> str:
    return t.user_attrs.get("baseline") or "search"


def _network(model: dict | None) -> str:
    """A trial's network in a few words: its class (or preset) and its shape."""
    if not isinstance(model, dict):
        return "?"
    name = str(model.get("_target_") or model.get("name")).rsplit(".", 1)[-1]
    shape = ", ".join(f"{k} {v}" for k, v in model.items() if k not in ("_target_", "name"))
    return f"{name}({shape})"


def summarize(study: optuna.Study, metric: str) -> StudySummary:
    """The table and the best trials by score; for a multi-objective study (score, parameters) also the
    Pareto front (``study.best_trials``) and an ``n_params`` column."""
    direction = score_direction(study)
    multi = len(study.directions) > 1
    trials = study.get_trials(deepcopy=False)
    rows = []
    for t in trials:
        seeds = [float(v) for v in t.user_attrs.get("seed_scores") or []]
        rows.append(
            {
                "trial": t.number,
                "kind": _kind(t),
                "state": t.state.name.lower(),
                metric: trial_score(t),
                "seed_mean": statistics.fmean(seeds) if seeds else None,
                "seed_std": statistics.pstdev(seeds) if len(seeds) > 1 else (0.0 if seeds else None),
                "seed_scores": " ".join(f"{v:.4g}" for v in seeds),
                "seconds": t.duration.total_seconds() if t.duration else None,
                "same_as": t.user_attrs.get("duplicate_of"),
                "reason": t.user_attrs.get("reason"),
            }
        )
    columns = ["trial", "kind", "state", metric, "seed_mean", "seed_std", "seed_scores", "seconds", "same_as", "reason"]
    if multi:
        for row, t in zip(rows, trials):
            row["n_params"] = t.user_attrs.get("n_params")
        columns.insert(4, "n_params")
    table = pd.DataFrame(rows, columns=columns)
    if multi:
        table["n_params"] = table["n_params"].astype("Int64")
    table["same_as"] = table["same_as"].astype("Int64")
    if not table.empty:
        table["_order"] = table["state"].map({"complete": 0, "pruned": 1, "fail": 2}).fillna(3)
        table = table.sort_values(["_order", metric], ascending=[True, direction == "minimize"], na_position="last")
        table = table.drop(columns="_order").reset_index(drop=True)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and trial_score(t) is not None]

    def best_of(ts: list[FrozenTrial]) -> FrozenTrial | None:
        if not ts:
            return None
        return (min if direction == "minimize" else max)(ts, key=trial_score)

    # the front without re-proposals (a duplicate has its original's values: the original is listed)
    front = (sorted((t for t in study.best_trials if t.user_attrs.get("duplicate_of") is None),
                    key=lambda t: (t.values[1], t.values[0])) if multi else None)
    return StudySummary(
        table=table,
        metric=metric,
        direction=direction,
        best=best_of(front if front else complete),  # the front's best score: ties go to the smaller network
        best_search=best_of([t for t in complete if _kind(t) == "search"]),
        best_baseline=best_of([t for t in complete if _kind(t) != "search"]),
        front=front,
        selected=selected_trial(study),
    )


def selected_trial(study: optuna.Study) -> FrozenTrial | None:
    """The complete trial the selection stage chose for export (``user_attrs["selected_trial"]``), or None."""
    number = study.user_attrs.get("selected_trial")
    if number is None:
        return None
    return next((t for t in study.get_trials(deepcopy=False) if t.number == number and t.state == TrialState.COMPLETE),
                None)
