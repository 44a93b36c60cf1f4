"""The pair-embedding file (`pairs.npz`): the interchange format between data and training.

Arrays (n pairs, D embedding dims):
  diff            float32 (n, D)  e(chosen) - e(rejected)
  user            str     (n,)    user id
  split           str     (n,)    "train" | "test" (for unseen users "train" rows are their few-shot pairs)
  seen            bool    (n,)    user takes part in joint / federated training
  logit_true      float   (n,)    optional: the true Bradley-Terry logit (benchmarks; enables oracle metrics)
  reference_head  float   (D,)    optional: a fixed reward head (e.g. a reward model's score head)
  group           str     (n,)    optional: pairs in one group share a response or a conversation (`prepare`
                                  writes the conversation id). Every held-out estimate splits a user's pairs by
                                  group, never inside one; a file without it counts every pair as its own group.
  embedder        str     ()      optional: the id of the embedder that made diff (`lore-fed embed` writes its
                                  `.name`); `train` and `simulate` copy it into basis.npz, whose devices compare it
                                  with their encoder's. A file without it gives a basis of embedder "unknown".
  pairs_jsonl_blake2b str ()      optional: the BLAKE2b digest of the dataset's pairs.jsonl that `lore-fed embed`
                                  embedded; a dataset directory whose pairs.jsonl no longer has it is refused
                                  (`refuse_stale_pair_file`). A file without it is read as before.
"""

from __future__ import annotations

import functools
import hashlib
import math
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_save_npz
from lore_core.npz_file import open_npz
from lore_core.text_file import ids_message, is_name, names_refused, normalisation_twins, twins_message

PAIRS_FILENAME = "pairs.npz"
PAIRS_JSONL = "pairs.jsonl"  # a dataset's text pairs (`lore-fed prepare`), which `lore-fed embed` turns into pairs.npz
SPLITS = ("train", "test")
REQUIRED_ARRAYS = ("diff", "user", "split", "seen")
OPTIONAL_ARRAYS = ("logit_true", "reference_head", "group", "embedder", "pairs_jsonl_blake2b")
TEXT_ARRAYS = ("user", "split", "group")  # numpy unicode strings in every reader
# Real embedders give differences of order 1 (sentence) to a few hundred (reward-model hidden states); a value far
# beyond is a broken file, and in float32 scores it would overflow or let one pair outweigh every other.
MAX_ABS_DIFF = 1e6
# ... and a file whose largest difference is below this is ties only (a tester's 1e-44 diffs): refused like zeros.
MIN_LARGEST_DIFF = 1e-12
# The embeddings' scale (the median coordinate's rms times sqrt(D): rms |d| for isotropic pairs) that federated
# training's learning rates, clip norm and L2 are set for, and how far above it a coordinate may be: `embed`
# normalizes its embeddings (differences' rms |d| 0.5 to 1.4), as the synthetic populations are (1.41). `train`'s fits
# divide other scales out (joint_trainer.FitScale, `fit_scales`); `simulate` refuses them (check_federated_scale).
USUAL_DIFF_RMS = (1 / 16, 16)
# A deployment node refuses only its own file's clear misfits (`load_device_users`): it holds few pairs, and one
# MiniLM pair's own scale goes down to 0.01 (bench_results/device_scale.md: no single pair of the stress matrix's
# files outside this band, nor any coordinate this many times the others'). A node with fewer pairs than
# DEVICE_MIN_PAIRS is not checked: one or two near-identical responses measure as small as a broken embedder
# (a reviewer), while four pairs of one user never came near the band's floor there.
DEVICE_DIFF_RMS = (1 / 256, 256)
DEVICE_MIN_PAIRS = 4
EXPECTED = f"a pair file (.npz with arrays {', '.join(REQUIRED_ARRAYS)}; see `lore-fed embed`)"


class PairFileError(ValueError):
    """A pair file that does not follow the contract above."""


@dataclass(frozen=True)
class PairSet:
    diff: np.ndarray
    user: np.ndarray
    split: np.ndarray
    seen: np.ndarray
    logit_true: np.ndarray | None = None
    reference_head: np.ndarray | None = None
    group: np.ndarray | None = None
    embedder: str | None = None  # a 0-d unicode array (as read from a file) is checked, then kept as a str
    pairs_jsonl_blake2b: str | None = None  # of the whole file; `subset` drops it
    source: str = "<memory>"

    def __post_init__(self) -> None:
        _validate(self)
        for name in ("embedder", "pairs_jsonl_blake2b"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))

    @property
    def n(self) -> int:
        return int(self.diff.shape[0])

    @property
    def dim(self) -> int:
        return int(self.diff.shape[1])

    def user_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(user_ids (U,), index (n,) into user_ids); user ids sorted, so indices are stable across subsets."""
        user_ids, index = np.unique(self.user, return_inverse=True)
        return user_ids, index.astype(np.int64)

    def subset(self, mask: np.ndarray) -> "PairSet":
        mask = np.asarray(mask)
        return PairSet(
            diff=self.diff[mask],
            user=self.user[mask],
            split=self.split[mask],
            seen=self.seen[mask],
            logit_true=None if self.logit_true is None else self.logit_true[mask],
            reference_head=self.reference_head,
            group=None if self.group is None else self.group[mask],
            embedder=self.embedder,
            source=self.source,
        )

    def select(self, *, seen: bool, split: str) -> "PairSet":
        return self.subset((self.seen == seen) & (self.split == split))

    def summary(self) -> dict:
        seen_users = np.unique(self.user[self.seen])
        unseen_users = np.unique(self.user[~self.seen])
        return {
            "pairs": self.n,
            "dim": self.dim,
            "seen_users": int(seen_users.size),
            "unseen_users": int(unseen_users.size),
            "train_pairs": int((self.split == "train").sum()),
            "test_pairs": int((self.split == "test").sum()),
            "has_logit_true": self.logit_true is not None,
            "has_reference_head": self.reference_head is not None,
            "has_group": self.group is not None,
        }


def resolve_pair_path(path: str | Path) -> Path:
    """Accept a pair file or a dataset directory holding `pairs.npz` (embedded from the pairs.jsonl there, if any)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / PAIRS_FILENAME
        if not candidate.exists():
            raise PairFileError(
                f"{path} is a directory without {PAIRS_FILENAME}; run `lore-fed embed {path}` first "
                "or pass a pair file"
            )
        refuse_stale_pair_file(path)
        return candidate
    if not path.exists():
        raise PairFileError(f"pair file {path} does not exist")
    return path


def file_digest(path: str | Path) -> str:
    """BLAKE2b (16 bytes, hex) of a whole file's bytes, read in 16 MiB chunks: the digest `lore-fed embed` records of
    the pairs.jsonl it embedded, and a run's record of its pair file (lore_cli.run_data, method "file")."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_stale_pair_file(dataset_dir: Path) -> None:
    """A dataset's pairs.npz embedded from another pairs.jsonl than the one beside it (edited after `lore-fed embed`)
    is refused: training on it would read the old pairs without a word. pairs.jsonl is hashed whatever its time (an
    edit put back with an older time, by a restore or `cp -p`, is caught too; about a second per GB, once per
    command); a copy with new times but the same content passes."""
    pair_file, text = dataset_dir / PAIRS_FILENAME, dataset_dir / PAIRS_JSONL
    try:
        text_stat, pair_stat = text.stat(), pair_file.stat()
    except OSError:
        return  # no pairs.jsonl: embeddings the user brought
    if not stat.S_ISREG(text_stat.st_mode):  # a FIFO would block the hash for ever (found by a tester)
        raise PairFileError(f"{text} is not a regular file; {dataset_dir} needs the pairs.jsonl that `lore-fed embed` "
                            f"embedded (or give {pair_file} itself)")
    _check_embedded_digest(dataset_dir, (text_stat.st_mtime_ns, text_stat.st_size, pair_stat.st_mtime_ns,
                                         pair_stat.st_size))


@functools.lru_cache(maxsize=8)
def _check_embedded_digest(dataset_dir: Path, stamps: tuple) -> None:
    """`refuse_stale_pair_file`'s hash and verdict; `stamps` (both files' times and sizes) key the cache, so the
    many readers of one command hash the text once and warn once."""
    pair_file, text = dataset_dir / PAIRS_FILENAME, dataset_dir / PAIRS_JSONL
    with open_npz(pair_file, EXPECTED, PairFileError) as data:
        recorded = data["pairs_jsonl_blake2b"] if "pairs_jsonl_blake2b" in data.files else None
    if recorded is None:
        if stamps[0] < stamps[2]:  # pairs.jsonl older than pairs.npz: nothing says it changed
            return
        warnings.warn(f"{text} is newer than {pair_file}, which records no digest of the pairs it embedded (an "
                      f"older `lore-fed embed`); if {text} changed, run `lore-fed embed {dataset_dir}` again",
                      UserWarning, stacklevel=4)
        return
    check_digest_kind(pair_file, recorded.dtype, recorded.shape)
    if str(recorded) != file_digest(text):
        raise PairFileError(f"{text} changed after {pair_file} was embedded from it, so {pair_file} holds other "
                            f"pairs; run `lore-fed embed {dataset_dir}` again (or give {pair_file} itself to use it "
                            "as it is)")


def load_pairs(path: str | Path) -> PairSet:
    """Load and validate a pair file (or `DIR/pairs.npz`)."""
    file = resolve_pair_path(path)
    with open_npz(file, EXPECTED, PairFileError) as data:
        arrays = {key: data[key] for key in data.files}
    missing = [key for key in REQUIRED_ARRAYS if key not in arrays]
    if missing:
        raise PairFileError(f"{file}: missing required arrays {missing}; found {sorted(arrays)}")
    unknown = sorted(set(arrays) - set(REQUIRED_ARRAYS) - set(OPTIONAL_ARRAYS))
    if unknown:
        raise PairFileError(f"{file}: unknown arrays {unknown}; allowed: {REQUIRED_ARRAYS + OPTIONAL_ARRAYS}")
    pairs = PairSet(
        diff=arrays["diff"],
        user=arrays["user"],
        split=arrays["split"],
        seen=arrays["seen"],
        logit_true=arrays.get("logit_true"),
        reference_head=arrays.get("reference_head"),
        group=arrays.get("group"),
        embedder=arrays.get("embedder"),
        pairs_jsonl_blake2b=arrays.get("pairs_jsonl_blake2b"),
        source=str(file),
    )
    refuse_all_zero(has_signal(pairs.diff) if len(pairs.diff) else True, file)
    return pairs


def text_dtype_message(where, name: str, dtype: np.dtype) -> str:
    """Text columns are numpy unicode strings; bytes (dtype S, as h5py or Python 2 tools write) are refused in every
    reader alike rather than compared unequal to str ids downstream."""
    hint = "; bytes: convert with .astype(str)" if dtype.kind == "S" else ""
    return f"{where}: {name} must be an array of strings (numpy unicode, dtype <U...), got {dtype}{hint}"


def check_embedder(where, value) -> None:
    """The optional `embedder` (a 0-d numpy unicode string, not empty), alike in every reader: bytes, a list of
    names or a number would be copied into a basis file as a name no encoder has."""
    value = np.asarray(value)
    check_embedder_kind(where, value.dtype, value.shape)
    if not is_name(str(value)):
        raise PairFileError(f"{where}: embedder must be a non-empty string without control characters (the "
                            f"embedder's id), got {str(value)[:100]!r}")


def check_embedder_kind(where, dtype: np.dtype, shape: tuple) -> None:
    """`check_embedder`'s dtype and shape part (a column reader checks them from the .npy header)."""
    if tuple(shape) != () or dtype.kind != "U":
        hint = "; bytes: convert with .astype(str)" if dtype.kind == "S" else ""
        raise PairFileError(f"{where}: embedder must be one string (a 0-d numpy unicode array, e.g. "
                            f"np.str_(embedder.name)), got {dtype} of shape {tuple(shape)}{hint}")


def check_digest_kind(where, dtype: np.dtype, shape: tuple) -> None:
    """The optional `pairs_jsonl_blake2b` is one string (a 0-d numpy unicode array), in every reader alike."""
    if tuple(shape) != () or dtype.kind != "U":
        raise PairFileError(f"{where}: pairs_jsonl_blake2b must be one string (a 0-d numpy unicode array, the digest "
                            f"`lore-fed embed` writes), got {dtype} of shape {tuple(shape)}")


def has_signal(diff: np.ndarray) -> bool:
    """Whether any entry of `diff` reaches MIN_LARGEST_DIFF (no (n, D) temporary)."""
    return bool(diff.size) and max(float(diff.max()), -float(diff.min())) >= MIN_LARGEST_DIFF


def fit_scales(column_squares: np.ndarray, n: int) -> tuple[float, np.ndarray]:
    """From each coordinate's sum of squared differences over n pairs (D,): the common scale, the power of two
    nearest the median coordinate's scale (its rms times sqrt(D), which is rms |d| for isotropic pairs) where that is
    outside USUAL_DIFF_RMS, else 1; and per coordinate that times, for a coordinate more than USUAL_DIFF_RMS[1] times
    above it, the power of two nearest the ratio. Coordinates below are left alone: MiniLM's differences hold
    coordinates at 0 and near it, which scaled up would be noise fitted at a weak penalty. `joint_trainer.FitScale`
    fits in these units; `simulate` refuses anything but all 1 (check_federated_scale)."""
    return _scales(*_coordinate_ratios(column_squares, n), USUAL_DIFF_RMS)


def _coordinate_ratios(column_squares: np.ndarray, n: int) -> tuple[float, np.ndarray]:
    """The median coordinate's scale (rms times sqrt(D), over coordinates not all 0) and each coordinate's over it."""
    scale = np.sqrt(np.asarray(column_squares, np.float64) / max(n, 1) * np.size(column_squares))
    nonzero = scale[scale > 0]
    median = float(np.median(nonzero)) if nonzero.size else 1.0
    return median, scale / median


def _scales(median: float, ratio: np.ndarray, band: tuple[float, float]) -> tuple[float, np.ndarray]:
    """`fit_scales` from the median coordinate's scale and each coordinate's ratio to it, for a band (low, high)."""
    low, high = band
    overall = 1.0 if low <= median <= high else 2.0 ** round(math.log2(median))
    return overall, overall * np.where(ratio > high, 2.0 ** np.round(np.log2(np.maximum(ratio, high))), 1.0)


def check_federated_scale(column_squares: np.ndarray, n: int, file: str | Path,
                          band: tuple[float, float] = USUAL_DIFF_RMS) -> None:
    """Refuse pairs that are not at the usual scale for federated training (`fit_scales` not all 1): at rms |d| 1e-4
    a run ended at chance with exit 0, at 1e3 10 points below its figure at 1, and beside one coordinate 1000 times
    the others at chance again (testers; 30 rounds of 12-50 users). Scaling the embeddings, or one coordinate, by a
    constant changes no preference a basis can express, so the remedy names the powers of two that fix it. A node
    checking only its own few pairs passes the wider DEVICE_DIFF_RMS."""
    median, ratio = _coordinate_ratios(column_squares, n)
    overall, columns = _scales(median, ratio, band)
    if overall == 1.0 and (columns == 1.0).all():
        return
    low, high = band
    usual = (f"this check refuses differences with rms |d| outside 1/{1 / low:g} to {high:g} or a coordinate more "
             f"than {high:g} times the others', since federated training's learning rates, clip norm and L2 are set "
             "for normalized embeddings (as `lore-fed embed` writes: rms |d| 0.5 to 1.4)")
    off = np.flatnonzero(ratio > high)
    powers = np.round(np.log2(ratio[off])).astype(int)
    whole = -round(math.log2(overall))
    steps = [f"divide coordinate {k} by 2^{p}" for k, p in zip(off[:5], powers[:5])]
    steps += ["and so on"] if off.size > 5 else []
    steps += [f"multiply the embeddings by 2^{whole} = {2.0**whole:.3g}"] if whole else []
    where = (f"{off.size} of {ratio.size} coordinates are more than {high:g} times the others' scale"
             if off.size else f"the embedding differences' scale (rms |d| for isotropic pairs) is {median:.2g}")
    raise PairFileError(f"{file}: {where}; {usual}. Fix: {', '.join(steps)}, which changes no preference a basis "
                        "can express (`lore-fed train` needs no such step)")


def refuse_all_zero(any_nonzero: bool, file: str | Path) -> None:
    """A whole file whose diff is zero (below MIN_LARGEST_DIFF) in every pair (checked per file: a block or one
    user's pairs may be)."""
    if not any_nonzero:
        raise PairFileError(f"{file}: diff is zero in every pair (every entry below {MIN_LARGEST_DIFF:g}: chosen and "
                            "rejected embedded alike); a pair's diff is e(chosen) - e(rejected): re-embed the pairs")


def read_pair_column(path: str | Path, name: str) -> np.ndarray:
    """One array of a pair file without reading the others (an .npz member is read on access): counting users or
    splitting them into nodes never needs the embeddings."""
    file = resolve_pair_path(path)
    with open_npz(file, EXPECTED, PairFileError) as data:
        found = sorted(data.files)
        column = data[name] if name in found else None
    if column is None:
        raise PairFileError(f"{file}: no array {name!r}; found {found}")
    return column


def save_pairs(pairs: PairSet, path: str | Path) -> Path:
    """Write a pair file atomically; `path` may be a dataset directory."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path / PAIRS_FILENAME
    arrays = {
        "diff": pairs.diff.astype(np.float32, copy=False),
        "user": pairs.user.astype(str),
        "split": pairs.split.astype(str),
        "seen": pairs.seen.astype(bool),
    }
    if pairs.logit_true is not None:
        arrays["logit_true"] = pairs.logit_true.astype(np.float32)
    if pairs.reference_head is not None:
        arrays["reference_head"] = pairs.reference_head.astype(np.float32)
    if pairs.group is not None:
        arrays["group"] = pairs.group.astype(str)
    if pairs.embedder is not None:
        arrays["embedder"] = np.str_(pairs.embedder)
    if pairs.pairs_jsonl_blake2b is not None:
        arrays["pairs_jsonl_blake2b"] = np.str_(pairs.pairs_jsonl_blake2b)
    atomic_save_npz(path, **arrays)
    return path


def _validate(p: PairSet) -> None:
    where = p.source
    diff = np.asarray(p.diff)
    if diff.ndim != 2 or diff.shape[1] == 0:
        raise PairFileError(f"{where}: diff must be a 2-D float array (n, D), got shape {diff.shape}")
    if not np.issubdtype(diff.dtype, np.floating):
        raise PairFileError(f"{where}: diff must be float, got {diff.dtype}")
    if not np.isfinite(diff).all():
        bad = int((~np.isfinite(diff)).any(axis=1).sum())
        raise PairFileError(f"{where}: diff has NaN or Inf in {bad} rows")
    if diff.size and float(max(diff.max(), -diff.min())) > MAX_ABS_DIFF:  # no (n, D) temporary
        bad = int((np.abs(diff) > MAX_ABS_DIFF).any(axis=1).sum())
        raise PairFileError(f"{where}: diff has values beyond +-{MAX_ABS_DIFF:g} in {bad} rows; embedding differences "
                            "are of order 1 to 100: re-embed the pairs")
    n = diff.shape[0]
    for name in ("user", "split", "seen"):
        arr = np.asarray(getattr(p, name))
        if arr.shape != (n,):
            raise PairFileError(f"{where}: {name} must have shape ({n},) like diff, got {arr.shape}")
    for name in TEXT_ARRAYS:
        arr = getattr(p, name)
        if arr is not None and np.asarray(arr).dtype.kind != "U":
            raise PairFileError(text_dtype_message(where, name, np.asarray(arr).dtype))
    if p.group is not None and np.asarray(p.group).shape != (n,):
        raise PairFileError(f"{where}: group must have shape ({n},) like diff, got {np.asarray(p.group).shape}")
    if p.embedder is not None:
        check_embedder(where, p.embedder)
    if p.pairs_jsonl_blake2b is not None:
        check_digest_kind(where, np.asarray(p.pairs_jsonl_blake2b).dtype, np.asarray(p.pairs_jsonl_blake2b).shape)
    if p.seen.dtype != np.bool_:
        raise PairFileError(f"{where}: seen must be bool, got {p.seen.dtype}")
    bad_splits = sorted(set(np.unique(p.split).tolist()) - set(SPLITS))
    if bad_splits:
        raise PairFileError(f"{where}: split values must be 'train' or 'test', found {bad_splits}")
    if n:
        user_ids, index = np.unique(p.user, return_inverse=True)
        refused = names_refused(user_ids)
        if refused:
            raise PairFileError(ids_message(where, "user ids", refused))
        twins = normalisation_twins(user_ids)
        if twins:
            raise PairFileError(twins_message(where, "user ids", twins))
        seen_count = np.bincount(index, weights=p.seen, minlength=user_ids.size)
        total = np.bincount(index, minlength=user_ids.size)
        mixed = user_ids[(seen_count > 0) & (seen_count < total)]
        if mixed.size:
            raise PairFileError(f"{where}: users marked both seen and unseen: {mixed[:5].tolist()}")
    for name in ("logit_true", "reference_head"):
        value = getattr(p, name)
        if value is not None and np.asarray(value).dtype.kind != "f":
            raise PairFileError(f"{where}: {name} must be float, got {np.asarray(value).dtype}")
    if p.logit_true is not None:
        lt = np.asarray(p.logit_true)
        if lt.shape != (n,):
            raise PairFileError(f"{where}: logit_true must have shape ({n},), one per pair, got {lt.shape}")
        _check_finite(lt, "logit_true", where)
    if p.reference_head is not None:
        head = np.asarray(p.reference_head)
        if head.shape != (diff.shape[1],):
            raise PairFileError(f"{where}: reference_head must have shape ({diff.shape[1]},) to match diff, got "
                                f"{head.shape}")
        _check_finite(head, "reference_head", where)


def _check_finite(values: np.ndarray, name: str, where: str) -> None:
    """Refuse NaN or Inf in `name`, saying how many entries and the first (a tester read "must be finite with shape
    (300,), got (300,)")."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise PairFileError(f"{where}: {name} must be finite; {bad.size} of {values.size} entries are NaN or Inf "
                            f"(the first at index {int(bad[0])})")

