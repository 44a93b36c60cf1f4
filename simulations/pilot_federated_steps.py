"""Pilot: the clients' local steps of a pair-weighted federated run (privacy none, joint update).

    python -m simulations.pilot_federated_steps [--cells NAME:SEED,...] [--steps 5,1] [--work DIR] [--out FILE]

With `weight-by pair` each client scales a user's update by the user's pairs over the population's mean. The joint
update was `local-steps` (lore-fed 0.2.0's default 5) gradient steps on the user's own mean loss, not one gradient
step, so on a population where most users hold one pair the scaled updates were not the pair-weighted likelihood's
step: the hostile `thin-majority` run settled 0.8 / 1.1 points below `train` (bench_results/hostile_populations.md
at 174c026). One local step makes the update an exact gradient step; this pilot chose it as 0.2.1's default for
pair-weighted joint updates. This pilot runs `lore-fed simulate` (the matrix's federated
row before 0.2.5: the real ServerApp and ClientApp in process, 600 rounds of a fifth of the seen users, `train`'s
pair-weighted choice of the same cell) with each `--steps` value on pilot cells only (hostile populations at seeds
11-12, matrix ones at 101; `bench_pair_weighting`'s cells, whose `train` rows it reuses from its --work), and writes
each run's distance to `train`. It chooses nothing by itself; a default taken from it is taken on these cells.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.pairs import load_pairs
from simulations import bench_hostile_populations as hostile
from simulations import bench_matrix as matrix
from simulations.bench_pair_weighting import pair_file, run_cell

CELLS = ("thin-majority:11", "heavy-tail:11", "heavy-tail:12", "clickers:11", "minority:11", "weak-few:11",
         "iso-5-15:101", "iso-20-40:101", "iso-shared:101", "iso-noise:101", "iso-zero:101", "aniso-20-40:101",
         "iso-weak:101")
GROUPS = ("seen_test_acc", "unseen_test_acc")


def federated(name: str, path: Path, n_seen: int | None = None) -> dict:
    """The rounds and users per round these pilots ran, so that their cached rows stay what they were: 600 rounds of
    a fifth of the seen users, at least 10 on a hostile cell (the hostile benchmark's federated row before 0.2.5) and
    at least 50 on a matrix population (`simulate --privacy none`'s default before 0.2.5; it is now every seen user).
    `n_seen`: the cell's seen users where the caller has counted them (else read from the pair file)."""
    if name in hostile.POPULATIONS:
        return hostile.federated_a_fifth(name)
    if n_seen is None:
        pairs = load_pairs(path)
        n_seen = int(np.unique(pairs.user[pairs.seen]).size)
    return {"rounds": 600, "clients_per_round": min(max(50, n_seen // 5), n_seen)}


def simulate_steps(name: str, seed: int, steps: int, work: Path) -> dict:
    """One cell's pair-weighted `simulate` row with `steps` local steps (cached under work/results)."""
    cache = work / "results" / name / f"seed{seed}" / f"pair-simulate-steps{steps}.json"
    if not cache.exists():
        path = pair_file(name, seed, work)
        train = run_cell(name, seed, work)["pair"]["train"]
        chosen = matrix.train_choice(train, "pair")
        run_dir = matrix._fresh(work / "runs" / name / f"seed{seed}" / f"pair-simulate-steps{steps}")
        # the marginal update is one step and refuses another --local-steps (lore-fed 0.2.1)
        extra = () if chosen.get("objective") == "marginal" else ("--local-steps", str(steps))
        atomic_write_json(cache, matrix.simulate_row(path, run_dir, chosen, federated(name, path),
                                                     ["--privacy", "none"], extra))
    return json.loads(cache.read_text())


def markdown(table: dict[str, dict], steps: list[int], command: str) -> str:
    lines = [f"# Local steps of a pair-weighted federated run (`{command}`)", "",
             "`simulate` (privacy none, pair weighting, `train`'s pair-weighted choice, 600 rounds of a fifth of "
             "the seen users) minus `train`, points, seen / new users, on pilot cells. `objective`: the update "
             "`train`'s choice gives the clients (marginal: one exact step whatever `--local-steps` says).", "",
             "| cell | objective | " + " | ".join(f"{s} local steps" for s in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for cell, row in table.items():
        lines.append(f"| {cell} | {row['objective']} | " + " | ".join(
            " / ".join(f"{100 * d:+.1f}" for d in row["minus_train"][str(s)]) for s in steps) + " |")
    for s in steps:
        gaps = [d for row in table.values() if row["objective"] == "joint" for d in row["minus_train"][str(s)]]
        worst = min(gaps) if gaps else float("nan")
        lines.append("")
        lines.append(f"{s} local steps, joint-update cells, seen and new together: mean {100 * np.mean(gaps):+.2f} "
                     f"points, lowest {100 * worst:+.1f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--steps", default="5,1")
    parser.add_argument("--work", default="runs/bench_pair_weighting")
    parser.add_argument("--out", default="bench_results/federated_steps_pilot.md")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    work = Path(args.work)
    table = {}
    for cell, name, seed, train, objective in pilot_trains(args.cells, work, parser.error):
        # the marginal update is one exact step whatever --local-steps says: one run stands for every value
        runs = {s: simulate_steps(name, seed, s if objective == "joint" else steps[0], work) for s in steps}
        table[cell] = {"objective": objective,
                       "minus_train": {str(s): [r[g] - train[g] for g in GROUPS] for s, r in runs.items()}}
        print(cell, {s: [round(100 * d, 1) for d in table[cell]["minus_train"][str(s)]] for s in steps}, flush=True)
    command = "python -m simulations.pilot_federated_steps" + cells_flag(args.cells, CELLS)
    write_pilot(Path(args.out), {"steps": steps, "cells": table}, markdown(table, steps, command))
    return 0


def pilot_trains(cells: str, work: Path, error) -> Iterator[tuple[str, str, int, dict, str]]:
    """Each of the comma-separated NAME:SEED `cells` as (cell, name, seed, its pair-weighted `train` row, the update
    that row's choice gives the clients); a reported seed (under 11) goes to `error` (the parser's)."""
    for cell in cells.split(","):
        name, seed = cell.split(":")
        if int(seed) < 11:
            error(f"{cell}: pilot cells only (seeds 11 and up); the reported seeds are 0-2")
        train = run_cell(name, int(seed), work)["pair"]["train"]
        yield cell, name, int(seed), train, train.get("objective", "joint") if train["rank"] > 1 else "joint"


def cells_flag(cells: str, default: tuple[str, ...]) -> str:
    """The --cells part of a pilot's command line as its results file names it: none for the default cells."""
    return "" if cells == ",".join(default) else f" --cells {cells}"


def write_pilot(out: Path, payload: dict, markdown_text: str) -> None:
    """A pilot's results: out (markdown) and out.json, each written whole."""
    atomic_write_json(out.with_suffix(".json"), payload)
    atomic_write_text(out, markdown_text)
    print(markdown_text)


if __name__ == "__main__":
    raise SystemExit(main())
