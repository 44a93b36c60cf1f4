"""Which pair file a `simulate` run directory belongs to: a resumed run must read the file it started on.

The checkpoint fingerprints the settings and the users per node, not the pairs, so a file with the same users and D
but other pairs resumed silently and was reported under its own name with the first file's figures. DIR/data.json
records the size and a BLAKE2b digest of the pair file a run starts on (of its arrays' sizes and CRC-32s: see
`pair_file_fingerprint`); a resume on another file is refused before Ray starts or anything is written. A run
directory from before this record resumes and gets one.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

from lore_core.atomic_io import atomic_write_json
from lore_core.pairs import file_digest
from lore_core.text_file import is_json_integer, json_loads

DATA_FILENAME = "data.json"


def pair_file_fingerprint(pairs_path: str | Path, method: str = "zip-crc32") -> dict:
    """{"bytes", "blake2b", "method"} of the file's content (its path may move between runs). "zip-crc32": a pair
    file is a zip archive whose central directory holds each array's CRC-32 and size, and its readers check every
    CRC, so the digest covers the file size and those entries and costs no pass over a 4 GiB file; it catches a file
    replaced by mistake, not a forgery built to match the CRCs. "file" (or a file that is not a zip): the whole
    content, as records without a method were made."""
    size = Path(pairs_path).stat().st_size
    try:
        if method != "zip-crc32":
            raise zipfile.BadZipFile(method)
        with zipfile.ZipFile(pairs_path) as archive:
            entries = sorted((info.filename, info.file_size, info.CRC) for info in archive.infolist())
        digest = hashlib.blake2b(json.dumps([size, entries]).encode(), digest_size=16).hexdigest()
    except zipfile.BadZipFile:
        method, digest = "file", file_digest(pairs_path)
    return {"bytes": size, "blake2b": digest, "method": method}


def fingerprint_problem(recorded) -> str | None:
    """Why a recorded fingerprint (as `pair_file_fingerprint` writes it) cannot be checked against a file; None when
    it can. A damaged record must not pass for one that matches, nor for a file that changed."""
    if not isinstance(recorded, dict):
        return f"expected an object with 'bytes' and 'blake2b', got {type(recorded).__name__}"
    size, digest = recorded.get("bytes"), recorded.get("blake2b")
    if not is_json_integer(size):
        return f"'bytes' must be the file's size in bytes, got {size!r}"
    if not isinstance(digest, str) or not digest or any(c not in "0123456789abcdef" for c in digest):
        return f"'blake2b' must be a hex digest, got {digest!r}"
    if recorded.get("method", "file") not in ("zip-crc32", "file"):
        return f"'method' must be 'zip-crc32' or 'file', got {recorded['method']!r}"
    return None


def same_pair_file(recorded: dict, pairs_path: str | Path) -> bool:
    """Whether `pairs_path` has the content a run recorded (by the record's own method); the size first, which
    costs no read of a 4 GiB file."""
    if Path(pairs_path).stat().st_size != recorded.get("bytes"):
        return False
    current = pair_file_fingerprint(pairs_path, recorded.get("method", "file"))
    return current["bytes"] == recorded.get("bytes") and current["blake2b"] == recorded.get("blake2b")


def check_same_pairs(run_dir: Path, pairs_path: Path, resuming: bool) -> dict:
    """The fingerprint of `pairs_path`; raises ValueError (exit 2) when a resumed run started on another file, or
    when DIR/data.json is not a record of this command (the user's own file, which the run would replace)."""
    current = {"path": str(Path(pairs_path).resolve()), **pair_file_fingerprint(pairs_path)}
    record = run_dir / DATA_FILENAME
    if not record.exists():
        return current
    try:
        started = json_loads(record.read_text())
        problem = fingerprint_problem(started)  # the one definition of a valid record, audit's too
        if problem:
            raise ValueError(problem)
        same = started["bytes"] == current["bytes"] and (
            started["blake2b"] == current["blake2b"] or same_pair_file(started, pairs_path))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if not resuming:  # no checkpoint: the file is not a crashed start of this command's, it is someone's file
            raise ValueError(f"--out {run_dir} holds {DATA_FILENAME}, which is not the pair-file record lore-fed "
                             f"simulate writes ({exc}): it would be replaced; give a new directory") from exc
        raise ValueError(f"{record}: not a pair-file record ({exc}); expected JSON with 'bytes' and 'blake2b', as "
                         f"lore-fed simulate writes it. Restore it, or start the run afresh in a new --out") from exc
    if resuming and not same:
        raise ValueError(f"--out {run_dir} holds a run trained on another pair file ({started.get('path')}, "
                         f"{started['bytes']} bytes) than {pairs_path} ({current['bytes']} bytes, other content); "
                         "give that file to resume it, or a new --out directory")
    return current


def record_pairs(run_dir: Path, fingerprint: dict) -> None:
    atomic_write_json(run_dir / DATA_FILENAME, fingerprint)


def refuse_a_dataset(run_dir: Path, flag: str) -> None:
    """A run directory that is a dataset of `lore-fed prepare` is refused before anything is written: a tester's
    `deploy local --run-dir DATASET` wrote its checkpoint, ledger, node folders and certificates among its files."""
    from lore_core.prism_pairs import PAIRS_JSONL, SUMMARY_JSON, USERS_JSONL

    found = [name for name in (PAIRS_JSONL, USERS_JSONL, SUMMARY_JSON) if (Path(run_dir) / name).is_file()]
    if found:
        raise ValueError(f"{flag} {run_dir} holds {', '.join(found)}: it is a dataset of `lore-fed prepare`, not a "
                         "run directory; give a new directory for the run (the dataset is its input)")
