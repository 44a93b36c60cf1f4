"""Does a nested check of the selection stop small populations from losing to one shared reward? A pilot.

    python -m simulations.pilot_nested_check [--populations base-20,base-40,base-100,weak-40,rich-40,aniso-40,...]
                                             [--seeds 101,...,110]
                                             [--thresholds split:1.5,0.5,1,1.5,2] [--work runs/pilot_nested_boot]
                                             [--out bench_results] [--name nested_check_bootstrap_pilot]

In populations of tens of users the one-SE rule still chose a chance winner among 50-150 candidates and lost 2-4
points to BT on some seeds (bench_results/one_se_threshold_pilot.md, side_margin_pilot.md). A stricter threshold
stopped that but gave up real gains at 100 users. `model_selection.nested_gain` estimates the selection's own gain
on users the rule did not choose on instead: the users are split into five parts, each part scored by the choice the
rule makes on the other users, over five random splits. `lore-fed train` (default flags) records it in metrics.json
(`held_out.nested_check`) beside its selection table: the gain, its SE from a bootstrap over users (`se`) and the
SE over users of the split-averaged gains (`split_se`, about half the real spread:
bench_results/nested_check_calibration.md). For each arm the chosen row is
replayed from that record (`choose_with_nested_check`): `off` is the one-SE rule alone, `z` a higher rank only where
the nested gain exceeds z of its bootstrap SEs, `split:z` z of its split SEs (the rule before the bootstrap, at
1.5). Each arm's choice is trained with its settings fixed (`--rank --l2 --prior-pairs --objective --seed`) and
compared with BT (`--rank 1`) twice: on the test pairs, and in expectation over their labels (`expected_accuracy`:
the test pairs' true logits, so that label noise on a few hundred pairs does not decide). Populations are the stress
matrix's base (`bench_matrix.BASE`) with 20, 40 or 100 seen users, weak personalization (0.3) at 40, and four where
a learned basis has more to gain: 150-250 training pairs per seen user (20 few-shot) at 20 and 40 users,
anisotropic embeddings at 40, and 60-100 pairs per seen user at 100. Pilot seeds only; runs are cached under
`--work`, so a rerun only adds what is missing. (`nested_check_pilot.md` is this pilot's first run, at 6ce35bc,
when the record had one SE, the split SE, and arms `z` meant z of it.)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lore_core.model_selection import choose_with_nested_check
from simulations.bench_matrix import BASE, TRAIN_CHOICE
from simulations.bench_rule_replay import recorded_choice
from simulations.pilot_one_se_threshold import GROUPS, population_pilot_args, run_cells, versus_bt_columns, write_pilot
from simulations.pilot_side_margin import fixed_run, summarize, trained_cell

POPULATIONS = {
    "base-20": replace(BASE, seen_users=20),
    "base-40": replace(BASE, seen_users=40),
    "base-100": replace(BASE, seen_users=100),
    "weak-40": replace(BASE, seen_users=40, personalization=0.3),
    "rich-40": replace(BASE, seen_users=40, train_pairs=(150, 250), few_shot_pairs=20),
    "aniso-40": replace(BASE, seen_users=40, isotropic=False),
    "rich-20": replace(BASE, seen_users=20, train_pairs=(150, 250), few_shot_pairs=20),
    "mid-100": replace(BASE, seen_users=100, train_pairs=(60, 100)),
}
OFF = "off"
SPLIT = "split:"
SCORES = {"test": "On the test pairs", "truth": "In expectation over the test pairs' labels (their true logits)"}


def arm_choice(table: list[dict], check: dict, arm: str) -> int:
    """The row `arm` chooses: the one-SE rule alone (`off`), or with the nested check at threshold z of its
    bootstrap SE (`z`; a record without one is refused) or of its split SE (`split:z`)."""
    if arm == OFF:
        return choose_with_nested_check(table, check, enforce=False)
    if arm.startswith(SPLIT):
        check, arm = {**check, "se": check.get("split_se", check["se"])}, arm[len(SPLIT):]
    elif not check.get("se_from", "").startswith("bootstrap"):
        raise ValueError(f"arm {arm} needs a bootstrap SE; this record's SE is from {check.get('se_from', 'splits')} "
                         "(a one-fold population, or a run older than the bootstrap)")
    return choose_with_nested_check(table, check, enforce=True, threshold=float(arm))


def _arm_name(text: str) -> str:
    """`z` or `split:z` with z written as `%g` (1.50 -> 1.5)."""
    prefix = SPLIT if text.startswith(SPLIT) else ""
    return f"{prefix}{float(text[len(prefix):]):g}"


def _truth(row: dict) -> list[float]:
    return [row[f"{g}_test_expected_acc"] for g in GROUPS]


def run_population(name: str, seed: int, arms: list[str], work: Path) -> dict:
    pairs, bt, train, metrics = trained_cell(POPULATIONS, name, seed, work)
    table, check = metrics["selection"], metrics["held_out"]["nested_check"]
    chose = recorded_choice(table)
    out = {"population": name, "seed": seed, "bt": [bt[f"{g}_test_acc"] for g in GROUPS], "bt_truth": _truth(bt),
           "check": check, "by_arm": {}}
    for arm in arms:
        index = arm_choice(table, check, arm)
        row = table[index]
        fixed = fixed_run(pairs, row, seed, train, index == chose)
        out["by_arm"][arm] = {"choice": {k: row[k] for k in TRAIN_CHOICE if k in row},
                              "test": [fixed[f"{g}_test_acc"] for g in GROUPS], "truth": _truth(fixed)}
    return out


def markdown(summaries: dict, cells: list[dict], names: list[str], seeds: list[int], arms: list[str]) -> str:
    lines = [f"# Nested-check pilot (`python -m simulations.pilot_nested_check --populations {','.join(names)} "
             f"--seeds {','.join(map(str, seeds))} --thresholds {','.join(arms[1:])}`)", "",
             "`off`: the one-SE rule alone. `z`: a rank above 1 only where the selection's nested gain "
             "(`model_selection.nested_gain`: each fifth of the users scored by the choice made on the others) "
             "exceeds z of its bootstrap SEs; `split:z`: z of the SE over users of the split-averaged gains. Each "
             "arm's choice is trained with fixed settings; figures are its accuracy - BT in points, seen / new users, "
             "mean ± SE over the seeds. Pilot seeds only: nothing here is a reported figure."]
    for score, title in SCORES.items():
        lines += ["", f"## {title}", "",
                  "| population | arm | choice - BT | worst seed | seeds below -1 | higher rank chosen |",
                  "|---|---|---|---|---|---|"]
        for name in names:
            for arm in arms:
                e = summaries[score][f"{name}|{arm}"]
                lines.append(f"| {name} | {arm} | {versus_bt_columns(e, e['seeds'])} |")
    lines += ["", "By seed: the nested gain ± bootstrap SE (split SE) in points, and each arm's rank and accuracy "
              "- BT on the test pairs [in expectation over their labels], seen / new:", ""]
    for c in cells:
        check = c["check"]
        arms_text = "; ".join(
            f"{arm}: rank {v['choice']['rank']} {100 * (v['test'][0] - c['bt'][0]):+.1f} / "
            f"{100 * (v['test'][1] - c['bt'][1]):+.1f} [{100 * (v['truth'][0] - c['bt_truth'][0]):+.1f} / "
            f"{100 * (v['truth'][1] - c['bt_truth'][1]):+.1f}]" for arm, v in c["by_arm"].items())
        parts = [rank for draw in check["ranks_chosen"] for rank in draw]
        nested = "no SE" if check["se"] is None else f"{100 * check['gain']:+.1f} ± {100 * check['se']:.1f}"
        split = "" if check.get("split_se") is None else f" ({100 * check['split_se']:.1f})"
        lines.append(f"- {c['population']} seed {c['seed']}: nested {nested}{split} (a rank above 1 in "
                     f"{sum(rank > 1 for rank in parts)} of {len(parts)} parts); {arms_text}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, names, seeds = population_pilot_args(argv, __doc__, POPULATIONS, range(101, 111),
                                               ("--thresholds", "split:1.5,0.5,1,1.5,2"), "runs/pilot_nested_boot",
                                               "nested_check_bootstrap_pilot")
    arms = [OFF] + [_arm_name(z) for z in args.thresholds.split(",")]
    cells = run_cells(names, seeds, lambda name, seed: run_population(name, seed, arms, Path(args.work)),
                      "by_arm", "arm")
    summaries = {score: summarize(cells, names, arms, "by_arm", score) for score in SCORES}
    write_pilot(args, {"populations": names, "seeds": seeds, "arms": arms, "summary": summaries, "cells": cells},
                markdown(summaries, cells, names, seeds, arms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
