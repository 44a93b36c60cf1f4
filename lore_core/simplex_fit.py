"""Few-shot fit of user weights on the simplex with the basis frozen: numpy only (runs on a device).

For each user u, minimise over w in the simplex
    F_u(w) = (1/n_u) sum_{j in u} softplus(-w . s_j) + lam * KL(w || uniform)
where s_j = A d_j are the pair's basis scores. F_u is strictly convex (lam > 0), so this solver and the torch
trainer reach the same w. lam is one strength for all users, or one per user: `prior_from_pairs` sets
lam_u = c / n_u, the Bayesian weight of a prior worth c pairs against a user's n_u pairs (a user with few pairs
stays near the population, one with many is free to be personal). The prior keeps every weight > 0, which makes a
damped Newton method on the simplex fast and exact.
All users are solved at once (batched), which is what the federated client and evaluation need.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from lore_core.reward_math import bt_loss, bt_loss_grad, segment_sum

DEFAULT_PRIOR_STRENGTH = 0.02  # joint training: one weak pull for every user, so that the basis rows specialize
# Personalization (w fit with A frozen: evaluation, new users, devices): the prior is worth this many of the user's
# own pairs (lam_u = c / n_u). Chosen on a public pilot population (`python -m simulations.choose_prior_pairs`),
# never on a run it is reported for.
DEFAULT_PRIOR_PAIRS = 3.0


class ConvergenceWarning(UserWarning):
    """The few-shot fit stopped at max_iter before converging (as scikit-learn's ConvergenceWarning): the weights are
    the last iterate, not the optimum. Raised as a warning so every caller reports it without handling it."""


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
    prior_strength: float | np.ndarray = DEFAULT_PRIOR_STRENGTH,
    init: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> SimplexFitResult:
    """Batched few-shot fit. basis_scores (n, B) = diff @ A.T; returns weights (n_users, B).

    Damped Newton on the simplex: F_u is strictly convex with Hessian (1/n) sum sigma(1-sigma) s s^T +
    lam diag(1/w); each step solves the equality-constrained Newton system (sum of the step = 0) for all users at
    once (batched B x B solves), then backtracks to stay inside the simplex and decrease F_u. Converges in tens of
    iterations where first-order mirror descent needs thousands near the simplex boundary.
    Users without pairs get the prior (uniform weights).
    """
    scores = np.asarray(basis_scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"basis_scores must be (n, B), got shape {scores.shape}")
    n_basis = scores.shape[1]
    lam = _user_strengths(prior_strength, n_users)
    counts = np.bincount(user_idx, minlength=n_users).astype(np.float64)
    inv_counts = 1.0 / np.maximum(counts, 1.0)
    if init is None:
        weights = np.full((n_users, n_basis), 1.0 / n_basis)
    else:
        weights = np.clip(np.asarray(init, dtype=np.float64), 1e-12, None)
        weights /= weights.sum(axis=1, keepdims=True)
    outer = scores[:, :, None] * scores[:, None, :]  # (n, B, B)
    kkt = np.zeros((n_users, n_basis + 1, n_basis + 1))
    kkt[:, :n_basis, n_basis] = 1.0
    kkt[:, n_basis, :n_basis] = 1.0
    objective = few_shot_objective(weights, scores, user_idx, lam)
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):
        logits = np.einsum("nb,nb->n", scores, weights[user_idx])
        g_pair = bt_loss_grad(logits)
        grad = segment_sum(g_pair[:, None] * scores, user_idx, n_users) * inv_counts[:, None]
        grad += lam[:, None] * (np.log(weights * n_basis) + 1.0)
        curvature = -g_pair * (1.0 + g_pair)  # sigma(z) * (1 - sigma(z))
        hess = segment_sum(curvature[:, None, None] * outer, user_idx, n_users) * inv_counts[:, None, None]
        hess += lam[:, None, None] * np.einsum("ub,bc->ubc", 1.0 / weights, np.eye(n_basis))
        kkt[:, :n_basis, :n_basis] = hess
        rhs = np.concatenate([-grad, np.zeros((n_users, 1))], axis=1)
        step = np.linalg.solve(kkt, rhs[:, :, None])[:, :n_basis, 0]
        # Largest step keeping w > 0, then backtrack until F_u decreases (per user, vectorized).
        with np.errstate(divide="ignore", invalid="ignore"):
            limit = np.where(step < 0, -weights / step, np.inf).min(axis=1)
        t = np.minimum(1.0, 0.99 * limit)
        todo = np.ones(n_users, bool)
        for _ in range(40):
            trial = np.where(todo[:, None], weights + t[:, None] * step, weights)
            trial_obj = few_shot_objective(trial, scores, user_idx, lam)
            better = trial_obj <= objective + 1e-4 * t * (grad * step).sum(axis=1)
            accept = todo & better
            weights = np.where(accept[:, None], trial, weights)
            objective = np.where(accept, trial_obj, objective)
            todo &= ~better
            if not todo.any():
                break
            t = np.where(todo, t * 0.5, t)
        weights = np.clip(weights, 1e-300, None)
        weights /= weights.sum(axis=1, keepdims=True)
        decrement = -(grad * step).sum(axis=1)
        if np.all(decrement < tol) or np.abs(step).max(initial=0.0) < tol:
            converged = True
            break
    if not converged and n_users and iteration:
        unconverged = int((decrement >= tol).sum())
        warnings.warn(f"the few-shot w fit did not converge in {max_iter} iterations for {unconverged} of {n_users} "
                      f"users (largest Newton decrement {decrement.max():.3g} > tol {tol:g}); their weights are the "
                      "last iterate (a stronger prior, prior_pairs or prior_strength, makes the fit better posed)",
                      ConvergenceWarning, stacklevel=2)
    return SimplexFitResult(weights=weights, iterations=iteration, converged=converged)


def prior_from_pairs(user_idx: np.ndarray, n_users: int, prior_pairs: float) -> np.ndarray:
    """Per-user strengths lam_u = prior_pairs / n_u (U,): the prior weighs as much as `prior_pairs` of the user's
    own pairs (users without pairs get lam = prior_pairs; they keep the uniform prior anyway)."""
    if not (np.isfinite(prior_pairs) and prior_pairs > 0):
        raise ValueError(f"prior_pairs must be finite and > 0, got {prior_pairs}")
    counts = np.bincount(np.asarray(user_idx, dtype=np.int64), minlength=n_users)
    return prior_pairs / np.maximum(counts, 1).astype(np.float64)


def _user_strengths(prior_strength: float | np.ndarray, n_users: int) -> np.ndarray:
    lam = np.asarray(prior_strength, dtype=np.float64)
    if lam.ndim not in (0, 1) or (lam.ndim == 1 and lam.shape != (n_users,)):
        raise ValueError(f"prior_strength must be a number or one per user ({n_users},), got shape {lam.shape}")
    if not (np.all(np.isfinite(lam)) and np.all(lam > 0)):
        raise ValueError(f"prior_strength must be finite and > 0, got {prior_strength}")
    return np.broadcast_to(lam, (n_users,))


def few_shot_objective(
    weights: np.ndarray, basis_scores: np.ndarray, user_idx: np.ndarray, prior_strength: float | np.ndarray
) -> np.ndarray:
    """F_u(w) per user (U,): for checks that two solvers reach the same optimum."""
    n_users, n_basis = weights.shape
    logits = np.einsum("nb,nb->n", basis_scores, weights[user_idx])
    counts = np.maximum(np.bincount(user_idx, minlength=n_users), 1)
    loss = np.bincount(user_idx, weights=bt_loss(logits), minlength=n_users) / counts
    kl = (weights * np.log(np.clip(weights * n_basis, 1e-300, None))).sum(axis=1)
    return loss + _user_strengths(prior_strength, n_users) * kl
