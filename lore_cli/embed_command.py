"""`lore-fed embed DATASET_DIR`: pairs.jsonl -> pairs.npz.

Each line of `DATASET_DIR/pairs.jsonl` (written by `lore-fed prepare`) is one preference pair
`{"user", "history": [messages], "chosen", "rejected", "split", "seen", ...}`; the pair feature is
diff = e(history, chosen) - e(history, rejected). If `DATASET_DIR/ground_truth.npz` (benchmark truth) was made with
the same embedder, the true logits are added (`logit_true`); in reward-model mode the model's score head is added
(`reference_head`). The embedder's id (`embedder.name`) is stored as `embedder`, and the digest of the pairs.jsonl
embedded as `pairs_jsonl_blake2b` (a later edit of it makes train and simulate refuse the stale pairs.npz).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lore_core.atomic_io import check_output_path
from lore_core.pairs import PAIRS_FILENAME, PAIRS_JSONL, SPLITS, PairSet, file_digest, save_pairs
from lore_core.prism_schema import GROUND_TRUTH_FILE as GROUND_TRUTH

TRUTH_ARRAYS = ("basis", "user_id", "user_weights", "logit_scale", "embedder")


class DatasetError(ValueError):
    """A pairs.jsonl or ground_truth.npz that does not follow its contract."""


def configure(parser: argparse.ArgumentParser) -> None:
    from lore_core.embeddings import MODES

    parser.add_argument("dataset_dir", type=Path, help="directory holding pairs.jsonl (from `lore-fed prepare`)")
    parser.add_argument(
        "--model", default=None, help="Hugging Face repo id or local model directory (default: offline all-MiniLM-L6-v2)"
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="auto",
        help="auto: reward-model for a one-label *ForSequenceClassification model, else sentence",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_batch_size(parser)
    parser.add_argument("--max-length", type=at_least(2), default=None,
                        help="token limit (default 256 sentence, 4096 reward-model; at most the model's)")
    parser.add_argument(
        "--cache-dir", default=None, help="embedding cache (default $LORE_CACHE_DIR or ~/.cache/lore-fed/embeddings)"
    )
    parser.add_argument(
        "--ignore-ground-truth",
        action="store_true",
        help=f"do not read {GROUND_TRUTH} (e.g. to embed a benchmark with another model)",
    )


def add_batch_size(parser: argparse.ArgumentParser) -> None:
    """--batch-size of the embedder (embed, synth), checked by the parser: refused by the flag's name before the
    model loads (the embedder's own check names `batch_size`, after loading)."""
    parser.add_argument("--batch-size", type=at_least(1), default=32, help="texts per forward pass (>= 1)")


def at_least(low: int):
    """An argparse type: an integer >= low, refused by the flag's name before any model loads."""

    def checked(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    checked.__name__ = "positive integer" if low == 1 else f"integer >= {low}"  # argparse's "invalid ... value: 'x'"
    return checked


def run(args: argparse.Namespace) -> int:
    from lore_cli.train_command import check_device

    check_device(args.device)  # by the flag's name, before the model loads (the embedder's check names `device`)
    from transformers.utils import logging as transformers_logging

    from lore_core.embeddings import load_embedder

    transformers_logging.disable_progress_bar()  # per-tensor "Loading weights" bars; our own bar counts texts
    dataset_dir = Path(args.dataset_dir)
    if dataset_dir.is_file():
        raise DatasetError(f"{dataset_dir} is a file; give the dataset directory that holds {PAIRS_JSONL} (from "
                           "`lore-fed prepare`)")
    # hashed before the read, and its size and time checked again before pairs.npz is written: an edit while the
    # pairs embed is refused here, writing nothing, rather than leave a pairs.npz every reader then refuses
    text_file = dataset_dir / PAIRS_JSONL
    digest = file_digest(text_file) if text_file.is_file() else None
    hashed = _stamp(text_file)
    records = read_pair_records(text_file)
    check_pair_file_writable(dataset_dir / PAIRS_FILENAME)
    truth_path = dataset_dir / GROUND_TRUTH
    truth = None
    if truth_path.exists() and not args.ignore_ground_truth:
        truth = read_ground_truth(truth_path)  # checked before the model loads; against the embedder below
    embedder = load_embedder(  # a SettingError (the model's own range of a setting) is spelled by lore_cli.main
        args.model,
        mode=args.mode,
        device=args.device,
        batch_size=args.batch_size,
        max_length=args.max_length,
        cache_dir=args.cache_dir,
    )
    if truth is not None:
        truth = check_ground_truth(truth, truth_path, embedder.name, embedder.dim)
    if truth is not None:
        check_truth_users(truth, records["user"], truth_path)  # before the embedding, which may take hours

    n = len(records["chosen"])
    histories = records["history"]
    embeddings = embedder.embed(histories + histories, records["chosen"] + records["rejected"])
    diff = embeddings[:n] - embeddings[n:]
    stats = embedder.last_stats

    users = np.array(records["user"], dtype=str)
    pairs = PairSet(
        diff=diff,
        user=users,
        split=np.array(records["split"], dtype=str),
        seen=np.array(records["seen"], dtype=bool),
        logit_true=None if truth is None else true_logits(truth, users, diff, truth_path),
        group=None if records["conversation"] is None else np.array(records["conversation"], dtype=str),
        reference_head=embedder.reference_head() if hasattr(embedder, "reference_head") else None,
        embedder=embedder.name,  # train and simulate copy it into basis.npz; devices check their encoder against it
        pairs_jsonl_blake2b=digest,
        source=str(dataset_dir / PAIRS_JSONL),
    )
    if _stamp(text_file) != hashed:
        raise DatasetError(f"{text_file} changed while its pairs were embedded; nothing was written. Run `lore-fed "
                           f"embed {dataset_dir}` again once it is final (the cache keeps what was embedded)")
    out = save_pairs(pairs, dataset_dir)
    extras = [name for name in ("logit_true", "reference_head", "group") if getattr(pairs, name) is not None]
    with_extras = f", with {' and '.join(extras)}" if extras else ""
    print(f"wrote {out}: {n} pairs, dim {embedder.dim}, embedder {embedder.name}{with_extras}")
    print(
        f"texts: {stats.requested} requested, {stats.unique} distinct, {stats.computed} embedded, "
        f"{stats.cached} served from cache"
    )
    return 0


def _stamp(path: Path) -> tuple[int, int] | None:
    """(size, modification time in ns) of a file, None when it is not there: what tells an edit."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def check_pair_file_writable(path: Path) -> None:
    """Before the model loads: a pairs.npz that cannot be written failed only after every pair was embedded."""
    if path.is_dir():
        raise DatasetError(f"{path} is a directory, where embed writes the pair file; move it away")
    check_output_path(path, "the pair file", directory=False)


def read_pair_records(path: Path) -> dict[str, list]:
    """Parse and check pairs.jsonl -> column lists (user, history, chosen, rejected, split, seen, conversation).

    `conversation` (written by `prepare`) becomes the pair file's `group`; it is None when no line has it (a file
    from an older `prepare`), and then every line must lack it."""
    from lore_core.embeddings import EmbeddingError, validate_history
    from lore_core.text_file import ids_message, is_name, normalisation_twins, read_jsonl, twins_message

    if not path.is_file():
        raise DatasetError(f"{path} not found; run `lore-fed prepare` on the folder first (a `lore-fed synth` "
                           "population included: prepare makes its pairs.jsonl)")
    columns: dict[str, list] = {k: [] for k in ("user", "history", "chosen", "rejected", "split", "seen")}
    conversations: list[str | None] = []
    seen_at: dict[str, tuple[bool, int]] = {}  # user -> (seen, first line): checked here, not after embedding
    for lineno, record in read_jsonl(path, DatasetError):
        where = f"{path} line {lineno}"
        missing = [k for k in columns if k not in record]
        if missing:
            raise DatasetError(f"{where}: missing keys {missing}")
        for key in ("user", "chosen", "rejected"):
            if not isinstance(record[key], str):
                raise DatasetError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        # what `prepare` drops (a tester's hand-written line of chosen == rejected embedded as a tie, scored an error)
        _check_preference(record, where)
        if record["split"] not in SPLITS:
            raise DatasetError(f"{where}: 'split' must be one of {SPLITS}, got {record['split']!r}")
        if not isinstance(record["seen"], bool):
            raise DatasetError(f"{where}: 'seen' must be true or false, got {record['seen']!r}")
        seen, first = seen_at.setdefault(record["user"], (record["seen"], lineno))
        if record["seen"] != seen:
            raise DatasetError(f"{where}: user {record['user']!r} has 'seen' {str(record['seen']).lower()}, but "
                               f"{str(seen).lower()} on line {first}; a user is seen or unseen in all its pairs")
        try:
            validate_history(record["history"])
        except EmbeddingError as exc:
            raise DatasetError(f"{where}: 'history': {exc}") from None
        for key in columns:
            columns[key].append(record[key])
        if "conversation" in record and not isinstance(record["conversation"], str):
            raise DatasetError(f"{where}: 'conversation' must be a string, got "
                               f"{type(record['conversation']).__name__}")
        if "\x00" in record.get("conversation", ""):  # numpy drops trailing NULs: 'c\x00' would become 'c'
            raise DatasetError(f"{where}: 'conversation' {record['conversation']!r} holds a NUL character; ids are "
                               "text")
        if not is_name(record["user"]):  # a NUL included: numpy drops trailing ones ('u\x00' would become 'u')
            raise DatasetError(ids_message(where, "'user'", [record["user"]]))
        conversations.append(record.get("conversation"))
    if not columns["user"]:
        raise DatasetError(f"{path} holds no pairs")
    twins = normalisation_twins(np.array(list(seen_at), dtype=str))  # the distinct users, before the embedding
    if twins:
        raise DatasetError(twins_message(path, "'user' values", twins))
    has = [c is not None for c in conversations]
    if any(has) and not all(has):
        raise DatasetError(f"{path}: pair {has.index(not has[0]) + 1} {'lacks' if has[0] else 'has'} 'conversation' "
                           "unlike pair 1; every line must have it or none")
    columns["conversation"] = conversations if all(has) else None
    return columns


def _check_preference(record: dict, where: str) -> None:
    """A line states a preference: two responses, neither empty, not the same text, and scores (where given) that do
    not rank the rejected response higher."""
    for key in ("chosen", "rejected"):
        if not record[key]:
            raise DatasetError(f"{where}: {key!r} is empty; a pair compares two responses (`prepare` drops such pairs)")
    if record["chosen"] == record["rejected"]:
        raise DatasetError(f"{where}: 'chosen' and 'rejected' are the same text, which states no preference "
                           "(`prepare` drops such pairs)")
    scores = [record.get(f"{key}_score") for key in ("chosen", "rejected")]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores) and scores[0] < scores[1]:
        raise DatasetError(f"{where}: 'chosen_score' {scores[0]} is below 'rejected_score' {scores[1]}: the scores "
                           "rank the rejected response higher; swap the responses or fix the scores")


def read_ground_truth(path: Path) -> dict[str, np.ndarray]:
    """Load the benchmark truth's arrays (all present, none pickled)."""
    from lore_core.npz_file import open_npz

    with open_npz(path, f"the benchmark truth (.npz with arrays {', '.join(TRUTH_ARRAYS)})", DatasetError) as data:
        truth = {key: data[key] for key in data.files}
    missing = [k for k in TRUTH_ARRAYS if k not in truth]
    if missing:
        raise DatasetError(f"{path}: missing arrays {missing}; found {sorted(truth)}")
    return truth


def check_ground_truth(truth: dict[str, np.ndarray], path: Path, embedder_name: str,
                       dim: int) -> dict[str, np.ndarray] | None:
    """The truth for this embedder; None (with a warning) when it was made with another embedder of the same dim."""
    from lore_core.basis_file import other_embedders

    basis, weights, user_id = truth["basis"], truth["user_weights"], truth["user_id"]
    if basis.ndim != 2 or basis.shape[1] != dim:
        raise DatasetError(
            f"{path}: the true basis has shape {basis.shape}, but embedder {embedder_name} gives {dim}-d "
            f"embeddings; embed with the benchmark's embedder ({truth['embedder']}) or pass --ignore-ground-truth"
        )
    if user_id.ndim != 1 or weights.shape != (user_id.size, basis.shape[0]):
        raise DatasetError(
            f"{path}: user_weights must be (users, K) = ({user_id.size}, {basis.shape[0]}), got {weights.shape}"
        )
    if other_embedders(str(truth["embedder"]), embedder_name):  # a copy of the model in another folder is the same
        print(
            f"warning: {path} was made with embedder {truth['embedder']}, not {embedder_name}; "
            "the oracle (logit_true) is not available",
            file=sys.stderr,
        )
        return None
    return truth


def check_truth_users(truth: dict[str, np.ndarray], users: list[str], where: Path) -> None:
    """Every user of the pairs has true weights (`true_logits` needs them)."""
    unknown = sorted(set(users) - set(truth["user_id"].astype(str).tolist()))
    if unknown:
        raise DatasetError(f"{where}: users without ground-truth weights: {unknown[:5]}; embed the benchmark's own "
                           "pairs, or pass --ignore-ground-truth")


def true_logits(truth: dict[str, np.ndarray], users: np.ndarray, diff: np.ndarray, where: Path) -> np.ndarray:
    """logit_true_j = logit_scale * w_{u_j} . (basis @ diff_j), (n,)."""
    user_id = truth["user_id"].astype(str)
    if not user_id.size:  # (a reviewer: np.searchsorted on none indexed past the end, a traceback)
        raise DatasetError(f"{where}: users without ground-truth weights: the truth names no user")
    order = np.argsort(user_id)
    pos = np.minimum(np.searchsorted(user_id, users, sorter=order), user_id.size - 1)
    index = order[pos]
    unknown = np.unique(users[user_id[index] != users])
    if unknown.size:
        raise DatasetError(f"{where}: users without ground-truth weights: {unknown[:5].tolist()}")
    basis_scores = diff.astype(np.float64) @ truth["basis"].astype(np.float64).T  # (n, K)
    weights = truth["user_weights"].astype(np.float64)[index]
    return float(truth["logit_scale"]) * np.einsum("nk,nk->n", basis_scores, weights)
