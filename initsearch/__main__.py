"""``python -m initsearch [overrides]`` and the ``initsearch`` console script.

Every failure is one line on stderr (``verbose=true`` adds the traceback): a config Hydra cannot compose
(unknown preset, bad override syntax, unknown key: with the closest known key) exits with 2 before Hydra
starts; errors in what the user gave with 2; anything unexpected with 1; a stop by SIGINT/SIGTERM with
130/143. A failure before anything was written leaves no output folder behind. ``--help``/``-h`` prints
the tool's help (``conf/config.yaml``, ``hydra.help``); ``--hydra-help`` Hydra's own.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from initsearch.errors import exit_quietly_on_broken_pipe, exit_without_teardown, wants_help

# Hydra's flags that take a value (the next argument), left out when the overrides are checked.
FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun")
# Flags after which no study runs here (help, the config, Hydra's info) or runs as a sweep of several.
NO_STUDY_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--multirun", "-m",
                  "--shell-completion", "-sc")


def app() -> Callable[[], Any]:
    """Hydra's entry point for one study (``cli.run``), built when called: the module itself imports
    neither Hydra nor torch, so that ``program`` can start the MLflow writer before those imports."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from initsearch.cli import bad_input, config_dir, remove_unused_output_dir, report_error, report_unexpected, run
    from initsearch.errors import InitSearchError, StudyInterrupted

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
            remove_unused_output_dir(out_dir, logs=bad_input(exc))
            sys.exit(report_error(exc, verbose))
        except Exception as exc:
            remove_unused_output_dir(out_dir)
            sys.exit(report_unexpected(exc, verbose))

    return _app


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
    from initsearch.cli import compose_problem, with_custom_groups

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
        app()()

    exit_quietly_on_broken_pipe(start)


def may_track(args: list[str]) -> bool:
    """Whether these arguments run one study that may log to MLflow (not a help page, not Hydra's
    ``--cfg``/``--info``, not a sweep, not ``tracking_uri=none``)."""
    if wants_help(args) or any(arg in NO_STUDY_FLAGS for arg in args):
        return False
    # ("none", "off") is tracking.uri.OFF_VALUES, written out: importing that module imports torch and optuna
    return not any(arg.split("=", 1)[1].strip().strip("'\"").lower() in ("none", "off")
                   for arg in args if arg.lstrip("+~").startswith("tracking_uri="))


def program() -> None:
    """The console script and ``python -m initsearch``: start the MLflow writer process when the study may
    track (it imports MLflow on another core meanwhile: ``tracking.delivery.prestart_writer``), then
    ``main``, then exit without the interpreter's teardown (``errors.exit_without_teardown``)."""
    if may_track(sys.argv[1:]):
        from initsearch.tracking.delivery import prestart_writer

        prestart_writer()
    exit_without_teardown(main)


if __name__ == "__main__":
    program()
