"""A LoRe-shaped pair file with a known truth, for benchmarks and tests (no text, no embedder).

Users' rewards are r_u = w_u . A* e with a hidden rank-K basis A* (K x D) and Dirichlet weights; labels are sampled
from the Bradley-Terry model, so the oracle (true A*, true w) is below 1. Knobs that make a population hard:
  isotropic           embeddings with no preferred direction (default: anisotropic, like differences of normalised
                      sentence embeddings: a few strong directions, a long tail, which is where the rewards live)
  personalization     1 = every user draws its own Dirichlet weights; 0 = every user has the population weights;
                      between, a mix (weak personalization)
  responses_per_turn  2 = independent pairs; R > 2 = PRISM-style turns: R responses, the user picks one (Gumbel
                      choice = Bradley-Terry / Plackett-Luce), and the chosen is paired with each of the other R - 1,
                      so the pairs of a turn share a response. `group` names the turn.
  label_noise         share of labels flipped at random, beyond Bradley-Terry
Train and test rows are whole groups, as `prepare` splits whole conversations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lore_core.pairs import PairSet


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
    isotropic: bool = False
    personalization: float = 1.0
    responses_per_turn: int = 2
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.personalization <= 1.0:
            raise ValueError(f"personalization must be in [0, 1], got {self.personalization}")
        if self.responses_per_turn < 2:
            raise ValueError(f"responses_per_turn must be >= 2, got {self.responses_per_turn}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {self.label_noise}")


@dataclass(frozen=True)
class SyntheticTruth:
    basis: np.ndarray  # (K, D)
    user_ids: np.ndarray  # (U,)
    user_weights: np.ndarray  # (U, K)


def make_synthetic_pairs(config: SyntheticPairsConfig = SyntheticPairsConfig()) -> tuple[PairSet, SyntheticTruth]:
    rng = np.random.default_rng(config.seed)
    extra = np.random.default_rng([config.seed, 7])  # draws of the newer knobs: the default stream is unchanged
    dim, k = config.dim, config.true_rank
    spectrum = np.ones(dim) if config.isotropic else 1.0 / np.sqrt(1.0 + np.arange(dim))
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    mixing = rotation * spectrum  # (D, D); d = mixing @ g
    true_basis = rng.standard_normal((k, dim)) @ mixing.T  # anisotropic: rewards live in the strong directions
    user_count = config.seen_users + config.unseen_users
    user_ids = np.array([f"user{i:05d}" for i in range(user_count)])
    weights = rng.dirichlet(np.full(k, config.heterogeneity), size=user_count)
    if config.personalization < 1.0:
        population = extra.dirichlet(np.ones(k))
        weights = config.personalization * weights + (1.0 - config.personalization) * population

    seen = np.arange(user_count) < config.seen_users
    train_counts = np.where(
        seen, rng.integers(config.train_pairs[0], config.train_pairs[1] + 1, size=user_count), config.few_shot_pairs
    )
    if config.responses_per_turn == 2:
        diff, user_idx, is_test, group = _independent_pairs(rng, mixing, train_counts, config.test_pairs)
        scale = config.logit_scale / (diff @ true_basis.T).std()
        logit = scale * np.einsum("nk,nk->n", diff @ true_basis.T, weights[user_idx])
        sign = np.where(rng.random(user_idx.size) < 1.0 / (1.0 + np.exp(-logit)), 1.0, -1.0)
    else:
        emb, turn_user, turn_test = _turn_responses(extra, mixing, train_counts, config.test_pairs,
                                                    config.responses_per_turn)
        scale = config.logit_scale / ((emb[:, 0] - emb[:, 1]) @ true_basis.T).std()
        diff, turn = _chosen_pairs(extra, emb, scale * true_basis, weights[turn_user])
        user_idx, is_test, group = turn_user[turn], turn_test[turn], turn
        logit = scale * np.einsum("nk,nk->n", diff @ true_basis.T, weights[user_idx])
        sign = np.ones(user_idx.size)  # the chosen response is already first
    if config.label_noise:
        sign *= np.where(extra.random(user_idx.size) < config.label_noise, -1.0, 1.0)

    pairs = PairSet(
        diff=(diff * sign[:, None]).astype(np.float32),
        user=user_ids[user_idx],
        split=np.where(is_test, "test", "train"),
        seen=seen[user_idx],
        logit_true=(logit * sign).astype(np.float32),
        group=np.char.add(user_ids[user_idx], np.char.add("-", group.astype(str))),
        source="synthetic",
    )
    return pairs, SyntheticTruth(basis=true_basis * scale, user_ids=user_ids, user_weights=weights)


def _independent_pairs(rng, mixing, train_counts, test_pairs):
    """Every pair its own group: diff = a Gaussian of norm sqrt(2) (two unit embeddings apart)."""
    counts = train_counts + test_pairs
    user_idx = np.repeat(np.arange(counts.size), counts)
    is_test = np.concatenate([np.r_[np.zeros(t, bool), np.ones(test_pairs, bool)] for t in train_counts])
    raw = rng.standard_normal((user_idx.size, mixing.shape[0])) @ mixing.T
    raw /= np.linalg.norm(raw, axis=1, keepdims=True) / np.sqrt(2.0)  # |d| ~ distance of two unit embeddings
    return raw, user_idx, is_test, np.arange(user_idx.size)


def _turn_responses(rng, mixing, train_counts, test_pairs, responses):
    """PRISM-style turns: per user ceil(n / (R - 1)) train turns and ceil(test / (R - 1)) test turns, each of R unit
    response embeddings. Returns embeddings (T, R, D), each turn's user (T,) and test flag (T,)."""
    per_turn = responses - 1
    train_turns = -(-train_counts // per_turn)
    test_turns = -(-test_pairs // per_turn)
    turn_user = np.repeat(np.arange(train_counts.size), train_turns + test_turns)
    turn_test = np.concatenate([np.r_[np.zeros(t, bool), np.ones(test_turns, bool)] for t in train_turns])
    emb = rng.standard_normal((turn_user.size, responses, mixing.shape[0])) @ mixing.T
    return emb / np.linalg.norm(emb, axis=2, keepdims=True), turn_user, turn_test


def _chosen_pairs(rng, emb, basis, turn_weights):
    """The user picks one response per turn by Gumbel-max over its rewards (Bradley-Terry for every pair); the
    chosen is paired with each of the others. emb (T, R, D), basis (K, D) in logit units, turn_weights (T, K).
    Returns diffs (T * (R-1), D) chosen - other, and each pair's turn (T * (R-1),)."""
    n_turns, responses, _ = emb.shape
    reward = np.einsum("trd,kd,tk->tr", emb, basis, turn_weights)
    chosen = np.argmax(reward + rng.gumbel(size=reward.shape), axis=1)
    others = np.array([[j for j in range(responses) if j != c] for c in range(responses)])[chosen]  # (T, R-1)
    rows = np.arange(n_turns)[:, None]
    diff = emb[rows, chosen[:, None]] - emb[rows, others]  # (T, R-1, D)
    return diff.reshape(-1, emb.shape[2]), np.repeat(np.arange(n_turns), responses - 1)
