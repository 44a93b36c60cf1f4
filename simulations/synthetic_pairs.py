"""A LoRe-shaped pair file with a known truth, for benchmarks and tests (no text, no embedder).

Users' rewards are r_u = w_u . A* e with a hidden rank-K basis A* (K x D) and Dirichlet weights; pair diffs are
anisotropic Gaussians (like differences of normalised sentence embeddings: a few strong directions, a long tail);
labels are sampled from the Bradley-Terry model, so the oracle (true A*, true w) is below 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_save_npz
from lore_core.pairs import PairSet, save_pairs
from lore_core.prism_schema import GROUND_TRUTH_FILE


@dataclass(frozen=True)
class SyntheticPairsConfig:
    dim: int = 384
    true_rank: int = 5
    seen_users: int = 200
    unseen_users: int = 50
    train_pairs: tuple[int, int] = (30, 50)  # per seen user, inclusive range
    few_shot_pairs: int = 10  # per unseen user
    test_pairs: int = 20  # per user
    heterogeneity: float = 0.5  # Dirichlet concentration of users' weights (small = diverse users)
    logit_scale: float = 5.0  # larger = less label noise (oracle accuracy up)
    seed: int = 0


@dataclass(frozen=True)
class SyntheticTruth:
    basis: np.ndarray  # (K, D)
    user_ids: np.ndarray  # (U,)
    user_weights: np.ndarray  # (U, K)


def make_synthetic_pairs(config: SyntheticPairsConfig = SyntheticPairsConfig()) -> tuple[PairSet, SyntheticTruth]:
    rng = np.random.default_rng(config.seed)
    dim, k = config.dim, config.true_rank
    # Anisotropic feature covariance: spectrum decaying like sentence-embedding differences.
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(dim))
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    mixing = rotation * spectrum  # (D, D); d = mixing @ g
    true_basis = rng.standard_normal((k, dim)) @ mixing.T  # rewards live in the strong directions
    user_count = config.seen_users + config.unseen_users
    user_ids = np.array([f"user{i:05d}" for i in range(user_count)])
    weights = rng.dirichlet(np.full(k, config.heterogeneity), size=user_count)

    seen = np.arange(user_count) < config.seen_users
    train_counts = np.where(
        seen, rng.integers(config.train_pairs[0], config.train_pairs[1] + 1, size=user_count), config.few_shot_pairs
    )
    counts = train_counts + config.test_pairs
    user_idx = np.repeat(np.arange(user_count), counts)
    split = np.concatenate([np.r_[np.zeros(t, bool), np.ones(config.test_pairs, bool)] for t in train_counts])

    raw = rng.standard_normal((user_idx.size, dim)) @ mixing.T
    raw /= np.linalg.norm(raw, axis=1, keepdims=True) / np.sqrt(2.0)  # |d| ~ distance of two unit embeddings
    basis_scores = raw @ true_basis.T  # (n, K)
    scale = config.logit_scale / basis_scores.std()
    logit = scale * np.einsum("nk,nk->n", basis_scores, weights[user_idx])
    chosen_first = rng.random(user_idx.size) < 1.0 / (1.0 + np.exp(-logit))
    sign = np.where(chosen_first, 1.0, -1.0)

    pairs = PairSet(
        diff=(raw * sign[:, None]).astype(np.float32),
        user=user_ids[user_idx],
        split=np.where(split, "test", "train"),
        seen=seen[user_idx],
        logit_true=(logit * sign).astype(np.float32),
        source="synthetic",
    )
    return pairs, SyntheticTruth(basis=true_basis * scale, user_ids=user_ids, user_weights=weights)


def write_synthetic_dataset(directory: str | Path, config: SyntheticPairsConfig) -> Path:
    """Write `pairs.npz` and its truth `ground_truth.npz` (basis in logit units, logit_scale 1, user_id,
    user_weights: the arrays `lore-fed synth` writes that readers of a truth use) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairs, truth = make_synthetic_pairs(config)
    atomic_save_npz(directory / GROUND_TRUTH_FILE, basis=truth.basis.astype(np.float32), user_id=truth.user_ids,
                    user_weights=truth.user_weights, logit_scale=np.float64(1.0), embedder=np.str_("synthetic"))
    return save_pairs(pairs, directory)
