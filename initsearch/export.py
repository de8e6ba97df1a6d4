"""Export a trial's init policy as a policy file (``python -m initsearch.export``).

    python -m initsearch.export study_name=digits_mlp [storage=initsearch.journal] [out=policy.json] [trial=N] [force=true]
    python -m initsearch.export study_name=deep_mlp portable=true
    python -m initsearch.export list=true [tracking_uri=sqlite:///mlflow.db]

Without ``trial`` it exports the best complete trial (a baseline, if one won); of a multi-objective study
(score and parameters) the Pareto front's trial with the best score (``trial=N`` picks another). A chosen trial must be
complete: a pruned one (its score is partial), a failed or a running one is refused unless ``force=true``.
``portable=true`` writes the policy with role selectors (first / last / residual branch ends / hidden layers
by type and activation), which apply unchanged to a deeper or wider variant of the network, when every layer
of each role got the same init; otherwise it says which role differs and writes nothing.
``list=true`` lists the winners of earlier studies logged to MLflow, with the network each one searched
(depth, activation mix, layer types), to pick ``warm_start`` sources.
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
from initsearch.errors import (
    ConfigError,
    InitSearchError,
    did_you_mean,
    exit_quietly_on_broken_pipe,
    first_line,
    wants_help,
)
from initsearch.init.layers import LayerDiscovery, discover_layers
from initsearch.init.policy import InitPolicy, save_policy
from initsearch.init.portable import portable_policy
from initsearch.proxy.models import build_model
from initsearch.search.outcome import score_direction, trial_score
from initsearch.search.report import format_seconds
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
        "direction": score_direction(study),
        "score": trial_score(trial),
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


def pick_trial(study: optuna.Study, number: int | None = None, force: bool = False) -> FrozenTrial:
    """The chosen trial, or the best complete one; ``ConfigError`` when there is none, or when the chosen one
    is not complete (pruned: a partial score; failed; still running) and ``force`` is not set."""
    trials = study.get_trials(deepcopy=False)
    if number is not None:
        match = [t for t in trials if t.number == number]
        if not match:
            raise ConfigError(f"trial: study {study.study_name!r} has no trial {number} (it has {len(trials)})")
        state = match[0].state
        if state != TrialState.COMPLETE and not (force and match[0].user_attrs.get("policy") is not None):
            reason = match[0].user_attrs.get("reason")
            what = {TrialState.PRUNED: "was pruned (its score is partial)", TrialState.RUNNING: "is still running",
                    TrialState.WAITING: "has not run yet"}.get(state, "did not finish")
            raise ConfigError(
                f"trial: trial {number} of study {study.study_name!r} {what} (state {state.name}"
                + (f": {reason}" if reason else "") + ")"
                + ("; export a complete one, or add force=true" if match[0].user_attrs.get("policy") is not None
                   else "; it has no policy to export")
            )
        return match[0]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise ConfigError(f"trial: study {study.study_name!r} has no complete trial to export")
    selected = study.user_attrs.get("selected_trial")  # what the selection stage chose on new seeds
    chosen = [t for t in complete if t.number == selected]
    if chosen:
        return chosen[0]
    if len(study.directions) == 1:
        return study.best_trial
    front = study.best_trials  # score and parameters: the front's best score (ties: the smaller network)
    pick = min if score_direction(study) == "minimize" else max
    return pick(sorted(front, key=lambda t: t.values[1]), key=trial_score)


def export_policy(study: optuna.Study, out: str | Path, trial: int | None = None, force: bool = False,
                  portable: bool = False) -> Path:
    """Write the trial's policy to ``out``; for a joint search's trial also its network, as ``best_model.yaml``
    in the same folder (a model config: ``validate ... model=<folder>/best_model.yaml``)."""
    return export_trial(study, pick_trial(study, trial, force), out, portable)


# The example shape of the built-in data sets, to rebuild a study's proxy for portable=true.
BUILTIN_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}


def proxy_layers(study: optuna.Study, chosen: FrozenTrial) -> LayerDiscovery:
    """The discovered layers of the network the trial trained (rebuilt from the study's records)."""
    model_cfg = chosen.user_attrs.get("model") or study.user_attrs.get("model")
    data = study.user_attrs.get("data")
    if not isinstance(model_cfg, dict) or data not in BUILTIN_SHAPES:
        raise ConfigError(f"portable: needs the study's network on a built-in data set ({', '.join(BUILTIN_SHAPES)}), "
                          f"got data {data!r}; from Python: initsearch.init.portable.portable_policy(policy, layers)")
    shape = BUILTIN_SHAPES[data]
    model = build_model(model_cfg, shape, 10)
    return discover_layers(model, torch.zeros(2, *shape))


def make_portable(policy: InitPolicy, layers: LayerDiscovery) -> InitPolicy:
    """The role-based form of ``policy``; ``ConfigError`` naming the role whose layers differ."""
    result = portable_policy(policy, layers.layers)
    if result.policy is None:
        raise ConfigError(f"portable: {result.differing[0]}; export without portable=true for per-layer rules")
    return result.policy


def export_trial(study: optuna.Study, chosen: FrozenTrial, out: str | Path, portable: bool = False) -> Path:
    """``export_policy`` of a trial already picked."""
    policy = trial_policy(study, chosen)
    if portable:
        policy = make_portable(policy, proxy_layers(study, chosen))
    path = save_policy(policy, out)
    if chosen.user_attrs.get("model"):
        export_model(chosen.user_attrs["model"], path.parent / "best_model.yaml")
    return path


def export_model(model: dict[str, Any], out: Path) -> Path:
    """A joint trial's network as a Hydra model config (YAML), written next to its policy."""
    from omegaconf import OmegaConf

    header = "# the network of a joint architecture + init search's winner: validate ... model=<this file>\n"
    out.write_text(header + OmegaConf.to_yaml(OmegaConf.create(dict(model))), encoding="utf-8")
    return out


WINNER_COLUMNS = {"study": "initsearch.study", "model": "initsearch.net.model", "depth": "initsearch.net.depth",
                  "activations": "initsearch.net.activations", "layer_types": "initsearch.net.layer_types",
                  "best": "initsearch.best_kind"}


def earlier_winners(tracking_uri: str | None) -> list[dict[str, Any]]:
    """Every finished study's parent run in the MLflow store: its network tags, metric, best score, when it
    ended and where its ``best_policy.json`` is; newest first."""
    from initsearch.tracking.runs import search_all
    from initsearch.tracking.uri import open_client, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri is None:
        raise ConfigError("tracking_uri: list=true reads the MLflow store; tracking is off (none)")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):].partition("?")[0]).is_file():
        raise ConfigError(f"tracking_uri: no MLflow store at {uri} (run a study first, or pass tracking_uri=...)")
    client = open_client(uri)
    rows = []
    for experiment in client.search_experiments():
        for run in search_all(client, experiment.experiment_id, "tags.`initsearch.best_policy` = 'best_policy.json'"):
            tags = run.data.tags
            row: dict[str, Any] = {column: tags.get(tag, "") for column, tag in WINNER_COLUMNS.items()}
            row["metric"] = run.data.params.get("score.metric", "")
            row["score"] = run.data.metrics.get("best_score")
            row["ended"] = datetime.fromtimestamp((run.info.end_time or run.info.start_time) / 1000, UTC).strftime("%Y-%m-%d %H:%M")
            artifacts = run.info.artifact_uri
            row["policy"] = f"{artifacts.removeprefix('file://')}/best_policy.json"  # a local store: a plain path
            rows.append(row)
    return sorted(rows, key=lambda r: r["ended"], reverse=True)


def print_winners(rows: list[dict[str, Any]]) -> None:
    """The winners as a table on stdout, then how to use one as a warm start."""
    import pandas as pd

    if not rows:
        print("no finished study in this MLflow store yet")
        return
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        print(pd.DataFrame(rows).to_string(index=False))
    print("warm start from one: python -m initsearch warm_start=[STUDY] (same storage) or warm_start=[POLICY_FILE]")


HELP = """\
initsearch.export: write the init policy of a trial of a study as a policy file (JSON), with its provenance.

Usage: python -m initsearch.export study_name=NAME [key=value ...]

  study_name=NAME   the study (as python -m initsearch named it: its study preset's name by default)
  storage=URL       where the study is (default ./initsearch.journal; sqlite:///x.db, postgresql://...)
  out=PATH          the file to write (default best_policy.json)
  trial=N           that trial instead of the best complete one
  force=true        export trial=N even when it is not complete (pruned, failed, running)
  portable=true     role selectors (first/last/branch ends/hidden by type and activation) instead of layer
                    names, to apply to deeper or wider variants; refused, naming the role, when a role's
                    layers got different inits
  list=true         list the winners of earlier studies in the MLflow store (tracking_uri=...) instead

Examples:
  python -m initsearch.export study_name=digits_mlp out=policy.json
  python -m initsearch.export study_name=digits_mlp out=policy.json trial=12
  python -m initsearch.export study_name=deep_mlp out=policy.json portable=true
  python -m initsearch.export list=true

Then apply it in your training code: initsearch.apply_policy(model, "policy.json", example_batch=x).
"""
KEYS = ("study_name", "storage", "out", "trial", "force", "portable", "list", "tracking_uri")


def _parse_args(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg}: expected key=value (python -m initsearch.export --help)")
        if key not in KEYS:
            hint = did_you_mean(key, KEYS) or f" (one of {', '.join(KEYS)})"
            raise ConfigError(f"{key}: no such key{hint}")
        args[key] = value
    if args.get("list", "false").lower() not in ("true", "false"):
        raise ConfigError(f"list: must be true or false, got {args['list']!r}")
    if args.get("list", "false").lower() == "true":
        return args
    if "study_name" not in args:
        raise ConfigError("study_name: required (python -m initsearch.export study_name=NAME [storage=...] [out=...] [trial=N])")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        return exit_quietly_on_broken_pipe(lambda: print(HELP, end="") or 0)
    return exit_quietly_on_broken_pipe(lambda: _export(argv))


def _export(argv: list[str]) -> int:
    try:
        args = _parse_args(argv)
        if args.get("list", "false").lower() == "true":
            print_winners(earlier_winners(args.get("tracking_uri")))
            return 0
        trial = args.get("trial")
        if trial is not None and not trial.isdigit():
            raise ConfigError(f"trial: must be a trial number, got {trial!r}")
        force = args.get("force", "false").lower()
        if force not in ("true", "false"):
            raise ConfigError(f"force: must be true or false, got {args['force']!r}")
        portable = args.get("portable", "false").lower()
        if portable not in ("true", "false"):
            raise ConfigError(f"portable: must be true or false, got {args['portable']!r}")
        storage = args.get("storage") or DEFAULT_STORAGE
        if not is_rdb(storage) and not Path(storage).exists():
            raise ConfigError(f"storage: no study storage at {storage!r} (run the study first, or pass storage=...)")
        try:
            study = optuna.load_study(study_name=args["study_name"], storage=open_storage(storage))
        except KeyError:
            raise ConfigError(f"study_name: no study {args['study_name']!r} in {storage}") from None
        chosen = pick_trial(study, None if trial is None else int(trial), force == "true")
        path = export_trial(study, chosen, args.get("out") or "best_policy.json", portable == "true")
    except InitSearchError as exc:
        print(f"initsearch.export: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"initsearch.export: error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return 1
    print(describe_trial(study, chosen))
    print(f"wrote {path}")
    return 0


def describe_trial(study: optuna.Study, trial: FrozenTrial) -> str:
    """One line: which trial, its kind, state, score (and the metric), per-seed scores, how long it took."""
    metric = study.user_attrs.get("metric") or "score"
    kind = trial.user_attrs.get("baseline") or "search"
    value = trial_score(trial)
    score = "no score" if value is None else f"{metric} {value:.4g}"
    if len(trial.values or ()) > 1:
        score += f", {int(trial.values[1])} parameters"
    seeds = trial.user_attrs.get("seed_scores") or []
    parts = [f"trial {trial.number} ({kind}, {trial.state.name.lower()})", score]
    if seeds:
        parts.append("per seed " + " ".join(f"{v:.4g}" for v in seeds))
    if trial.duration is not None:
        parts.append(format_seconds(trial.duration.total_seconds()))
    return " · ".join(parts)


if __name__ == "__main__":
    from initsearch.errors import exit_without_teardown

    exit_without_teardown(main)
