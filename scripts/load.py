"""Many workers on one study: every trial once, the baselines once, one MLflow child run per trial.

Runs one study of a tiny proxy (synthetic data, a 2-layer MLP, 20 steps) with ``--trials`` searched trials,
either as ``n_workers=--workers`` processes of one command on a journal file (``--storage`` unset), or as
``--workers`` separate commands on a database (``--storage postgresql://...``: several "machines", each
with its own ``INITSEARCH_WORKER_HOST``). MLflow is a SQLite store in the scratch folder. Prints the wall
time and checks the study and the runs; exits 1 when a check fails.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/load.py --workers 8 --trials 200
    OMP_NUM_THREADS=1 .venv/bin/python scripts/load.py --workers 4 --trials 200 \\
        --storage postgresql://initsearch:change-me@127.0.0.1/initsearch
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = ["data=synthetic", "model.depth=2", "model.width=16", "train.steps=20", "train.eval_every=10",
        "baselines=[he,xavier]", "score.seeds=1", "pruner=none"]


def check(storage: str, study_name: str, tracking_uri: str, trials: int, baselines: int) -> list[str]:
    """What must hold after the run: the problems found (none = every check passed)."""
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from initsearch.search.storage import open_storage
    from initsearch.search.workers import counted

    found = optuna.load_study(study_name=study_name, storage=open_storage(storage)).get_trials(deepcopy=False)
    problems = []
    if sorted(t.number for t in found) != list(range(len(found))):
        problems.append("trial numbers are not 0..n-1")
    if counted(found) != trials + baselines:
        problems.append(f"{counted(found)} trials count, expected {trials + baselines}")
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in found):
        problems.append("trials left RUNNING or WAITING")
    names = [t.user_attrs.get("baseline") for t in found if t.user_attrs.get("baseline") and t.state != TrialState.FAIL]
    if len(names) != baselines or len(set(names)) != baselines:
        problems.append(f"baselines run {names}")
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(study_name)
    runs = client.search_runs([exp.experiment_id], "tags.`initsearch.role` = 'trial'", max_results=5000) if exp else []
    numbers = sorted(int(r.data.tags["initsearch.trial"]) for r in runs)
    finished = sorted(t.number for t in found if t.state.is_finished())
    if numbers != finished:
        problems.append(f"{len(numbers)} child runs for {len(finished)} finished trials "
                        f"(twice: {sorted({n for n in numbers if numbers.count(n) > 1})[:10]})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--storage", default=None, help="a database URL: --workers separate commands on it")
    parser.add_argument("--study-name", default=f"load_{int(time.time())}")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="initsearch-load-") as tmp:
        storage = args.storage or f"{tmp}/load.journal"
        tracking_uri = f"sqlite:///{tmp}/mlflow.db"
        common = [sys.executable, "-m", "initsearch", *TINY, f"n_trials={args.trials}", f"storage={storage}",
                  f"study_name={args.study_name}", f"tracking_uri={tracking_uri}", f"hydra.run.dir={tmp}/out"]
        started = time.monotonic()
        if args.storage is None:
            procs = [subprocess.Popen([*common, f"n_workers={args.workers}"], cwd=tmp, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
        else:
            procs = [subprocess.Popen([*common, f"hydra.run.dir={tmp}/out{i}"], cwd=tmp,
                                      env=dict(env, INITSEARCH_WORKER_HOST=f"machine-{i}"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for i in range(args.workers)]
        errors = [p.communicate()[1] for p in procs]
        seconds = time.monotonic() - started
        codes = [p.returncode for p in procs]
        problems = [f"exit status {c}: {e.strip().splitlines()[-1:]}" for c, e in zip(codes, errors) if c != 0]
        problems += check(storage, args.study_name, tracking_uri, args.trials, 2)
    kind = "PostgreSQL commands" if args.storage else "local workers (n_workers)"
    print(f"{args.workers} {kind}, {args.trials} trials + 2 baselines: {seconds:.1f} s "
          f"({seconds / (args.trials + 2):.2f} s per trial)")
    for problem in problems:
        print(f"FAILED: {problem}")
    print("every trial once, the baselines once, one MLflow child run per trial" if not problems else "")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
