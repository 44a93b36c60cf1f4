"""Would a stricter one-SE rule stop small populations from losing to one shared reward? A pilot, not a default.

    python -m simulations.pilot_one_se_threshold [--sizes 20,50] [--seeds 101,...,110] [--thresholds 1,1.5,2,2.5,3]
                                                 [--work runs/pilot_one_se] [--out bench_results]

On seeds 0-5 of `bench_small_populations`, 20-user populations still lost to BT on half the seeds (up to 4.2
points): among 50-150 candidates one may clear one SE by chance. A higher threshold would guard against that, so
this measures it, on pilot seeds only. Each population is the stress matrix's base (`bench_matrix.BASE`) with
`--sizes` seen users. `lore-fed train` (default flags) runs once and records its selection table; for each threshold
z, the candidate that `model_selection.beats_rank1(row, z)` and the table's held-out score would choose is trained
with its settings fixed (`--rank --l2 --prior-pairs --objective`), and its test accuracy is compared with BT
(`--rank 1`). z = 1 is what `train` does (the fixed run reproduces it). Runs are cached under `--work` (a run
directory with a metrics.json is read, not rerun), so a rerun only adds what is missing.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.model_selection import choose_from_table
from simulations.bench_matrix import BASE, _mean_se, train_row, train_row_of
from simulations.synthetic_pairs import write_synthetic_dataset

GROUPS = ("seen", "unseen")


def cached_train(pairs: Path, run_dir: Path, flags: list[str]) -> dict:
    """`train_row`, or the run's metrics.json where that run already finished."""
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        return train_row_of(json.loads(metrics.read_text()), float("nan"))
    return train_row(pairs, run_dir, flags)


def choice_at(table: list[dict], threshold: float) -> dict:
    """The row `select_one_se` would choose with `threshold` SEs in place of one."""
    return table[choose_from_table(table, threshold, side=-1.0)[0]]  # the side condition when this pilot ran


def run_population(size: int, seed: int, thresholds: list[float], work: Path) -> dict:
    root = work / "data" / f"{size}-s{seed}"
    if not (root / "pairs.npz").exists():
        write_synthetic_dataset(root, replace(BASE, seen_users=size, seed=seed))
    pairs = root / "pairs.npz"
    bt = cached_train(pairs, root / "bt", ["--rank", "1"])
    cached_train(pairs, root / "train", [])
    table = json.loads((root / "train" / "metrics.json").read_text())["selection"]
    out = {"size": size, "seed": seed, "bt": [bt[f"{g}_test_acc"] for g in GROUPS], "by_threshold": {}}
    for z in thresholds:
        row = choice_at(table, z)
        flags = ["--rank", str(row["rank"]), "--l2", repr(row["l2"]), "--prior-pairs", repr(row["prior_pairs"]),
                 "--objective", row["objective"]]
        fixed = cached_train(pairs, root / ("fixed-" + "-".join(flags[1::2])), flags)
        out["by_threshold"][f"{z:g}"] = {"choice": {k: row[k] for k in ("rank", "l2", "prior_pairs", "objective")},
                                         "gain_se": [row["gain_vs_rank1"], row["gain_se"]],
                                         "test": [fixed[f"{g}_test_acc"] for g in GROUPS]}
    return out


def versus_bt(cells: list[dict], arm: str, key: str, score: str = "test") -> dict:
    """The choices `cell[arm][key]` against BT over `cells`: accuracy - BT in points per group (mean, SE, worst, by
    seed, seeds below -1) and how many chose a rank above 1. `score` "test" compares `cell[arm][key]["test"]` with
    `cell["bt"]`; another name compares `cell[arm][key][score]` with `cell["bt_" + score]`."""
    entry = {}
    bt = "bt" if score == "test" else f"bt_{score}"
    for i, group in enumerate(GROUPS):
        diffs = [100 * (c[arm][key][score][i] - c[bt][i]) for c in cells]
        mean, se = _mean_se(diffs)
        entry[group] = {"mean": mean, "se": se, "worst": min(diffs), "by_seed": diffs,
                        "seeds_below_minus_1": sum(d < -1 for d in diffs)}
    entry["higher_rank_chosen"] = sum(c[arm][key]["choice"]["rank"] > 1 for c in cells)
    return entry


def versus_bt_columns(entry: dict, seeds: int) -> str:
    """A `versus_bt` entry as a table's columns: choice - BT (mean ± SE), worst seed, seeds below -1 point, how
    many of the `seeds` chose a rank above 1 (seen / new users)."""
    gain = " / ".join(f"{entry[g]['mean']:+.2f} ± {entry[g]['se']:.2f}" for g in GROUPS)
    worst = " / ".join(f"{entry[g]['worst']:+.1f}" for g in GROUPS)
    below = " / ".join(str(entry[g]["seeds_below_minus_1"]) for g in GROUPS)
    return f"{gain} | {worst} | {below} | {entry['higher_rank_chosen']} of {seeds}"


def run_cells(populations: list, seeds: list[int], run, arm: str, word: str) -> list[dict]:
    """`run(population, seed)` for each, printing each cell's choices `cell[arm]` and their test accuracy - BT."""
    cells = []
    for population in populations:
        for seed in seeds:
            started = time.perf_counter()
            cells.append(run(population, seed))
            bt = cells[-1]["bt"]
            print(f"{population}, seed {seed}: " + "; ".join(
                f"{word} {key}: rank {v['choice']['rank']} {100 * (v['test'][0] - bt[0]):+.1f} / "
                f"{100 * (v['test'][1] - bt[1]):+.1f}" for key, v in cells[-1][arm].items())
                + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    return cells


def population_pilot_args(argv: list[str] | None, doc: str, populations, seeds: range, arms: tuple[str, str],
                          work: str, name: str) -> tuple[argparse.Namespace, list[str], list[int]]:
    """The flags of a pilot over named populations (`--populations --seeds --work --out --name` and the arms' flag,
    `arms` = (flag, default)); returns (args, populations, seeds), refusing unknown populations and seeds under 100
    (pilot seeds only)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--populations", default=",".join(populations))
    parser.add_argument("--seeds", default=",".join(str(s) for s in seeds))
    parser.add_argument(arms[0], default=arms[1])
    parser.add_argument("--work", default=work)
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--name", default=name)
    args = parser.parse_args(argv)
    names = args.populations.split(",")
    chosen_seeds = [int(s) for s in args.seeds.split(",")]
    if set(names) - set(populations) or min(chosen_seeds) < 100:
        parser.error(f"populations are {', '.join(populations)}; seeds are pilot seeds (100 or more)")
    return args, names, chosen_seeds


def write_pilot(args: argparse.Namespace, record: dict, text: str) -> None:
    """`--out`/`--name`.json and .md, the markdown also printed."""
    out = Path(args.out)
    atomic_write_json(out / f"{args.name}.json", record)
    atomic_write_text(out / f"{args.name}.md", text)
    print(text)


def summarize(cells: list[dict], sizes: list[int], thresholds: list[float]) -> dict:
    return {f"{size}-{z:g}": versus_bt([c for c in cells if c["size"] == size], "by_threshold", f"{z:g}")
            for size in sizes for z in thresholds}


def markdown(summary: dict, sizes: list[int], seeds: list[int], thresholds: list[float]) -> str:
    lines = [f"# One-SE threshold pilot (`python -m simulations.pilot_one_se_threshold --sizes "
             f"{','.join(map(str, sizes))} --seeds {','.join(map(str, seeds))}`)", "",
             "The stress matrix's base population with few seen users. For each threshold z, the candidate the "
             "one-SE rule would choose with z SEs (z = 1: `lore-fed train` today) is trained with fixed settings; "
             "figures are its test accuracy - BT in points, seen / new users, mean ± SE over the seeds. "
             "Pilot seeds only: nothing here is a reported figure.", "",
             "| seen users | z | train - BT | worst seed | seeds below -1 | higher rank chosen |", "|---|---|---|---|---|---|"]
    for size in sizes:
        for z in thresholds:
            lines.append(f"| {size} | {z:g} | {versus_bt_columns(summary[f'{size}-{z:g}'], len(seeds))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20,50")
    parser.add_argument("--seeds", default=",".join(str(s) for s in range(101, 111)))
    parser.add_argument("--thresholds", default="1,1.5,2,2.5,3")
    parser.add_argument("--work", default="runs/pilot_one_se")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    thresholds = [float(z) for z in args.thresholds.split(",")]
    if 1.0 not in thresholds:
        parser.error("--thresholds must include 1 (what `lore-fed train` does)")
    cells = run_cells(sizes, seeds, lambda size, seed: run_population(size, seed, thresholds, Path(args.work)),
                      "by_threshold", "z")
    summary = summarize(cells, sizes, thresholds)
    out = Path(args.out)
    atomic_write_json(out / "one_se_threshold_pilot.json", {"sizes": sizes, "seeds": seeds,
                                                            "thresholds": thresholds, "summary": summary,
                                                            "cells": cells})
    text = markdown(summary, sizes, seeds, thresholds)
    atomic_write_text(out / "one_se_threshold_pilot.md", text)
    print(text)
    return 0 if np.isfinite([summary[k]["seen"]["mean"] for k in summary]).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
