"""The pair file (`lore_core.pairs`) on disk, column by column: read and write it without holding it.

`np.savez` stores every array as an uncompressed zip member (a .npy file), so each column of a pair file lies at a
fixed offset: `PairColumns` finds it (zip local header, then the .npy header) and reads row ranges or gathers rows
through a short-lived memory map, so a reader holds only the rows it asked for. A compressed member (written by
`np.savez_compressed`) is read whole instead: correct, not scalable; so is one not in this machine's byte order
(`.astype('>f4')`) or in column-major order (`np.asfortranarray`), converted as it is read (`npz_file.native_array`).
`PairIndex` sorts the users once (a file written by user, as the writers here do, needs no sort) and keeps each
user's row range, so the rows of any block of users are cut by offsets, in time proportional to those rows.
`check_pair_file` validates a whole file in user-aligned chunks with the contract's own checks (`PairSet`).
`pair_file_writer` streams columns into a new file (atomically), chunk by chunk.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_path
from lore_core.text_file import ids_message, names_refused, normalisation_twins, twins_message
from lore_core.npz_file import (MEMBER_ERRORS, READ_ERRORS, check_npz_head, native_array,
                                 refuse_repeated_members, refuse_short_member, unreadable)
from lore_core.pairs import (EXPECTED, OPTIONAL_ARRAYS, REQUIRED_ARRAYS, TEXT_ARRAYS, PairFileError, PairSet,
                             check_digest_kind, check_embedder, check_embedder_kind, has_signal, refuse_all_zero,
                             resolve_pair_path, text_dtype_message)

READ_ROWS = 1 << 17  # rows per block when a whole file is scanned (~200 MB of diff at D = 384)
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header (zipfile.sizeFileHeader = 30 bytes)

PER_PAIR_ARRAYS = ("diff", "user", "split", "seen", "logit_true", "group")  # one row per pair, diff first


@dataclass(frozen=True)
class _Member:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int | None  # first data byte in the file; None: compressed, `array` holds it
    array: np.ndarray | None = None
    stored: tuple[int, int, int] | None = None  # (first byte of the member, its size, its CRC-32)


class PairColumns:
    """The arrays of one pair file, read on demand. `source` names the file in every error. `embedder`: the file's
    embedder id (read and checked on opening: one small scalar), None when the file has none."""

    def __init__(self, source: str, members: dict[str, _Member], file: Path | None = None) -> None:
        self.source, self._members, self._file = source, members, file
        self._check_shapes()
        self.embedder = self._read_embedder()

    @classmethod
    def open(cls, path: str | Path) -> "PairColumns":
        """Locate every array of a pair file (or `DIR/pairs.npz`) without reading one."""
        file = resolve_pair_path(path)
        check_npz_head(file, EXPECTED, PairFileError)
        try:
            members = _locate_members(file)
        except (*READ_ERRORS, *MEMBER_ERRORS, struct.error) as exc:  # only reads happen in _locate_members
            raise unreadable(file, exc, EXPECTED, PairFileError) from exc
        return cls(str(file), members, file)

    @classmethod
    def from_pairs(cls, pairs: PairSet) -> "PairColumns":
        """The same interface over a PairSet in memory (a device's own small file, tests)."""
        arrays = {"diff": pairs.diff, "user": pairs.user, "split": pairs.split, "seen": pairs.seen,
                  "logit_true": pairs.logit_true, "reference_head": pairs.reference_head,
                  "embedder": None if pairs.embedder is None else np.asarray(np.str_(pairs.embedder))}
        return cls(pairs.source, {name: _Member(a.dtype, a.shape, None, a) for name, a in arrays.items()
                                  if a is not None})

    @property
    def n(self) -> int:
        return int(self._members["diff"].shape[0])

    @property
    def dim(self) -> int:
        return int(self._members["diff"].shape[1])

    def has(self, name: str) -> bool:
        return name in self._members

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop of one array, as a new in-memory array."""
        member = self._members[name]
        stop = member.shape[0] if stop is None else stop
        if member.array is not None:
            return np.array(member.array[start:stop])
        row_bytes = member.dtype.itemsize * int(np.prod(member.shape[1:], dtype=np.int64))
        count = (stop - start) * (row_bytes // member.dtype.itemsize)
        out = np.fromfile(self._file, dtype=member.dtype, count=count, offset=member.offset + start * row_bytes)
        return out.reshape((stop - start,) + member.shape[1:])

    def mapped(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of one array as a read-only memory map of just that range (no copy): the pages read
        belong to this process only while the returned array lives."""
        member = self._members[name]
        if member.array is not None:
            return member.array[start:stop]
        row_bytes = member.dtype.itemsize * int(np.prod(member.shape[1:], dtype=np.int64))
        return np.memmap(self._file, dtype=member.dtype, mode="r", offset=member.offset + start * row_bytes,
                         shape=(stop - start,) + member.shape[1:])

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The given rows (int array, ascending for speed) of one array, gathered through a memory map that is
        closed again before returning: the pages read do not stay in this process."""
        member = self._members[name]
        if member.array is not None:
            return member.array[rows]
        with open(self._file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = np.ndarray(member.shape, dtype=member.dtype, buffer=mapped, offset=member.offset)
            out = view[rows]
            del view
        return out

    def verify_checksums(self) -> None:
        """Every member's bytes against the CRC-32 stored in the archive, as np.load checks them: a damaged byte
        is an error here, never a silently wrong value. One sequential pass over the file."""
        if self._file is None:
            return  # arrays in memory
        with open(self._file, "rb") as handle:
            for name, member in self._members.items():
                if member.stored is None:
                    continue  # compressed: zipfile checked it when it was read
                start, size, expected = member.stored
                handle.seek(start)
                crc, left = 0, size
                while left:
                    chunk = handle.read(min(left, 1 << 24))
                    if not chunk:
                        break
                    crc, left = zlib.crc32(chunk, crc), left - len(chunk)
                if left or crc != expected:
                    raise PairFileError(f"{self.source}: unreadable .npz, damaged or truncated (bad CRC-32 of array "
                                        f"{name!r}); expected {EXPECTED}")

    def _check_shapes(self) -> None:
        """The contract's array names and shapes, from the headers alone."""
        where, found = self.source, sorted(self._members)
        missing = [name for name in REQUIRED_ARRAYS if name not in self._members]
        if missing:
            raise PairFileError(f"{where}: missing required arrays {missing}; found {found}")
        unknown = sorted(set(found) - set(REQUIRED_ARRAYS) - set(OPTIONAL_ARRAYS))
        if unknown:
            raise PairFileError(f"{where}: unknown arrays {unknown}; allowed: {REQUIRED_ARRAYS + OPTIONAL_ARRAYS}")
        diff = self._members["diff"]
        if len(diff.shape) != 2 or diff.shape[1] == 0:
            raise PairFileError(f"{where}: diff must be a 2-D float array (n, D), got shape {diff.shape}")
        if diff.dtype.kind != "f":
            raise PairFileError(f"{where}: diff must be float, got {diff.dtype}")
        for name in PER_PAIR_ARRAYS[1:]:
            if name in self._members and self._members[name].shape != (self.n,):
                raise PairFileError(f"{where}: {name} must have shape ({self.n},) like diff, "
                                    f"got {self._members[name].shape}")
        for name in TEXT_ARRAYS:
            if name in self._members and self._members[name].dtype.kind != "U":
                raise PairFileError(text_dtype_message(where, name, self._members[name].dtype))
        for name in ("logit_true", "reference_head"):
            if name in self._members and self._members[name].dtype.kind != "f":
                raise PairFileError(f"{where}: {name} must be float, got {self._members[name].dtype}")
        head = self._members.get("reference_head")
        if head is not None and head.shape != (self.dim,):
            raise PairFileError(f"{where}: reference_head must have shape ({self.dim},) to match diff, "
                                f"got {head.shape}")
        embedder = self._members.get("embedder")
        if embedder is not None:
            check_embedder_kind(where, embedder.dtype, embedder.shape)  # from the header; the value on opening
        digest = self._members.get("pairs_jsonl_blake2b")
        if digest is not None:
            check_digest_kind(where, digest.dtype, digest.shape)

    def _read_embedder(self) -> str | None:
        """The 0-d `embedder` member's value (its dtype and shape checked by `_check_shapes`), not empty."""
        member = self._members.get("embedder")
        if member is None:
            return None
        if member.array is not None:
            value = member.array
        else:
            value = np.fromfile(self._file, dtype=member.dtype, count=1, offset=member.offset).reshape(())
        check_embedder(self.source, value)
        return str(value)


def _locate_members(file: Path) -> dict[str, _Member]:
    members = {}
    with zipfile.ZipFile(file) as archive, open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        refuse_repeated_members(archive.namelist())
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            if info.flag_bits & 0x1:  # as np.load (zipfile) refuses it: the same file is bad input for every reader
                raise ValueError(f"array {name!r} is marked encrypted")
            if info.compress_type != zipfile.ZIP_STORED:
                members[name] = _read_whole(archive, info)
                continue
            handle.seek(info.header_offset)
            header = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
            start = info.header_offset + _LOCAL_HEADER.size + header[10] + header[11]  # after name and extra field
            handle.seek(start)
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            if dtype.hasobject:
                raise ValueError(f"array {name!r} holds Python objects (allow_pickle=False)")
            if not dtype.isnative or (fortran and len(shape) > 1):
                members[name] = _read_whole(archive, info)
                continue
            offset = handle.tell()
            if offset + dtype.itemsize * int(np.prod(shape, dtype=np.int64)) > size:
                raise ValueError(f"array {name!r} is truncated")
            members[name] = _Member(dtype, tuple(shape), offset, stored=(start, info.compress_size, info.CRC))
    return members


def _read_whole(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    """A member held in memory (compressed, in another byte order or column-major), in native byte and C order;
    refused first when its header claims more than it holds (a reviewer: a deflated (1e9, 384) header asked 1.4 TiB)."""
    refuse_short_member(archive, info.filename, info.filename[:-4])
    with archive.open(info) as stream:  # zipfile checks the CRC-32 as it reads
        array = native_array(np.lib.format.read_array(stream, allow_pickle=False))
    return _Member(array.dtype, array.shape, None, array)


@dataclass(frozen=True)
class PairIndex:
    """Users in sorted order and where their rows are: user u (position in `user_ids`) owns rows
    `order[starts[u]:starts[u + 1]]` (`order` None: the file is sorted by user, rows starts[u]..starts[u+1])."""

    user_ids: np.ndarray  # (U,) sorted
    starts: np.ndarray  # (U + 1,) int64
    order: np.ndarray | None  # (n,) int64 or None

    @property
    def n_users(self) -> int:
        return int(self.user_ids.size)

    @classmethod
    def build(cls, columns: PairColumns, chunk_rows: int = 4 * READ_ROWS) -> "PairIndex":
        """One pass over the user column in chunks; a file not sorted by user is sorted once (in memory)."""
        firsts, ids, last = [], [], None
        for start in range(0, columns.n, chunk_rows):
            users = columns.read("user", start, min(start + chunk_rows, columns.n))
            if (last is not None and users[0] < last) or np.any(users[1:] < users[:-1]):
                return cls._sorted_in_memory(columns.read("user"))
            new = np.flatnonzero(np.r_[last is None or users[0] != last, users[1:] != users[:-1]])
            firsts.append(start + new)
            ids.append(users[new])
            last = users[-1]
        if not firsts:
            return cls(np.array([], dtype=str), np.zeros(1, np.int64), None)
        return cls(np.concatenate(ids), np.r_[np.concatenate(firsts), columns.n].astype(np.int64), None)

    @classmethod
    def _sorted_in_memory(cls, users: np.ndarray) -> "PairIndex":
        order = np.argsort(users, kind="stable")
        ordered = users[order]
        firsts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        return cls(ordered[firsts], np.r_[firsts, users.size].astype(np.int64), order.astype(np.int64))

    def rows(self, first_user: int, stop_user: int) -> np.ndarray:
        """File rows (int64) of users first_user..stop_user-1, grouped by user in user order."""
        lo, hi = int(self.starts[first_user]), int(self.starts[stop_user])
        return np.arange(lo, hi, dtype=np.int64) if self.order is None else self.order[lo:hi]

    def row_users(self, first_user: int, stop_user: int) -> np.ndarray:
        """For each row of `rows(first_user, stop_user)`: its user's position relative to first_user."""
        counts = np.diff(self.starts[first_user:stop_user + 1])
        return np.repeat(np.arange(stop_user - first_user), counts)

    def user_chunks(self, rows_per_chunk: int) -> Iterator[tuple[int, int]]:
        """(first user, stop user) blocks of about `rows_per_chunk` rows each (a user is never cut)."""
        first = 0
        while first < self.n_users:
            stop = int(np.searchsorted(self.starts, self.starts[first] + rows_per_chunk, side="right")) - 1
            stop = min(max(stop, first + 1), self.n_users)
            yield first, stop
            first = stop


def rows_of_users(starts: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """When user u owns positions starts[u]:starts[u + 1]: the positions of `users` (int array), in that order, and
    for each position the index of its user in `users`. Vectorized; time follows the rows returned."""
    users = np.asarray(users, dtype=np.int64)
    lengths = starts[users + 1] - starts[users]
    ends = np.cumsum(lengths)
    within = np.arange(int(ends[-1]) if ends.size else 0) - np.repeat(ends - lengths, lengths)
    return np.repeat(starts[users], lengths) + within, np.repeat(np.arange(users.size), lengths)


@dataclass(frozen=True)
class PopulationCounts:
    """What a run needs to know about a pair file's users (and nothing of their embeddings)."""

    users: int
    seen_users: int
    train_users: int  # seen users with at least one training pair
    idle_users: np.ndarray  # ids of seen users without a training pair (only test pairs)
    largest_client_pairs: int  # most training pairs of one seen user
    pairs: int
    dim: int
    few_shot_pairs: int = 10  # median training pairs of the new (unseen) users that have any
    seen_train_pairs: int = 0  # training pairs of the seen users
    # each coordinate's sum of squared differences over all pairs (D,): the embeddings' scale (pairs.fit_scales)
    column_squares: np.ndarray | None = None
    seen_positions: np.ndarray | None = None  # positions of the seen users among the sorted ids: where nodes hold them


def user_blocks(columns: PairColumns, index: PairIndex,
                rows_per_block: int = READ_ROWS) -> Iterator[tuple[int, int, PairSet]]:
    """The file as PairSets of whole users, about `rows_per_block` rows each, with the index positions of their
    users (first, stop); each block is validated by `PairSet`, so a bad file gets the contract's error, naming the
    file. A block's diff maps the file (no copy): use a block within its iteration."""
    head = columns.read("reference_head") if columns.has("reference_head") else None
    names = [name for name in PER_PAIR_ARRAYS if columns.has(name)]
    for first, stop in index.user_chunks(rows_per_block):
        rows = index.rows(first, stop)
        if index.order is None:  # one contiguous range
            arrays = {name: (columns.mapped if name == "diff" else columns.read)(name, int(rows[0]), int(rows[-1]) + 1)
                      for name in names}
        else:
            arrays = {name: columns.take(name, rows) for name in names}
        yield first, stop, PairSet(**arrays, reference_head=head, embedder=columns.embedder, source=columns.source)


def check_pair_file(path: str | Path, rows_per_block: int = READ_ROWS) -> tuple[PairColumns, PairIndex,
                                                                                  PopulationCounts]:
    """Validate a whole pair file as `load_pairs` does (checksums, then the contract block by block of whole users,
    `user_blocks`), and count its population. Memory: one block and the user column."""
    columns = PairColumns.open(path)
    columns.verify_checksums()
    index = PairIndex.build(columns)
    refused = names_refused(index.user_ids)
    if refused:
        raise PairFileError(ids_message(columns.source, "user ids", refused))
    twins = normalisation_twins(index.user_ids)
    if twins:
        raise PairFileError(twins_message(columns.source, "user ids", twins))
    seen_users = train_users = largest = seen_train_pairs = 0
    idle, few_shot, seen_at = [], [], []
    nonzero = columns.n == 0
    squares = np.zeros(columns.dim)
    for first, stop, block in user_blocks(columns, index, rows_per_block):
        nonzero = nonzero or has_signal(block.diff)
        squares += np.einsum("nd,nd->d", block.diff, block.diff, dtype=np.float64)
        user_pos = index.row_users(first, stop)  # rows are in index order within a block
        seen = np.bincount(user_pos, weights=block.seen, minlength=stop - first) > 0
        trains = np.bincount(user_pos, weights=block.seen & (block.split == "train"), minlength=stop - first)
        seen_users += int(seen.sum())
        seen_at.append(first + np.flatnonzero(seen))
        train_users += int((trains > 0).sum())
        seen_train_pairs += int(trains.sum())
        idle.append(index.user_ids[first:stop][seen & (trains == 0)])
        largest = max(largest, int(trains.max(initial=0)))
        shots = np.bincount(user_pos, weights=~block.seen & (block.split == "train"), minlength=stop - first)
        few_shot.append(shots[shots > 0])
    refuse_all_zero(nonzero, columns.source)
    shots = np.concatenate(few_shot) if few_shot else np.zeros(0)
    return columns, index, PopulationCounts(users=index.n_users, seen_users=seen_users, train_users=train_users,
                                            idle_users=np.concatenate(idle) if idle else index.user_ids[:0],
                                            largest_client_pairs=largest, pairs=columns.n, dim=columns.dim,
                                            few_shot_pairs=median_few_shot(shots),
                                            seen_train_pairs=seen_train_pairs, column_squares=squares,
                                            seen_positions=np.concatenate(seen_at) if seen_at else np.zeros(0, int))


def median_few_shot(per_user: np.ndarray, default: int = 10) -> int:
    """The median few-shot count over new users that have any (per_user: counts > 0), else `default`: how many
    pairs a user of the selection's new-user fold adapts on (what the file's new users really get)."""
    return int(np.median(per_user)) if per_user.size else default


@contextmanager
def pair_file_writer(path: str | Path) -> Iterator["PairFileWriter"]:
    """Write a pair file column by column, each column in chunks, without holding it. The file appears at `path`
    (atomically: `atomic_io.atomic_path`) only when the block ends without an error:

        with pair_file_writer(path) as out:
            with out.column("diff", np.float32, (n, D)) as diff:
                for chunk in chunks: diff.write(chunk)
            out.array("user", users)
    """
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        yield PairFileWriter(archive)


class PairFileWriter:
    """Members of an open archive, written in the order they are opened, one at a time (`pair_file_writer`)."""

    def __init__(self, archive: zipfile.ZipFile) -> None:
        self._zip = archive

    def column(self, name: str, dtype, shape: tuple[int, ...]) -> "_ColumnStream":
        """A member `name` of the given dtype and shape, to be filled in row order by `write(chunk)` calls."""
        dtype = np.dtype(dtype)
        stream = self._zip.open(f"{name}.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(stream, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": tuple(shape)})
        return _ColumnStream(name, stream, dtype, tuple(shape))

    def array(self, name: str, values: np.ndarray) -> None:
        """A whole (small) array as one member; a 0-d array (a scalar such as `embedder`) stays 0-d."""
        values = np.asarray(values)
        values = np.ascontiguousarray(values) if values.ndim else values  # ascontiguousarray makes a 0-d array 1-d
        with self.column(name, values.dtype, values.shape) as stream:
            stream.write(values)


class _ColumnStream:
    def __init__(self, name: str, stream, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.name, self._stream, self.dtype, self.shape = name, stream, dtype, shape
        self._rows = 0

    def __enter__(self) -> "_ColumnStream":
        return self

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        rows = len(chunk) if chunk.ndim else 1  # a 0-d member (a scalar such as `embedder`) is one row
        if chunk.shape[1:] != self.shape[1:] or self._rows + rows > self._declared_rows:
            raise ValueError(f"{self.name}: chunk of shape {chunk.shape} does not fit {self.shape} "
                             f"after {self._rows} rows")
        self._stream.write(chunk.reshape(-1).view(np.uint8).data)
        self._rows += rows

    @property
    def _declared_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def __exit__(self, kind, value, traceback) -> None:
        self._stream.close()
        if kind is None and self._rows != self._declared_rows:
            raise ValueError(f"{self.name}: {self._rows} rows written, {self.shape} declared")
