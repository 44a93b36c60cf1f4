"""The basis file (`.npz`): the shared LoRe basis A as the server, `lore-fed train` and devices exchange it.

Arrays:
  basis     float32 (B, D)  the rank-B basis over D-dim pair embeddings
  version   int64   ()      e.g. the federated round that produced it; devices refuse to mix versions silently
  embedder  str     ()      name of the embedder whose space the basis lives in
  dim, rank int64   ()      D and B, stored so a reader can check the shape without trusting it
  sha256    str     ()      sha256 of basis.tobytes() (float32, C order): detects a torn or altered file
  prior_pairs float64 ()    optional: the personal prior (in pairs) chosen with this basis on held-out groups
                            (`lore-fed train`) or set for the run (`lore-fed simulate`); devices and `evaluate` use
                            it. A file without it leaves the choice to the reader (evaluation: 3 pairs; a device: 0.5).
Numpy only (importable on a device).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lore_core.atomic_io import atomic_save_npz
from lore_core.npz_file import open_npz
from lore_core.text_file import is_name, not_a_file

if TYPE_CHECKING:
    from lore_core.pairs import PairSet

BASIS_ARRAYS = ("basis", "version", "embedder", "dim", "rank", "sha256")
UNKNOWN_EMBEDDER = "unknown"  # a basis trained on pairs that do not name their embedder (before pair files did)
MAX_ABS_BASIS = 1e6  # as pair files' MAX_ABS_DIFF: far beyond any trained basis, far below float32 overflow


class BasisFileError(ValueError):
    """A basis file that does not follow the contract above (or was corrupted)."""


@dataclass(frozen=True)
class BasisFile:
    basis: np.ndarray  # (B, D) float32
    version: int
    embedder: str
    sha256: str
    source: str = "<memory>"
    prior_pairs: float | None = None  # the personal prior chosen with this basis; None: the file carries none

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])


def basis_checksum(basis: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(basis, dtype=np.float32).tobytes()).hexdigest()


def save_basis(path: str | Path, basis: np.ndarray, *, version: int, embedder: str,
               prior_pairs: float | None = None) -> Path:
    """Write a basis file atomically; `basis` (B, D) is stored as float32."""
    path = Path(path)
    arr = np.ascontiguousarray(basis, dtype=np.float32)
    _check_basis(arr, str(path))
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
        raise BasisFileError(f"{path}: version must be an int >= 0, got {version!r}")
    if not is_name(embedder):
        raise BasisFileError(f"{path}: embedder must be a non-empty string without control characters, got "
                             f"{str(embedder)[:100]!r}")
    extra = {}
    if prior_pairs is not None:
        _check_prior(prior_pairs, str(path))
        extra["prior_pairs"] = np.float64(prior_pairs)
    atomic_save_npz(
        path,
        basis=arr,
        version=np.int64(version),
        embedder=np.str_(embedder),
        dim=np.int64(arr.shape[1]),
        rank=np.int64(arr.shape[0]),
        sha256=np.str_(basis_checksum(arr)),
        **extra,
    )
    return path


def basis_file_path(path: str | Path) -> Path:
    """A `--basis` as given: a basis file, or a run directory's basis.npz (`evaluate` and the device's `init` take
    either; a directory without one is named as such, not "is a directory")."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / "basis.npz").is_file():
        raise BasisFileError(f"{path} is a directory without basis.npz: give a basis file, or the directory of a "
                             "completed run (a run writes basis.npz when it completes)")
    return path / "basis.npz"


def load_basis(path: str | Path) -> BasisFile:
    """Load and validate a basis file: arrays present, shapes, finiteness and checksum."""
    path = Path(path)
    if not path.is_file():
        raise BasisFileError(not_a_file("basis file", path))
    with open_npz(path, f"a basis file (.npz with arrays {', '.join(BASIS_ARRAYS)})", BasisFileError) as data:
        arrays = {key: data[key] for key in data.files}
    missing = [key for key in BASIS_ARRAYS if key not in arrays]
    if missing:
        raise BasisFileError(f"{path}: missing arrays {missing}; a basis file holds {list(BASIS_ARRAYS)}")
    unknown = sorted(set(arrays) - set(BASIS_ARRAYS) - {"prior_pairs"})
    if unknown:
        raise BasisFileError(f"{path}: unknown arrays {unknown}; a basis file holds {list(BASIS_ARRAYS)} and "
                             "optionally prior_pairs")
    kinds = {"dim": "iu", "rank": "iu", "version": "iu", "embedder": "U", "sha256": "U", "prior_pairs": "iuf"}
    wrong = [f"{key} ({arrays[key].dtype})" for key, allowed in kinds.items()
             if key in arrays and (arrays[key].dtype.kind not in allowed or arrays[key].ndim)]
    if wrong:
        raise BasisFileError(f"{path}: {', '.join(wrong)}: dim, rank, version must be scalar ints, embedder and "
                             "sha256 strings, prior_pairs a number")
    basis = arrays["basis"]
    if basis.dtype != np.float32:
        raise BasisFileError(f"{path}: basis must be float32, got {basis.dtype}")
    _check_basis(basis, str(path))
    try:
        dim, rank, version = int(arrays["dim"]), int(arrays["rank"]), int(arrays["version"])
        embedder, checksum = str(arrays["embedder"]), str(arrays["sha256"])
    except (TypeError, ValueError) as exc:
        raise BasisFileError(f"{path}: dim, rank, version must be scalar ints, embedder and sha256 strings") from exc
    if basis.shape != (rank, dim):
        raise BasisFileError(f"{path}: basis has shape {basis.shape}, but the file declares rank {rank}, dim {dim}")
    if checksum != basis_checksum(basis):
        raise BasisFileError(f"{path}: basis checksum mismatch (file corrupted or altered)")
    if not basis.any():  # two testers' zeros (checksum recomputed) were taken: every pair a tie, accuracy 0
        raise BasisFileError(f"{path}: every entry of the basis is 0, so every response would get the same reward; "
                             "give a trained basis")
    if version < 0 or not is_name(embedder):
        raise BasisFileError(f"{path}: version must be >= 0 and embedder a non-empty string without control "
                             f"characters, got {version}, {embedder[:100]!r}")
    prior_pairs = None
    if "prior_pairs" in arrays:
        try:
            prior_pairs = float(arrays["prior_pairs"])
        except (TypeError, ValueError):
            raise BasisFileError(f"{path}: prior_pairs must be a scalar number") from None
        _check_prior(prior_pairs, str(path))
    return BasisFile(basis=basis, version=version, embedder=embedder, sha256=checksum, source=str(path),
                     prior_pairs=prior_pairs)


def other_embedders(first: str | None, second: str | None) -> bool:
    """Whether two embedder names say two embedding spaces. An unnamed embedder (None, UNKNOWN_EMBEDDER) matches
    any. `lore-fed embed` names an embedder LABEL@FINGERPRINT/PIPELINE, the label being the model folder's name: one
    model copied to another folder keeps its fingerprint (its files' digest), so only what follows '@' is compared
    when both names have it."""
    unnamed = (None, UNKNOWN_EMBEDDER)
    if first in unnamed or second in unnamed:
        return False
    spaces = [_FINGERPRINTED.fullmatch(name) for name in (first, second)]
    if all(spaces):  # the label (a folder name: no '/', maybe an '@', as in 'tiny@v2') is not compared
        return spaces[0].group(1) != spaces[1].group(1)
    return first != second


_FINGERPRINTED = re.compile(r"[^/]*@([0-9a-f]{10}(?:/.*)?)", re.DOTALL)  # LABEL@FINGERPRINT/PIPELINE, greedy label


def warn_if_other_embedder(basis_file: BasisFile, pairs: PairSet) -> None:
    """Warn (UserWarning) when the basis and the pair file name other embedders (`other_embedders`): the basis would
    meet pairs from another embedding space."""
    if other_embedders(basis_file.embedder, pairs.embedder):
        warnings.warn(f"basis {basis_file.source} was trained on embeddings of {basis_file.embedder!r}, but "
                      f"{pairs.source} holds embeddings of {pairs.embedder!r}: the scores compare two spaces; embed "
                      "the pairs with the basis' embedder", UserWarning, stacklevel=3)


def _check_prior(prior_pairs: float, where: str) -> None:
    from lore_core.simplex_fit import MAX_PRIOR_PAIRS

    if not (np.isfinite(prior_pairs) and 0 < prior_pairs <= MAX_PRIOR_PAIRS):
        raise BasisFileError(f"{where}: prior_pairs must be a finite number > 0 and at most {MAX_PRIOR_PAIRS:g}, "
                             f"got {prior_pairs}")


def _check_basis(basis: np.ndarray, where: str) -> None:
    if basis.ndim != 2 or 0 in basis.shape:
        raise BasisFileError(f"{where}: basis must be a non-empty 2-D array (B, D), got shape {basis.shape}")
    if not np.isfinite(basis).all():
        raise BasisFileError(f"{where}: basis has NaN or Inf values")
    if basis.shape[0] > basis.shape[1]:
        raise BasisFileError(f"{where}: basis has {basis.shape[0]} rows for {basis.shape[1]} embedding dimensions; a "
                             "basis has at most as many rows as dimensions (rank <= D)")
    if np.abs(basis).max() > MAX_ABS_BASIS:
        raise BasisFileError(f"{where}: basis has values beyond +-{MAX_ABS_BASIS:g}; a trained basis is of order 1 "
                             "to 100 (its rewards would overflow)")
