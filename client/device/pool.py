"""A question pool: the candidate pairs a new user might be asked, in `adapt`'s input format without the answer.

JSON Lines or a JSON list of {"history": [messages] | "prompt": str, "responses": [A, B]}, or a .npz holding
`diff` (P, D) = e(A) - e(B) (the sign of a row does not matter: a question is unordered). The user's answer goes
back to `adapt` as {"prompt"|"history", "chosen", "rejected"} (or, for an .npz pool, the row times +1 if A was
chosen, -1 if B). Pairs the user already answered (same context and responses, or the same diff row up to sign)
are not asked again, and a pair the pool holds twice (either way round) is asked once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.device.personalize import (
    CHOICE_CONTEXT_KEYS,
    NOT_UNICODE,
    check_choice,
    choice_identity,
    diff_identities,
    is_unicode_text,
    read_user_diffs,
)
from lore_core.pairs import has_signal
from lore_core.text_file import json_records, not_a_file, read_text


class PoolError(ValueError):
    """A pool file that does not follow the format above."""


@dataclass(frozen=True)
class Pool:
    records: list[dict] | None  # the pool's text records; None for an .npz pool
    diff: np.ndarray | None  # (P, D) for an .npz pool; text pools are embedded by the caller

    @property
    def size(self) -> int:
        return len(self.records) if self.records is not None else int(self.diff.shape[0])


OUTPUT_KEYS = frozenset({"index", "information_bits"})  # what next-question adds to each pool record it prints


def read_pool(path: str | Path, dim: int) -> Pool:
    """Read and check a pool file; dim is the basis' embedding dimension (for .npz pools)."""
    path = Path(path)
    if not path.is_file():
        raise PoolError(not_a_file("pool file", path))
    if path.suffix == ".npz":  # zero rows stay valid: a pool pair is unordered and may compare equal items
        diff = read_user_diffs(path, dim, "an .npz pool", PoolError)
        if not has_signal(diff):  # a tester: every question offered would teach nothing
            raise PoolError(f"{path}: diff is zero in every pair of the pool (each compares two equal embeddings), "
                            "so no answer would teach anything; expected pairs of different responses")
        return Pool(records=None, diff=diff)
    text = read_text(path, PoolError, "pool file")  # a BOM is dropped; bad UTF-8 names the file and line
    records, places = json_records(text, path, PoolError, "pair")
    if not isinstance(records, list):  # one pretty-printed pair read "no pairs in the pool" (a reviewer)
        raise PoolError(f"{path}: a JSON {type(records).__name__}, not a pool; expected JSON Lines (one pair object "
                        "per line) or a JSON list of pairs")
    if not records:
        raise PoolError(f"{path}: no pairs in the pool")
    for record, place in zip(records, places):
        where = f"{path}: {place}"
        responses = record.get("responses") if isinstance(record, dict) else None
        if not (isinstance(responses, list) and len(responses) == 2 and all(isinstance(r, str) for r in responses)):
            raise PoolError(f"{where}: expected {{'prompt'|'history', 'responses': [A, B]}} with two strings")
        if responses[0] == responses[1]:
            raise PoolError(f"{where}: its two responses are the same text; a question compares two different ones")
        check_choice(as_choice(record, 0), where)  # the context, as `adapt` checks it
        # next-question prints the whole record beside its own keys, as strict JSON
        taken = sorted(OUTPUT_KEYS.intersection(record))
        if taken:
            raise PoolError(f"{where}: the keys {taken} are next-question's own (it writes them for each question); "
                            "rename them")
        try:
            printed = json.dumps(record, ensure_ascii=False, allow_nan=False)
        except ValueError:
            raise PoolError(f"{where}: a number is NaN or infinite, which JSON does not allow") from None
        if not is_unicode_text(printed):
            raise PoolError(f"{where}: a key or value {NOT_UNICODE}")
    return Pool(records=records, diff=None)


def as_choice(record: dict, chosen: int) -> dict:
    """The `adapt` record of answering pool pair `record` with response `chosen` (0 = A, 1 = B)."""
    context = {key: record[key] for key in CHOICE_CONTEXT_KEYS if key in record}
    return {**context, "chosen": record["responses"][chosen], "rejected": record["responses"][1 - chosen]}


def answered(pool: Pool, choices: tuple[str, ...], pair_diff: np.ndarray, diff: np.ndarray | None = None) -> np.ndarray:
    """(P,) bool: pool pairs the user has already answered (either way round): a text pair by its texts, and every
    pair by its difference `diff` (P, D) (a text pool's as embedded; an .npz pool's own by default) against the
    answers' (a tester's text pair that differed from an answered one only in case, which the encoder does not
    see, was asked again, and `adapt` then skipped the answer as already learned)."""
    diff = pool.diff if diff is None else diff
    held = np.zeros(pool.size, dtype=bool)
    if diff is not None and len(pair_diff):  # hashed rows: memory linear in the pool and the answers
        held = np.isin(diff_identities(diff, ordered=False), diff_identities(pair_diff, ordered=False))
    if pool.records is None:
        return held
    done = {choice_identity(r, ordered=False) for r in map(json.loads, choices) if "chosen" in r}  # not precomputed
    return held | np.array([key in done for key in question_identities(pool)], dtype=bool)


def repeated(pool: Pool, diff: np.ndarray | None = None) -> np.ndarray:
    """(P,) bool: pool pairs that an earlier pair of the pool already asks (the same question, either way round), so
    that a batch never asks one twice (a tester's pool holding a pair twice got it asked twice in one batch): by
    the texts of a text pair, and by the difference `diff` of every pair (texts the encoder reads alike are one
    question: a tester's batch of 3 asked one three times, recased)."""
    diff = pool.diff if diff is None else diff
    repeat = np.zeros(pool.size, dtype=bool)
    keys = [question_identities(pool)] if pool.records is not None else []
    keys += [diff_identities(diff, ordered=False)] if diff is not None else []
    for key in keys:
        later = np.ones(pool.size, dtype=bool)
        later[np.unique(key, return_index=True)[1]] = False
        repeat |= later
    return repeat


def question_identities(pool: Pool) -> np.ndarray:
    """(P,) what makes two pool pairs the same question, whichever response comes first: the context and the two
    responses of a text pair, the diff row up to sign of an .npz pool's."""
    if pool.records is None:
        return diff_identities(pool.diff, ordered=False)
    return np.array([choice_identity(as_choice(r, 0), ordered=False) for r in pool.records], dtype=object)
