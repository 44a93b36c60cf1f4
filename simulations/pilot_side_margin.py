"""May a higher rank win on one side while its held-out gain on the other side is negative? A pilot for the one-SE
rule's side condition.

    python -m simulations.pilot_side_margin [--populations base-40,weak-40,weak-300,noise-300]
                                            [--seeds 101,...,108] [--sides -1,-0.5,0] [--work runs/pilot_side_margin]
                                            [--out bench_results]

The one-SE rule (`lore_core/model_selection.py`) needs a candidate's gain over rank 1 (mean of the seen and new
gains) to exceed its SE, and each side's gain to exceed `side` times its own SE. With `side` = -1 a tester's 40
weakly personal users chose rank 6 on a held-out gain of -0.4 ± 0.8 points for seen users and +2.6 ± 0.9 for new
ones, and lost 2.7 / 1.4 points to BT. `SIDE_SE` is now 0. This measures each `side` on pilot seeds only:
`lore-fed train` (default flags) runs once and records its selection table; for each `side`, the candidate
`choose_from_table(table, 1, side)` picks is trained with its settings fixed (`--rank --l2 --prior-pairs
--objective --seed`; the choice train made is its own run) and its test accuracy compared with BT (`--rank 1`).
Populations are the stress matrix's base (`bench_matrix.BASE`) with 40 or 300 seen users, weak personalization
(0.3) or 20 % flipped labels. Runs are cached under `--work`, so a rerun only adds what is missing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from lore_core.model_selection import choose_from_table
from simulations.bench_matrix import BASE, TRAIN_CHOICE
from simulations.bench_rule_replay import HELD_OUT_GAINS, fixed_flags, recorded_choice
from simulations.pilot_one_se_threshold import (GROUPS, cached_train, population_pilot_args, run_cells, versus_bt,
                                                 versus_bt_columns, write_pilot)
from simulations.synthetic_pairs import write_synthetic_dataset

POPULATIONS = {
    "base-40": replace(BASE, seen_users=40),
    "weak-40": replace(BASE, seen_users=40, personalization=0.3),
    "weak-300": replace(BASE, personalization=0.3),
    "noise-300": replace(BASE, label_noise=0.2),
}


def trained_cell(populations: dict, name: str, seed: int, work: Path) -> tuple[Path, dict, dict, dict]:
    """A pilot cell's pair file (written once under `work`), its BT run and its `lore-fed train` run (cached):
    (pair file, BT's row, train's row, train's metrics.json)."""
    root = work / "data" / f"{name}-s{seed}"
    if not (root / "pairs.npz").exists():
        write_synthetic_dataset(root, replace(populations[name], seed=seed))
    pairs = root / "pairs.npz"
    bt = cached_train(pairs, root / "bt", ["--rank", "1", "--seed", str(seed)])
    train = cached_train(pairs, root / "train", ["--seed", str(seed)])
    return pairs, bt, train, json.loads((root / "train" / "metrics.json").read_text())


def fixed_run(pairs: Path, row: dict, seed: int, train: dict, is_trains_choice: bool) -> dict:
    """The `cached_train` row of the table row's settings trained fixed (cached beside the pair file); train's own
    run where the row is the one it chose."""
    flags = fixed_flags(row, seed)
    return train if is_trains_choice else cached_train(pairs, pairs.parent / ("fixed-" + "-".join(flags[1:9:2])),
                                                       flags)


def fixed_test(pairs: Path, row: dict, seed: int, train: dict, is_trains_choice: bool) -> list[float]:
    """Test accuracy (seen, new) of `fixed_run`."""
    fixed = fixed_run(pairs, row, seed, train, is_trains_choice)
    return [fixed[f"{g}_test_acc"] for g in GROUPS]


def run_population(name: str, seed: int, sides: list[float], work: Path) -> dict:
    pairs, bt, train, metrics = trained_cell(POPULATIONS, name, seed, work)
    table = metrics["selection"]
    chose = recorded_choice(table)
    out = {"population": name, "seed": seed, "bt": [bt[f"{g}_test_acc"] for g in GROUPS], "by_side": {}}
    for side in sides:
        index = choose_from_table(table, 1.0, side)[0]
        row = table[index]
        out["by_side"][f"{side:g}"] = {"choice": {k: row[k] for k in TRAIN_CHOICE if k in row},
                                       "gains": {k: row[k] for k in HELD_OUT_GAINS},
                                       "test": fixed_test(pairs, row, seed, train, index == chose)}
    return out


def summarize(cells: list[dict], names: list[str], keys: list[str], field: str = "by_side",
              score: str = "test") -> dict:
    """`versus_bt` of each population and arm key (`cell[field][key]`, on `score`), with its number of seeds."""
    out = {}
    for name in names:
        mine = [c for c in cells if c["population"] == name]
        for key in keys:
            out[f"{name}|{key}"] = {**versus_bt(mine, field, key, score), "seeds": len(mine)}
    return out


def markdown(summary: dict, names: list[str], seeds: list[int], sides: list[float]) -> str:
    lines = [f"# Side-margin pilot (`python -m simulations.pilot_side_margin --populations {','.join(names)} "
             f"--seeds {','.join(map(str, seeds))} --sides {','.join(f'{s:g}' for s in sides)}`)", "",
             "A candidate above rank 1 is chosen only when its gain exceeds one SE and each side's gain (seen, new) "
             "exceeds `side` times its own SE; `side` = -1 was `lore-fed train`'s rule before this pilot, 0 is "
             "today's (`model_selection.SIDE_SE`). Each side's choice is trained with fixed settings; figures are "
             "its test accuracy - BT in points, seen / new users, mean ± SE over the seeds. Pilot seeds only: "
             "nothing here is a reported figure.", "",
             "| population | side | choice - BT | worst seed | seeds below -1 | higher rank chosen |",
             "|---|---|---|---|---|---|"]
    for name in names:
        for side in sides:
            e = summary[f"{name}|{side:g}"]
            lines.append(f"| {name} | {side:g} | {versus_bt_columns(e, e['seeds'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, names, seeds = population_pilot_args(argv, __doc__, POPULATIONS, range(101, 109),
                                               ("--sides", "-1,-0.5,0"), "runs/pilot_side_margin", "side_margin_pilot")
    sides = [float(s) for s in args.sides.split(",")]
    cells = run_cells(names, seeds, lambda name, seed: run_population(name, seed, sides, Path(args.work)),
                      "by_side", "side")
    summary = summarize(cells, names, [f"{side:g}" for side in sides])
    write_pilot(args, {"populations": names, "seeds": seeds, "sides": sides, "summary": summary, "cells": cells},
                markdown(summary, names, seeds, sides))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
