"""``python -m initsearch [overrides]``: compose the config, run the study, print the summary, export the best.

Errors in what the user gave (a bad override, missing data, an unreachable store) print one line and exit
with status 2; an unexpected error prints one line and exits with 1; ``verbose=true`` shows the traceback.
SIGINT (Ctrl-C) and SIGTERM end the running trial (recorded failed, "interrupted by ...", and run again
on resume), export the best policy so far, say where, and exit with 130 / 143.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from initsearch.errors import (
    ConfigError,
    DataError,
    DiskFault,
    InitSearchError,
    PolicyError,
    StudyFailed,
    StudyInterrupted,
    did_you_mean,
    first_line,
)
from initsearch.export import export_policy
from initsearch.search.progress import Progress
from initsearch.search.report import StudySummary, selected_trial, summarize
from initsearch.search.selection import run_selection
from initsearch.search.settings import StudySettings, is_rdb, settings_from_config
from initsearch.search.storage import (
    OWN_FILE,
    check_storage_file,
    finished_trials,
    open_storage,
    sqlite_file,
    write_fault,
)
from initsearch.search.study import check_resumable, run_study
from initsearch.search.threads import choose_threads, use_threads
from initsearch.search.trial import prepare
from initsearch.search.workers import StudyLock

log = logging.getLogger("initsearch")
HELPER_STOP_TIMEOUT_S = 120.0  # how long a stopped helper worker may take to record its trial and exit


def config_dir() -> str:
    """The config folder: shipped inside the installed package, or ``conf/`` at the root of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"initsearch: no config folder found next to {here}")


CUSTOM_GROUPS = ("model", "data")  # groups whose ``_target_`` on the command line selects their ``custom`` option


def with_custom_groups(args: Sequence[str]) -> list[str]:
    """The command line with ``model=custom`` (``data=custom``) added in front where ``model._target_=...``
    (``data._target_=...``) is given without a ``model=``/``data=`` choice, and a leading ``+`` dropped from
    such a ``_target_`` (the custom groups have the key). So ``model._target_=pkg.Net`` works exactly as
    typed, on any preset, and the built-in proxy's keys (``depth``, ``channels``...) never reach the class.
    Without ``study_name=``, the study is named after the class and/or function (``custom_study_name``)."""
    out = list(args)
    names = []
    for group in CUSTOM_GROUPS:
        targets = [i for i, a in enumerate(out) if a.lstrip("+").startswith(f"{group}._target_=")]
        chosen = any(a.lstrip("+~").startswith(f"{group}=") for a in out)
        if targets:
            names.append(out[targets[-1]].partition("=")[2].rsplit(".", 1)[-1])
        if not targets or chosen:
            continue
        for i in targets:
            out[i] = out[i].lstrip("+")
        out.insert(targets[0], f"{group}=custom")  # among the overrides (after any --flag of Hydra's)
    if names and not any(a.lstrip("+").startswith("study_name=") for a in out):
        out.append(f"study_name={custom_study_name(names)}")  # not the preset's study, which holds another network
    return out


def custom_study_name(names: Sequence[str]) -> str:
    """The study name of a user's network and/or data: their names joined (``TinyResNet``,
    ``Regressor_diabetes``), so a study of your own never resumes a preset's study of another network."""
    joined = "_".join(re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") for name in names if name)
    return joined.strip("_") or "custom"


@dataclass(frozen=True)
class FinishedStudy:
    """What a finished study command leaves: the exported policy's path, the study, its summary."""

    policy_path: Path
    study: optuna.Study
    summary: StudySummary


def run(cfg: DictConfig, out_dir: str | Path) -> Path | None:
    """Run the study of ``cfg``; write ``best_policy.json`` and ``trials.csv`` into ``out_dir``; return the policy path.

    With ``n_workers=N`` it starts N - 1 helper processes on the same study and waits for them. Raises
    ``StudyFailed`` when no trial finished (nothing is exported), ``StudyInterrupted`` after a SIGINT/SIGTERM
    (the best so far is exported first). ``tracking_only=true`` runs no trial and writes nothing
    (``sync_tracking``).
    """
    settings = settings_from_config(cfg)
    if settings.tracking_only:
        check_storage(settings)
        return sync_tracking(settings, OmegaConf.to_yaml(cfg))
    return run_settings(settings, cfg, out_dir).policy_path


def run_settings(settings: StudySettings, cfg: DictConfig, out_dir: str | Path) -> FinishedStudy:
    """``run`` with settings already made from ``cfg`` (``initsearch.search`` puts the user's objects into
    them); ``cfg`` is what MLflow records and what helper workers start from. An ``InitSearchError`` raised
    once this process has finished a trial carries ``trained = True`` (its run's log is worth keeping)."""
    progress: list[Progress] = []
    try:
        return _run_settings(settings, cfg, out_dir, progress)
    except InitSearchError as exc:
        exc.trained = bool(progress) and progress[0].ran > 0  # type: ignore[attr-defined]
        raise


def _run_settings(settings: StudySettings, cfg: DictConfig, out_dir: str | Path,
                  progress: list[Progress]) -> FinishedStudy:
    check_storage(settings)
    check_output(out_dir)
    with stop_on_signals():
        proxy = prepare(settings)  # a bad model or data is said first
        check_resume(settings)
        threads = choose_threads(settings, proxy)
        log.info("%s", threads.describe())
    with stop_on_signals(), use_threads(threads):
        tracker = Progress(open_tracker(settings), settings)
        progress.append(tracker)
        helpers = Helpers.start(cfg, settings)
        study = None
        try:
            study = run_study(settings, proxy, tracker, OmegaConf.to_yaml(cfg))
            helpers.join()
        except StudyInterrupted as exc:
            if exc.study is None:  # stopped while waiting for the helpers: this process's study is complete
                exc.study = study
            helpers.stop(signal.SIGTERM)
            export_so_far(exc, settings, out_dir)
            _close(tracker)
            raise
        except Exception as exc:
            fault = write_fault(exc)
            if fault is None:
                raise
            kept = finished_trials(settings.storage, settings.study_name)
            raise DiskFault(f"storage: cannot write to {fault.filename or settings.storage}: {fault.strerror or fault}; "
                            f"the {'' if kept is None else f'{kept} '}trials finished before are kept; make room "
                            "and run the same command again to resume") from None
        finally:
            helpers.stop(signal.SIGTERM)  # only those still running (after an unexpected error)
    summary = summarize(study, settings.score.metric)
    if summary.best is None:
        reasons = [r for r in summary.table["reason"].dropna().unique()[:3]]
        raise StudyFailed(
            f"no trial of study {settings.study_name!r} finished: every one failed or was pruned"
            + (f" (e.g. {'; '.join(reasons)})" if reasons else "")
        )
    selection = run_selection(settings, proxy, study)
    # export what won on all the evidence (`initsearch.export` picks it too); no stage: the best score, not an
    # earlier run's choice among fewer trials
    if selection is not None or study.user_attrs.get("selected_trial") is not None:
        study.set_user_attr("selected_trial", None if selection is None else selection.chosen.number)
    summary.selected = selected_trial(study)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = export_policy(study, out / "best_policy.json", None if selection is None else selection.chosen.number)
        summary.table.to_csv(out / "trials.csv", index=False)
        if selection is not None:
            selection.table().to_csv(out / "selection.csv", index=False, float_format="%.6g")
        else:  # an ``out=`` folder used before: no stale table beside this export (MLflow logs what is there)
            (out / "selection.csv").unlink(missing_ok=True)
    except OSError as exc:
        print(summary.format())
        raise DiskFault(f"output folder {out}: cannot write ({exc.strerror or exc}); the study is kept in its "
                        f"storage: python -m initsearch.export study_name={settings.study_name} "
                        f"storage={settings.storage} out=<file> exports its best policy") from None
    picture = draw_policy(path, proxy, out / "best_policy.png")
    front = draw_pareto_front(summary, out / "pareto_front.png")
    if tracker.ran == 0:
        searched = int((summary.table["kind"] == "search").sum())
        print(f"study already complete: {searched} searched trials (n_trials={settings.n_trials}; "
              "a larger n_trials searches more)")
    print(summary.format())
    if selection is not None:
        print(selection.describe())
    tracker.study_finished(study, summary, path)
    network = [path.with_name("best_model.yaml")] if summary.winner.user_attrs.get("model") else []  # a joint search's
    print(files_written(out, [path, *network, out / "trials.csv", out / "selection.csv", *(p for p in (picture, front) if p),
                              *getattr(tracker, "figures", [])],
                        getattr(tracker, "runs_url", None)))
    return FinishedStudy(path, study, summary)


def draw_policy(policy_path: Path, proxy: Any, target: Path) -> Path | None:
    """``best_policy.png``: what the exported policy does to each layer of the proxy (scheme, scale, LSUV),
    as ``apply_policy`` would resolve it. ``None`` (and a debug log) when it cannot be drawn."""
    from initsearch.init.policy import load_policy, plan
    from initsearch.tracking.plots import plot_policy

    def figure() -> Any:
        policy = load_policy(policy_path)
        lsuv = policy.lsuv is not None and policy.lsuv.enabled
        rows = [{"name": layer.name, "activation": layer.activation, "scheme": spec.scheme, "scale": spec.scale,
                 "gain": spec.gain, "lsuv": lsuv and spec.lsuv and spec.scheme != "keep"}
                for layer, _, spec in plan(policy, proxy.layers, strict=False) if layer.family != "norm"]
        prov = policy.provenance or {}
        return plot_policy(rows, f"Best policy: trial {prov.get('trial')} ({prov.get('kind')}), "
                                 f"{prov.get('metric')} {prov.get('score', float('nan')):.4g}")

    return save_courtesy_figure(figure, target)


def draw_pareto_front(summary: StudySummary, target: Path) -> Path | None:
    """``pareto_front.png`` of a multi-objective study (score and parameters; the tracker logs it to MLflow
    too); ``None`` for a single-objective study, or (with a debug log) when it cannot be drawn."""
    from initsearch.tracking.plots import plot_pareto_front

    if not summary.front:
        return None
    return save_courtesy_figure(
        lambda: plot_pareto_front(summary.table, [t.number for t in summary.front], summary.metric, summary.direction),
        target)


def save_courtesy_figure(figure: Callable[[], Any], target: Path) -> Path | None:
    """Draw ``figure()`` and save it as ``target``; ``None`` when it has nothing to draw or fails (a debug
    log): a picture is a courtesy and never fails the study."""
    from initsearch.tracking.plots import save_figure

    try:
        fig = figure()
        if fig is None:
            return None
        save_figure(fig, target)
        return target
    except Exception as exc:
        log.debug("%s not drawn (%s)", target.name, first_line(exc, with_type=True))
        return None


def files_written(out: Path, files: list[Path], runs_url: str | None) -> str:
    """The closing lines: the run folder, each file written there, and where the runs are in MLflow."""
    lines = [f"wrote into {out.resolve()}/:"]
    width = max(len(f.name) for f in files)
    about = {"best_policy.json": "the best policy (apply it with initsearch.apply_policy)",
             "best_model.yaml": "its network (a joint search): validate ... model=<this file>",
             "best_policy.png": "what the best policy does to each layer",
             "pareto_front.png": "score against network size, the Pareto front joined",
             "trials.csv": "every trial: kind, state, score, per-seed scores, seconds, reason",
             "selection.csv": "the front-runners on new seeds before export, and which one was exported",
             "score_by_trial.png": "score by trial against the baselines",
             "training_curves.png": "training curves of the best trials and the baselines",
             "init_signals.png": "signal through the layers at init",
             "param_importances.png": "which choices mattered"}
    lines += [f"  {f.name:<{width}}  {about.get(f.name, '')}".rstrip() for f in files if f.is_file()]
    lines.append(f"best policy: {files[0].resolve()}")
    if runs_url:
        local = "127.0.0.1:5000" in runs_url
        lines.append(f"MLflow runs: {runs_url}" + ("  (after: make ui)" if local else ""))
    return "\n".join(lines)


def sync_tracking(settings: StudySettings, config_yaml: str) -> None:
    """``tracking_only=true``: log to MLflow what it misses of an existing study (the trials earlier runs
    could not log, and the end of a complete study), without running any trial."""
    import optuna

    from initsearch.search.workers import counted, running

    try:
        study = optuna.load_study(study_name=settings.study_name, storage=open_storage(settings.storage))
    except KeyError:
        raise ConfigError(f"tracking_only: no study named {settings.study_name!r} in {settings.storage}") from None
    tracker = open_tracker(settings)
    if not hasattr(tracker, "flush"):
        raise ConfigError("tracking_only: tracking is off (tracking_uri=none)")
    tracker.study_started(settings, config_yaml, study)
    tracker.flush()
    summary = summarize(study, settings.score.metric)
    trials = study.get_trials(deepcopy=False)
    if running(trials):
        tracker.detach(report=True)  # other workers run the study: its parent run stays as it is
    elif summary.best is None or counted(trials) < len(settings.baselines) + settings.n_trials:
        tracker.close()  # a stopped study: its parent run is KILLED until the study runs again
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="initsearch-sync-") as tmp:
            tracker.study_finished(study, summary, export_policy(study, Path(tmp) / "best_policy.json"))
    print(f"MLflow: {tracker.backfilled} trials logged; {tracker.not_in_mlflow} not yet in MLflow")
    return None


def check_output(out_dir: str | Path) -> None:
    """Before any training: the output folder can be created and written (one line when it cannot)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".initsearch-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder {out}: cannot write there ({exc.strerror or exc}); set hydra.run.dir=<folder>") from None


def check_storage(settings: StudySettings) -> None:
    """Before any data is loaded: the study and MLflow do not share one file; open a database storage once
    (an unreachable server is one line at once); for a journal file, its folder must exist (the file itself
    is created by the study) and a file already there must be an Optuna journal."""
    check_own_files(settings)
    if is_rdb(settings.storage):
        open_storage(settings.storage, heartbeat_interval=settings.heartbeat_interval, grace_period=settings.grace_period)
        return
    folder = Path(settings.storage).expanduser().absolute().parent
    if not folder.is_dir():
        raise ConfigError(f"storage: the folder of the journal file {settings.storage!r} does not exist ({folder})")
    check_storage_file(settings.storage)


def check_resume(settings: StudySettings) -> None:
    """An existing study resumes only under its own settings (``study.check_resumable``): checked once the
    model and data are known good, before the thread count is measured and helper workers start. Writes
    nothing (a journal file that is not there yet is a new study: opening it would create it)."""
    if not is_rdb(settings.storage) and not (Path(settings.storage).is_file() and Path(settings.storage).stat().st_size):
        return
    try:
        study = optuna.load_study(study_name=settings.study_name, storage=open_storage(settings.storage))
    except KeyError:  # a new study
        return
    check_resumable(study, settings)


def check_own_files(settings: StudySettings) -> None:
    """``storage`` and a local SQLite ``tracking_uri`` name different files: Optuna would write its tables
    (or journal records) into MLflow's store. Checked before either is opened or created."""
    from initsearch.tracking.uri import resolve_tracking_uri

    uri = resolve_tracking_uri(settings.tracking_uri)
    study_file = sqlite_file(settings.storage) if is_rdb(settings.storage) else settings.storage
    mlflow_file = sqlite_file(uri) if uri is not None else None
    if mlflow_file is None or study_file is None:
        return
    if Path(study_file).expanduser().resolve() == Path(mlflow_file).resolve():
        raise ConfigError(f"storage: {settings.storage} is also the MLflow store (tracking_uri={uri}): Optuna and "
                          f"MLflow never share one file; {OWN_FILE}")


def open_tracker(settings: StudySettings) -> Any:
    """The study's tracker (``tracking.tracker.make_tracker``). A local SQLite MLflow store is opened under a lock
    next to it: two workers creating the same new store at once would both run its migrations and fail."""
    from initsearch.tracking.tracker import make_tracker
    from initsearch.tracking.uri import resolve_tracking_uri

    uri = resolve_tracking_uri(settings.tracking_uri)
    if uri is None or not uri.startswith("sqlite:///"):
        return make_tracker(settings)
    with StudyLock(uri, None, "mlflow"):
        return make_tracker(settings)


def export_so_far(exc: StudyInterrupted, settings: StudySettings, out_dir: str | Path) -> Path | None:
    """After a stop: export the best complete trial so far (and ``trials.csv``), say where on stdout and
    what happened on stderr. ``None`` when nothing finished yet."""
    study, name = exc.study, signal.Signals(exc.signum).name
    summary = summarize(study, settings.score.metric) if study is not None else None
    path = None
    if summary is not None and summary.best is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = export_policy(study, out / "best_policy.json")
        summary.table.to_csv(out / "trials.csv", index=False)
        print(f"best policy so far: {path.resolve()}", flush=True)
    complete = 0 if summary is None else int((summary.table["state"] == "complete").sum())
    print(
        f"initsearch: stopped by {name} after {complete} complete trials; "
        + ("nothing to export yet; " if path is None else "")
        + "the running trial is recorded as failed (interrupted) and runs again when the same command is run again",
        file=sys.stderr,
        flush=True,
    )
    return path


def _close(tracker: Any) -> None:
    close = getattr(tracker, "close", None)
    if close is not None:
        try:
            close()
        except Exception as exc:
            log.warning("tracking: closing failed (%s: %s)", type(exc).__name__, exc)


# ---- signals ---------------------------------------------------------------------------------------------------
@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, the first SIGINT or SIGTERM raises ``StudyInterrupted`` in the main thread (Optuna then
    records the running trial as failed). The handlers go back to what they were at once, so a second
    signal acts as it normally would (Ctrl-C twice stops at once, a second SIGTERM kills). An ignored SIGINT
    stays ignored (``nohup``; helper workers, which their main process stops with SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    def handler(signum: int, frame: Any) -> None:
        restore()
        raise StudyInterrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        old = signal.getsignal(sig)
        if sig == signal.SIGINT and old == signal.SIG_IGN:
            continue
        previous[sig] = old
        signal.signal(sig, handler)
    try:
        yield
    finally:
        restore()


# ---- helper worker processes (n_workers > 1) -----------------------------------------------------------------
class Helpers:
    """The N - 1 helper processes of ``n_workers=N`` (spawned, so nothing of this process is shared but the
    config): each runs the same study with the same settings and exports nothing."""

    def __init__(self, procs: list[Any]) -> None:
        self.procs = procs

    @classmethod
    def start(cls, cfg: DictConfig | Mapping[str, Any], settings: StudySettings) -> Helpers:
        count = settings.n_workers - 1
        if count <= 0:
            return cls([])
        config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=worker_main, args=(config, i + 1, os.getpid()), name=f"initsearch-worker-{i + 1}")
                 for i in range(count)]
        for proc in procs:
            proc.start()
        return cls(procs)

    def join(self) -> None:
        """Wait for every helper to finish its last trial; a helper that failed is a warning."""
        for proc in self.procs:
            proc.join()
            if proc.exitcode:
                log.warning("helper worker %s exited with status %s", proc.name, proc.exitcode)

    def stop(self, signum: int) -> None:
        """Send ``signum`` to the helpers still running and wait for them (they record their trial as
        interrupted); kill those that do not exit within ``HELPER_STOP_TIMEOUT_S``."""
        alive = [p for p in self.procs if p.is_alive()]
        for proc in alive:
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass
        for proc in alive:
            proc.join(HELPER_STOP_TIMEOUT_S)
            if proc.is_alive():
                log.warning("helper worker %s did not stop; killing it (its trial is failed on the next start)", proc.name)
                proc.kill()
                proc.join()


def worker_main(config: dict[str, Any], index: int, parent_pid: int) -> None:
    """A helper worker process: the same study with the same settings; no summary, no export.

    It ignores SIGINT (Ctrl-C reaches the whole process group; the main process stops its helpers with
    SIGTERM, once) and gets SIGTERM when the main process dies (Linux).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _terminate_with_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING, format=f"[initsearch worker {index}] %(levelname)s: %(message)s")
    verbose = bool(config.get("verbose", False))
    try:
        settings = settings_from_config(config)
        with stop_on_signals():
            proxy = prepare(settings)
            threads = choose_threads(settings, proxy)
        with stop_on_signals(), use_threads(threads):
            tracker = open_tracker(settings)
            try:
                run_study(settings, proxy, tracker, OmegaConf.to_yaml(config))
            finally:
                _detach(tracker)
    except StudyInterrupted as exc:
        sys.exit(exc.exit_status)
    except InitSearchError as exc:
        sys.exit(report_error(exc, verbose, prefix=f"initsearch worker {index}"))
    except Exception as exc:
        sys.exit(report_unexpected(exc, verbose, prefix=f"initsearch worker {index}"))


def _detach(tracker: Any) -> None:
    """A helper leaves the MLflow parent run as it is (the main process finishes it)."""
    detach = getattr(tracker, "detach", None) or getattr(tracker, "flush", None)
    if detach is not None:
        try:
            detach()
        except Exception as exc:
            log.warning("tracking: %s", exc)


def _terminate_with_parent(parent_pid: int) -> None:
    """Ask Linux for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


# ---- errors ----------------------------------------------------------------------------------------------------
def report_error(exc: BaseException, verbose: bool, prefix: str = "initsearch") -> int:
    """A user error: one line on stderr (the traceback too with ``verbose``); exit status 2."""
    if verbose:
        traceback.print_exception(exc)
    print(f"{prefix}: error: {exc}", file=sys.stderr)
    return 2


def report_unexpected(exc: BaseException, verbose: bool, prefix: str = "initsearch") -> int:
    """Anything else: one line naming the exception (the traceback with ``verbose``); exit status 1."""
    if verbose:
        traceback.print_exception(exc)
    text = first_line(exc)
    hint = "" if verbose else " (verbose=true shows the traceback)"
    print(f"{prefix}: error: {type(exc).__name__}: {text}{hint}", file=sys.stderr)
    return 1


# ---- the command line, shared by the three commands --------------------------------------------------------------
def config_keys(overrides: Sequence[str] = ()) -> list[str]:
    """Every key of the composed config (dotted; Hydra's own left out), with the config groups chosen by
    ``overrides`` (those of the form ``group=option`` that compose; the others are ignored)."""
    from hydra import compose, initialize_config_dir

    def flat(node: Any, prefix: str) -> list[str]:
        if isinstance(node, Mapping):
            out = [prefix] if prefix else []
            for key, value in node.items():
                out += flat(value, f"{prefix}.{key}" if prefix else str(key))
            return out
        return [prefix]

    groups = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0] and not o.startswith(("+", "~"))]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="initsearch"):
        for chosen in (groups, []):
            try:
                cfg = compose(config_name="config", overrides=chosen)
                break
            except Exception:
                continue
        else:
            return []
    return flat(OmegaConf.to_container(cfg, resolve=False), "")


def compose_problem(args: Sequence[str], extra_keys: Sequence[str] = ()) -> str | None:
    """Why Hydra cannot compose the config of these command-line overrides, in one line, or ``None``.

    Hydra would print several lines and exit with 1. Arguments with Hydra flags (``--cfg``, ``-m``...) are
    left to Hydra itself. ``extra_keys``: a command's own keys, also offered as "did you mean".
    """
    if any(arg.startswith("-") for arg in args):
        return None
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="initsearch"):
            compose(config_name="config", overrides=list(args), return_hydra_config=True)
    except Exception as exc:
        return compose_error_line(exc, args, extra_keys)
    return None


def compose_error_line(exc: BaseException, args: Sequence[str], extra_keys: Sequence[str] = ()) -> str:
    """Hydra's message in one line: an unknown key named with the closest known one; an unparsable override
    named; otherwise Hydra's detail lines joined, its search paths and hints left out."""
    from hydra.errors import OverrideParseException

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, OverrideParseException):
        bad = next((arg for arg in args if _unparsable(arg)), None)
        return f"override {bad!r}: {lines[0] if lines else exc}" if bad else (lines[0] if lines else str(exc))
    unknown = _unknown_key(str(exc))
    if unknown is not None:
        hint = did_you_mean(unknown, [*extra_keys, *config_keys(args)])
        return (f"{unknown}: no such key{hint}" if hint else
                f"{unknown}: no such key (a new key, e.g. an argument of your own model, is added as +{unknown}=...)")
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


def _unknown_key(message: str) -> str | None:
    """The key of Hydra's "Could not override 'KEY'" / "Key 'KEY' is not in struct" messages."""
    import re

    for pattern in (r"Could not override '([^']+)'", r"Key '([^']+)' is not in struct", r"Key '([^']+)' not in "):
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    return None


def bad_input(exc: BaseException) -> bool:
    """An error in what the user gave (a value, a file, a model, data), found before this process trained a
    trial: nothing in the output folder is worth keeping. Not a study that failed, a disk that cannot be
    written, or an error after trials trained (``run_settings`` marks those ``trained``)."""
    return isinstance(exc, (ConfigError, DataError, PolicyError)) and not getattr(exc, "trained", False)


def _unparsable(arg: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([arg])
    except Exception:
        return True
    return False


def remove_unused_output_dir(out_dir: str | Path, logs: bool = False, parents: int = 2) -> None:
    """After a failure before anything was written: remove the run folder Hydra made (its ``.hydra`` copy of
    the config and an empty log; ``logs``: any log, for an error in what the user gave, which the command
    printed), and up to ``parents`` folders above it (``outputs/<study>/``) when they are empty then."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.name == ".hydra" and entry.is_dir():
            continue
        if entry.suffix == ".log" and entry.is_file() and (logs or entry.stat().st_size == 0):
            continue
        return  # something of value (a policy, a table, a study's log): keep the folder
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    for folder in (out.parent, out.parent.parent)[:parents]:
        try:
            folder.rmdir()  # only when empty
        except OSError:
            return
