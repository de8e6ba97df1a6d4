"""How fast initsearch evaluates init candidates, against the hand-written loop and the bare training loop.

In one process, on the same proxy, data, budget (steps, batch size) and number of trials:

(a) ``handwritten``: a plain Optuna objective as users write it today: a ``DataLoader`` over the training
    set, per-layer ``torch.nn.init`` schemes chosen with ``trial.suggest_categorical``, ``mlflow.log_metric``
    every step into a SQLite MLflow store, validation at the same checkpoints, the mean training loss as score;
(b) ``bare``: ``initsearch.proxy.train.train_run`` over the candidates (c) tried, one after another, with no search
    and no logging: only the training runs are timed (the floor for one candidate at a time);
(c) ``initsearch``: ``run_study`` with the real MLflow tracker into a temporary SQLite store and the default
    Optuna storage kind (a journal file);
(d) ``population``: (c) with ``batch_trials=K`` (one entry per ``--k``);
(p) ``population floor`` (only with ``--parts ...p``): ``train_population`` over (b)'s candidates in groups of
    K, init not timed (the floor of (d)).

All parts train every candidate for the full budget: no baselines (so the counts match), ``score.seeds=1``
(each trial trains once), no pruner, no pre-screen. The first trials' one-time costs (lazy kernel loading)
are paid by a warm-up before any part. Opening a fresh MLflow store is not timed in either (a) or (c).

initsearch's time is split by wrapping its functions with timers (exclusive time: a nested call is counted
in its own category only): training steps (``train_run``/``train_population`` minus the rest), validation
checkpoints, init (fresh model, ``apply_policy`` incl. LSUV, ``signal_report``), data (batch index drawing,
timed, and gathering, estimated from a micro-benchmark of the same shapes and subtracted from training steps),
Optuna (ask/tell, search-space sampling, report/should_prune, user attrs, trial queries), MLflow (the study
thread's hooks and the final wait until the MLflow writer process has logged every trial), other (the rest of
the wall time). Shown apart because they overlap the study: the wall time of the tracker's sender thread
(which blocks when the writer lags) and the writer process's CPU for logging the trials.

``--compile-check`` also times a training step of the proxy eager and under ``torch.compile``;
``--engine-check K`` times K candidates trained one by one against each population engine, with one shared
seed (as a batched study trains them) and with distinct seeds.
``--sampling 100,1000`` also measures Optuna's sampling time per trial (``ask()`` + the search space's
suggestions, the study's sampler) on a study that already holds that many finished trials of the proxy's
search space, in memory and in a journal file.

    .venv/bin/python scripts/bench.py --trials 20 --steps 200 --k 16 --out bench.json
    .venv/bin/python scripts/bench.py --parts cd --k 1,4,16,64 --trials 64
    .venv/bin/python scripts/bench.py --parts bcd --width-mult 2
    .venv/bin/python scripts/bench.py --parts "" --sampling 100,1000 --compile-check
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

import initsearch.proxy.kernels as kernels_mod  # noqa: E402
import initsearch.proxy.population as population_mod  # noqa: E402
import initsearch.proxy.train as train_mod  # noqa: E402
import initsearch.search.batched as batched_mod  # noqa: E402
import initsearch.search.sequential as sequential_mod  # noqa: E402
import initsearch.search.space as space_mod  # noqa: E402
import initsearch.search.storage as storage_mod  # noqa: E402
import initsearch.search.trial as trial_mod  # noqa: E402
import initsearch.tracking.tracker as tracking_mod  # noqa: E402
from initsearch.cli import config_dir  # noqa: E402
from initsearch.init.apply import apply_policy  # noqa: E402
from initsearch.init.policy import InitPolicy  # noqa: E402
from initsearch.proxy.models import build_model  # noqa: E402
from initsearch.proxy.population import train_population  # noqa: E402
from initsearch.proxy.train import train_run  # noqa: E402
from initsearch.search.settings import StudySettings, settings_from_config  # noqa: E402
from initsearch.search.study import make_sampler, run_study  # noqa: E402
from initsearch.search.trial import Proxy, fresh_model, prepare  # noqa: E402
from initsearch.search.workers import FINISHED  # noqa: E402

CATEGORIES = ("training steps", "validation", "init/LSUV/diagnostics", "data", "Optuna", "MLflow", "other")
HANDWRITTEN_SCHEMES = ("kaiming_normal", "xavier_normal", "orthogonal")


# ---- timers ------------------------------------------------------------------------------------------------
class Timers:
    """Exclusive wall time per category of wrapped functions, per thread (a nested call's time is taken out
    of its caller's category)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._local = threading.local()

    def _stack(self) -> list[float]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def wrap(self, fn: Callable[..., Any], category: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = self._stack()
            stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = stack.pop()
                self.seconds[category] += elapsed - nested
                self.calls[category] += 1
                if stack:
                    stack[-1] += elapsed
        return timed


def _targets() -> list[tuple[Any, str, str]]:
    """(owner, attribute, category) of every function the split wraps."""
    S, B, R, P, T = sequential_mod, batched_mod, trial_mod, population_mod, tracking_mod.MlflowTracker
    return [
        (S, "train_run", "train"), (B, "train_population", "train"),
        (train_mod, "evaluate", "validation"), (P, "evaluate_members", "validation"),
        (P, "draw_indices", "data"), (train_mod, "draw_batches", "data"),
        (R, "fresh_model", "init/LSUV/diagnostics"),
        (R, "init_contender", "init/LSUV/diagnostics"), (R, "signal_report", "init/LSUV/diagnostics"),
        (R, "require_finite", "init/LSUV/diagnostics"),
        (space_mod.SearchSpace, "sample", "Optuna"),
        (optuna.study.Study, "ask", "Optuna"), (optuna.study.Study, "tell", "Optuna"),
        (optuna.study.Study, "get_trials", "Optuna"),
        (optuna.study._optimize, "_tell_with_warning", "Optuna"),
        (optuna.trial.Trial, "report", "Optuna"), (optuna.trial.Trial, "should_prune", "Optuna"),
        (optuna.trial.Trial, "set_user_attr", "Optuna"), (R, "set_user_attrs", "Optuna"),
        (R, "complete_twin", "Optuna"), (storage_mod, "_write_records", "Optuna"),
        (T, "study_started", "MLflow"), (T, "trial_finished", "MLflow"), (T, "flush", "MLflow"),
        (T, "_log_trial", "MLflow logging thread"), (T, "_start", "MLflow logging thread"),
    ]


@contextlib.contextmanager
def instrumented(timers: Timers) -> Iterator[None]:
    """Wrap the targets for the duration of the block; put the originals back after."""
    saved = []
    try:
        for owner, name, category in _targets():
            original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
            if original is None:  # renamed in the code base: its time lands in "other"; say so
                print(f"  (bench: {getattr(owner, '__name__', owner)}.{name} not found; not timed apart)")
                continue
            saved.append((owner, name, original))
            setattr(owner, name, timers.wrap(original, category))
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


# ---- setup ----------------------------------------------------------------------------------------------------
def compose_settings(args: argparse.Namespace, tmp: Path) -> tuple[Any, StudySettings]:
    overrides = [
        f"study={args.study}", f"n_trials={args.trials}", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", "baselines=[]", "score.seeds=1", "pruner=none",
        "prescreen.enabled=false", f"model.width_multiplier={args.width_mult}", f"device={args.device}",
        f"storage={tmp}/warmup.journal", "tracking_uri=none", *args.overrides,
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return cfg, settings_from_config(cfg)


def load_avg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def fresh(settings: StudySettings, proxy: Proxy, seed: int) -> nn.Module:
    """The proxy as a trial builds it (the function itself, bound before any timer wraps it)."""
    return fresh_model(settings.model, proxy.data, proxy.device, seed)


def warm_up(settings: StudySettings, proxy: Proxy) -> None:
    """Pay the one-time costs (kernel loading, first autograd/vmap graphs) before anything is timed."""
    short = dataclasses.replace(settings.train, steps=min(20, settings.train.steps), eval_every=10)
    train_run(fresh(settings, proxy, 0), proxy.data, short, seed=0)
    train_population([fresh(settings, proxy, i) for i in range(2)], proxy.data, short, seeds=[0, 1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(trials: int, seconds: float) -> float:
    return 60.0 * trials / seconds if seconds > 0 else math.nan


# ---- (a) the hand-written loop -----------------------------------------------------------------------------
def handwritten(settings: StudySettings, proxy: Proxy, n_trials: int, tmp: Path) -> dict[str, Any]:
    """An idiomatic Optuna + DataLoader + MLflow objective over the same proxy, data and budget."""
    import mlflow
    from torch.utils.data import DataLoader, TensorDataset

    cfg, device = settings.train, proxy.device
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/handwritten/mlflow.db")
    (tmp / "handwritten").mkdir(exist_ok=True)
    mlflow.set_experiment("handwritten")  # creates the store: not timed, as make_tracker is not in (c)
    train_set = TensorDataset(proxy.data.x_train.cpu(), proxy.data.y_train.cpu())
    x_val, y_val = proxy.data.x_val, proxy.data.y_val

    def objective(trial: optuna.Trial) -> float:
        torch.manual_seed(trial.number)
        model = build_model(settings.model, proxy.data.input_shape, proxy.data.num_classes).to(device)
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                scheme = trial.suggest_categorical(f"init_{name}", HANDWRITTEN_SCHEMES)
                getattr(nn.init, scheme + "_")(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        total, step = 0.0, 0
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
            mlflow.log_params(trial.params)
            while step < cfg.steps:
                for xb, yb in loader:
                    xb, yb = xb.to(device), yb.to(device)
                    loss = F.cross_entropy(model(xb), yb)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    step += 1
                    mlflow.log_metric("train_loss", loss.item(), step=step)
                    total += loss.item()
                    if step % cfg.eval_every == 0 or step == cfg.steps:
                        model.eval()
                        with torch.no_grad():
                            logits = model(x_val)
                            val_loss = F.cross_entropy(logits, y_val).item()
                            val_acc = (logits.argmax(1) == y_val).float().mean().item()
                        model.train()
                        mlflow.log_metrics({"val_loss": val_loss, "val_acc": val_acc}, step=step)
                        trial.report(val_loss, step)
                    if step == cfg.steps:
                        break
            score = total / cfg.steps
            mlflow.log_metric("score", score)
        return score

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=settings.seed),
                                pruner=optuna.pruners.NopPruner())
    start = time.perf_counter()
    with mlflow.start_run(run_name="handwritten-study"):
        study.optimize(objective, n_trials=n_trials)
    seconds = time.perf_counter() - start
    done = len(study.get_trials(states=FINISHED))
    return {"trials": done, "trained": done, "seconds": seconds, "trials_per_min": rate(done, seconds)}


# ---- (c)/(d) initsearch's study ----------------------------------------------------------------------------
def initsearch_study(cfg: Any, settings: StudySettings, proxy: Proxy, tmp: Path, k: int,
                     sampling_s_per_step: float, sampling_s_per_member_step: float, tracking: bool = True
                     ) -> tuple[dict[str, Any], Any]:
    """Run the study (batch_trials=k) with the MLflow tracker into a fresh store (or none); time it and split
    the time."""
    folder = tmp / f"initsearch-k{k}"
    folder.mkdir()
    uri = f"sqlite:///{folder}/mlflow.db" if tracking else "none"
    s = dataclasses.replace(settings, storage=str(folder / "study.journal"), tracking_uri=uri,
                            study_name=f"bench-k{k}", batch_trials=k)
    tracker = tracking_mod.make_tracker(s)
    getattr(tracker, "open_store_now", lambda: None)()  # opening (creating) the store: not timed
    timers = Timers()
    with instrumented(timers):
        start = time.perf_counter()
        study = run_study(s, proxy, tracker, OmegaConf.to_yaml(cfg))
        getattr(tracker, "flush", lambda: None)()
        _sync(proxy.device)
        seconds = time.perf_counter() - start
    cpu = dict(getattr(tracker, "tracking_cpu_s", {}))  # after the flush: every trial acknowledged
    getattr(tracker, "close", lambda: None)()
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    trained = [t for t in trials if "duplicate_of" not in t.user_attrs]
    steps_trained = sum(len(t.user_attrs.get("seeds") or [1]) * s.train.steps for t in trained)
    per_step = sampling_s_per_step if k == 1 else sampling_s_per_member_step
    result = {
        "trials": len(trials), "trained": len(trained), "seconds": seconds, "trials_per_min": rate(len(trials), seconds),
        "states": {st.name.lower(): sum(1 for t in trials if t.state == st) for st in FINISHED},
        "split_s": split(timers, seconds, per_step * steps_trained),
        "mlflow_worker_thread_s": timers.seconds.get("MLflow logging thread", 0.0),
        "mlflow_writer_trial_cpu_s": cpu.get("_log_trial", 0.0),
    }
    return result, study


def split(timers: Timers, wall: float, data_estimate: float) -> dict[str, float]:
    """The wall time by category (seconds); ``data`` = measured index drawing + the estimated gathering,
    taken out of the training category."""
    t = timers.seconds
    data = t.get("data", 0.0) + data_estimate
    out = {
        "training steps": max(t.get("train", 0.0) - data_estimate, 0.0),
        "validation": t.get("validation", 0.0),
        "init/LSUV/diagnostics": t.get("init/LSUV/diagnostics", 0.0),
        "data": data,
        "Optuna": t.get("Optuna", 0.0),
        "MLflow": t.get("MLflow", 0.0),
    }
    out["other"] = max(wall - sum(out.values()), 0.0)
    return out


def sampling_cost(proxy: Proxy, batch_size: int, k: int, repeats: int = 5, steps: int = 200) -> float:
    """Seconds per step (per member when k > 1) of gathering the batch, the way ``train_run`` (k == 1) or
    ``train_population`` (k > 1) does it; the index drawing (``train.draw_batches``) is timed in the study
    itself. A study's population shares one evaluation seed, so ``train_population`` gathers one batch per
    step for all k members (see its "Shared batches")."""
    x, y, device = proxy.data.x_train, proxy.data.y_train, proxy.device
    gen = torch.Generator(device=device).manual_seed(0)
    best = math.inf
    for _ in range(repeats):
        plan = train_mod.draw_batches(gen, len(x), steps, batch_size, device)
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            x[plan[i]], y[plan[i]]
        _sync(device)
        best = min(best, (time.perf_counter() - start) / steps / k)
    return best


# ---- (b) and (p): the floors ---------------------------------------------------------------------------------
def candidates(study: optuna.Study | None, settings: StudySettings, proxy: Proxy, n: int) -> list[InitPolicy]:
    """The policies (c) tried, or ``n`` random ones from the search space when (c) did not run."""
    if study is not None:
        return [InitPolicy.from_dict(t.user_attrs["policy"]) for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("policy") and "duplicate_of" not in t.user_attrs][:n]
    sampler_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=settings.seed))
    out = []
    for _ in range(n):
        trial = sampler_study.ask()
        out.append(settings.space.sample(trial, proxy.layers))
        sampler_study.tell(trial, 0.0)
    return out


def initialized(settings: StudySettings, proxy: Proxy, policy: InitPolicy, seed: int) -> nn.Module:
    model = fresh(settings, proxy, seed)
    apply_policy(model, policy, example_batch=proxy.example_x, seed=seed)
    return model


def bare(settings: StudySettings, proxy: Proxy, policies: Sequence[InitPolicy]) -> dict[str, Any]:
    """train_run over the candidates one by one; only the training runs are timed."""
    seed = settings.eval_seeds[0]
    seconds = 0.0
    for policy in policies:
        model = initialized(settings, proxy, policy, seed)
        _sync(proxy.device)
        start = time.perf_counter()
        train_run(model, proxy.data, settings.train, seed=seed)
        _sync(proxy.device)
        seconds += time.perf_counter() - start
    return {"trials": len(policies), "trained": len(policies), "seconds": seconds,
            "trials_per_min": rate(len(policies), seconds)}


def population_floor(settings: StudySettings, proxy: Proxy, policies: Sequence[InitPolicy], k: int) -> dict[str, Any]:
    """train_population over the candidates in groups of k; only the training is timed."""
    seed = settings.eval_seeds[0]
    seconds = 0.0
    for first in range(0, len(policies), k):
        group = policies[first:first + k]
        models = [initialized(settings, proxy, p, seed) for p in group]
        _sync(proxy.device)
        start = time.perf_counter()
        train_population(models, proxy.data, settings.train, seeds=[seed] * len(models))
        _sync(proxy.device)
        seconds += time.perf_counter() - start
    return {"trials": len(policies), "trained": len(policies), "seconds": seconds,
            "trials_per_min": rate(len(policies), seconds)}


# ---- Optuna's sampling time -------------------------------------------------------------------------------
def optuna_sampling(settings: StudySettings, proxy: Proxy, sizes: Sequence[int], asks: int, tmp: Path
                    ) -> dict[str, Any]:
    """Seconds per ``ask()`` + search-space sampling with the study's sampler, at each study size."""
    rng = random.Random(0)
    out: dict[str, Any] = {}
    for n in sizes:
        filler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(n):
            trial = filler.ask()
            settings.space.sample(trial, proxy.layers)
            filler.tell(trial, rng.uniform(0.5, 2.5))
        finished = filler.get_trials(deepcopy=False)
        for kind in ("memory", "journal"):
            storage = None if kind == "memory" else optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(str(tmp / f"sampling-{n}.journal")))
            study = optuna.create_study(study_name=f"sampling-{n}", storage=storage,
                                        sampler=make_sampler(settings.sampler, settings.seed))
            study.add_trials(finished)
            times = []
            for _ in range(asks):
                start = time.perf_counter()
                trial = study.ask()
                settings.space.sample(trial, proxy.layers)
                times.append(time.perf_counter() - start)
                study.tell(trial, rng.uniform(0.5, 2.5))
            out[f"{n}_{kind}"] = {"finished_trials": n, "storage": kind, "asks": asks,
                                  "mean_s": float(np.mean(times)), "max_s": float(np.max(times)),
                                  "params_per_trial": len(trial.params)}
            print(f"  Optuna sampling at {n:>5} finished trials ({kind:<7}): {np.mean(times) * 1e3:8.1f} ms per trial "
                  f"(max {np.max(times) * 1e3:.1f} ms, {len(trial.params)} params)")
    return out


# ---- the population engines against the loop ------------------------------------------------------------------
def engine_check(settings: StudySettings, proxy: Proxy, k: int, repeats: int = 3) -> dict[str, Any]:
    """Milliseconds per member-step (validation included, init not) of K fresh proxies trained one by one
    (``train_run``), and as one population with each engine that can run the proxy; the best of ``repeats``.
    Two seed layouts: ``shared`` (one evaluation seed for all members, as a batched study trains them) and
    ``distinct`` (seeds 0..K-1: every member its own batches). ``stacked, default route`` is the stacked
    engine with its float32 products kept on ATen's default kernels (``initsearch.proxy.kernels`` not consulted),
    to show what stacking gains apart from the kernels."""
    models = lambda: [fresh(settings, proxy, i) for i in range(k)]  # noqa: E731
    modes = ["loop"] + [m for m in ("stacked", "vmap") if _engine_ok(models(), m, proxy.device)]
    if "stacked" in modes and kernels_mod.available() and proxy.device.type == "cpu":
        modes.insert(2, "stacked, default route")
    out: dict[str, dict[str, float]] = {}
    for layout, seeds in (("shared", [0] * k), ("distinct", list(range(k)))):
        best: dict[str, float] = {}
        for _ in range(repeats):
            for mode in modes:
                group = models()
                _sync(proxy.device)
                with _default_route(mode.endswith("default route")):
                    start = time.perf_counter()
                    if mode == "loop":
                        for model, seed in zip(group, seeds):
                            train_run(model, proxy.data, settings.train, seed=seed)
                    else:
                        train_population(group, proxy.data, settings.train, seeds=seeds, mode=mode.split(",")[0])
                    _sync(proxy.device)
                    per = (time.perf_counter() - start) / k / settings.train.steps * 1e3
                best[mode] = min(best.get(mode, math.inf), per)
        for mode, ms in best.items():
            print(f"  engine check, K={k}, {layout:<8} seeds, {mode:<22}: {ms:.3f} ms per member-step "
                  f"({best['loop'] / ms:.2f}x the loop)")
        out[layout] = best
    routes = {f"{key.engine}, K={key.rows}, {'shared' if key.shared else 'distinct'} seeds, {key.threads} thread(s)":
              verdict for key, verdict in kernels_mod._VERDICTS.items() if isinstance(key, population_mod.RouteKey)}
    return {"k": k, "ms_per_member_step": out, "onednn_route_verdicts": routes}


@contextlib.contextmanager
def _default_route(on: bool) -> Iterator[None]:
    """Within (when ``on``): populations keep ATen's default matmul kernels (no verdict consulted)."""
    if not on:
        yield
        return
    original = population_mod._onednn_route
    population_mod._onednn_route = lambda stack, data, cfg: False
    try:
        yield
    finally:
        population_mod._onednn_route = original


def _engine_ok(models: list[nn.Module], mode: str, device: torch.device) -> bool:
    try:
        population_mod.choose_mode(models, mode, device)
    except ValueError:
        return False
    return True


# ---- does torch.compile pay? ---------------------------------------------------------------------------------
def compile_check(settings: StudySettings, proxy: Proxy, steps: int = 200, repeats: int = 3) -> dict[str, Any]:
    """Milliseconds per training step of the proxy, eager and ``torch.compile``d (the compile time apart): the
    loop of ``train_run`` (index batch, forward, cross-entropy, backward, optimizer step)."""
    x, y, cfg = proxy.data.x_train, proxy.data.y_train, settings.train
    out: dict[str, Any] = {}
    for kind in ("eager", "compiled"):
        model = fresh(settings, proxy, 0)
        forward = model if kind == "eager" else torch.compile(model)
        optimizer = train_mod.training_optimizer(model, cfg)
        gen = torch.Generator(device=proxy.device).manual_seed(0)

        def step() -> None:
            idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen, device=proxy.device)
            loss = F.cross_entropy(forward(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        start = time.perf_counter()
        step()
        _sync(proxy.device)
        first = time.perf_counter() - start
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(proxy.device)
            best = min(best, (time.perf_counter() - start) / steps)
        out[kind] = {"first_step_s": first, "ms_per_step": best * 1e3}
        print(f"  torch.compile check, {kind:<8}: first step {first:6.2f} s, then {best * 1e3:.3f} ms/step (best of {repeats})")
    return out


# ---- the run ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="digits_mlp", help="study preset (conf/study/)")
    parser.add_argument("--trials", type=int, default=20, help="trials per part")
    parser.add_argument("--steps", type=int, default=200, help="training steps per trial")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--k", default="16", help="population size(s) for (d), comma-separated, e.g. 1,4,16,64")
    parser.add_argument("--width-mult", type=float, default=1.0, help="model.width_multiplier of the proxy")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--parts", default="abcd", help="which parts to run: letters among a b c d p")
    parser.add_argument("--no-mlflow", action="store_true", help="run (c) and (d) with tracking_uri=none")
    parser.add_argument("--repeats", type=int, default=1, help="run the parts this many times, interleaved; "
                        "each part's figures are those of its median run")
    parser.add_argument("--sampling", default="", help="also time Optuna's sampling at these study sizes, e.g. 100,1000")
    parser.add_argument("--sampling-asks", type=int, default=5)
    parser.add_argument("--compile-check", action="store_true", help="also time a training step eager vs torch.compile")
    parser.add_argument("--engine-check", type=int, default=0, metavar="K",
                        help="also time K candidates one by one against the population engines")
    parser.add_argument("--out", default="results/bench/latest.json", help="where the figures go (JSON; results/ is git-ignored)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data=synthetic")
    args = parser.parse_args(argv)
    logging.getLogger("initsearch").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ks = [int(v) for v in args.k.split(",") if v.strip()]
    parts = set(args.parts)

    with tempfile.TemporaryDirectory(prefix="initsearch-bench-") as tmp_name:
        tmp = Path(tmp_name)
        cfg, settings = compose_settings(args, tmp)
        t0 = time.perf_counter()
        proxy = prepare(settings)
        data_load_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in fresh(settings, proxy, 0).parameters())
        warm_up(settings, proxy)
        report: dict[str, Any] = {
            "config": {
                "study": args.study, "trials": args.trials, "steps": args.steps, "batch_size": args.batch_size,
                "k": ks, "width_multiplier": args.width_mult, "device": str(proxy.device),
                "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "overrides": args.overrides,
                "mlflow": not args.no_mlflow, "repeats": args.repeats,
                "model": settings.model, "model_parameters": n_params, "train_examples": len(proxy.data.x_train),
                "torch": torch.__version__, "optuna": optuna.__version__, "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            "load_avg_start": load_avg(), "data_load_s": data_load_s, "parts": {},
        }
        print(f"bench: {args.study}, {args.trials} trials x {args.steps} steps (batch {args.batch_size}), "
              f"{n_params:,} parameters, device {proxy.device}, {torch.get_num_threads()} torch thread(s), "
              f"load {report['load_avg_start']}")
        parts_out: dict[str, Any] = report["parts"]
        per_step = sampling_cost(proxy, args.batch_size, 1)
        per_member_step = sampling_cost(proxy, args.batch_size, max(ks)) if any(k > 1 for k in ks) else per_step

        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        labels: dict[str, str] = {}
        suffix = " (no MLflow)" if args.no_mlflow else ""

        def record(key: str, label: str, result: dict[str, Any]) -> None:
            result["load_avg_after"] = load_avg()
            result["trained_per_min"] = rate(result["trained"], result["seconds"])
            runs[key].append(result)
            labels[key] = label
            print(f"  {label:<48} {result['trials']:>4} trials ({result['trained']:>3} trained) in "
                  f"{result['seconds']:7.2f} s: {result['trials_per_min']:7.1f} trials/min, "
                  f"{result['trained_per_min']:7.1f} trained/min   (load {result['load_avg_after']})")

        for repeat in range(args.repeats):
            if args.repeats > 1:
                print(f"run {repeat + 1} of {args.repeats}:")
            run_tmp = tmp / f"run{repeat}"
            run_tmp.mkdir()
            if "a" in parts:
                record("a_handwritten", "(a) hand-written Optuna+DataLoader+MLflow",
                       handwritten(settings, proxy, args.trials, run_tmp))
            study_c = None
            if "c" in parts:
                result, study_c = initsearch_study(cfg, settings, proxy, run_tmp, 1, per_step, per_member_step,
                                                   not args.no_mlflow)
                record("c_initsearch", "(c) initsearch study" + suffix, result)
            policies = candidates(study_c, settings, proxy, args.trials) if ("b" in parts or "p" in parts) else []
            if "b" in parts:
                record("b_bare", "(b) bare train_run, one at a time", bare(settings, proxy, policies))
            for k in ks:
                if "d" in parts and k > 1:
                    result, _ = initsearch_study(cfg, settings, proxy, run_tmp, k, per_step, per_member_step,
                                                 not args.no_mlflow)
                    record(f"d_population_k{k}", f"(d) initsearch study, batch_trials={k}" + suffix, result)
                if "p" in parts and k > 1:
                    record(f"p_population_floor_k{k}", f"(p) bare train_population, K={k}",
                           population_floor(settings, proxy, policies, k))
        for key, results in runs.items():  # the run with the median rate stands for the part; all rates kept
            ordered = sorted(results, key=lambda r: r["trials_per_min"])
            chosen = dict(ordered[(len(ordered) - 1) // 2])
            chosen["runs_trials_per_min"] = [r["trials_per_min"] for r in results]
            parts_out[key] = chosen
        if args.repeats > 1:
            print(f"medians of {args.repeats} runs:")
            for key, result in parts_out.items():
                rates = ", ".join(f"{v:.0f}" for v in result["runs_trials_per_min"])
                print(f"  {labels[key]:<48} {result['trials_per_min']:8.1f} trials/min, "
                      f"{result['trained_per_min']:8.1f} trained/min  (runs: {rates} trials/min)")

        for measure in ("trials_per_min", "trained_per_min"):  # trained: trials that did train (no duplicates)
            ratios = {}
            for key in parts_out:
                for base in ("a_handwritten", "b_bare"):
                    mine, theirs = parts_out[key].get(measure), parts_out.get(base, {}).get(measure)
                    if key not in (base, "a_handwritten") and mine and theirs:
                        ratios[f"{key} / {base}"] = mine / theirs
            report["ratios" if measure == "trials_per_min" else "ratios_trained"] = ratios
            if ratios:
                print(f"ratios ({measure.replace('_', ' ')}):")
                for name, value in ratios.items():
                    print(f"  {name:<52} {value:6.2f}x")
        for key, result in parts_out.items():
            if "split_s" in result:
                wall = result["seconds"]
                sp = result["split_s"]
                outside = 1.0 - sp["training steps"] / wall
                outside_run = 1.0 - (sp["training steps"] + sp["validation"]) / wall
                result["overhead_outside_training_steps"] = outside
                result["overhead_outside_training_runs"] = outside_run
                print(f"time split of {key} ({wall:.2f} s):")
                for cat in CATEGORIES:
                    print(f"  {cat:<24} {sp[cat]:8.3f} s  {100 * sp[cat] / wall:5.1f}%")
                print(f"  (overlapped: MLflow sender thread {result['mlflow_worker_thread_s']:.3f} s wall, blocked "
                      f"while the writer lags; writer process {result.get('mlflow_writer_trial_cpu_s', 0.0):.3f} s CPU "
                      "logging the trials)")
                print(f"  overhead outside training steps: {100 * outside:.1f}%; outside training runs "
                      f"(steps + validation): {100 * outside_run:.1f}%")
        if args.sampling:
            sizes = [int(v) for v in args.sampling.split(",") if v.strip()]
            report["optuna_sampling"] = optuna_sampling(settings, proxy, sizes, args.sampling_asks, tmp)
        if args.engine_check:
            report["engines"] = engine_check(settings, proxy, args.engine_check)
        if args.compile_check:
            report["torch_compile"] = compile_check(settings, proxy)
        report["load_avg_end"] = load_avg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"figures: {Path(args.out).resolve()}  (load at the end {report['load_avg_end']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
