"""Repeats embedded again: does joining near-equal comparisons fix `train`, and does it change any other population?

    python -m simulations.bench_repeat_groups --before REV [--seeds 0,1,2] [--out bench_results/repeat_groups.md]

`lore-fed train` keeps a user's repeats of one comparison in one held-out group. Until `--before`, only repeats
equal bit for bit; now also those equal within 1 % of their length (`repeated_comparisons.near_repeats`), as a
text embedded a second time writes them. Two parts:
  groups  every stress-matrix population (seeds `--seeds` and the pilot seed 101; prism-synth where
          `runs/bench_matrix` holds its embedded pairs) and every hostile population: the seen users' training
          groups under the exact rule and under the near rule. Equal counts mean equal partitions (the near rule
          only joins more), so every figure measured on that population stands.
  train   `repeats-reembedded` (`bench_hostile_populations`: 6 comparisons repeated 20-40 times, each repeat with
          relative noise 1e-4, no `group` array): `lore-fed train --rank 1` (BT) and `lore-fed train` from the
          `--before` commit and from this checkout, side by side; train - BT in points, seen / new users.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.model_selection import dense_groups, join_groups, join_repeated_comparisons, per_user_codes
from lore_core.pairs import load_pairs
from lore_core.repeated_comparisons import same_comparison
from simulations import bench_hostile_populations as hostile
from simulations.bench_hostile_ab import ab_cells, table
from simulations.bench_matrix import POPULATIONS, PRISM_SEED
from simulations.bench_small_populations import ARMS
from simulations.revisions import short_revision
from simulations.synthetic_pairs import make_synthetic_pairs

PILOT_SEED = 101
PRISM_DATA = Path("runs/bench_matrix/data/prism-synth")


def group_counts(pairs) -> dict:
    """Seen users' training groups under the exact and the near rule."""
    train = pairs.select(seen=True, split="train")
    _, user_idx = np.unique(train.user, return_inverse=True)
    given = dense_groups(user_idx, train.group)
    _, first, same = np.unique(per_user_codes(user_idx, same_comparison(train.diff)), return_index=True,
                               return_inverse=True)
    exact = join_groups(given, first[same.reshape(-1)])  # each pair linked to its code's first pair
    near = join_repeated_comparisons(user_idx, given, train.diff)
    return {"pairs": int(train.n), "exact": int(exact.max()) + 1, "near": int(near.max()) + 1}


def population_groups(seeds: list[int]) -> list[dict]:
    rows = []
    for pop in POPULATIONS:
        for seed in seeds + [PILOT_SEED]:
            if pop.synthetic is not None:
                pairs = make_synthetic_pairs(replace(pop.synthetic, seed=seed))[0]
            else:
                path = PRISM_DATA / f"users2400-seed{PRISM_SEED}-split{seed}" / "pairs.npz"
                if not path.exists():
                    continue
                pairs = load_pairs(path)
            rows.append({"population": pop.name, "seed": seed, **group_counts(pairs)})
            print(rows[-1], flush=True)
    for name in hostile.POPULATIONS:
        for seed in seeds:
            rows.append({"population": f"hostile {name}", "seed": seed,
                         **group_counts(hostile.hostile_population(name, seed)[0])})
            print(rows[-1], flush=True)
    return rows


def markdown(groups: list[dict], cells: list[dict], config: dict) -> str:
    changed = [g for g in groups if g["near"] != g["exact"]]
    lines = [f"# Repeats embedded again: {config['after']} against {config['before']}", "",
             f"`python -m simulations.bench_repeat_groups --before {config['before']} --seeds "
             f"{','.join(map(str, config['seeds']))}`. The module docstring says what each part measures.", "",
             "## Groups of the seen users' training pairs, exact rule / near rule", "",
             f"{len(groups)} population files; the near rule changed the groups of {len(changed)}"
             + (f" ({', '.join(sorted({g['population'] for g in changed}))})" if changed else "") + ":", "",
             "| population | seed | pairs | groups (exact) | groups (near) |", "|---|---|---|---|---|"]
    lines += [f"| {g['population']} | {g['seed']} | {g['pairs']:,} | {g['exact']:,} | {g['near']:,} |"
              for g in groups]
    lines += ["", "## `repeats-reembedded`: `train` - BT (points, seen / new users)", ""] + table(cells, config)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision with the exact rule only")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="bench_results/repeat_groups.md")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    revisions = {arm: short_revision(getattr(args, arm)) for arm in ARMS}
    groups = population_groups(seeds)
    cells = ab_cells(revisions, ["repeats-reembedded"], seeds)["repeats-reembedded"]
    config = {"seeds": seeds, **revisions}
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"config": config, "groups": groups, "train": cells})
    atomic_write_text(out, markdown(groups, cells, config))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
