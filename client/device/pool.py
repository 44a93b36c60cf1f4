"""A question pool: the candidate pairs a new user might be asked, in `adapt`'s input format without the answer.

JSON Lines or a JSON list of {"history": [messages] | "prompt": str, "responses": [A, B]}, or a .npz holding
`diff` (P, D) = e(A) - e(B) (the sign of a row does not matter: a question is unordered). The user's answer goes
back to `adapt` as {"prompt"|"history", "chosen", "rejected"} (or, for an .npz pool, the row times +1 if A was
chosen, -1 if B). Pairs the user already answered (same context and responses, or the same diff row up to sign)
are not asked again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.device.personalize import CHOICE_CONTEXT_KEYS, MAX_ABS_DIFF, check_choice
from lore_core.text_file import not_a_file


class PoolError(ValueError):
    """A pool file that does not follow the format above."""


@dataclass(frozen=True)
class Pool:
    records: list[dict] | None  # the pool's text records; None for an .npz pool
    diff: np.ndarray | None  # (P, D) for an .npz pool; text pools are embedded by the caller

    @property
    def size(self) -> int:
        return len(self.records) if self.records is not None else int(self.diff.shape[0])


def read_pool(path: str | Path, dim: int) -> Pool:
    """Read and check a pool file; dim is the basis' embedding dimension (for .npz pools)."""
    path = Path(path)
    if not path.is_file():
        raise PoolError(not_a_file("pool file", path))
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                diff = data["diff"] if "diff" in data.files else None
                users = np.unique(data["user"]).size if "user" in data.files else 0
        except Exception as exc:  # zip, format and pickle errors of a bad file come in many types
            raise PoolError(f"{path}: not a readable .npz pool ({type(exc).__name__}: {exc})") from exc
        if diff is None or diff.ndim != 2 or diff.shape[1] != dim or not diff.shape[0] \
                or not np.issubdtype(diff.dtype, np.floating) or not np.isfinite(diff).all():
            shape = None if diff is None else diff.shape
            raise PoolError(f"{path}: an .npz pool needs a finite 'diff' array (P, {dim}) with P >= 1, got {shape}")
        if np.abs(diff).max() > MAX_ABS_DIFF:  # as `adapt` refuses them: an answer to such a pair could not be learned
            raise PoolError(f"{path}: diff has values beyond +-{MAX_ABS_DIFF:g}; embedding differences are of order 1 "
                            "to 100 (were they embedded with this basis's encoder?)")
        if users > 1:
            raise PoolError(f"{path}: a pair file of {users} users; a pool holds the candidate pairs of one user")
        return Pool(records=None, diff=diff.astype(np.float64))
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PoolError(f"{path}: not JSON Lines or a JSON list ({exc})") from exc
    if not isinstance(records, list) or not records:
        raise PoolError(f"{path}: no pairs in the pool")
    for number, record in enumerate(records, 1):
        where = f"{path}: pair {number}"
        responses = record.get("responses") if isinstance(record, dict) else None
        if not (isinstance(responses, list) and len(responses) == 2 and all(isinstance(r, str) for r in responses)):
            raise PoolError(f"{where}: expected {{'prompt'|'history', 'responses': [A, B]}} with two strings")
        check_choice(as_choice(record, 0), where)  # the context, as `adapt` checks it
    return Pool(records=records, diff=None)


def as_choice(record: dict, chosen: int) -> dict:
    """The `adapt` record of answering pool pair `record` with response `chosen` (0 = A, 1 = B)."""
    context = {key: record[key] for key in CHOICE_CONTEXT_KEYS if key in record}
    return {**context, "chosen": record["responses"][chosen], "rejected": record["responses"][1 - chosen]}


def answered(pool: Pool, choices: tuple[str, ...], pair_diff: np.ndarray) -> np.ndarray:
    """(P,) bool: pool pairs the user has already answered."""
    if pool.records is None:
        stored = np.asarray(pair_diff, np.float32)
        rows = pool.diff.astype(np.float32)
        if not stored.shape[0]:
            return np.zeros(pool.size, bool)
        same = (rows[:, None, :] == stored[None]).all(-1) | (rows[:, None, :] == -stored[None]).all(-1)
        return same.any(axis=1)
    done = {_key(json.loads(c)) for c in choices}
    return np.array([_key(as_choice(r, 0)) in done for r in pool.records])


def _key(choice: dict) -> tuple:
    context = json.dumps(choice.get("history", choice.get("prompt")), sort_keys=True, ensure_ascii=False)
    return context, frozenset((choice.get("chosen"), choice.get("rejected")))
