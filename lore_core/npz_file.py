"""Reading an `.npz` archive that may be damaged or not an archive at all: every failure is one clear error.

`np.load` alone answers a truncated file with `BadZipFile`, a flipped byte with a CRC error at the first array
read, an `.npy` renamed `.npz` with an ndarray (no `files`), and a text file with a hint about pickles. Every
reader of a user-supplied `.npz` (pair, basis, ground-truth, choices, checkpoint files) goes through `open_npz`,
which also hands every array over in this machine's byte order and in C order (`native_array`). Numpy only
(importable on a device).
"""

from __future__ import annotations

import contextlib
import math
import tokenize
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from lore_core.text_file import not_a_file

ZIP_MAGIC = b"PK"  # local file header PK\x03\x04, or PK\x05\x06 for an empty archive
NPY_MAGIC = b"\x93NUMPY"
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)
# What reading one member can raise besides READ_ERRORS: zipfile's RuntimeError ("is encrypted, password required":
# one flipped flag bit) and NotImplementedError (an unknown compression method), numpy's .npy header parser's
# tokenize.TokenError and SyntaxError (an unbalanced header). A tester found each escaping as a traceback. Caught
# only around the reads themselves (`member_error`), not around a caller's own code.
MEMBER_ERRORS = (RuntimeError, NotImplementedError, SyntaxError, tokenize.TokenError)


def refuse_repeated_members(names: list[str]) -> None:
    """A zip may hold one name twice, and readers silently take the last: a file written by numpy never does, so
    one that does was altered (found by a tester). numpy reads `diff` and `diff.npy` as one array `diff`, so they
    count as one name (a reviewer: two readers took one copy each). ValueError, which every reader reports as
    unreadable."""
    seen, repeated = set(), set()
    for name in names:
        name = name.removesuffix(".npy")
        (repeated if name in seen else seen).add(name)
    if repeated:
        raise ValueError(f"it holds {sorted(repeated)} more than once")


def member_error(key: str, exc: Exception) -> ValueError:
    """A MEMBER_ERRORS failure as the ValueError every reader reports (through `unreadable`)."""
    return ValueError(f"array {key!r} cannot be read ({type(exc).__name__}: {exc})")


class NpzFileError(ValueError):
    """A file that is not a readable `.npz` archive of plain (non-object) arrays."""


@contextlib.contextmanager
def open_npz(path: str | Path, expected: str = "an .npz archive of arrays",
             error: type[ValueError] = NpzFileError) -> Iterator["NativeArrays"]:
    """`np.load(path)` for an archive, its arrays in native byte order and C order; reading them inside the `with`
    block is covered too.

    `expected` says what the file should have been (for the message); `error` is the ValueError subclass raised,
    so callers keep their own error type (PairFileError, BasisFileError, ...)."""
    path = Path(path)
    check_npz_head(path, expected, error)
    try:
        with np.load(path, allow_pickle=False) as data:
            refuse_repeated_members(data.zip.namelist())
            yield NativeArrays(data)
    except READ_ERRORS as exc:
        if isinstance(exc, error):
            raise
        raise unreadable(path, exc, expected, error) from exc


def refuse_short_member(archive: zipfile.ZipFile, name: str, key: str) -> None:
    """ValueError when the .npy member `name` claims in its header more bytes than it holds: numpy allocates the
    header's size before it reads, and a header of (1e9, 384) made `evaluate` fail with a MemoryError traceback for
    1.4 TiB (a tester). Stored or compressed, npy 1.0 to 3.0 (2.0 and 3.0 share the header's layout); a member
    without the npy magic is left to its reader (numpy returns its bytes)."""
    info = archive.getinfo(name)
    with archive.open(info) as stream:
        if stream.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
            return
        stream.seek(0)
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
        header = stream.tell()
    if dtype.hasobject:
        return  # refused as such by its reader (allow_pickle=False)
    claimed = dtype.itemsize * math.prod(int(n) for n in shape)
    if claimed > info.file_size - header:
        raise ValueError(f"array {key!r} is truncated: its header says {claimed:,} bytes, the file holds "
                         f"{max(info.file_size - header, 0):,}")


def native_array(array: np.ndarray) -> np.ndarray:
    """`array` in this machine's byte order and in row-major (C) order (a copy only when it is not): numpy also
    writes big-endian arrays (`.astype('>f4')`), which torch refuses, and column-major ones (`np.asfortranarray`),
    whose rows do not lie one after another. The copy is exact."""
    if array.dtype.isnative and array.flags.c_contiguous:
        return array
    return array.astype(array.dtype.newbyteorder("="), order="C")


class NativeArrays(Mapping):
    """An open archive (np.load's NpzFile) whose arrays are read through `native_array`."""

    def __init__(self, data: np.lib.npyio.NpzFile) -> None:
        self._data, self.files = data, data.files

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            names = self._data.zip.namelist()
            name = f"{key}.npy" if f"{key}.npy" in names else key if key in names else None  # as numpy finds it
            if name is not None:
                refuse_short_member(self._data.zip, name, key)
            value = self._data[key]
        except MEMBER_ERRORS as exc:
            raise member_error(key, exc) from exc
        return native_array(value) if isinstance(value, np.ndarray) else value  # a member not .npy: its bytes

    def __contains__(self, key) -> bool:
        return key in self.files  # without reading the array (Mapping's default would)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def check_npz_head(path: Path, expected: str, error: type[ValueError] = NpzFileError) -> None:
    """Refuse what is not a zip archive at all (a directory, an empty file, a single .npy, text) by its first bytes;
    also for readers that open the archive without np.load (`lore_core.pair_columns`)."""
    try:
        if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO would block open() for ever
            raise error(f"{not_a_file('', path)} (a FIFO, socket or device); expected {expected}")
        with open(path, "rb") as handle:
            head = handle.read(len(NPY_MAGIC))
    except IsADirectoryError:
        raise error(f"{path} is a directory; expected {expected}") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc}); expected {expected}") from exc
    if head.startswith(NPY_MAGIC):
        raise error(f"{path} is a single .npy array, not an .npz archive of named arrays; expected {expected}")
    if not head.startswith(ZIP_MAGIC):
        kind = "an empty file" if not head else "not a zip archive (text or another format?)"
        raise error(f"{path} is {kind}; expected {expected}")


def unreadable(path: Path, exc: Exception, expected: str, error: type[ValueError] = NpzFileError) -> ValueError:
    """The error for an archive that failed while being read."""
    if isinstance(exc, ValueError) and "allow_pickle" in str(exc):
        reason = "it holds pickled (object) arrays, which are never loaded"
    else:
        reason = f"damaged or truncated ({type(exc).__name__}: {exc})"
    return error(f"{path}: unreadable .npz, {reason}; expected {expected}")
