"""Canary users for a one-run audit of the real run (Steinke, Nasr & Jagielski, NeurIPS 2023; canary clients as in
Andrew et al., ICLR 2024), numpy only.

The auditor draws K canaries before the run: a unit direction u_j (B, D) each and a secret fair coin. The canaries
join the population as K extra users on canary nodes, whatever their coin, so the population size and the
sampling rate q = m / (N + K) the accountant uses do not depend on the coins. When the server's sampler picks a
canary, it uploads C u_j (C = the clip norm the server sends: the largest influence a user may have) if its coin
says "in", and a zero update if "out": under DP-FedAvg's fixed denominator a user who sends zero is exactly a user
who is not there. Every sampling of an "in" canary adds C u_j to that round's sum, so it leaves a trace in about
q T of the T released rounds; the audit (lore_core.audits.canary) scores each direction on the released record.
The directions are orthonormal (K <= B * D; else random unit vectors), so canaries never blur each other's scores,
and random, so nearly orthogonal to the users' updates; the audit also projects out the directions in which the
released sums carry more energy than the claimed noise could (the real users' drift).

The secrets file (`--canary-secrets FILE`, never inside the run directory) holds directions and coins for the
auditor; in simulation the canary nodes read their own rows of it (the ServerApp never opens it).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_save_npz
from lore_core.text_file import json_loads

SCHEMA = "lore-fed-canaries/1"


class CanaryFileError(ValueError):
    """A canary secrets file that cannot be used (missing, foreign, wrong shape)."""


@dataclass(frozen=True)
class CanarySecrets:
    directions: np.ndarray  # (K, B, D), each of unit Frobenius norm
    included: np.ndarray  # (K,) bool: the secret coins

    @property
    def count(self) -> int:
        return int(self.included.size)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(x) for x in self.directions.shape[1:])


def draw_canaries(count: int, shape: tuple[int, int], seed: int | None = None) -> CanarySecrets:
    """K unit directions and fair coins from a secret seed (`seed` only for tests). The directions are random and,
    when K <= B * D, exactly orthonormal, so one canary's uploads add nothing to another's score."""
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    dim = int(np.prod(shape))
    gaussian = rng.standard_normal((dim, count) if count <= dim else (count, dim))
    if count <= dim:
        directions = np.linalg.qr(gaussian)[0].T  # (K, dim), orthonormal rows
    else:
        directions = gaussian / np.linalg.norm(gaussian, axis=1, keepdims=True)
    return CanarySecrets(directions=directions.reshape((count,) + tuple(shape)), included=rng.random(count) < 0.5)


def save_canaries(path: str | Path, canaries: CanarySecrets) -> None:
    atomic_save_npz(path, schema=np.array(json.dumps({"schema": SCHEMA})), directions=canaries.directions,
                    included=canaries.included)


def load_canaries(path: str | Path) -> CanarySecrets:
    from lore_core.npz_file import open_npz

    path = Path(path)
    expected = "the canary secrets file `lore-fed simulate --canaries K --canary-secrets FILE` wrote"
    try:
        with open_npz(path, expected, CanaryFileError) as data:
            schema = json_loads(str(data["schema"])).get("schema")
            directions, included = data["directions"].astype(np.float64), data["included"].astype(bool)
    except CanaryFileError:
        raise
    except (OSError, KeyError, ValueError, AttributeError) as exc:
        raise CanaryFileError(f"{path}: not a canary secrets file ({exc}); expected the file `lore-fed simulate "
                              "--canaries K --canary-secrets FILE` wrote") from exc
    if schema != SCHEMA or directions.ndim != 3 or included.shape != (directions.shape[0],):
        raise CanaryFileError(f"{path}: schema {schema!r} with directions {directions.shape} and coins "
                              f"{included.shape}; expected {SCHEMA!r}, (K, B, D) and (K,)")
    return CanarySecrets(directions=directions, included=included)


def canary_digest(canaries: CanarySecrets) -> str:
    """SHA-256 of the canaries' directions and coins: `simulate` records it in the run's metrics.json, so that the
    canary audit refuses another run's secrets (their canaries absent from this run's releases would read as a
    mechanism that leaks nothing, and a broken one would pass). The directions are random: the digest reveals
    nothing of them."""
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(canaries.directions, dtype="<f8").tobytes())
    digest.update(np.ascontiguousarray(canaries.included, dtype=bool).tobytes())
    return digest.hexdigest()


def canary_node_rows(count: int, index: int, canary_nodes: int) -> np.ndarray:
    """The canary indices (into the secrets file) hosted by canary node `index` of `canary_nodes`."""
    return np.array_split(np.arange(count), canary_nodes)[index]


@dataclass(frozen=True)
class CanaryBlock:
    """The canaries one canary node hosts: its users are canaries, it has no pairs."""

    directions: np.ndarray  # (S, B, D)
    included: np.ndarray  # (S,)

    @property
    def n_train_users(self) -> int:
        return int(self.included.size)

    @property
    def dim(self) -> int:
        return int(self.directions.shape[2])

    def updates(self, sampled: np.ndarray, clip_norm: float) -> np.ndarray:
        """The sampled canaries' uploads (k, B, D): C u_j if the coin says in, else zero."""
        scale = clip_norm * self.included[sampled].astype(np.float64)
        return scale[:, None, None] * self.directions[sampled]


def load_canary_block(path: str, index: int, canary_nodes: int) -> CanaryBlock:
    canaries = load_canaries(path)
    rows = canary_node_rows(canaries.count, index, canary_nodes)
    return CanaryBlock(directions=canaries.directions[rows], included=canaries.included[rows])
