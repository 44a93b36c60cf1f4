"""Personalized best-of-N on the device: r = w . A e for each candidate's pair embedding e = phi(context, y)."""

from __future__ import annotations

import numpy as np


def candidate_rewards(basis: np.ndarray, weights: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """Rewards (N,) of candidates with embeddings (N, D) under basis (B, D) and weights (B,)."""
    head = np.asarray(basis, np.float64).T @ np.asarray(weights, np.float64)  # (D,): the user's reward head
    return np.asarray(embeddings, np.float64) @ head


def rank_order(rewards: np.ndarray) -> np.ndarray:
    """Candidate indices, best first; ties keep the input order."""
    return np.argsort(-np.asarray(rewards), kind="stable")
