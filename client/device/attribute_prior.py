"""Declared attributes (language, age band, ...) -> a prior for w, on the device only.

The table. A JSON file shipped beside the basis (built by `python -m simulations.attribute_priors` from a PUBLIC
pilot panel: people who consented to share their pairs and their attributes, whose w the builder fits with the
released basis). For each attribute value with at least `min_users` pilot users it holds the mean of their w:
  {"format": "lore-fed-attribute-priors/1", "basis_sha256": ..., "rank": B, "source": ..., "min_users": k,
   "groups": {field: {value: {"users": n, "mean": [B floats]}}}}
Every device downloads the whole table, so nobody learns which row it uses; the declared attributes stay in the
device state (deleted by `forget`) and are never sent. No user's w leaves a device to build it.

The prior. The personal prior's centre moves from uniform (the population reward) to the group mean m:
KL(w || m) instead of KL(w || uniform), same strength. Several attributes: m proportional to the geometric mean of
their group means (the sum of their KL terms, each with weight 1/k). Whether this helps is measured in
`simulations.bench_onboarding` (it is not assumed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lore_core.basis_file import BasisFile
from lore_core.text_file import is_json_integer

FORMAT = "lore-fed-attribute-priors/1"
# A group mean's smallest weight. The prior's mode is that mean and its curvature 1/m_k: means of 1e-100 or below
# broke the device's Laplace fit (a hostile-input test: "Eigenvalues did not converge") and collapsed its samples.
# A mean over 20 or more panel members' fitted w is hardly ever that small; `publishable_mean` floors what a builder
# writes all the same.
MIN_GROUP_WEIGHT = 1e-6


class AttributePriorError(ValueError):
    """A table that does not follow the format above, or that was built for another basis."""


def read_table(path: str | Path, basis: BasisFile) -> dict:
    """Load and check a table for `basis` (same checksum and rank)."""
    from lore_core.text_file import parse_json, read_text

    path = Path(path)
    table = parse_json(read_text(path, AttributePriorError, "attribute prior table"), path, AttributePriorError)
    keys = ("format", "basis_sha256", "rank", "groups")
    if not isinstance(table, dict) or not set(keys) <= set(table):  # it said "('groups')" or "(list indices must be
        # integers ...)" (a tester)
        found = f"keys {sorted(table)}" if isinstance(table, dict) else f"a JSON {type(table).__name__}"
        raise AttributePriorError(f"{path}: not an attribute prior table: expected a {FORMAT} JSON object with the "
                                  f"keys {list(keys)}, found {found}")
    groups, fmt, sha, rank = (table[key] for key in ("groups", "format", "basis_sha256", "rank"))
    if not is_json_integer(rank, low=1):  # json reads Infinity, and 2.5 is no rank
        raise AttributePriorError(f"{path}: rank must be an integer (the basis' rank), got {json.dumps(rank)[:40]}")
    if not isinstance(groups, dict) or not all(isinstance(values, dict) and all(isinstance(row, dict) for row in
                                                                                  values.values())
                                               for values in groups.values()):
        raise AttributePriorError(f"{path}: not an attribute prior table: `groups` must map each field to "
                                  "{value: {\"mean\": [...]}} objects")
    if fmt != FORMAT:
        raise AttributePriorError(f"{path}: format {fmt!r}, expected {FORMAT!r}")
    if sha != basis.sha256 or rank != basis.rank:
        raise AttributePriorError(f"{path}: built for basis {str(sha)[:12]} (rank {rank}), but the device holds "
                                  f"{basis.sha256[:12]} (rank {basis.rank}); get the table of this basis")
    for field, values in groups.items():
        for value, row in values.items():
            given = row.get("mean")
            numbers = isinstance(given, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                      for x in given)  # "0.5" passed as a weight (a tester)
            mean = np.asarray(given, dtype=np.float64) if numbers else np.zeros(0)
            if mean.shape != (rank,) or not (mean >= MIN_GROUP_WEIGHT).all() or abs(mean.sum() - 1.0) > 1e-6:
                raise AttributePriorError(f"{path}: {field}={value!r}: mean must be {rank} weights of at least "
                                          f"{MIN_GROUP_WEIGHT:g} summing to 1")
    return table


def publishable_mean(mean: np.ndarray) -> list[float]:
    """A group's mean w (B,) as a table row: normalised, every weight at least MIN_GROUP_WEIGHT."""
    floored = np.maximum(mean / mean.sum(), 2 * MIN_GROUP_WEIGHT)  # 2x: still >= the minimum once renormalised
    return [float(x) for x in floored / floored.sum()]


def prior_mean(table: dict, declared: dict[str, str]) -> tuple[np.ndarray | None, list[str]]:
    """The prior centre (B,) for the declared {field: value} (None when no row matches) and the declarations the
    table has no row for."""
    rows, missing = [], []
    for field, value in declared.items():
        row = table["groups"].get(field, {}).get(value)
        (rows if row else missing).append(row or f"{field}={value}")
    if not rows:
        return None, missing
    log_mean = np.mean([np.log(np.asarray(row["mean"], np.float64)) for row in rows], axis=0)
    mean = np.exp(log_mean - log_mean.max())
    return mean / mean.sum(), missing


def parse_declarations(items: list[str]) -> dict[str, str]:
    """FIELD=VALUE strings -> {field: value}."""
    declared = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field.strip() or not value.strip():
            raise AttributePriorError(f"declare attributes as FIELD=VALUE (e.g. age='25-34 years old'), got {item!r}")
        if field.strip() in declared:
            raise AttributePriorError(f"{field.strip()} is declared twice ({declared[field.strip()]!r} and "
                                      f"{value.strip()!r}); give each field once")
        declared[field.strip()] = value.strip()
    return declared
