"""Atomic file writes: a crash mid-write leaves the previous file intact (temp file + fsync + rename)."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on a clean exit it is synced and renamed over `path` (readers
    see either the old or the new file, never a torn one), on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            # A full disk fails a write or its flush with no file named: name the file this write was for, so a
            # CLI reports it as a problem with that path (exit 2) instead of a traceback.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    fsync_dir(path.parent)


# atomic_path's temp files of the kinds of file a run writes: "." + the target's name + "." + tempfile's 8 random
# characters + ".tmp" (a target that is itself a temp file, as `train` writes its outputs in full before renaming
# them, gives ".tmp" before the random characters)
TEMP_FILE = re.compile(r"\..+\.(npz|json|jsonl|md|png|tmp)\.[a-z0-9_]{8}\.tmp")
RUN_FOLDERS = ("releases", "client-accountants", "audits")  # the folders a run writes inside its directory
# A directory holding one of these is a run's: `train` writes user_weights.npz beside its basis.npz and metrics.json,
# `simulate` its checkpoint and ledger (a basis.npz alone may be any copy of a basis, as a device's).
RUN_MARKERS = ("user_weights.npz", "checkpoint.npz", "ledger.json")


def is_run_directory(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return any((folder / name).is_file() for name in RUN_MARKERS) or \
        all((folder / name).is_file() for name in ("basis.npz", "metrics.json"))


def run_folder_of(path: str | os.PathLike) -> Path | None:
    """The run's own folder (RUN_FOLDERS inside a run directory) that `path` is or lies in, or None: another
    command's output there would enter a run's record (a release record, its accountants, its audits)."""
    path = Path(path).resolve()  # `..` and links taken: where the output would really land
    return next((folder for folder in (path, *path.parents)
                 if folder.name in RUN_FOLDERS and is_run_directory(folder.parent)), None)
STALE_SECONDS = 60.0  # older than any write in progress: a writer that holds no lock (an `evaluate --out` into the
# run directory) keeps its temp file


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files that writers killed mid-write (SIGKILL: no `finally`) left in a run `directory` and its
    RUN_FOLDERS, and return them. Only for the holder of the directory's lock (lore_core.run_lock), about to write:
    no other run writes there, and a temp file older than STALE_SECONDS is no write in progress. A user's other
    folders are never looked into."""
    directory = Path(directory)
    folders = [directory, *(directory / name for name in RUN_FOLDERS
                            if (directory / name).is_dir() and not (directory / name).is_symlink())]
    temps = (path for folder in folders for path in folder.iterdir() if TEMP_FILE.fullmatch(path.name))
    return [path for path in temps if _removed_if_stale(path)]


def remove_stale_temps_of(path: str | os.PathLike) -> None:
    """Delete the temp files of `path` alone (".NAME.xxxxxxxx.tmp", atomic_path's) older than STALE_SECONDS: what a
    writer of it killed mid-write left, for a command that holds no run lock (`evaluate --out`: a tester's stayed for
    good). Another file's, ".NAME.bak.json.xxxxxxxx.tmp" say, is never touched."""
    path = Path(path)
    own = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    with suppress(OSError):
        for temp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            if own.fullmatch(temp.name):
                _removed_if_stale(temp)


def _removed_if_stale(path: Path) -> bool:
    """Unlink `path` if it is a regular file older than STALE_SECONDS; whether it was. One renamed meanwhile or not
    ours to remove stays (left over, not in the way)."""
    with suppress(OSError):
        if path.is_file() and not path.is_symlink() and time.time() - path.stat().st_mtime > STALE_SECONDS:
            path.unlink()
            return True
    return False


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old or the new file, never a torn one."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (strict_json(obj, indent=2) + "\n").encode())


def strict_json(obj: Any, **options: Any) -> str:
    """`json.dumps` of `obj` as strict JSON: a float that is not finite (a figure that does not exist, such as the
    standard error of one user's accuracy) is written null. Python writes NaN and Infinity, which are not JSON:
    strict parsers (JavaScript, jq, most tools) refuse the whole file."""
    return json.dumps(_finite_or_null(obj), allow_nan=False, **options)


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(value) for value in obj]
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """`np.savez` (uncompressed members, readable by np.load), streamed member by member to the file: no copy of
    the archive in memory, whatever its size."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.asanyarray(value), allow_pickle=False)


def atomic_save_figure(fig: Any, path: str | os.PathLike, *, dpi: int) -> None:
    """A matplotlib figure as a PNG at `path`, via atomic_path: a kill mid-write leaves the old plot or none."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")  # the temp name ends in .tmp: say the format


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Flags that name a path: an empty value is Path("") = ".", so the command would read or write the working directory.
PATH_FLAGS = ("--out", "--run-dir", "--state", "--certs", "--cache-dir", "--reference", "--secrets",
              "--canary-secrets", "--work", "--basis", "--pairs", "--choices", "--candidates", "--encoder", "--config",
              "--model")  # --model "" read the working directory as a model (a tester)


def empty_path_flag(argv: list[str]) -> str | None:
    """The first path flag of `argv` given an empty or blank value (`--out ""`, `--out=`, `--state " "`), or None
    (found by testers: `train --out ""` and `device --state "" init` wrote into the working directory, and
    `--state " "` made a directory named by a space)."""
    for i, token in enumerate(argv):
        flag, equals, value = token.partition("=")
        if flag in PATH_FLAGS and (value if equals else argv[i + 1] if i + 1 < len(argv) else "x").strip() == "":
            return flag
    return None


def check_output_path(path: str | os.PathLike, flag: str, *, directory: bool) -> None:
    """Fail before any work when an output cannot be written: the nearest existing ancestor of `path` (the path
    itself for a directory output) must be a writable directory, and a directory output may not lie in a run's own
    folders (run_folder_of). A ValueError naming the flag (the CLI: exit 2), instead of an errno message after the
    work is done."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a directory")
    if directory and (folder := run_folder_of(path)) is not None:  # a tester's `train --out RUN/releases`: then
        raise ValueError(f"{flag} {path} is inside the run folder {folder}, which only the run writes; give a "
                         "directory outside it")  # `evaluate --basis RUN/releases` read the train run's basis
    if not directory and path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    ancestor = path if directory else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():  # a broken link: mkdir would fail with "File exists" after the work
            raise ValueError(f"{flag} {path}: {ancestor} is a symbolic link to {os.readlink(ancestor)}, which does "
                             "not exist")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {ancestor} is not writable")
    try:  # access() trusts the mode bits: a pseudo file system (/proc) or a read-only mount refuses the file itself
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {ancestor} does not take new files (a test file there failed: "
                         f"{exc.strerror or exc})") from None
