"""Export a trial's init policy as a policy file (``python -m initsearch.export``).

    python -m initsearch.export study_name=digits_mlp [storage=initsearch.journal] [out=policy.json] [trial=N]

Without ``trial`` it exports the best complete trial (a baseline, if one won).
"""
from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from initsearch import __version__
from initsearch.errors import ConfigError, InitSearchError, first_line
from initsearch.init.policy import InitPolicy, save_policy
from initsearch.search.settings import DEFAULT_STORAGE, is_rdb
from initsearch.search.storage import open_storage


def trial_policy(study: optuna.Study, trial: FrozenTrial) -> InitPolicy:
    """The trial's policy, with provenance (study, trial, metric, score, per-seed scores, model, versions)."""
    stored = trial.user_attrs.get("policy")
    if stored is None:
        raise ConfigError(f"trial: trial {trial.number} of study {study.study_name!r} has no policy (state {trial.state.name})")
    provenance: dict[str, Any] = {
        "study": study.study_name,
        "trial": trial.number,
        "kind": trial.user_attrs.get("baseline") or "search",
        "metric": study.user_attrs.get("metric"),
        "direction": study.direction.name.lower(),
        "score": trial.value,
        "seed_scores": trial.user_attrs.get("seed_scores"),
        "seeds": trial.user_attrs.get("seeds"),
        "params": dict(trial.params),
        "model": study.user_attrs.get("model"),
        "data": study.user_attrs.get("data"),
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "initsearch": __version__,
        "torch": torch.__version__.split("+")[0],
    }
    return InitPolicy.from_dict(stored).with_provenance(**provenance)


def pick_trial(study: optuna.Study, number: int | None = None) -> FrozenTrial:
    """The chosen trial, or the best complete one; ``ConfigError`` when there is none."""
    trials = study.get_trials(deepcopy=False)
    if number is not None:
        match = [t for t in trials if t.number == number]
        if not match:
            raise ConfigError(f"trial: study {study.study_name!r} has no trial {number} (it has {len(trials)})")
        if match[0].state not in (TrialState.COMPLETE, TrialState.PRUNED):
            reason = match[0].user_attrs.get("reason")
            raise ConfigError(
                f"trial: trial {number} of study {study.study_name!r} did not finish (state {match[0].state.name}"
                + (f": {reason}" if reason else "") + "); export a complete one"
            )
        return match[0]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise ConfigError(f"trial: study {study.study_name!r} has no complete trial to export")
    return study.best_trial


def export_policy(study: optuna.Study, out: str | Path, trial: int | None = None) -> Path:
    return save_policy(trial_policy(study, pick_trial(study, trial)), out)


def _parse_args(argv: list[str]) -> dict[str, str]:
    known = {"study_name", "storage", "out", "trial"}
    args: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in known:
            raise ConfigError(f"{arg}: expected key=value with key one of {', '.join(sorted(known))}")
        args[key] = value
    if "study_name" not in args:
        raise ConfigError("study_name: required (python -m initsearch.export study_name=NAME [storage=...] [out=...] [trial=N])")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv)
        trial = args.get("trial")
        if trial is not None and not trial.isdigit():
            raise ConfigError(f"trial: must be a trial number, got {trial!r}")
        storage = args.get("storage") or DEFAULT_STORAGE
        if not is_rdb(storage) and not Path(storage).exists():
            raise ConfigError(f"storage: no study storage at {storage!r} (run the study first, or pass storage=...)")
        try:
            study = optuna.load_study(study_name=args["study_name"], storage=open_storage(storage))
        except KeyError:
            raise ConfigError(f"study_name: no study {args['study_name']!r} in {storage}") from None
        path = export_policy(study, args.get("out") or "best_policy.json", None if trial is None else int(trial))
    except InitSearchError as exc:
        print(f"initsearch.export: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"initsearch.export: error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
