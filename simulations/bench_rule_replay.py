"""Which choices does today's one-SE rule change on `train` runs made under an earlier rule, and what do they score?

    python -m simulations.bench_rule_replay --runs GLOB[,GLOB...] [--sides correlated|independent]
                                            [--out bench_results/side_margin_replay.md]

Each run directory the globs match is a `lore-fed train` output: metrics.json with its selection table, the pair
file it read (`pairs_path`) and its `--seed`. A run that kept the per-user held-out figures it chose on
(`selection_heldout.npz`, which `train` writes since `lore_core/selection_record.py` was added) is replayed on
them with today's whole rule (`selection_record.replay`: the table, the one-SE rule and the nested check with its
bootstrap), exactly; a record whose candidates and estimates are not the table's (left beside another run's
metrics.json) is not used. On older runs, `choose_from_table` replays the one-SE rule on the table's figures. Its
estimates and gains do not depend on the rule, but its gain SE does since 85dcd0b (a user's seen and new gains
counted as correlated): a table recorded before holds the SE with the sides independent, which its per-side SEs do
not let today's be rebuilt from. So on such runs the replay is today's rule with the SE as it was then (the side
condition and thresholds, which this script was written for, replay exactly); a run that recorded the nested check
of small populations
(`held_out.nested_check`) is replayed with it (`choose_with_nested_check`). A run of a small population
(`held_out.folds` above 1) made before that check has no record of it, and is replayed with the one-SE rule alone;
one whose enforced check has no bootstrap SE (`se_from`, before the nested gain's SE came from a bootstrap) is not
replayed, and counted apart.
Where today's choice differs from the recorded one, both choices are trained again with their settings fixed
(`--rank --l2 --prior-pairs --objective --seed`), with BT (`--rank 1`) beside them, by this checkout with one
thread, under a sibling `replay/` (cached): the two runs differ only in the choice, so the difference is the rule's
effect. (A rerun of `train` itself need not reproduce a table recorded by other code or another thread count:
near-tied estimates move, see the README's matrix section.) Cells whose choice does not change are counted.
`--sides independent` turns the question round, for runs made by today's code: which choices did counting a user's
seen and new gains as correlated (`model_selection._gain_rows`, 85dcd0b) change? The table records each side's gain
SE, so the rule before, with the gain's SE half the root sum of squares of the two (`independent_sides`), replays
on it; a run's recorded choice is today's, and "the other choice" is the rule before's. On a run with a record
the whole rule before replays on the per-user figures (`independent_gain_rows`: the table's gain SE and the nested
check's choices, bootstrap included). Runs without one whose nested check was enforced are counted apart: their
record was made by the rule after 85dcd0b (sides correlated; from 85dcd0b to 0e19817 its bootstrap also chose on
one copy of each drawn user) and the rule before's check cannot be rebuilt from a table.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from lore_core import model_selection
from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.model_selection import choose_from_table, choose_with_nested_check
from lore_core.selection_record import FILENAME as RECORD, load_record, matches_table, replay as replay_record
from simulations.pilot_one_se_threshold import GROUPS
CHOICE = ("rank", "objective", "l2", "prior_pairs")
HELD_OUT_GAINS = ("seen_gain", "seen_gain_se", "new_gain", "new_gain_se")


def recorded_choice(table: list[dict]) -> int | None:
    return next((i for i, row in enumerate(table) if row.get("chosen")), None)


def fixed_flags(row: dict, seed: int) -> list[str]:
    return ["--rank", str(row["rank"]), "--l2", repr(row["l2"]), "--prior-pairs", repr(row["prior_pairs"]),
            "--objective", row["objective"], "--seed", str(seed)]


def run_train(pairs: str, out: Path, flags: list[str]) -> dict:
    """`lore-fed train PAIRS --out OUT FLAGS` (one thread) unless OUT holds its metrics.json; that metrics.json."""
    if not (out / "metrics.json").exists():
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-m", "lore_cli.main", "train", pairs, "--out", str(out), *flags],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"train {' '.join(flags)} on {pairs} failed: {done.stderr.strip()[-500:]}")
    return json.loads((out / "metrics.json").read_text())


def independent_sides(table: list[dict]) -> list[dict]:
    """The table as the one-SE rule read it before 85dcd0b: the gain's SE from the seen and new sides' SEs as if
    the two were independent (the seen side's alone where no user was scored as new)."""
    def se(row: dict) -> float | None:
        if row["new_gain"] is None or math.isnan(row["new_gain"]):
            return row["gain_se"]
        if row["seen_gain_se"] is None or row["new_gain_se"] is None:  # null in metrics.json: NaN when written
            return None
        return 0.5 * math.hypot(row["seen_gain_se"], row["new_gain_se"])
    return [{**row, "gain_se": se(row)} for row in table]


SIDES = {"correlated": lambda table: table, "independent": independent_sides}


@contextlib.contextmanager
def independent_gain_rows():
    """The rule before 85dcd0b on per-user figures: while inside, the gain SE the one-SE rule reads (the table's,
    `_table_rows`, and the nested check's choices, `choose_on_arrays`, both from `_gain_rows`) is half the root sum
    of squares of the two sides' SEs, as if a user's seen and new gains were independent (the seen side's alone
    where no user is scored as new). The nested check's own record (`_sides_mean_se`) counted the covariance before
    85dcd0b too, so it keeps today's, which differs from it only by the clip of the covariance: its split SE is
    today's, and its gain and bootstrap SE those of the rule before."""
    correlated, record = model_selection._gain_rows, model_selection._sides_mean_se

    def independent(seen: np.ndarray, new: np.ndarray) -> dict[str, np.ndarray]:
        rows = correlated(seen, new)
        both = 0.5 * np.hypot(rows["seen_gain_se"], rows["new_gain_se"])
        return {**rows, "se": np.where(np.isnan(rows["new_gain"]), rows["seen_gain_se"], both)}

    def sides_mean_se(seen: np.ndarray, new: np.ndarray) -> dict:
        return {key: float(value[0]) for key, value in correlated(seen[None], new[None]).items()}

    model_selection._gain_rows, model_selection._sides_mean_se = independent, sides_mean_se
    try:
        yield
    finally:
        model_selection._gain_rows, model_selection._sides_mean_se = correlated, record


RECORD_RULES = {"correlated": contextlib.nullcontext, "independent": independent_gain_rows}


def replay(run: Path, metrics: dict, sides: str = "correlated") -> dict:
    table, check = metrics["selection"], metrics.get("held_out", {}).get("nested_check")
    before = recorded_choice(table)
    if (run / RECORD).exists():  # the per-user figures: the whole rule, nested check included, exactly
        with RECORD_RULES[sides]():
            now, rows, _ = replay_record(load_record(run / RECORD))
        if matches_table(rows, table):
            return _scored(run, metrics, before, now, "per-user figures")
    if check is not None and check["enforced"] and "se_from" not in check:  # its SE is the split SE: not today's
        return {"run": str(run), "before": {k: table[before][k] for k in CHOICE}, "changed": False,
                "not_replayed": "nested check recorded before its bootstrap SE"}
    if check is not None and check["enforced"] and sides == "independent":
        return {"run": str(run), "before": {k: table[before][k] for k in CHOICE}, "changed": False,
                "not_replayed": "nested check enforced, recorded by today's rule"}
    read = SIDES[sides](table)
    now = choose_from_table(read)[0] if check is None else choose_with_nested_check(read, check, check["enforced"])
    return _scored(run, metrics, before, now, "table")


def _scored(run: Path, metrics: dict, before: int, now: int, replayed_on: str) -> dict:
    """The cell of one replayed run; where the choice changed, both choices trained again beside BT."""
    table = metrics["selection"]
    cell = {"run": str(run), "before": {k: table[before][k] for k in CHOICE}, "changed": now != before,
            "replayed_on": replayed_on}
    if not cell["changed"]:
        return cell
    cell.update(now={k: table[now][k] for k in CHOICE},
                heldout_gains_before={k: table[before][k] for k in HELD_OUT_GAINS})
    seed, pairs, work = metrics["seed"], metrics["pairs_path"], run.parent / "replay"
    try:
        bt = run_train(pairs, work / "bt", ["--rank", "1", "--seed", str(seed)])
        scores = {}
        for side, index in (("before", before), ("now", now)):
            flags = fixed_flags(table[index], seed)
            fixed = run_train(pairs, work / ("fixed-" + "-".join(flags[1::2])), flags)
            scores[side] = [fixed[f"{g}_test_acc"] - bt[f"{g}_test_acc"] for g in GROUPS]
    except RuntimeError as error:
        cell["error"] = str(error)
        return cell
    cell.update(gain_before=scores["before"], gain_now=scores["now"])
    return cell


def _choice(c: dict) -> str:
    return f"rank {c['rank']} {c['objective']}, l2 {c['l2']:.1e}, prior {c['prior_pairs']:g}"


def _points(value, sign: str = "+") -> str:
    """A held-out figure in points; "–" where metrics.json holds null (NaN when it was written)."""
    return "–" if value is None else f"{100 * value:{sign}.2f}"


def how_replayed(on_records: int, on_tables: int, sides: str) -> str:
    """Which runs were replayed on their per-user figures (the whole rule) and which on their tables."""
    parts = []
    if on_records:
        patch = "" if sides == "correlated" else ", with `independent_gain_rows`"
        parts.append(f"{on_records} on the per-user figures they chose on (`{RECORD}`: `selection_record.replay`, "
                     f"the whole rule with its nested check{patch})")
    if on_tables:
        patch = "" if sides == "correlated" else " and `independent_sides`"
        parts.append(f"{on_tables} on their selection tables (`choose_from_table`{patch})")
    return "Replayed: " + "; ".join(parts) + "."


def markdown(cells: list[dict], patterns: list[str], sides: str = "correlated") -> str:
    changed = [c for c in cells if c["changed"]]
    scored = [c for c in changed if "gain_now" in c]
    reasons = Counter(c["not_replayed"] for c in cells if "not_replayed" in c)
    stale = sum(reasons.values())
    exact = sum(c.get("replayed_on") == "per-user figures" for c in cells)
    flags = f"--runs {','.join(patterns)}" + ("" if sides == "correlated" else f" --sides {sides}")
    other = "today's" if sides == "correlated" else "the independent sides'"
    title = ("Today's one-SE rule replayed on earlier `train` runs" if sides == "correlated"
             else "The one-SE rule before 85dcd0b (independent sides) replayed on `train` runs of today's code")
    lines = [f"# {title} (`python -m simulations.bench_rule_replay {flags}`)", "",
             f"{len(cells) - stale} runs replayed; {other} rule"
             + ("" if exact else f" (`lore_core/model_selection.py` `choose_from_table`"
                f"{'' if sides == 'correlated' else ', `independent_sides`'})") + " chooses another candidate on "
             f"{len(changed)}."
             + (f" On those, the recorded and {other} choices were trained again with their settings fixed, beside "
                "BT, by the same code with one thread: test accuracy - BT in points, seen / new users." if changed
                else "")
             + (f" {how_replayed(exact, len(cells) - stale - exact, sides)}" if exact else "")
             + (f" {stale} more runs were not replayed ("
                + "; ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items())) + ")."
                if stale else ""), ""]
    if changed:
        lines += [f"| run | recorded choice (held-out gain seen / new ± SE, points) | its test - BT | {other} choice "
                  "| its test - BT |", "|---|---|---|---|---|"]
    for c in changed:
        g = c["heldout_gains_before"]
        held = (f"{_points(g['seen_gain'])} ± {_points(g['seen_gain_se'], '')} / {_points(g['new_gain'])} ± "
                f"{_points(g['new_gain_se'], '')}")
        before = now = f"failed: {c['error']}" if "error" in c else ""
        if "gain_now" in c:
            before = f"{100 * c['gain_before'][0]:+.1f} / {100 * c['gain_before'][1]:+.1f}"
            now = f"{100 * c['gain_now'][0]:+.1f} / {100 * c['gain_now'][1]:+.1f}"
        lines.append(f"| {c['run']} | {_choice(c['before'])} ({held}) | {before} | {_choice(c['now'])} | {now} |")
    if scored:
        delta = np.array([np.subtract(c["gain_now"], c["gain_before"]) for c in scored]) * 100
        low_before = np.array([c["gain_before"] for c in scored]).min(axis=0) * 100
        low_now = np.array([c["gain_now"] for c in scored]).min(axis=0) * 100
        lines += ["", f"Changed runs: mean change ({other} choice - recorded) {delta[:, 0].mean():+.2f} / "
                  f"{delta[:, 1].mean():+.2f} points "
                  f"(seen / new); lowest test - BT among them {low_before[0]:+.1f} / {low_before[1]:+.1f} with the "
                  f"recorded choices, {low_now[0]:+.1f} / {low_now[1]:+.1f} with {other}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="comma-separated globs of `train` run directories")
    parser.add_argument("--out", default=None, help="default: bench_results/side_margin_replay.md, or "
                        "bench_results/correlated_sides_replay.md with --sides independent")
    parser.add_argument("--sides", choices=sorted(SIDES), default="correlated",
                        help="independent: replay the rule before 85dcd0b on runs of today's code")
    args = parser.parse_args(argv)
    patterns = args.runs.split(",")
    runs = {}
    for run in sorted({Path(p) for pattern in patterns for p in glob.glob(pattern)}):
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
        if recorded_choice(metrics.get("selection") or []) is not None:  # fixed-settings runs have no choice
            runs[run] = metrics
    if not runs:
        parser.error(f"no `train` run with a selection table matches {args.runs}")
    cells = []
    for run, metrics in runs.items():
        cells.append(replay(run, metrics, args.sides))
        c = cells[-1]
        if "gain_now" in c:
            print(f"{run}: {100 * c['gain_before'][0]:+.1f} / {100 * c['gain_before'][1]:+.1f} -> "
                  f"{100 * c['gain_now'][0]:+.1f} / {100 * c['gain_now'][1]:+.1f}", flush=True)
        elif "error" in c:
            print(f"{run}: {c['error']}", flush=True)
    out = Path(args.out or ("bench_results/side_margin_replay.md" if args.sides == "correlated"
                            else "bench_results/correlated_sides_replay.md"))
    atomic_write_json(out.with_suffix(".json"), {"patterns": patterns, "sides": args.sides, "cells": cells})
    text = markdown(cells, patterns, args.sides)
    atomic_write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
