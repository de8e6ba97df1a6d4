"""Threads against proxy size: the seconds of threads=auto's short measurement run, per thread count, for
several study presets; a table on stdout and a figure (docs/threads.png).

    .venv/bin/python scripts/threads.py [--studies digits_mlp,deep_mlp,digits_cnn] [--repeats 5] [--out docs/threads.png]

Each preset is timed with ``search.threads.time_proxy`` (MEASURE_STEPS steps of a fresh proxy, best of
REPEATS) for every count ``threads=auto`` would try, ``--repeats`` times, alternating the counts so that a
change of load hits them alike; the figure shows the median and the range of the repeats.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from initsearch.search.settings import settings_from_config
from initsearch.search.threads import MEASURE_STEPS, available_cores, candidates, time_proxy
from initsearch.search.trial import prepare
from initsearch.tracking.plots import pyplot, save_figure


def compose(study: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from initsearch.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[f"study={study}", "tracking_uri=none"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", default="digits_mlp,deep_mlp,digits_cnn")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="docs/threads.png")
    args = ap.parse_args()
    counts = candidates(available_cores())
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} UTC, {available_cores()} cores, load {os.getloadavg()}, "
          f"{MEASURE_STEPS} steps per run")
    results: dict[str, dict[int, list[float]]] = {}
    for study in args.studies.split(","):
        settings = settings_from_config(compose(study))
        proxy = prepare(settings)
        results[study] = {n: [] for n in counts}
        for _ in range(args.repeats):
            for n in counts:
                results[study][n].append(time_proxy(settings, proxy, n))
    print("| study | " + " | ".join(f"{n} thread{'s' if n > 1 else ''} (ms, median [min-max])" for n in counts)
          + " | auto picks |")
    print("| --- | " + " | ".join("---:" for _ in counts) + " | ---: |")
    for study, by_n in results.items():
        med = {n: statistics.median(v) for n, v in by_n.items()}
        chosen = 1
        for n in counts[1:]:
            if med[n] <= 0.9 * med[chosen]:
                chosen = n
        cells = [f"{1000 * med[n]:.0f} [{1000 * min(v):.0f}-{1000 * max(v):.0f}]" for n, v in by_n.items()]
        print(f"| {study} | " + " | ".join(cells) + f" | {chosen} |")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(counts)
    for i, n in enumerate(counts):
        xs = [j + (i - (len(counts) - 1) / 2) * width for j in range(len(results))]
        meds = [1000 * statistics.median(r[n]) for r in results.values()]
        lows = [m - 1000 * min(r[n]) for m, r in zip(meds, results.values())]
        highs = [1000 * max(r[n]) - m for m, r in zip(meds, results.values())]
        ax.bar(xs, meds, width, yerr=[lows, highs], capsize=3, label=f"{n} thread{'s' if n > 1 else ''}")
    ax.set_xticks(range(len(results)), list(results))
    ax.set_ylabel(f"ms for {MEASURE_STEPS} training steps (median, range)")
    ax.set_yscale("log")
    ax.set_title(f"Training time per thread count ({available_cores()} cores, {time.strftime('%Y-%m-%d')})")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
