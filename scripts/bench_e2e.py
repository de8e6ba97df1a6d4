"""End to end, as a user runs it: each scenario as its own process, timed from start to exit.

Scenarios (``--scenarios``, comma-separated; all by default):

- ``mlp_bare``: ``scripts/bare_loop.py``, 40 policies of the MLP proxy (5 Linear of width 256) trained one at
  a time; ``mlp_study``: ``python -m initsearch`` on the same proxy, 40 trials, one seed per trial, no
  baselines, no selection stage, the default pruner, MLflow tracking into an existing SQLite store;
  ``mlp_study_K``: the same with ``batch_trials=K`` for each ``--k``;
- ``cnn_bare``, ``cnn_study``, ``cnn_study_K``: the same with ``study=digits_cnn``;
- ``one_trial``: a 1-trial study with tracking (an existing store); ``one_trial_none``: ``tracking_uri=none``;
- ``split``: ``scripts/bench.py --parts c`` (in process, 20 trials): its share of the wall time outside the
  training steps, one at a time.

Every scenario runs ``--repeats`` times, interleaved (round 1 of all, then round 2...), each study into a
fresh journal in a scratch folder; the table gives the median wall time, the ratios of the bare loops to
the studies, the median CPU time (user + system, the process and the MLflow writer it waits for: on a busy
machine the steadier figure) and every run's wall time. ``--roots A,B`` runs every scenario with the code of each checkout (``PYTHONPATH``;
``scripts/bare_loop.py`` from this checkout, ``scripts/bench.py`` from each), interleaved too: before/after on one
busy machine. Both sides run ``--threads`` torch threads (``threads=N`` for the studies; ``auto``: the
studies choose, the bare loops take torch's default).

    .venv/bin/python scripts/bench_e2e.py --repeats 3 --k 8
    .venv/bin/python scripts/bench_e2e.py --scenarios one_trial,one_trial_none --roots /work/main,.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
MLP = ["model.depth=5", "model.width=256"]
STUDY = ["score.seeds=1", "baselines=[]", "select.top_k=0", "progress=false"]


def load_avg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def scenarios(names: list[str], ks: list[int], trials: int, threads: str) -> dict[str, tuple[list[str], str]]:
    """Each scenario's command (after the interpreter) and kind (``bare``, ``study``, ``split``)."""
    bare_threads = [] if threads == "auto" else ["--threads", threads]
    study_threads = [f"threads={threads}"]
    out: dict[str, tuple[list[str], str]] = {}
    for family, proxy in (("mlp", MLP), ("cnn", ["study=digits_cnn"])):
        out[f"{family}_bare"] = ([str(HERE / "scripts" / "bare_loop.py"), "--trials", str(trials), *bare_threads,
                                  *proxy], "bare")
        study = ["-m", "initsearch", *proxy, f"n_trials={trials}", *STUDY, *study_threads]
        out[f"{family}_study"] = (study, "study")
        for k in ks:
            out[f"{family}_study_{k}"] = ([*study, f"batch_trials={k}"], "study")
    out["one_trial"] = (["-m", "initsearch", "n_trials=1", *STUDY], "study")
    out["one_trial_none"] = (["-m", "initsearch", "n_trials=1", *STUDY, "tracking_uri=none"], "study")
    out["split"] = (["{root}/scripts/bench.py", "--parts", "c", "--trials", "20"], "split")
    return {name: out[name] for name in names}


def run_once(python: str, root: Path, command: list[str], kind: str, scratch: Path, tag: str) -> dict:
    """One process, timed from start to exit; a study's own journal, the shared MLflow store."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [python, *command]
    if kind == "study":
        cmd += [f"storage={scratch}/{tag}.journal", f"study_name={tag}", f"tracking_uri=sqlite:///{scratch}/mlflow.db"
                if not any(a.startswith("tracking_uri=") for a in command) else "",
                f"hydra.run.dir={scratch}/out/{tag}"]
    elif kind == "split":
        cmd += ["--out", str(scratch / f"{tag}.json")]
    cmd = [a.replace("{root}", str(root)) for a in cmd if a]
    started, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the process and the ones it waited for (the writer)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nexited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = {"wall_s": wall, "cpu_s": cpu}
    if kind == "split":
        report = json.loads((scratch / f"{tag}.json").read_text())
        part = next(v for k, v in report["parts"].items() if k.startswith("c"))
        result["overhead"] = part["overhead_outside_training_steps"]
        result["split_s"] = part["split_s"]
        result["wall_s"] = part["seconds"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="mlp_bare,mlp_study,mlp_study_K,cnn_bare,cnn_study_K,one_trial,"
                        "one_trial_none,split", help="comma-separated; mlp_study_K/cnn_study_K: one per --k")
    parser.add_argument("--k", default="8", help="population size(s), comma-separated (or auto)")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--threads", default="1", help="torch threads on both sides, or auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--roots", default=str(HERE), help="checkouts whose code runs, comma-separated")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--out", default="", help="also write the figures here (JSON)")
    args = parser.parse_args(argv)

    ks = [k for k in args.k.split(",") if k.strip()]
    names: list[str] = []
    for name in args.scenarios.split(","):
        names += [name.replace("_K", f"_{k}") for k in ks] if name.endswith("_K") else [name]
    table = scenarios(names, ks, args.trials, args.threads)
    roots = [Path(r).resolve() for r in args.roots.split(",")]
    runs: dict[tuple[str, str], list[dict]] = {}
    report = {"load_avg_start": load_avg(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "argv": sys.argv[1:]}
    with tempfile.TemporaryDirectory(prefix="initsearch-e2e-") as tmp:
        scratch = Path(tmp)
        for root in roots:  # an existing MLflow store, as a user's second study finds it
            run_once(args.python, root, ["-m", "initsearch", "n_trials=1", *STUDY, "tracking_uri=sqlite:///"
                                         f"{scratch}/mlflow.db"], "study", scratch, f"warm_{len(runs)}_{root.name}")
        for rep in range(args.repeats):
            for name, (command, kind) in table.items():
                for root in roots:
                    tag = f"{name}_{root.name}_{rep}".replace("-", "_")
                    result = run_once(args.python, root, command, kind, scratch, tag)
                    runs.setdefault((name, str(root)), []).append(result)
                    extra = f", outside training steps {100 * result['overhead']:.1f}%" if "overhead" in result else ""
                    print(f"[{rep + 1}/{args.repeats}] {name:<18} {root.name:<14} {result['wall_s']:7.2f} s "
                          f"(CPU {result['cpu_s']:.2f} s){extra}"
                          f"  (load {load_avg()})", flush=True)
    report["load_avg_end"] = load_avg()
    median = {key: statistics.median(r["wall_s"] for r in results) for key, results in runs.items()}
    print(f"\nload average (1/5/15 min): start {report['load_avg_start']}, end {report['load_avg_end']}; "
          f"{args.repeats} runs each, interleaved; threads {args.threads}")
    print(f"{'scenario':<18} {'code':<14} {'median s':>9}  {'vs bare':>8}  {'CPU s':>6}  runs (s)")
    for (name, root), results in runs.items():
        family = name.split("_")[0]
        bare = median.get((f"{family}_bare", root))
        ratio = f"{bare / median[(name, root)]:7.2f}x" if bare and "study" in name else ""
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in results)
        extra = ""
        if "overhead" in results[0]:
            extra = "  outside training steps: " + ", ".join(f"{100 * r['overhead']:.1f}%" for r in results)
        cpu = statistics.median(r["cpu_s"] for r in results)
        print(f"{name:<18} {Path(root).name:<14} {median[(name, root)]:9.2f}  {ratio:>8}  {cpu:6.2f}  {walls}{extra}")
    if args.out:
        report["runs"] = {f"{name} @ {root}": results for (name, root), results in runs.items()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
