"""The per-user held-out figures a `train` selection chose on (`DIR/selection_heldout.npz`), kept so that any later
selection rule can be replayed on the very figures of this run.

metrics.json's selection table holds each candidate's means and SEs. A rule that reads the per-user figures in
another way cannot always be rebuilt from them: 85dcd0b counted a user's seen and new gains as correlated, and no
table recorded before it holds their covariance. This file holds the figures themselves:
  seen, new     (K, U) float64: candidate k's held-out accuracy for user u of the selection (the trainer's user
                order; NaN where the user was not scored on that side)
  rank, l2, prior_pairs, objective, seconds    (K,): each candidate's settings, as in the table
  nested, seed  0-d: what `model_selection.select` was called with
The users are the trainer's, in its order: sorted user ids of the seen users (of the selection's sample of users
in a large population), as `user_weights.npz` lists them for a population trained in memory. Written only where
candidates were compared (more than one).
`replay` runs `select` on them: with the code that wrote the file it gives the recorded table and choice exactly (a
test holds it to that), with later code the choice that code would have made. Centralized training holds every
user's data anyway; the file names no user.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_save_npz
from lore_core.model_selection import Candidate, select
from lore_core.npz_file import open_npz

FILENAME = "selection_heldout.npz"
PER_CANDIDATE = ("rank", "l2", "prior_pairs", "objective", "seconds")
KINDS = {"rank": "iu", "l2": "f", "prior_pairs": "f", "objective": "U", "seconds": "f", "nested": "b", "seed": "iu"}
EXPECTED = (f"a `lore-fed train` {FILENAME}: seen and new (K, U) float64, rank, l2, prior_pairs, objective and "
            "seconds (K,), nested and seed")


def record_of(candidates: list[Candidate], nested: bool, seed: int) -> dict[str, np.ndarray]:
    """The arrays of the module docstring for `select(candidates, nested, seed)`."""
    return {"seen": np.stack([c.seen for c in candidates]).astype(np.float64),
            "new": np.stack([c.new for c in candidates]).astype(np.float64),
            "rank": np.array([c.rank for c in candidates], dtype=np.int64),
            "l2": np.array([c.l2 for c in candidates], dtype=np.float64),
            "prior_pairs": np.array([c.prior_pairs for c in candidates], dtype=np.float64),
            "objective": np.array([c.objective for c in candidates], dtype=str),
            "seconds": np.array([c.seconds for c in candidates], dtype=np.float64),
            "nested": np.array(bool(nested)), "seed": np.array(int(seed), dtype=np.int64)}


def save_record(path: str | Path, record: dict[str, np.ndarray]) -> None:
    atomic_save_npz(path, **record)


def load_record(path: str | Path) -> dict[str, np.ndarray]:
    """The record at `path`, its shapes checked (ValueError naming the file and what was expected)."""
    with open_npz(path, EXPECTED) as data:
        missing = sorted({"seen", "new", "nested", "seed", *PER_CANDIDATE} - set(data.files))
        if missing:
            raise ValueError(f"{path}: missing {missing}; expected {EXPECTED}")
        record = {key: data[key] for key in data.files}
    seen, new = record["seen"], record["new"]
    if seen.ndim != 2 or seen.shape != new.shape or \
            any(record[key].shape != seen.shape[:1] for key in PER_CANDIDATE) or \
            record["nested"].shape or record["seed"].shape:
        shapes = {key: value.shape for key, value in record.items()}
        raise ValueError(f"{path}: shapes {shapes} do not fit together; expected {EXPECTED}")
    wrong = sorted(key for key, kinds in KINDS.items() if record[key].dtype.kind not in kinds)
    if wrong or seen.dtype != np.float64 or new.dtype != np.float64:
        dtypes = {key: str(value.dtype) for key, value in record.items()}
        raise ValueError(f"{path}: dtypes {dtypes} are not a record's; expected {EXPECTED}")
    return record


def matches_table(rows: list[dict], table: list[dict]) -> bool:
    """Whether replayed `rows` are those of a metrics.json `table`: the same candidates in the same order with the
    same held-out estimates (these do not depend on the rule). A record left beside another run's metrics.json (a
    rerun by code that wrote none) does not match."""
    keys = ("rank", "l2", "prior_pairs", "objective", "seen_acc", "new_acc")
    return len(rows) == len(table) and all(
        (b is None and isinstance(a, float) and math.isnan(a)) or a == b
        for row, recorded in zip(rows, table) for a, b in ((row[k], recorded.get(k)) for k in keys))


def candidates_of(record: dict[str, np.ndarray]) -> list[Candidate]:
    """The recorded candidates, as the trainer held them when it chose."""
    return [Candidate(rank=int(record["rank"][k]), l2=float(record["l2"][k]),
                      prior_pairs=float(record["prior_pairs"][k]), seen=record["seen"][k], new=record["new"][k],
                      seconds=float(record["seconds"][k]), objective=str(record["objective"][k]))
            for k in range(record["rank"].size)]


def replay(record: dict[str, np.ndarray]) -> tuple[int, list[dict], dict]:
    """Today's `select` on the recorded figures: (index of the chosen candidate, table rows, nested check)."""
    candidates = candidates_of(record)
    chosen, rows, check = select(candidates, nested=bool(record["nested"]), seed=int(record["seed"]))
    return next(k for k, c in enumerate(candidates) if c is chosen), rows, check
