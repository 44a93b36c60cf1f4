"""Pilot: is a federated run's gap to `train` on a pilot cell a matter of rounds (or users per round)?

    python -m simulations.pilot_federated_rounds [--cells NAME:SEED,...] [--rounds 600,1200] [--all-users]
        [--work DIR] [--out FILE]

Two pilot cells stayed more than a point below `train` at the matrix's federated settings
(bench_results/federated_server_lr_pilot.md: clickers:11 and iso-shared:102, at every server rate tried). Their
accuracy was still rising when the cosine schedule ended. This pilot runs the matrix's federated row before 0.2.5
(`lore-fed simulate --privacy none`, the real ServerApp and ClientApp in process, `train`'s pair-weighted choice, a
fifth of the seen users per round, every other flag at its default) at each `--rounds` value, and with
`--all-users` once more at the first value with every seen user in every round (at most 1,000, as the default),
and writes each run's distance to `train`. It chooses nothing: a default taken from it must first be checked on every
pilot cell and then rerun on the matrix.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json
from lore_core.pairs import load_pairs
from simulations import bench_matrix as matrix
from simulations.bench_pair_weighting import pair_file, run_cell
from simulations.pilot_federated_steps import GROUPS, cells_flag, federated, pilot_trains, write_pilot

CELLS = ("clickers:11", "iso-shared:102")
DEFAULT_OUT = "bench_results/federated_rounds_pilot.md"


def simulate_arm(name: str, seed: int, fed: dict, tag: str, work: Path) -> dict:
    """One cell's pair-weighted `simulate` row with the federated settings `fed` (cached under work/results)."""
    cache = work / "results" / name / f"seed{seed}" / f"pair-simulate-{tag}.json"
    if not cache.exists():
        path = pair_file(name, seed, work)
        chosen = matrix.train_choice(run_cell(name, seed, work)["pair"]["train"], "pair")
        run_dir = matrix._fresh(work / "runs" / name / f"seed{seed}" / f"pair-simulate-{tag}")
        atomic_write_json(cache, matrix.simulate_row(path, run_dir, chosen, fed, ["--privacy", "none"]))
    return json.loads(cache.read_text())


def arms(name: str, seed: int, rounds: list[int], all_users: bool, work: Path) -> dict[str, dict]:
    """{arm label: its federated settings}: a fifth of the seen users per round (the matrix's and the hostile
    benchmark's federated row before 0.2.5) at each of `rounds`, then every user (the default since)."""
    from lore_cli.simulate_command import default_users_per_round

    path = pair_file(name, seed, work)
    pairs = load_pairs(path)
    n_seen = int(np.unique(pairs.user[pairs.seen]).size)
    base = federated(name, path, n_seen)
    out = {f"{r} rounds, a fifth": {**base, "rounds": r} for r in rounds}
    if all_users:  # `simulate --privacy none`'s default since 0.2.5: every seen user, at most 1,000
        out[f"{rounds[0]} rounds, every user"] = {**base, "rounds": rounds[0],
                                                  "clients_per_round": default_users_per_round("none", n_seen)}
    return out


def markdown(table: dict, labels: list[str], command: str) -> str:
    lines = [f"# Rounds of a federated run without privacy on pilot cells (`{command}`)", "",
             "`simulate` (privacy none, `train`'s pair-weighted choice, the matrix's federated row but for the rounds "
             "and users per round named) minus `train`, points, seen / new users.", "",
             "| cell | objective | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for cell, row in table.items():
        lines.append(f"| {cell} | {row['objective']} | " + " | ".join(
            " / ".join(f"{100 * d:+.1f}" for d in row["minus_train"][label]) for label in labels) + " |")
    lines.append("")
    for label in labels:
        gaps = [d for row in table.values() for d in row["minus_train"][label]]
        lines.append(f"- {label}, seen and new together: mean {100 * np.mean(gaps):+.2f} points, lowest "
                     f"{100 * min(gaps):+.1f}, {sum(d < -0.01 for d in gaps)} of {len(gaps)} more than a point "
                     "below `train`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--rounds", default="600,1200")
    parser.add_argument("--all-users", action="store_true", help="also the first --rounds with every user per round")
    parser.add_argument("--work", default="runs/bench_pair_weighting")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rounds = [int(r) for r in args.rounds.split(",")]
    work = Path(args.work)
    table, labels = {}, []
    for cell, name, seed, train, objective in pilot_trains(args.cells, work, parser.error):
        runs = {}
        for label, fed in arms(name, seed, rounds, args.all_users, work).items():
            tag = f"r{fed['rounds']}-m{fed['clients_per_round']}"
            runs[label] = simulate_arm(name, seed, fed, tag, work)
        labels = list(runs)
        table[cell] = {"objective": objective, "minus_train": {
            label: [run[g] - train[g] for g in GROUPS] for label, run in runs.items()}}
        print(cell, {k: [round(100 * d, 1) for d in v] for k, v in table[cell]["minus_train"].items()}, flush=True)
    command = ("python -m simulations.pilot_federated_rounds" + cells_flag(args.cells, CELLS)
               + ("" if args.rounds == "600,1200" else f" --rounds {args.rounds}")
               + (" --all-users" if args.all_users else ""))
    write_pilot(Path(args.out), {"rounds": rounds, "cells": table}, markdown(table, labels, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
