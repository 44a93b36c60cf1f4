"""Where along the l2 grid does the marginal fit peak, against the joint fit of the same rank?

    python -m simulations.marginal_l2_offsets RUN_DIR [RUN_DIR ...] [--out bench_results/marginal_l2_offsets.md]

Reads the selection tables (`metrics.json`) of `lore-fed train` runs in which both objectives were fit at every l2
of each rank's walk (the code before 64ce433), and counts, per rank above 1, how many grid steps the best marginal
l2 lies from the best joint l2 (the held-out score selection maximizes). This is the evidence for running the marginal
fits only at the best joint l2 and its two neighbours (`joint_trainer.marginal_near_best`). Runs whose tables hold
marginal fits at only some walked l2s (made by that rule) are skipped, as they cannot say where the marginal peak is.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.model_selection import held_out_score


def _score(row: dict) -> float:
    return held_out_score(row["seen_acc"], row["new_acc"])


def offsets(selection: list[dict]) -> list[dict] | None:
    """Per rank above 1: the steps from the best joint l2 to the best marginal l2 (positive: a weaker penalty), and
    whether the chosen candidate was that rank's marginal fit. None if marginal fits do not cover the walk."""
    grid = sorted({row["l2"] for row in selection}, reverse=True)  # strong to weak, the walk's order
    chosen = next((row for row in selection if row.get("chosen")), None)
    out = []
    for rank in sorted({row["rank"] for row in selection if row["rank"] > 1}):
        rows = [row for row in selection if row["rank"] == rank]
        joint = [row for row in rows if row["objective"] == "joint"]
        marginal = [row for row in rows if row["objective"] == "marginal"]
        if not marginal:
            continue
        if {row["l2"] for row in marginal} != {row["l2"] for row in joint}:
            return None
        best_joint, best_marginal = max(joint, key=_score), max(marginal, key=_score)
        out.append({"rank": rank, "offset": grid.index(best_marginal["l2"]) - grid.index(best_joint["l2"]),
                    "chosen": bool(chosen and chosen["rank"] == rank and chosen["objective"] == "marginal")})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="`lore-fed train` run directories")
    parser.add_argument("--out", default="bench_results/marginal_l2_offsets.md")
    args = parser.parse_args(argv)
    cells, skipped = [], []
    for run in map(Path, args.runs):
        found = offsets(json.loads((run / "metrics.json").read_text())["selection"])
        if found is None:
            skipped.append(str(run))
        else:
            cells += [{"run": str(run), **cell} for cell in found]
    counts = Counter(cell["offset"] for cell in cells)
    chosen = Counter(cell["offset"] for cell in cells if cell["chosen"])
    near = sum(n for off, n in counts.items() if abs(off) <= 1)
    lines = ["# Best marginal l2 against best joint l2, per rank", "",
             f"`python -m simulations.marginal_l2_offsets RUN_DIR ...` over {len(args.runs) - len(skipped)} runs "
             f"({len(skipped)} skipped: marginal fits not at every walked l2). Offset: grid steps from the best joint "
             "l2 to the best marginal l2 of the same rank (positive: a weaker penalty).", "",
             "| offset | (run, rank) cells | of them the chosen fit |", "|---|---|---|"]
    lines += [f"| {off:+d} | {counts[off]} | {chosen.get(off, 0)} |" for off in sorted(counts)]
    lines += ["", f"Within one step: {near} of {len(cells)} cells; chosen marginal fits within one step: "
              f"{sum(n for off, n in chosen.items() if abs(off) <= 1)} of {sum(chosen.values())}."]
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"cells": cells, "skipped": skipped})
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
