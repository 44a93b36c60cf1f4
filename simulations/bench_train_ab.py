"""`lore-fed train` of two commits side by side: same pair files, same machine, the same moments.

    python -m simulations.bench_train_ab --before REV [--seeds 0,1,2] [--train-pairs 30,50] [--users 200]
                                         [--cells POP:SEED,...] [--out bench_results/train_ab.md]

For each seed one synthetic population (the engine benchmark's: D = 384, true rank 5, 50 new users with 10
few-shot pairs; `--users` seen users with `--train-pairs` training pairs each) is written once, and `lore-fed train`
(default flags, one thread each) runs on it from the `--before` commit (a temporary git worktree) and from this
checkout at the same time, so both share whatever else loads the machine. Reports wall seconds, the choice and test
accuracy of each, and the median ratio after / before. Once one arm ends the other runs alone, which pulls the
ratio towards 1. Timing only: which code is more accurate is the stress matrix's question.
`--cells iso-weak:0,...` runs on those stress-matrix cells instead (`simulations.bench_matrix`'s pair file of that
population and seed, `train --seed SEED` as the matrix runs it): do two commits make the same choice on one machine?
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.pairs import PAIRS_FILENAME, save_pairs
from simulations.bench_matrix import TRAIN_CHOICE, train_row_of
from simulations.revisions import ROOT, check_imports, checkout_label, code_env, worktree
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

def start_train(root: Path, pairs: Path, out: Path, flags: list[str] | tuple = ()) -> tuple[subprocess.Popen, float]:
    """`lore-fed train PAIRS --out OUT [flags]` with the code under `root`, one thread; (process, start time)."""
    env = code_env(root)
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "lore_cli.main", "train", str(pairs), "--out", str(out),
                                    *flags],
                                   cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, time.perf_counter()


def wait_all(runs: dict[str, tuple[subprocess.Popen, float]]) -> dict[str, float]:
    """Each run's own wall seconds (polled, so one run's end is not timed by waiting on another)."""
    seconds: dict[str, float] = {}
    while len(seconds) < len(runs):
        for name, (process, started) in runs.items():
            if name not in seconds and process.poll() is not None:
                seconds[name] = time.perf_counter() - started
        time.sleep(0.05)
    return seconds


def result(process: subprocess.Popen, seconds: float, out: Path) -> dict:
    if process.returncode != 0:
        log = (out.parent / f"{out.name}.log").read_text()
        raise RuntimeError(f"train in {out} failed (exit {process.returncode}): {log[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    held_out_fits = {(row["rank"], row["l2"], row["objective"]) for row in metrics["selection"]}
    return {**train_row_of(metrics, seconds), "held_out_fits": len(held_out_fits),
            "folds": metrics.get("held_out", {}).get("folds", 1)}


def _choice(run: dict) -> str:
    return (f"rank {run['rank']} {run['objective']}, l2 {run['l2']:.1e}, prior {run['prior_pairs']:g}, "
            f"{run['seen_test_acc']:.4f} / {run['unseen_test_acc']:.4f}")


def markdown(rows: list[dict], before: str, after: str, config: dict) -> str:
    population = ("Stress-matrix cells (`simulations.bench_matrix`'s pair files, `train --seed SEED`)"
                  if config.get("cells") else
                  f"{config['users']} seen users x {config['train_pairs'][0]}-{config['train_pairs'][1]} training "
                  "pairs, D = 384, true rank 5")
    lines = [f"# `lore-fed train`: {after} against {before}, side by side", "",
             f"{population}; both commits run at the same time on one shared 2-core machine, one thread each.",
             "A held-out fit is one (rank, l2, objective) of the selection.", "",
             "| cell | before: s | after: s | ratio | held-out fits before / after | before: choice, seen / new | "
             "after: choice, seen / new | same choice and accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["before"], r["after"]
        same = all(b.get(k) == a.get(k) for k in (*TRAIN_CHOICE, "seen_test_acc", "unseen_test_acc"))
        lines.append(f"| {r['cell']} | {b['seconds']:.1f} | {a['seconds']:.1f} | {a['seconds'] / b['seconds']:.2f} | "
                     f"{b['held_out_fits']} / {a['held_out_fits']} | {_choice(b)} | {_choice(a)} | "
                     f"{'yes' if same else 'no'} |")
    ratio = float(np.median([r["after"]["seconds"] / r["before"]["seconds"] for r in rows]))
    lines += ["", f"Median time ratio after / before: {ratio:.2f}."]
    return "\n".join(lines) + "\n"


def pair_files(args: argparse.Namespace, train_pairs: tuple[int, int], tmp: Path) -> list[tuple[str, Path, list[str]]]:
    """(cell name, pair file, train flags) of each run: `--cells` from the stress matrix, or one synthetic
    population per seed."""
    if args.cells:
        from simulations.bench_matrix import POPULATIONS, population_file

        by_name = {p.name: p for p in POPULATIONS}
        out = []
        for cell in args.cells.split(","):
            name, _, seed = cell.partition(":")
            if name not in by_name or not seed.isdigit():
                raise SystemExit(f"--cells: expected POP:SEED with POP one of {sorted(by_name)}, got {cell!r}")
            path, _ = population_file(by_name[name], int(seed), Path(args.work), quick=False)
            out.append((cell, path, ["--seed", seed]))
        return out
    out = []
    for seed in (int(s) for s in args.seeds.split(",")):
        pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(train_pairs=train_pairs, seen_users=args.users,
                                                             seed=seed))
        out.append((f"seed {seed}", save_pairs(pairs, tmp / f"seed{seed}" / PAIRS_FILENAME), []))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision of the earlier code")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-pairs", default="30,50")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--cells", default="", help="stress-matrix cells POP:SEED,... instead of --seeds")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_matrix"), help="the matrix's cache (--cells)")
    parser.add_argument("--out", default="bench_results/train_ab.md")
    args = parser.parse_args(argv)
    low, high = (int(v) for v in args.train_pairs.split(","))
    after = checkout_label()
    rows, running = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        cells = pair_files(args, (low, high), Path(tmp))  # a bad --cells is refused before the worktree is made
        with worktree(args.before, Path(tmp) / "before") as tree:
            try:
                for root in (tree, ROOT):
                    check_imports(root)
                for index, (cell, path, flags) in enumerate(cells):
                    where = Path(tmp) / f"run{index}"
                    runs = running = {name: start_train(root, path, where / name, flags)
                                      for name, root in (("before", tree), ("after", ROOT))}
                    seconds = wait_all(runs)
                    row = {"cell": cell, **{name: result(runs[name][0], seconds[name], where / name) for name in runs}}
                    rows.append(row)
                    print(f"{cell}: before {row['before']['seconds']:.1f} s, after {row['after']['seconds']:.1f} s",
                          flush=True)
            finally:
                for process, _ in running.values():
                    if process.poll() is None:
                        process.kill()
                        process.wait()
    out = Path(args.out)
    config = {"users": args.users, "train_pairs": (low, high), "cells": args.cells, "before": args.before,
              "after": after}
    atomic_write_json(out.with_suffix(".json"), {"config": config, "rows": rows})
    atomic_write_text(out, markdown(rows, args.before, after, config))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
