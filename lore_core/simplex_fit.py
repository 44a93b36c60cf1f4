"""Few-shot fit of user weights on the simplex with the basis frozen: numpy only (runs on a device).

For each user u, minimise over w in the simplex
    F_u(w) = (1/n_u) sum_{j in u} softplus(-w . s_j) + lam * KL(w || uniform)
where s_j = A d_j are the pair's basis scores. F_u is strictly convex (lam > 0), so this solver and the torch
trainer reach the same w. Exponentiated gradient (mirror descent) keeps w exactly on the simplex and > 0; the
KL term enters in closed form: w <- normalise(w^(1 - eta*lam) * exp(-eta * grad_loss)).
All users are solved at once (batched), which is what the federated client and evaluation need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lore_core.reward_math import bt_loss, bt_loss_grad, segment_sum

DEFAULT_PRIOR_STRENGTH = 0.02


@dataclass(frozen=True)
class SimplexFitResult:
    weights: np.ndarray  # (U, B)
    iterations: int
    converged: bool


def fit_user_weights(
    basis_scores: np.ndarray,
    user_idx: np.ndarray,
    n_users: int,
    *,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    init: np.ndarray | None = None,
    max_iter: int = 3000,
    tol: float = 1e-9,
) -> SimplexFitResult:
    """Batched few-shot fit. basis_scores (n, B) = diff @ A.T; returns weights (n_users, B).

    Users without pairs get the prior (uniform weights).
    """
    scores = np.asarray(basis_scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"basis_scores must be (n, B), got shape {scores.shape}")
    if prior_strength <= 0 or not np.isfinite(prior_strength):
        raise ValueError(f"prior_strength must be finite and > 0, got {prior_strength}")
    n_basis = scores.shape[1]
    counts = np.bincount(user_idx, minlength=n_users).astype(np.float64)
    inv_counts = 1.0 / np.maximum(counts, 1.0)
    if init is None:
        weights = np.full((n_users, n_basis), 1.0 / n_basis)
    else:
        weights = np.clip(np.asarray(init, dtype=np.float64), 1e-12, None)
        weights /= weights.sum(axis=1, keepdims=True)
    # Step 1/L per user: the loss Hessian in w is bounded by max_j |s_j|_inf^2 / 4 (l1 geometry).
    row_max = np.abs(scores).max(axis=1) if scores.size else np.zeros(0)
    smooth = np.zeros(n_users)
    np.maximum.at(smooth, user_idx, row_max**2 / 4.0)
    eta = 1.0 / (smooth + prior_strength + 1e-12)
    shrink = (1.0 - eta * prior_strength)[:, None]
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):
        logits = np.einsum("nb,nb->n", scores, weights[user_idx])
        grad = segment_sum(bt_loss_grad(logits)[:, None] * scores, user_idx, n_users) * inv_counts[:, None]
        log_w = shrink * np.log(weights) - eta[:, None] * grad
        log_w -= log_w.max(axis=1, keepdims=True)
        new = np.exp(log_w)
        new /= new.sum(axis=1, keepdims=True)
        change = np.abs(new - weights).max() if weights.size else 0.0
        weights = new
        if change < tol:
            converged = True
            break
    return SimplexFitResult(weights=weights, iterations=iteration, converged=converged)


def few_shot_objective(
    weights: np.ndarray, basis_scores: np.ndarray, user_idx: np.ndarray, prior_strength: float
) -> np.ndarray:
    """F_u(w) per user (U,): for checks that two solvers reach the same optimum."""
    n_users, n_basis = weights.shape
    logits = np.einsum("nb,nb->n", basis_scores, weights[user_idx])
    counts = np.maximum(np.bincount(user_idx, minlength=n_users), 1)
    loss = np.bincount(user_idx, weights=bt_loss(logits), minlength=n_users) / counts
    kl = (weights * np.log(np.clip(weights * n_basis, 1e-300, None))).sum(axis=1)
    return loss + prior_strength * kl
