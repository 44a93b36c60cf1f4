"""Build the attribute prior table (client.device.attribute_prior) from a PUBLIC pilot panel.

    python -m simulations.attribute_priors DATASET --basis BASIS --fields age,gender --out TABLE.json

Where the prior comes from. A pilot panel of people who consented to publish their pairs and their attributes (in
this repository's benchmarks: the seen users of a prepared dataset, whose `users.jsonl` holds the demographics).
Their w are fitted centrally with the released basis, exactly as a device fits w (with the basis file's personal
prior, as the device does), and averaged per attribute value. No w_i of the federated population is needed, so
none leaves a device.

What it costs in privacy. The panel's group means are published: a group smaller than --min-users is left out
(one member could otherwise be read off it), and the panel must have agreed to publication. A device downloads the
whole table, so neither the server nor the network learns which row it uses; the declared attributes stay in the
device state. The prior does make a device's w lean toward its group, so whatever later reveals w (served scores,
an unprotected update) reveals a little of the declared attribute too; user-level DP of the federated updates
covers it like any other local data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from client.device.attribute_prior import FORMAT, publishable_mean
from client.device.user_posterior import DEVICE_PRIOR_PAIRS, basis_prior_pairs
from lore_core.atomic_io import atomic_write_json, check_output_path
from lore_core.basis_file import BasisFile, basis_file_path, load_basis
from lore_core.evaluation import few_shot_weights
from lore_core.pairs import PairSet, load_pairs, resolve_pair_path
from lore_core.prism_pairs import USERS_JSONL
from lore_core.text_file import read_jsonl

MIN_USERS = 20


def read_demographics(dataset_dir: Path) -> dict[str, dict]:
    """users.jsonl of a prepared dataset -> {user: demographics}."""
    path = Path(dataset_dir) / USERS_JSONL
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: attribute priors need a prepared dataset with demographics")
    demographics = {}
    for line, row in read_jsonl(path):
        if not isinstance(row.get("user"), str) or not isinstance(row.get("demographics", {}), dict):
            raise ValueError(f"{path} line {line}: expected {{\"user\": str, \"demographics\": {{field: value}}}}")
        demographics[row["user"]] = row.get("demographics", {})
    return demographics


def build_table(panel: PairSet, basis: BasisFile, demographics: dict[str, dict], fields: list[str], *,
                min_users: int = MIN_USERS, source: str = "", prior_pairs: float = DEVICE_PRIOR_PAIRS) -> dict:
    """Group means of the panel's fitted w per (field, value) with >= min_users members."""
    ids, weights = few_shot_weights(panel, basis.basis.astype(np.float64), prior_pairs)
    groups: dict = {}
    for field in fields:
        values = np.array([str(demographics.get(u, {}).get(field)) for u in ids])
        groups[field] = {}
        for value in np.unique(values):
            members = values == value
            if value == "None" or members.sum() < min_users:
                continue
            mean = weights[members].mean(axis=0)
            groups[field][value] = {"users": int(members.sum()), "mean": publishable_mean(mean)}
    population = weights.mean(axis=0)
    return {"format": FORMAT, "basis_sha256": basis.sha256, "rank": basis.rank, "source": source,
            "min_users": min_users, "prior_pairs": prior_pairs,
            "population": {"users": int(ids.size), "mean": publishable_mean(population)},
            "groups": groups}


def panel_pairs(dataset, *, seen: bool = True) -> PairSet:
    """The pilot panel's pairs: the train split of the dataset's seen (default) users."""
    return load_pairs(dataset).select(seen=seen, split="train")


def _is_table(path: Path) -> bool:
    """A file --out may replace: a prior table this script wrote (a small JSON object of its format)."""
    try:
        return path.stat().st_size < 2**24 and json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_table_out(out: Path) -> None:
    """--out can be written and would replace nothing but an earlier table (a tester's pairs.npz, users.jsonl and
    basis.npz were each replaced by the table, exit 0)."""
    check_output_path(out, "--out", directory=False)
    if out.exists() and not _is_table(out):
        raise ValueError(f"--out {out} exists and is not an attribute prior table ({FORMAT}): it would be replaced; "
                         "give a new file name")


def check_fields(fields: list[str], demographics: dict[str, dict], source: Path) -> None:
    known = sorted({key for row in demographics.values() for key in row})
    unknown = [f for f in fields if f not in known]
    if not fields or unknown:
        raise ValueError(f"--fields: {unknown or 'none given'}: expected demographic fields of {source} "
                         f"({', '.join(known) or 'it has none'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="prepared dataset directory (pairs.npz and users.jsonl) of the pilot panel")
    parser.add_argument("--basis", required=True, help="the released basis the table is for (a basis file, or a "
                        "run directory holding basis.npz)")
    parser.add_argument("--fields", default="age,gender", help="comma-separated demographic fields")
    parser.add_argument("--min-users", type=int, default=MIN_USERS,
                        help=f"smallest group published (default {MIN_USERS}; at least 2: one member's w could be "
                             "read off a group of one)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.min_users < 2:
            raise ValueError(f"--min-users must be at least 2 (a group of one publishes that member's w), got "
                             f"{args.min_users}")
        check_table_out(Path(args.out))
        dataset = resolve_pair_path(args.dataset).parent
        demographics = read_demographics(dataset)
        fields = [f.strip() for f in args.fields.split(",") if f.strip()]
        check_fields(fields, demographics, dataset / USERS_JSONL)
        basis, panel = load_basis(basis_file_path(args.basis)), panel_pairs(dataset)  # a run directory too
        if basis.dim != panel.dim:
            raise ValueError(f"--basis {args.basis} has width {basis.dim}, but {dataset} embeds pairs in "
                             f"{panel.dim} dimensions: give the basis released for this embedding")
        table = build_table(panel, basis, demographics, fields, min_users=args.min_users, source=str(dataset),
                            prior_pairs=basis_prior_pairs(basis))  # as the device fits
        atomic_write_json(args.out, table)
    except (ValueError, OSError) as exc:
        print(f"attribute_priors: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{f} ({len(v)} groups)" for f, v in table["groups"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
