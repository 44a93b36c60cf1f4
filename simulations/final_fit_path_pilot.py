"""Does `lore-fed train` report the estimator its selection measured? The final fit, walked or cold, on pilot cells.

    python -m simulations.final_fit_path_pilot [--cells POP:SEED:TRAINSEED,...] [--work runs/final_fit_path_pilot]
                                               [--out bench_results]

The selection scores each (rank, l2) by fits that walk the l2 grid from strong to weak, each warm-started where the
previous one ended. The final fit used to start cold at the chosen l2; the objective is not convex, so at a weak l2
that lands in another optimum than the one the selection scored. For each cell (a stress-matrix population, its
pilot seed, and `lore-fed train --seed`, 0 being the default), this runs `lore-fed train` (the final fit now walks the
grid as the selection did) and `--rank 1` (BT), then refits the same choice cold on all training pairs (the old final
fit: `max_iter` iterations from the seeded random start, the marginal refit from it where chosen) and scores both as
every run is scored (`lore_core.evaluation`). Pilot seeds only (>= 100): nothing here is a reported figure.
Writes OUT/final_fit_path_pilot.{md,json}; each cell is cached under --work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text

DEFAULT_CELLS = ",".join([f"iso-shared:{s}:{t}" for s in (101, 102, 103, 104) for t in (0, s)]
                         + [f"{p}:101:0" for p in ("iso-20-40", "iso-5-15", "aniso-20-40", "iso-noise", "iso-weak",
                                                   "iso-zero")])


def cold_refit(train, metrics: dict, seed: int) -> np.ndarray:
    """The old final fit of the run's choice: cold at the chosen l2 on all training pairs (TrainConfig defaults)."""
    from lore_core.joint_trainer import TrainConfig, fit_basis_and_weights, fit_basis_marginal
    from lore_core.simplex_fit import prior_from_pairs

    config = TrainConfig()
    ids, idx = np.unique(train.user, return_inverse=True)
    rank, l2 = int(metrics["rank"]), float(metrics["l2"])
    weight_by = metrics.get("weight_by", "user")  # the run's (it was recorded once pair weighting existed)
    basis, _ = fit_basis_and_weights(train.diff, idx, ids.size, rank=rank, l2=l2, max_iter=config.max_iter,
                                     prior_strength=prior_from_pairs(idx, ids.size, config.train_prior_pairs),
                                     seed=seed, weight_by=weight_by)
    if metrics.get("objective") == "marginal" and rank > 1:
        basis = fit_basis_marginal(train.diff, idx, ids.size, rank=rank, l2=l2, init=basis, max_iter=config.max_iter,
                                   weight_by=weight_by)
    return basis


def run_cell(name: str, seed: int, train_seed: int, work: Path) -> dict:
    from lore_cli.main import main as cli
    from lore_core.evaluation import evaluate_model
    from lore_core.pairs import load_pairs
    from simulations.bench_matrix import POPULATIONS, population_file

    cache = work / "results" / f"{name}-seed{seed}-train{train_seed}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    pop = {p.name: p for p in POPULATIONS}[name]
    path, _ = population_file(pop, seed, work, False)
    runs = work / "runs" / name / f"seed{seed}-train{train_seed}"
    out = {}
    for row, flags in (("bt", ["--rank", "1"]), ("walked", [])):
        run_dir = runs / row
        if not (run_dir / "metrics.json").exists():
            if cli(["train", str(path), "--out", str(run_dir), "--seed", str(train_seed), *flags]) != 0:
                raise SystemExit(f"lore-fed train failed on {name} seed {seed}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        out[row] = {"seen": metrics["seen_test_acc"], "new": metrics["unseen_test_acc"]}
        if row == "walked":
            out["choice"] = {k: metrics[k] for k in ("rank", "l2", "prior_pairs", "objective")}
    pairs = load_pairs(path)
    cold = evaluate_model(pairs, cold_refit(pairs.select(seen=True, split="train"), out["choice"], train_seed),
                          prior_pairs=out["choice"]["prior_pairs"])
    out["cold"] = {"seen": cold["seen_test_acc"], "new": cold["unseen_test_acc"]}
    atomic_write_json(cache, out)
    return out


def points(cell: dict, row: str) -> tuple[float, float]:
    return tuple(100 * (cell[row][k] - cell["bt"][k]) for k in ("seen", "new"))


def markdown(cells: dict[str, dict], command: str) -> str:
    lines = ["# The final fit: walked down the l2 grid as the selection did, or cold (pilot cells)", "",
             f"`{command}`. Points above BT (`lore-fed train --rank 1`, same `--seed`), seen / new users. `walked`: "
             "`lore-fed train` today (the final fit repeats the selection's warm-started l2 walk); `cold`: the same "
             "choice refit cold at the chosen l2, as the final fit did before. Pilot seeds only.", "",
             "| population | seed | `--seed` | choice (rank, objective, l2, prior) | walked | cold |",
             "|---|---|---|---|---|---|"]
    for key, cell in cells.items():
        name, seed, train_seed = key.split(":")
        c = cell["choice"]
        walked, cold = points(cell, "walked"), points(cell, "cold")
        lines.append(f"| {name} | {seed} | {train_seed} | {c['rank']}, {c['objective']}, {c['l2']:.1e}, "
                     f"{c['prior_pairs']:g} | {walked[0]:+.1f} / {walked[1]:+.1f} | {cold[0]:+.1f} / {cold[1]:+.1f} |")
    walked = np.array([points(c, "walked") for c in cells.values()])
    cold = np.array([points(c, "cold") for c in cells.values()])
    lines += ["", f"Mean over {len(cells)} cells: walked {walked[:, 0].mean():+.2f} / {walked[:, 1].mean():+.2f}, "
              f"cold {cold[:, 0].mean():+.2f} / {cold[:, 1].mean():+.2f}; lowest cell: walked "
              f"{walked[:, 0].min():+.1f} / {walked[:, 1].min():+.1f}, cold {cold[:, 0].min():+.1f} / "
              f"{cold[:, 1].min():+.1f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=DEFAULT_CELLS)
    parser.add_argument("--work", default="runs/final_fit_path_pilot")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    cells = {}
    for key in args.cells.split(","):
        name, seed, train_seed = key.split(":")
        if int(seed) < 100:
            parser.error(f"{key}: pilot seeds are >= 100 (the matrix reports seeds 0-2)")
        cells[key] = run_cell(name, int(seed), int(train_seed), Path(args.work))
        print(key, json.dumps(cells[key]), flush=True)
    out = Path(args.out)
    atomic_write_json(out / "final_fit_path_pilot.json", cells)
    command = "python -m simulations.final_fit_path_pilot" + ("" if args.cells == DEFAULT_CELLS
                                                               else f" --cells {args.cells}")
    atomic_write_text(out / "final_fit_path_pilot.md", markdown(cells, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
