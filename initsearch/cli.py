"""``python -m initsearch [overrides]``: compose the config, run the study, print the summary, export the best.

Errors in what the user gave (a bad override, missing data, an unreachable store) print one line and exit
with status 2; ``verbose=true`` shows the traceback.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from initsearch.config import settings_from_config
from initsearch.errors import InitSearchError
from initsearch.export import export_policy
from initsearch.report import summarize
from initsearch.study import StudyFailed, prepare, run_study


def config_dir() -> str:
    """The config folder: shipped inside the installed package, or ``conf/`` at the root of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"initsearch: no config folder found next to {here}")


def run(cfg: DictConfig, out_dir: str | Path) -> Path:
    """Run the study of ``cfg``; write ``best_policy.json`` and ``trials.csv`` into ``out_dir``; return the policy path."""
    settings = settings_from_config(cfg)
    proxy = prepare(settings)
    from initsearch.tracking import make_tracker

    tracker = make_tracker(settings)
    study = run_study(settings, proxy, tracker, OmegaConf.to_yaml(cfg))
    summary = summarize(study, settings.score.metric)
    if summary.best is None:
        reasons = [r for r in summary.table["reason"].dropna().unique()[:3]]
        raise StudyFailed(
            f"no trial of study {settings.study_name!r} finished: every one failed or was pruned"
            + (f" (e.g. {'; '.join(reasons)})" if reasons else "")
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = export_policy(study, out / "best_policy.json")
    summary.table.to_csv(out / "trials.csv", index=False)
    print(summary.format())
    print(f"best policy: {path.resolve()}")
    tracker.study_finished(study, summary, path)
    return path


def report_error(exc: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(exc)
    print(f"initsearch: error: {exc}", file=sys.stderr)
    return 2
