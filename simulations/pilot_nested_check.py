"""Does a nested check of the selection stop small populations from losing to one shared reward? A pilot.

    python -m simulations.pilot_nested_check [--populations base-20,base-40,base-100,weak-40] [--seeds 101,...,110]
                                             [--thresholds 0,0.5,1,1.5,2] [--work runs/pilot_nested]
                                             [--out bench_results]

In populations of tens of users the one-SE rule still chose a chance winner among 50-150 candidates and lost 2-4
points to BT on some seeds (bench_results/one_se_threshold_pilot.md, side_margin_pilot.md). A stricter threshold
stopped that but gave up real gains at 100 users. `model_selection.nested_gain` estimates the selection's own gain
on users the rule did not choose on instead: the users are split into five parts, each part scored by the choice the
rule makes on the other users, over five random splits. `lore-fed train` (default flags) records it in metrics.json
(`held_out.nested_check`) beside its selection table. For each arm the chosen row is replayed from that record
(`choose_with_nested_check`): `off` is the one-SE rule alone, `z` a higher rank only where the nested gain exceeds z
of its SEs. Each arm's choice is trained with its settings fixed (`--rank --l2 --prior-pairs --objective --seed`)
and compared with BT (`--rank 1`) on the test pairs. Populations are the stress matrix's base (`bench_matrix.BASE`)
with 20, 40 or 100 seen users, and weak personalization (0.3) at 40. Pilot seeds only; runs are cached under
`--work`, so a rerun only adds what is missing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lore_core.model_selection import choose_with_nested_check
from simulations.bench_matrix import BASE, TRAIN_CHOICE
from simulations.bench_rule_replay import recorded_choice
from simulations.pilot_one_se_threshold import GROUPS, population_pilot_args, run_cells, versus_bt_columns, write_pilot
from simulations.pilot_side_margin import fixed_test, summarize, trained_cell

POPULATIONS = {
    "base-20": replace(BASE, seen_users=20),
    "base-40": replace(BASE, seen_users=40),
    "base-100": replace(BASE, seen_users=100),
    "weak-40": replace(BASE, seen_users=40, personalization=0.3),
}
OFF = "off"


def arm_choice(table: list[dict], check: dict, arm: str) -> int:
    """The row `arm` chooses: the one-SE rule alone (`off`) or with the nested check at threshold `arm`."""
    return choose_with_nested_check(table, check, enforce=arm != OFF, threshold=0.0 if arm == OFF else float(arm))


def run_population(name: str, seed: int, arms: list[str], work: Path) -> dict:
    pairs, bt, train, metrics = trained_cell(POPULATIONS, name, seed, work)
    table, check = metrics["selection"], metrics["held_out"]["nested_check"]
    chose = recorded_choice(table)
    out = {"population": name, "seed": seed, "bt": [bt[f"{g}_test_acc"] for g in GROUPS], "check": check,
           "by_arm": {}}
    for arm in arms:
        index = arm_choice(table, check, arm)
        row = table[index]
        out["by_arm"][arm] = {"choice": {k: row[k] for k in TRAIN_CHOICE},
                              "test": fixed_test(pairs, row, seed, train, index == chose)}
    return out


def markdown(summary: dict, cells: list[dict], names: list[str], seeds: list[int], arms: list[str]) -> str:
    lines = [f"# Nested-check pilot (`python -m simulations.pilot_nested_check --populations {','.join(names)} "
             f"--seeds {','.join(map(str, seeds))} --thresholds {','.join(arms[1:])}`)", "",
             "`off`: the one-SE rule alone. `z`: a rank above 1 only where the selection's nested gain "
             "(`model_selection.nested_gain`: each fifth of the users scored by the choice made on the others) "
             "exceeds z of its SEs. Each arm's choice is trained with fixed settings; figures are its test accuracy "
             "- BT in points, seen / new users, mean ± SE over the seeds. Pilot seeds only: nothing here is a "
             "reported figure.", "",
             "| population | arm | choice - BT | worst seed | seeds below -1 | higher rank chosen |",
             "|---|---|---|---|---|---|"]
    for name in names:
        for arm in arms:
            e = summary[f"{name}|{arm}"]
            lines.append(f"| {name} | {arm} | {versus_bt_columns(e, e['seeds'])} |")
    lines += ["", "By seed: the nested gain ± SE (points) and each arm's rank and test accuracy - BT, seen / new:", ""]
    for c in cells:
        check = c["check"]
        arms_text = "; ".join(
            f"{arm}: rank {v['choice']['rank']} {100 * (v['test'][0] - c['bt'][0]):+.1f} / "
            f"{100 * (v['test'][1] - c['bt'][1]):+.1f}" for arm, v in c["by_arm"].items())
        parts = [rank for draw in check["ranks_chosen"] for rank in draw]
        nested = ("no SE" if check["se"] is None else f"{100 * check['gain']:+.1f} ± {100 * check['se']:.1f}")
        lines.append(f"- {c['population']} seed {c['seed']}: nested {nested} (a rank above 1 in "
                     f"{sum(rank > 1 for rank in parts)} of {len(parts)} parts); {arms_text}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, names, seeds = population_pilot_args(argv, __doc__, POPULATIONS, range(101, 111),
                                               ("--thresholds", "0,0.5,1,1.5,2"), "runs/pilot_nested",
                                               "nested_check_pilot")
    arms = [OFF] + [f"{float(z):g}" for z in args.thresholds.split(",")]
    cells = run_cells(names, seeds, lambda name, seed: run_population(name, seed, arms, Path(args.work)),
                      "by_arm", "arm")
    summary = summarize(cells, names, arms, "by_arm")
    write_pilot(args, {"populations": names, "seeds": seeds, "arms": arms, "summary": summary, "cells": cells},
                markdown(summary, cells, names, seeds, arms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
