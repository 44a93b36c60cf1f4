"""Pilot: the server's base rate of a federated run without privacy (pair weighting, one local step).

    python -m simulations.pilot_federated_server_lr [--cells NAME:SEED,...] [--rates 1,0.3,0.1] [--work DIR]
        [--out FILE]

The rate without privacy (server/optimizer.py DEFAULT_SERVER_LR, Adam, cosine to 0) was chosen when each client
took five local steps under user weighting. With lore-fed 0.2.1's one pair-weighted step, the pilot cell
`clickers:11` (rank 8) settled 1.6 points below `train` at rate 1 with a fifth of the users per round, and about
level with it with every user per round (a run by hand): Adam's per-entry step of about the rate carried the
sample's noise. This pilot
runs `lore-fed simulate` (the matrix's federated row before 0.2.5: the real ServerApp and ClientApp in process,
600 rounds of a fifth of the seen users, `train`'s pair-weighted choice of the same cell) at each `--rates` value on
pilot cells only (`pilot_federated_steps`' cells: hostile populations at seeds 11-12, matrix ones at 101, whose `train`
rows and rate-1 rows it reuses from its --work), and writes each run's distance to `train`. It chooses nothing by
itself; a default taken from it is taken on these cells.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json
from simulations import bench_matrix as matrix
from simulations.bench_pair_weighting import pair_file, run_cell
from simulations.pilot_federated_steps import CELLS, GROUPS, cells_flag, federated, pilot_trains, write_pilot

# pilot_federated_steps' cells, and more matrix-shaped ones, added when the check on the reported seeds
# (`--check-reported iso-20-40`) found rate 0.3 two to three points below `train` on two of three iso-20-40 seeds
# (joint; the pilot's iso-20-40:101 had chosen marginal)
CELLS = (*CELLS, "iso-20-40:102", "iso-20-40:103", "iso-20-40:104", "iso-20-40:105", "iso-20-40:106",
         "iso-shared:102")
DEFAULT_OUT = "bench_results/federated_server_lr_pilot.md"
RATE_ONE_STEPS = {"joint": 1, "marginal": 5}  # pilot_federated_steps' cached rate-1 row of each update's default


def simulate_rate(name: str, seed: int, rate: float, objective: str, work: Path) -> dict:
    """One cell's pair-weighted `simulate` row at server rate `rate` and default local steps (cached under
    work/results, the rate given explicitly). At rate 1 pilot_federated_steps' cached row of today's default steps
    stands in where it exists (it ran rate 1, the default then; the marginal update's was cached under 5 steps,
    which it ignores)."""
    if rate == 1.0:
        cached = work / "results" / name / f"seed{seed}" / f"pair-simulate-steps{RATE_ONE_STEPS[objective]}.json"
        row = json.loads(cached.read_text()) if cached.exists() else {}
        if row and row.get("server_lr", 1.0) == 1.0:
            return row
    cache = work / "results" / name / f"seed{seed}" / f"pair-simulate-lr{rate:g}.json"
    if not cache.exists():
        path = pair_file(name, seed, work)
        chosen = matrix.train_choice(run_cell(name, seed, work)["pair"]["train"], "pair")
        run_dir = matrix._fresh(work / "runs" / name / f"seed{seed}" / f"pair-simulate-lr{rate:g}")
        atomic_write_json(cache, matrix.simulate_row(path, run_dir, chosen, federated(name, path),
                                                     ["--privacy", "none"], ("--server-lr", str(rate))))
    return json.loads(cache.read_text())


def markdown(table: dict[str, dict], rates: list[float], command: str) -> str:
    lines = [f"# Server rate of a federated run without privacy (`{command}`)", "",
             "`simulate` (privacy none, pair weighting with its default local steps, `train`'s pair-weighted "
             "choice, 600 rounds of a fifth of the seen users, Adam with a cosine schedule) minus `train`, points, "
             "seen / new users, on pilot cells; `swing`: the most the seen-user figure moved between evaluations "
             "over the last quarter of the run, points.", "",
             "| cell | objective | " + " | ".join(f"rate {r:g} | swing" for r in rates) + " |",
             "|---|---|" + "---|---|" * len(rates)]
    for cell, row in table.items():
        cells = [" / ".join(f"{100 * d:+.1f}" for d in row["minus_train"][f"{r:g}"])
                 + f" | {100 * row['swing'][f'{r:g}']:.1f}" for r in rates]
        lines.append(f"| {cell} | {row['objective']} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in rates:
        gaps = [d for row in table.values() for d in row["minus_train"][f"{r:g}"]]
        lines.append(f"- rate {r:g}, seen and new together: mean {100 * np.mean(gaps):+.2f} points, lowest "
                     f"{100 * min(gaps):+.1f}, {sum(d < -0.01 for d in gaps)} of {len(gaps)} more than a point "
                     "below `train`.")
    return "\n".join(lines) + "\n"


def reported_check(populations: str, rates: list[float], matrix_work: Path, work: Path) -> dict:
    """After the pilot, a check of its choice: the matrix's reported seeds 0-2 of `populations` at each rate, with the
    matrix's own `train` row and federated settings (its cache under `matrix_work`; rate 1 is its cached `simulate`
    row). {population: {seed: {rate: simulate - train, points (seen, new)}}}."""
    table = {}
    for name in populations.split(","):
        pop = next(p for p in matrix.POPULATIONS if p.name == name)
        for seed in (0, 1, 2):
            done = json.loads((matrix_work / "results" / name / f"seed{seed}.json").read_text())
            if matrix.other_rate(done["simulate"]):
                raise SystemExit(f"{matrix_work}: {name} seed {seed}'s simulate row ran another rate; rerun the matrix")
            path, _ = matrix.population_file(pop, seed, matrix_work, quick=False)
            fed = federated(name, path)  # a fifth of the users, as the check ran (the matrix's before 0.2.5)
            if done["simulate"].get("clients_per_round") != fed["clients_per_round"]:
                raise SystemExit(f"{matrix_work}: {name} seed {seed}'s simulate row ran other users per round than "
                                 f"this check's {fed['clients_per_round']} (a matrix at 0.2.5's default of every user)")
            runs = {}
            for rate in rates:
                cache = work / "results" / "reported-check" / name / f"seed{seed}-lr{rate:g}.json"
                if rate == 1.0:
                    runs[f"{rate:g}"] = done["simulate"]
                    continue
                if not cache.exists():
                    run_dir = matrix._fresh(work / "runs" / "reported-check" / name / f"seed{seed}-lr{rate:g}")
                    atomic_write_json(cache, matrix.simulate_row(
                        path, run_dir, done["train"], fed,
                        ["--privacy", "none"], ("--server-lr", str(rate))))
                runs[f"{rate:g}"] = json.loads(cache.read_text())
            table.setdefault(name, {})[str(seed)] = {
                r: [run[g] - done["train"][g] for g in GROUPS] for r, run in runs.items()}
            print(name, seed, {r: [round(100 * d, 1) for d in v] for r, v in table[name][str(seed)].items()},
                  flush=True)
    return table


def reported_markdown(table: dict, rates: list[float], command: str) -> str:
    lines = [f"# Server rate without privacy on the matrix's reported seeds (`{command}`)", "",
             "A check on the reported seeds after the pilot (bench_results/federated_server_lr_pilot.md), which "
             "alone favoured 0.3: `simulate` minus `train`, points, seen / new users, with the matrix's own `train` "
             "row and federated settings (600 rounds of a fifth of the seen users; rate 1 is the matrix's cached "
             "row). It kept the default at 1.", "",
             "| population | seed | " + " | ".join(f"rate {r:g}" for r in rates) + " |",
             "|---|---|" + "---|" * len(rates)]
    for name, seeds in table.items():
        for seed, row in seeds.items():
            lines.append(f"| {name} | {seed} | " + " | ".join(
                " / ".join(f"{100 * d:+.1f}" for d in row[f"{r:g}"]) for r in rates) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--rates", default="1,0.3,0.1")
    parser.add_argument("--work", default="runs/bench_pair_weighting")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--check-reported", metavar="POPULATIONS", default=None,
                        help="instead: the matrix's reported seeds of these populations at each rate (a check after "
                             "the pilot), from the matrix cache --matrix-work")
    parser.add_argument("--matrix-work", default="runs/matrix_today")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    work = Path(args.work)
    if args.check_reported:
        table = reported_check(args.check_reported, rates, Path(args.matrix_work), work)
        command = (f"python -m simulations.pilot_federated_server_lr --check-reported {args.check_reported} "
                   f"--rates {args.rates}")
        out = Path(args.out if args.out != DEFAULT_OUT else "bench_results/federated_server_lr_reported_check.md")
        write_pilot(out, {"rates": rates, "populations": table}, reported_markdown(table, rates, command))
        return 0
    table = {}
    for cell, name, seed, train, objective in pilot_trains(args.cells, work, parser.error):
        runs = {f"{r:g}": simulate_rate(name, seed, r, objective, work) for r in rates}
        table[cell] = {"objective": objective,
                       "minus_train": {r: [run[g] - train[g] for g in GROUPS] for r, run in runs.items()},
                       "swing": {r: run.get("swing_seen", 0.0) for r, run in runs.items()}}
        print(cell, {r: [round(100 * d, 1) for d in table[cell]["minus_train"][r]] for r in runs}, flush=True)
    command = "python -m simulations.pilot_federated_server_lr" + cells_flag(args.cells, CELLS)
    write_pilot(Path(args.out), {"rates": rates, "cells": table}, markdown(table, rates, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
