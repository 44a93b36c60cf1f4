"""Two `lore-fed train` jobs at once on a small machine: how much does each slow down, with and without one thread?

    python -m simulations.bench_concurrent_jobs [--repeats 3] [--out bench_results]

A tester saw one `train` take 5.8 s alone and 188 s beside another on this 2-core machine. torch starts one compute
thread per core, so two jobs ask for twice the cores, and their threads wait on each other at every parallel region.
This runs the same `train` (the matrix's base population, fixed settings, so it chooses nothing) alone and as two
jobs at once, with torch's default threads and with OMP_NUM_THREADS=1 (MKL_NUM_THREADS=1), alternating the settings
in each repeat so that noise on a shared machine falls on both. Reports the median wall seconds of a job and the
ratios. Writes bench_results/concurrent_jobs.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from lore_core.atomic_io import atomic_write_json, atomic_write_text

TRAIN_FLAGS = ["--rank", "4", "--l2", "1e-5", "--prior-pairs", "1", "--objective", "joint"]
THREADS = {"default": {}, "one thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}


def run_jobs(pairs: Path, work: Path, jobs: int, env_extra: dict) -> list[float]:
    """Start `jobs` trains at once; the wall seconds of each."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(env_extra)
    starts, procs = [], []
    for j in range(jobs):
        out = work / f"run{j}-{time.monotonic_ns()}"
        starts.append(time.perf_counter())
        procs.append(subprocess.Popen([sys.executable, "-m", "lore_cli.main", "train", str(pairs), "--out", str(out),
                                       *TRAIN_FLAGS], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    seconds = []
    for start, proc in zip(starts, procs):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"train failed: {err.decode()[-500:]}")
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    from lore_core.pairs import save_pairs
    from simulations.bench_matrix import BASE
    from simulations.synthetic_pairs import make_synthetic_pairs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = save_pairs(make_synthetic_pairs(replace(BASE, seed=101))[0], work / "pairs.npz")
        times = {f"{name}, {jobs} job{'s' if jobs > 1 else ''}": [] for name in THREADS for jobs in (1, 2)}
        for _ in range(args.repeats):
            for name, env_extra in THREADS.items():
                for jobs in (1, 2):
                    times[f"{name}, {jobs} job{'s' if jobs > 1 else ''}"] += run_jobs(pairs, work, jobs, env_extra)
    median = {key: statistics.median(values) for key, values in times.items()}
    report = {"cpus": os.cpu_count(), "train_flags": TRAIN_FLAGS, "seconds": times, "median_seconds": median}
    atomic_write_json(Path(args.out) / "concurrent_jobs.json", report)
    lines = ["# Two `lore-fed train` jobs at once", "",
             f"`python -m simulations.bench_concurrent_jobs --repeats {args.repeats}` on {os.cpu_count()} CPUs: the "
             "matrix's base population (300 users x 20-40 pairs, seed 101), `train " + " ".join(TRAIN_FLAGS) + "`. "
             "Median wall seconds of one job over the repeats (each job of a pair counted).", "",
             "| threads | alone (s) | two at once (s) | slowdown |", "|---|---|---|---|"]
    for name in THREADS:
        alone, both = median[f"{name}, 1 job"], median[f"{name}, 2 jobs"]
        lines.append(f"| {name} | {alone:.1f} | {both:.1f} | {both / alone:.1f}x |")
    default_alone = median["default, 1 job"]
    lines += ["", f"One thread alone against default threads alone: {median['one thread, 1 job'] / default_alone:.2f}x; "
              f"two one-thread jobs against two default jobs: "
              f"{median['one thread, 2 jobs'] / median['default, 2 jobs']:.2f}x."]
    atomic_write_text(Path(args.out) / "concurrent_jobs.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
