"""``python -m initsearch [overrides]`` and the ``initsearch`` console script.

Every failure is one line on stderr (``verbose=true`` adds the traceback): a config Hydra cannot compose
(unknown preset, bad override syntax, unknown key: with the closest known key) exits with 2 before Hydra
starts; errors in what the user gave with 2; anything unexpected with 1; a stop by SIGINT/SIGTERM with
130/143. A failure before anything was written leaves no output folder behind. ``--help``/``-h`` prints
the tool's help (``conf/config.yaml``, ``hydra.help``); ``--hydra-help`` Hydra's own.
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from initsearch.cli import (
    compose_problem,
    config_dir,
    remove_unused_output_dir,
    report_error,
    report_unexpected,
    run,
    with_custom_groups,
)
from initsearch.errors import (
    InitSearchError,
    StudyInterrupted,
    exit_quietly_on_broken_pipe,
    exit_without_teardown,
    wants_help,
)

# Hydra's flags that take a value (the next argument), left out when the overrides are checked.
FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> None:
    verbose = bool(cfg.get("verbose", False))
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        run(cfg, out_dir)
    except StudyInterrupted as exc:
        if verbose:
            import traceback

            traceback.print_exception(exc)
        sys.exit(exc.exit_status)
    except InitSearchError as exc:
        remove_unused_output_dir(out_dir)
        sys.exit(report_error(exc, verbose))
    except Exception as exc:
        remove_unused_output_dir(out_dir)
        sys.exit(report_unexpected(exc, verbose))


def overrides_of(args: list[str]) -> list[str]:
    """The ``key=value`` overrides among the arguments (Hydra's flags and their values left out)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def main() -> None:
    def start() -> None:
        sys.argv[1:] = with_custom_groups(sys.argv[1:])  # Hydra reads sys.argv itself
        args = sys.argv[1:]
        sweep = any(arg in ("-m", "--multirun") for arg in args)  # seed=0,1 is a sweep there: Hydra checks it
        problem = None if sweep else compose_problem(overrides_of(args))
        if problem is not None and wants_help(args):
            sys.argv = [sys.argv[0], "--help"]  # the help, whatever else the command line says
        elif problem is not None:
            print(f"initsearch: error: {problem}", file=sys.stderr)
            sys.exit(2)
        _app()

    exit_quietly_on_broken_pipe(start)


def program() -> None:
    """The console script and ``python -m initsearch``: ``main``, then exit without the interpreter's
    teardown (``errors.exit_without_teardown``)."""
    exit_without_teardown(main)


if __name__ == "__main__":
    program()
