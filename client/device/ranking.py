"""Personalized best-of-N on the device: r = w . A e for each candidate's pair embedding e = phi(context, y), with
posterior intervals of each reward and calibrated pairwise preference probabilities."""

from __future__ import annotations

import numpy as np

from client.device.posterior import CREDIBLE_LEVEL, PosteriorSamples, credible_intervals, preference_probability


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
    so a user the device knows little about gets probabilities near 0.5, not the point estimate's confidence."""
    scores = np.asarray(embeddings, np.float64) @ np.asarray(basis, np.float64).T  # (N, B)
    pair_scores = (scores[:, None, :] - scores[None, :, :]).reshape(1, -1, scores.shape[1])
    n = scores.shape[0]
    return preference_probability(samples, pair_scores)[0].reshape(n, n)
