"""Personalized best-of-N on the device: r = w . A e for each candidate's pair embedding e = phi(context, y), with
posterior intervals of each reward and calibrated pairwise preference probabilities."""

from __future__ import annotations

import numpy as np

from client.device.posterior import CREDIBLE_LEVEL, PosteriorSamples, credible_intervals, preference_probability

_BLOCK_VALUES = 2**20  # (pair, sample) logits preference_matrix holds at once: 8 MB each array of them


def candidate_rewards(basis: np.ndarray, weights: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """Rewards (N,) of candidates with embeddings (N, D) under basis (B, D) and weights (B,)."""
    head = np.asarray(basis, np.float64).T @ np.asarray(weights, np.float64)  # (D,): the user's reward head
    return np.asarray(embeddings, np.float64) @ head


def rank_order(rewards: np.ndarray) -> np.ndarray:
    """Candidate indices, best first; ties keep the input order."""
    return np.argsort(-np.asarray(rewards), kind="stable")


def reward_intervals(basis: np.ndarray, samples: PosteriorSamples, embeddings: np.ndarray,
                     level: float = CREDIBLE_LEVEL) -> np.ndarray:
    """Equal-tailed posterior intervals (2, N) of each candidate's reward w . A e; samples of one user."""
    scores = np.asarray(embeddings, np.float64) @ np.asarray(basis, np.float64).T  # (N, B)
    sample_rewards = np.einsum("usb,nb->usn", samples.w, scores)
    return credible_intervals(samples, sample_rewards, level)[:, 0]


def preference_matrix(basis: np.ndarray, samples: PosteriorSamples, embeddings: np.ndarray) -> np.ndarray:
    """P[i, j] (N, N) = P(candidate i preferred to j): the Bradley-Terry sigmoid integrated over w's posterior,
    so a user the device knows little about gets probabilities near 0.5, not the point estimate's confidence.

    Computed a block of rows at a time, of at most _BLOCK_VALUES (pair, sample) logits: a tester's 600 candidates
    took 4.5 GB when all N^2 x S logits were held at once; memory is now the (N, N) result plus one block."""
    scores = np.asarray(embeddings, np.float64) @ np.asarray(basis, np.float64).T  # (N, B)
    n = scores.shape[0]
    if not n:
        return np.zeros((0, 0))
    rows = max(1, _BLOCK_VALUES // (n * samples.w.shape[1]))
    return np.concatenate([preference_probability(samples, _pair_scores(scores[start:start + rows], scores))[0]
                           for start in range(0, n, rows)]).reshape(n, n)


def _pair_scores(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Scores (1, F * N, B) of the pairs (i, j), i of first (F, B) and j of second (N, B), i-major."""
    return (first[:, None, :] - second[None, :, :]).reshape(1, -1, first.shape[1])
