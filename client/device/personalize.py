"""Personalization on the device: few-shot w from the user's own choices, the strength dial, forgetting.

The solver is lore_core.simplex_fit (numpy, the same objective as the torch trainer), run for one user.
Incremental updates refit on all of the user's pairs, warm-started from the previous w: the objective is
convex, so the result does not depend on the order in which choices arrived.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lore_core.npz_file import open_npz
from lore_core.pairs import MAX_ABS_DIFF, MIN_LARGEST_DIFF
from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS, fit_user_weights
from lore_core.text_file import json_records, read_text

CHOICE_CONTEXT_KEYS = ("history", "prompt")
# The longest choice `adapt` stores, as JSON characters: the state keeps every choice's text whole (to embed it again
# under a new encoder), and a tester's 5 MB choices made a state of hundreds of MB. The encoder reads 128 tokens of
# context and 256 of a pair, about 1,000 characters: this leaves room for any encoder's window.
MAX_CHOICE_CHARS = 200_000


class ChoicesError(ValueError):
    """A choices file that does not follow the documented shape."""


@dataclass(frozen=True)
class Adaptation:
    user_weights: np.ndarray  # (B,)
    iterations: int
    converged: bool
    train_accuracy: float  # share of the user's pairs the personal reward orders as the user did


def adapt(
    basis: np.ndarray,
    pair_diff: np.ndarray,
    *,
    init: np.ndarray | None = None,
    prior_pairs: float = DEFAULT_PRIOR_PAIRS,
    prior_mean: np.ndarray | None = None,
) -> Adaptation:
    """Fit the user's w (B,) on the simplex from pair diffs (n, D) = e(chosen) - e(rejected), basis (B, D).

    The prior toward the population (uniform w, or `prior_mean` (B,) from declared attributes) weighs as much as
    `prior_pairs` of the user's own pairs: a user with a few choices stays close to it, one with many is free to
    be personal."""
    diff = np.asarray(pair_diff, dtype=np.float64)
    if diff.ndim != 2 or diff.shape[1] != basis.shape[1]:
        raise ValueError(f"pair diffs must be (n, {basis.shape[1]}) to match the basis, got {diff.shape}")
    scores = diff @ np.asarray(basis, dtype=np.float64).T  # (n, B)
    fit = fit_user_weights(
        scores, np.zeros(len(scores), dtype=np.int64), 1, prior_strength=prior_pairs / max(len(scores), 1),
        init=None if init is None else np.asarray(init, np.float64)[None, :],
        prior_mean=None if prior_mean is None else np.asarray(prior_mean, np.float64)[None, :],
    )
    weights = fit.weights[0]
    accuracy = float((scores @ weights > 0).mean()) if len(scores) else float("nan")
    return Adaptation(weights, fit.iterations, fit.converged, accuracy)


def effective_weights(user_weights: np.ndarray | None, strength: float | None, rank: int) -> np.ndarray:
    """(1 - s) * uniform + s * w_user (B,): s = 0 is the population reward, s = 1 fully personal.

    strength None ("off") or no personal weights yet give the population reward (uniform over the basis).
    Works on samples of w too: user_weights (..., B).
    """
    uniform = np.full(rank, 1.0 / rank)
    if strength is None or user_weights is None:
        return uniform
    s = parse_strength(strength)
    return (1.0 - s) * uniform + s * np.asarray(user_weights, np.float64)


def parse_strength(value, name: str = "strength") -> float | None:
    """'off' -> None; a number in [0, 1] -> float; anything else is an error naming `name` (the flag as typed) and
    the value as given (1e400 is reported as typed, not as the inf it becomes)."""
    problem = f"{name} must be a number in [0, 1] or 'off', got {value!r}"
    if isinstance(value, str):
        if value.strip().lower() == "off":
            return None
        try:
            value = float(value)
        except ValueError:
            raise ValueError(problem) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(problem)
    return float(value) + 0.0  # -0 is 0 (it printed -0.0)


def read_choices(path: str | Path) -> list[dict]:
    """The user's choices from JSON Lines or a JSON list: {"history": [messages] | "prompt": str, "chosen",
    "rejected"}; messages are {"role": "user" | "assistant", "content": str}."""
    path = Path(path)
    text = read_text(path, ChoicesError, "choices file")
    records, places = json_records(text, path, ChoicesError, "choice")
    if not isinstance(records, list):  # a tester's pretty-printed object read as "line 1: not valid JSON"
        raise ChoicesError(f"{path}: a JSON {type(records).__name__}, not choices; expected JSON Lines (one choice "
                           "object per line) or a JSON list of choices")
    if not records:
        raise ChoicesError(f"{path}: no choices in the file")
    for record, place in zip(records, places):
        check_choice(record, f"{path}: {place}")
    users = {str(record["user"]) for record in records if "user" in record}
    if len(users) > 1:  # a tester's `prepare` pairs.jsonl of 15 users was learned as one user's (an .npz is refused)
        raise ChoicesError(f"{path}: choices of {len(users)} users (its 'user' keys); a device learns from its own "
                           "user's choices only (give one user's, or leave 'user' out)")
    return records


def read_choice_diffs(path: str | Path, dim: int) -> np.ndarray:
    """Precomputed choices: `diff` (n, D) = e(chosen) - e(rejected) from an .npz, checked like a pair file's."""
    diff = read_user_diffs(path, dim, "precomputed choices", ChoicesError)
    empty = np.flatnonzero(tied_rows(diff))
    if empty.size:
        raise ChoicesError(f"{path}: rows {empty[:5].tolist()} are all zeros (every entry below "
                           f"{MIN_LARGEST_DIFF:g}: chosen == rejected); a choice is between two different responses")
    return diff


def npz_user(path: str | Path) -> str | None:
    """The one user an .npz of choices names in its `user` array (read_user_diffs refuses several), else None."""
    with open_npz(path, "precomputed choices", ChoicesError) as data:
        if "user" not in data.files:
            return None
        users = np.unique(data["user"])
    return str(users[0]) if users.size == 1 else None  # read_user_diffs refuses ids that are not strings


def tied_rows(diff: np.ndarray) -> np.ndarray:
    """(n,) rows that tell two responses apart by nothing: every entry below the pair file's MIN_LARGEST_DIFF (a
    tester's rows of 1e-30 were learned as choices). A row of a pool is not asked; a choice is refused."""
    return np.abs(np.asarray(diff)).max(axis=1, initial=0.0) < MIN_LARGEST_DIFF


def read_user_diffs(path: str | Path, dim: int, what: str, error: type[ValueError]) -> np.ndarray:
    """One user's pair diffs (n >= 1, D = dim) from an .npz with a `diff` array, finite and within +-MAX_ABS_DIFF,
    as float64: the check `adapt`'s precomputed choices and `next-question`'s .npz pool share (an answer to a pair
    beyond the bound could not be learned; a whole pair file's users would become this user). Raises `error`."""
    with open_npz(path, f"{what} (.npz with an array diff (n, {dim}))", error) as data:
        if "diff" not in data.files:
            raise error(f"{path}: {what} needs a 'diff' array (n, {dim}); found {data.files}")
        user = data["user"] if "user" in data.files else None
        if user is not None and (user.dtype.kind != "U" or user.ndim != 1):  # ints slipped past the one-user check
            raise error(f"{path}: user must be a 1-D array of strings (the pair file's user ids), got {user.dtype} "
                        f"{user.shape}")
        users = 0 if user is None else np.unique(user).size
        if users > 1:
            raise error(f"{path}: a pair file of {users} users; a device uses its own user's pairs only (an .npz "
                        "with just 'diff', or one user's rows)")
        diff = data["diff"]
    if diff.ndim != 2 or diff.shape[1] != dim or not np.issubdtype(diff.dtype, np.floating):
        raise error(f"{path}: diff must be finite floats (n, {dim}) to match the basis, got {diff.dtype} {diff.shape}")
    if not np.isfinite(diff).all():  # a tester read "got float32 (1, 24)" of a NaN file as a shape problem
        raise error(f"{path}: diff has {int((~np.isfinite(diff)).sum())} values that are not finite (NaN or inf); "
                    "embedding differences must be finite")
    if not diff.shape[0]:
        raise error(f"{path}: no pairs in the file")
    if user is not None and user.shape[0] != diff.shape[0]:
        raise error(f"{path}: user has {user.shape[0]} ids for {diff.shape[0]} diff rows; one id per row")
    if float(np.abs(diff).max()) > MAX_ABS_DIFF:
        raise error(f"{path}: diff has values beyond +-{MAX_ABS_DIFF:g}; embedding differences are of order 1 to 100 "
                    "(were they embedded with this basis's encoder?)")
    return diff.astype(np.float64)


def choice_context(record: dict) -> list[dict]:
    """The conversation a choice was made in, as messages (a bare prompt is one user message)."""
    if "history" in record:
        return record["history"]
    return [{"role": "user", "content": record["prompt"]}]


def choice_identity(record: dict, *, ordered: bool = True) -> str:
    """What makes two text choices the same, for `adapt` (a choice already learned) and `next-question` (a pool
    pair already answered): the conversation (a bare prompt is one user message; only each message's role and
    content) and the two responses; not the keys' order or extra keys an app adds. `ordered` False: the same pair
    whichever response was chosen."""
    context = [{key: m[key] for key in ("role", "content") if key in m} if isinstance(m, dict) else m
               for m in choice_context(record)]
    answer = [record["chosen"], record["rejected"]]
    return json.dumps([context, answer if ordered else sorted(answer)], ensure_ascii=False, sort_keys=True)


def diff_identities(diff: np.ndarray, *, ordered: bool = True) -> np.ndarray:
    """What makes precomputed pairs the same, as `choice_identity` for texts: (n,) each float32 row of diff (n, D) as
    one opaque value (-0 as 0), equal exactly for equal rows, to compare by hashing or sorting in linear memory (a
    tester's all-against-all comparison of 50,000 pool rows with 3,000 answers took 53.6 GiB). `ordered` False: a
    row and its negation (the same pair, the other response chosen) are the same."""
    rows = np.asarray(diff, np.float32)
    if not ordered:  # each row signed so that its first nonzero value is positive
        first = rows[np.arange(len(rows)), (rows != 0).argmax(axis=1)]
        rows = rows * np.where(first < 0, np.float32(-1), np.float32(1))[:, None]
    rows = np.ascontiguousarray(rows + np.float32(0))  # -0 + 0 = +0: equal values, equal bytes
    return rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1]))).ravel()


def check_choice(record, where: str) -> None:
    """A new choice as `read_choices` takes it: its shape (check_choice_shape), two different responses, and text
    that is Unicode."""
    check_choice_shape(record, where)
    if record["chosen"] == record["rejected"]:
        raise ChoicesError(f"{where}: 'chosen' and 'rejected' are the same text; a choice is between two different "
                           "responses")
    empty = [key for key in ("chosen", "rejected") if is_blank(record[key])]
    if empty:  # as `prepare` drops an empty response (a tester: adapt learned from one)
        raise ChoicesError(f"{where}: {' and '.join(repr(key) for key in empty)} is empty; a choice is between two "
                           "responses with text")
    if is_blank("".join(message["content"] for message in choice_context(record))):  # as `rank --prompt ""`
        raise ChoicesError(f"{where}: the {'prompt' if 'prompt' in record else 'history'} is blank; a choice answers "
                           "the user's message, so give its text")
    texts = {key: record[key] for key in ("prompt", "chosen", "rejected") if key in record}
    texts.update({f"history[{i}].content": message["content"] for i, message in enumerate(record.get("history", []))})
    for key, text in texts.items():
        if not is_unicode_text(text):
            raise ChoicesError(f"{where}: '{key}' {NOT_UNICODE}")
    try:  # what the state stores: strict JSON (a tester's extra key NaN was stored as it came)
        stored = json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ChoicesError(f"{where}: a number is NaN or infinite, which JSON does not allow") from None
    if not is_unicode_text(stored):  # an extra key's value, such as 'user' (a reviewer)
        raise ChoicesError(f"{where}: a key or value {NOT_UNICODE}")
    if len(stored) > MAX_CHOICE_CHARS:  # kept whole on the device, to embed again under a new encoder
        raise ChoicesError(f"{where}: {len(stored):,} characters; a choice holds at most {MAX_CHOICE_CHARS:,} (the "
                           "encoder reads the last part of the conversation and the start of each response: send "
                           "the last messages of a long history)")


def check_choice_shape(record, where: str) -> None:
    """What a choice must hold to be embedded: exactly one of prompt / history, chosen and rejected strings. A stored
    choice is checked for this alone: rules added since (two different responses) must not lock out a state that an
    earlier `adapt` wrote."""
    if not isinstance(record, dict):
        raise ChoicesError(f"{where}: expected an object, got {type(record).__name__}")
    if sum(key in record for key in CHOICE_CONTEXT_KEYS) != 1:
        raise ChoicesError(f"{where}: needs exactly one of 'history' or 'prompt', got keys {sorted(record)}")
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str):
            raise ChoicesError(f"{where}: '{key}' must be a string")
    if "prompt" in record and not isinstance(record["prompt"], str):
        raise ChoicesError(f"{where}: 'prompt' must be a string")
    history = record.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
        for m in history
    ) or ("history" in record and not history):
        raise ChoicesError(f"{where}: 'history' must be a non-empty list of {{'role': 'user'|'assistant', 'content'}}")


# A JSON "\ud83d" escape (an emoji cut in half, as JavaScript string slicing leaves it) or a command-line argument
# with bytes that are not UTF-8 gives a str that is not text: the tokenizer fails on it.
NOT_UNICODE = ("is not valid Unicode text: it holds a lone surrogate (such as \\ud83d, half of an emoji) or a byte "
               "that is not UTF-8")


# Whitespace and the invisible format characters (zero-width spaces and joiners, word joiner, BOM, soft hyphen,
# bidirectional controls): a response of U+200B alone passed as text (a tester)
_BLANK = re.compile("[\\s\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]*")


def is_blank(text: str) -> bool:
    return _BLANK.fullmatch(text) is not None


def is_unicode_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
