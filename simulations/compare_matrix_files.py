"""Two stress-matrix results side by side: what a change of code or default moved, population by population.

    python -m simulations.compare_matrix_files --before bench_results/matrix_today_user.json
        --after bench_results/matrix_today.json [--out bench_results/matrix_today_weighting.md]

Reads two `bench_matrix` JSON files (same populations and seeds) and writes, per population, `train` - BT and the
ranks chosen in each, the change of `train`'s mean and of BT's, and the issue's criteria (within 2 SE of BT or
above, 2 points where the true basis is 5 or more above BT, at or above the published recipe's best rank, the
federated run within 1 point) in each file. Chooses nothing: both files are measured on the reported seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lore_core.atomic_io import atomic_write_text

GROUPS = ("seen", "unseen")
CRITERIA = (("within_2se_of_bt_or_above", "2 SE"), ("two_points_where_ceiling_5", "+2 pts"),
            ("at_or_above_published", "published"), ("federated_within_1_point", "federated"))


def _by_population(path: Path) -> tuple[list[int], dict[str, dict]]:
    data = json.loads(path.read_text())
    return data["seeds"], {p["population"]: p for p in data["populations"]}


def _points(entry: dict, key: str) -> str:
    return " / ".join(f"{100 * entry['checks'][g][key]:+.1f}" for g in GROUPS)


def _row_change(before: dict, after: dict, row: str) -> str:
    return " / ".join(f"{100 * (after['rows'][row][g]['mean'] - before['rows'][row][g]['mean']):+.1f}" for g in GROUPS)


def _failing(entry: dict) -> str:
    """The criteria a population fails, seen (s) and new (n) users; a criterion that does not apply is not listed."""
    out = []
    for key, label in CRITERIA:
        sides = [{"seen": "s", "unseen": "n"}[g] for g in GROUPS if entry["checks"][g].get(key) is False]
        if sides:
            out.append(f"{label} ({', '.join(sides)})")
    return "; ".join(out) or "none"


def markdown(before: dict[str, dict], after: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [f"# Stress matrix, two files side by side (`python -m simulations.compare_matrix_files --before "
             f"{args.before} --after {args.after}`)", "",
             "Points, seen / new users, means over the files' seeds. `train` - BT as each file measured it; the change "
             "of each row's mean from before to after; the criteria each file fails (s: seen, n: new; `2 SE`: within "
             "2 SE of BT or above, `+2 pts`: 2 points over BT where the true basis is 5 or more above it, "
             "`published`: at or above the published recipe's best rank, `federated`: `simulate` within 1 point of "
             "`train`).", "",
             "| population | `train` - BT before | `train` - BT after | ranks before | ranks after | `train` change "
             "| BT change | fails before | fails after |", "|---|---|---|---|---|---|---|---|---|"]
    for name, a in after.items():
        b = before[name]
        lines.append(f"| {name} | {_points(b, 'train_minus_bt')} | {_points(a, 'train_minus_bt')} | "
                     f"{', '.join(map(str, b['rows']['train']['ranks']))} | "
                     f"{', '.join(map(str, a['rows']['train']['ranks']))} | {_row_change(b, a, 'train')} | "
                     f"{_row_change(b, a, 'bt')} | {_failing(b)} | {_failing(a)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="a bench_matrix JSON file")
    parser.add_argument("--after", required=True, help="a bench_matrix JSON file of the same populations and seeds")
    parser.add_argument("--out", default="bench_results/matrix_today_weighting.md")
    args = parser.parse_args(argv)
    (seeds, before), (seeds_after, after) = _by_population(Path(args.before)), _by_population(Path(args.after))
    if seeds != seeds_after:
        parser.error(f"the files hold other seeds ({seeds} and {seeds_after}): their means are not comparable")
    missing = sorted(set(before) ^ set(after))
    if missing:
        parser.error(f"populations in only one file: {missing}")
    text = markdown(before, after, args)
    atomic_write_text(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
