"""`lore-fed train` - BT on hostile populations, two commits side by side: did a fix help where it was found?

    python -m simulations.bench_hostile_ab --before REV --populations NAME,... [--after REV] [--seeds 0,1,2]
                                           [--out bench_results/hostile_ab.md]

Each population is `bench_hostile_populations`' (a tester's population, added there when it broke a claim). On each
seed, `lore-fed train --rank 1` (BT) and `lore-fed train` (default flags) run from the `--before` commit (a
temporary git worktree) and from the `--after` one, the two commits at the same time (`bench_small_populations`'
`run_population`). Reports train - BT in points, seen / new users, per seed and as mean ± SE over seeds, with the
ranks and held-out folds `train` chose.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from simulations import bench_hostile_populations as hostile
from simulations.bench_small_populations import ARMS, run_population
from simulations.revisions import checked_worktrees, short_revision


def gain(cell: dict, i: int) -> float:
    """train - BT in points: i = 0 seen users, 1 new users."""
    key = ("seen_test_acc", "unseen_test_acc")[i]
    return 100.0 * (cell["train"][key] - cell["bt"][key])


def ab_cells(revisions: dict[str, str], names: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """{population: [one cell per seed: {arm: {row: train_row}}]} for the two commits of `revisions`."""
    out = {name: [] for name in names}
    with checked_worktrees({arm: revisions[arm] for arm in ARMS}) as (tmp, roots):
        for name in names:
            for seed in seeds:
                work = tmp / name / f"seed{seed}"
                out[name].append(run_population(roots, hostile.population_file(name, seed, work), work))
                print(f"{name} seed {seed}: " + "; ".join(
                    f"{arm} {gain(out[name][-1][arm], 0):+.1f} / {gain(out[name][-1][arm], 1):+.1f}"
                    for arm in ARMS), flush=True)
    return out


def _mean_se(values: list[float]) -> str:
    array = np.array(values)
    se = array.std(ddof=1) / math.sqrt(array.size) if array.size > 1 else math.nan
    return f"{array.mean():+.1f} ± {se:.1f}"


def table(cells: list[dict], revisions: dict[str, str]) -> list[str]:
    """Markdown rows, one per commit: mean ± SE, by seed, ranks and folds chosen."""
    lines = ["| commit | mean ± SE over seeds | by seed | ranks chosen | held-out folds |", "|---|---|---|---|---|"]
    for arm in ARMS:
        seen, new = [gain(c[arm], 0) for c in cells], [gain(c[arm], 1) for c in cells]
        by_seed = "; ".join(f"{s:+.1f} / {n:+.1f}" for s, n in zip(seen, new))
        lines.append(f"| {arm} ({revisions[arm]}) | {_mean_se(seen)} / {_mean_se(new)} | {by_seed} | "
                     f"{[c[arm]['train']['rank'] for c in cells]} | {[c[arm]['train'].get('folds') for c in cells]} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision of the earlier code")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--populations", required=True, help=f"of {','.join(hostile.POPULATIONS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="bench_results/hostile_ab.md")
    args = parser.parse_args(argv)
    names = args.populations.split(",")
    unknown = sorted(set(names) - set(hostile.POPULATIONS))
    if unknown:
        parser.error(f"unknown populations {unknown}; choose from {list(hostile.POPULATIONS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    revisions = {arm: short_revision(getattr(args, arm)) for arm in ARMS}
    cells = ab_cells(revisions, names, seeds)
    lines = [f"# Hostile populations: `lore-fed train` - BT, {revisions['after']} against {revisions['before']}", "",
             f"`python -m simulations.bench_hostile_ab --before {revisions['before']} --after {revisions['after']} "
             f"--populations {args.populations} --seeds {args.seeds}`. Points, seen / new users; BT is `lore-fed "
             "train --rank 1` of the same commit; both commits ran side by side on one shared 2-core machine. The "
             "populations are described in `simulations/bench_hostile_populations.py`."]
    for name in names:
        lines += ["", f"## {name}", ""] + table(cells[name], revisions)
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"config": {"seeds": seeds, **revisions}, "cells": cells})
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
