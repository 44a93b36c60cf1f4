"""Which choices does today's one-SE rule change on `train` runs made under an earlier rule, and what do they score?

    python -m simulations.bench_rule_replay --runs GLOB[,GLOB...] [--out bench_results/side_margin_replay.md]

Each run directory the globs match is a `lore-fed train` output: metrics.json with its selection table, the pair
file it read (`pairs_path`) and its `--seed`. The table does not depend on the rule, so `choose_from_table` replays
today's rule on it exactly. Where today's choice differs from the recorded one, `lore-fed train` (default flags, the
run's `--seed`, one thread) runs again on the same file into a sibling `train_now/`, and BT (`train --rank 1`) into
a sibling `bt/` unless it is there; both runs are cached. The report gives each changed cell's test accuracy - BT
before and after, and whether the rerun's selection table reproduced the recorded one (the same candidates and
held-out estimates: the rule is then the only difference; a different thread count or an earlier commit can move
near-tied estimates, see the README's matrix section). Cells whose choice does not change keep their runs and are
counted.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.model_selection import choose_from_table

GROUPS = ("seen", "unseen")
ESTIMATES = ("rank", "objective", "l2", "prior_pairs", "seen_acc", "new_acc")


def recorded_choice(table: list[dict]) -> int:
    return next(i for i, row in enumerate(table) if row.get("chosen"))


def run_train(pairs: str, out: Path, flags: list[str]) -> dict:
    """`lore-fed train PAIRS --out OUT FLAGS` (one thread) unless OUT holds its metrics.json; that metrics.json."""
    if not (out / "metrics.json").exists():
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-m", "lore_cli.main", "train", pairs, "--out", str(out), *flags],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"train on {pairs} failed: {done.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


def same_table(a: list[dict], b: list[dict]) -> bool:
    """The same candidates with the same held-out estimates (to 1e-9)."""
    def key(row):
        return tuple(round(row[k], 9) if isinstance(row[k], float) else row[k] for k in ESTIMATES)
    return len(a) == len(b) and all(key(x) == key(y) for x, y in zip(a, b))


def replay(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    table = metrics["selection"]
    before, now = recorded_choice(table), choose_from_table(table)[0]
    cell = {"run": str(run), "before": {k: table[before][k] for k in ESTIMATES[:4]}, "changed": now != before}
    if not cell["changed"]:
        return cell
    seed = ["--seed", str(metrics["seed"])]
    bt = run_train(metrics["pairs_path"], run.parent / "bt", ["--rank", "1", *seed])
    after = run_train(metrics["pairs_path"], run.parent / f"{run.name}_now", seed)
    cell.update(now={k: table[now][k] for k in ESTIMATES[:4]},
                rerun_choice={k: after[k] for k in ESTIMATES[:4]},
                table_reproduced=same_table(table, after["selection"]),
                gain_before=[metrics[f"{g}_test_acc"] - bt[f"{g}_test_acc"] for g in GROUPS],
                gain_after=[after[f"{g}_test_acc"] - bt[f"{g}_test_acc"] for g in GROUPS],
                heldout_gains_before={k: table[before][k] for k in ("seen_gain", "seen_gain_se", "new_gain",
                                                                    "new_gain_se")})
    return cell


def _choice(c: dict) -> str:
    return f"rank {c['rank']} {c['objective']}, l2 {c['l2']:.1e}, prior {c['prior_pairs']:g}"


def markdown(cells: list[dict], patterns: list[str]) -> str:
    changed = [c for c in cells if c["changed"]]
    lines = [f"# Today's one-SE rule replayed on earlier `train` runs (`python -m simulations.bench_rule_replay "
             f"--runs {','.join(patterns)}`)", "",
             f"{len(cells)} runs; today's rule (`lore_core/model_selection.py` `choose_from_table`) chooses another "
             f"candidate on {len(changed)}. Those were rerun with `lore-fed train` (default flags, their seed, one "
             "thread). Points of test accuracy - BT, seen / new users.", "",
             "| run | recorded choice (held-out gain seen / new, ± SE, points) | test - BT before | today's choice "
             "| test - BT now | table reproduced |", "|---|---|---|---|---|---|"]
    for c in changed:
        g = c["heldout_gains_before"]
        held = (f"{100 * (g['seen_gain'] or 0):+.2f} ± {100 * (g['seen_gain_se'] or 0):.2f} / "
                f"{100 * (g['new_gain'] or 0):+.2f} ± {100 * (g['new_gain_se'] or 0):.2f}")
        lines.append(f"| {c['run']} | {_choice(c['before'])} ({held}) | "
                     f"{100 * c['gain_before'][0]:+.1f} / {100 * c['gain_before'][1]:+.1f} | "
                     f"{_choice(c['rerun_choice'])} | {100 * c['gain_after'][0]:+.1f} / "
                     f"{100 * c['gain_after'][1]:+.1f} | {'yes' if c['table_reproduced'] else 'no'} |")
    if changed:
        delta = np.array([np.subtract(c["gain_after"], c["gain_before"]) for c in changed]) * 100
        worst_before = np.array([c["gain_before"] for c in changed]).min(axis=0) * 100
        worst_after = np.array([c["gain_after"] for c in changed]).min(axis=0) * 100
        lines += ["", f"Changed runs: mean change {delta[:, 0].mean():+.2f} / {delta[:, 1].mean():+.2f} points "
                  f"(seen / new); lowest test - BT among them {worst_before[0]:+.1f} / {worst_before[1]:+.1f} "
                  f"before, {worst_after[0]:+.1f} / {worst_after[1]:+.1f} now."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="comma-separated globs of `train` run directories")
    parser.add_argument("--out", default="bench_results/side_margin_replay.md")
    args = parser.parse_args(argv)
    patterns = args.runs.split(",")
    runs = sorted({Path(p) for pattern in patterns for p in glob.glob(pattern)
                   if (Path(p) / "metrics.json").exists()})
    runs = [r for r in runs if "selection" in json.loads((r / "metrics.json").read_text())]
    if not runs:
        parser.error(f"no `train` run with a selection table matches {args.runs}")
    cells = []
    for run in runs:
        cells.append(replay(run))
        if cells[-1]["changed"]:
            c = cells[-1]
            print(f"{run}: {100 * c['gain_before'][0]:+.1f} / {100 * c['gain_before'][1]:+.1f} -> "
                  f"{100 * c['gain_after'][0]:+.1f} / {100 * c['gain_after'][1]:+.1f}", flush=True)
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"patterns": patterns, "cells": cells})
    text = markdown(cells, patterns)
    atomic_write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
