"""``python -m initsearch [overrides]`` and the ``initsearch`` console script.

Every failure is one line on stderr (``verbose=true`` adds the traceback): a config Hydra cannot compose
(unknown preset, bad override syntax, unknown key) exits with 2 before Hydra starts; errors in what the
user gave with 2; anything unexpected with 1; a stop by SIGINT/SIGTERM with 130/143.
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from initsearch.cli import config_dir, report_error, report_unexpected, run, with_custom_groups
from initsearch.errors import InitSearchError, StudyInterrupted


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> None:
    verbose = bool(cfg.get("verbose", False))
    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except StudyInterrupted as exc:
        if verbose:
            import traceback

            traceback.print_exception(exc)
        sys.exit(exc.exit_status)
    except InitSearchError as exc:
        sys.exit(report_error(exc, verbose))
    except Exception as exc:
        sys.exit(report_unexpected(exc, verbose))


def compose_problem(args: list[str]) -> str | None:
    """Why Hydra cannot compose the config of these command-line overrides, in one line, or ``None``.

    Hydra would print several lines and exit with 1. Arguments with Hydra flags (``--cfg``, ``-m``,
    ``--help``...) are left to Hydra itself.
    """
    if any(arg.startswith("-") for arg in args):
        return None
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="initsearch"):
            compose(config_name="config", overrides=list(args), return_hydra_config=True)
    except Exception as exc:
        return _one_line(exc, args)
    return None


def _one_line(exc: BaseException, args: list[str]) -> str:
    """Hydra's message, its detail lines joined, search paths and hints left out; the offending override
    named when Hydra does not say which one it could not parse."""
    from hydra.errors import OverrideParseException

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, OverrideParseException):
        bad = next((arg for arg in args if _unparsable(arg)), None)
        return f"override {bad!r}: {lines[0] if lines else exc}" if bad else (lines[0] if lines else str(exc))
    kept, options = [], []
    section = "message"
    for line in lines:
        if line.startswith(("Config search path", "See https://", "Set the environment variable")):
            break
        if line.startswith("Available options"):
            section = "options"
            continue
        if line.startswith(("full_key:", "object_type", "reference_type", "provider=")):
            continue
        (options if section == "options" else kept).append(line)
    text = "; ".join(kept) or type(exc).__name__
    return text + (f" (available: {', '.join(options)})" if options else "")


def _unparsable(arg: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([arg])
    except Exception:
        return True
    return False


def main() -> None:
    sys.argv[1:] = with_custom_groups(sys.argv[1:])  # Hydra reads sys.argv itself
    problem = compose_problem(sys.argv[1:])
    if problem is not None:
        print(f"initsearch: error: {problem}", file=sys.stderr)
        sys.exit(2)
    _app()


if __name__ == "__main__":
    main()
