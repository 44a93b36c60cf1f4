"""Few-shot fit of user weights on the simplex with the basis frozen: numpy only (runs on a device).

For each user u, minimise over w in the simplex
    F_u(w) = (1/n_u) sum_{j in u} softplus(-w . s_j) + lam * KL(w || m)
where s_j = A d_j are the pair's basis scores and m is uniform (the population reward) unless a device gives a
prior mean (declared attributes, client.device.attribute_prior). F_u is strictly convex (lam > 0), so this solver
and the torch trainer reach the same w. lam is one strength for all users, or one per user: `prior_from_pairs` sets
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
# Past a million pairs the prior has pinned w to its mean (to about 1e-6) and the device's posterior samples
# collapse onto one (at 1e300 one effective sample of 512): a larger prior is an error, not a setting.
MAX_PRIOR_PAIRS = 1e6
# A basis released under user-level DP is noisy, so each user's w leans more on the population: a DP run takes
# this personal prior unless `prior-pairs` is given. Chosen on five DP pilots (iso-5-15-1400 seeds 101-103,
# prism-synth seed 101, 1,400 users x 30-50 pairs seed 101; `python -m simulations.choose_dp_defaults
# --personal-prior`): thin users gain from more, thick ones lose from it; 10 has the best mean.
DP_PRIOR_PAIRS = 10.0


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
    prior_mean: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> SimplexFitResult:
    """Batched few-shot fit. basis_scores (n, B) = diff @ A.T; returns weights (n_users, B).

    Damped Newton on the simplex: F_u is strictly convex with Hessian (1/n) sum sigma(1-sigma) s s^T +
    lam diag(1/w); each step solves the equality-constrained Newton system (sum of the step = 0) for all users at
    once (batched B x B solves), then backtracks to stay inside the simplex and decrease F_u. Converges in tens of
    iterations where first-order mirror descent needs thousands near the simplex boundary.
    Users without pairs get the prior mode. prior_mean (n_users, B) on the simplex replaces uniform in the KL
    term (an on-device prior, e.g. from declared attributes); None = uniform, the population reward.
    """
    scores = np.asarray(basis_scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"basis_scores must be (n, B), got shape {scores.shape}")
    n_basis = scores.shape[1]
    lam = _user_strengths(prior_strength, n_users)
    counts = np.bincount(user_idx, minlength=n_users).astype(np.float64)
    inv_counts = 1.0 / np.maximum(counts, 1.0)
    log_prior = prior_log_mean(prior_mean, n_users, n_basis)
    if init is None:
        weights = np.exp(log_prior)
    else:
        weights = np.clip(np.asarray(init, dtype=np.float64), 1e-12, None)
        weights /= weights.sum(axis=1, keepdims=True)
    outer = scores[:, :, None] * scores[:, None, :]  # (n, B, B)
    kkt = np.zeros((n_users, n_basis + 1, n_basis + 1))
    kkt[:, :n_basis, n_basis] = 1.0
    kkt[:, n_basis, :n_basis] = 1.0
    objective = few_shot_objective(weights, scores, user_idx, lam, prior_mean)
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):
        logits = np.einsum("nb,nb->n", scores, weights[user_idx])
        g_pair = bt_loss_grad(logits)
        grad = segment_sum(g_pair[:, None] * scores, user_idx, n_users) * inv_counts[:, None]
        grad += lam[:, None] * (np.log(weights) - log_prior + 1.0)
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
        decrement = -(grad * step).sum(axis=1)
        # A user already within `tol` takes its (tiny) Newton step as is: its objective change is rounding noise,
        # and backtracking on it would halve the step 40 times for the whole batch.
        settled = decrement < tol
        todo = np.ones(n_users, bool)
        for _ in range(40):
            trial = np.where(todo[:, None], weights + t[:, None] * step, weights)
            trial_obj = few_shot_objective(trial, scores, user_idx, lam, prior_mean)
            better = (trial_obj <= objective + 1e-4 * t * (grad * step).sum(axis=1)) | settled
            accept = todo & better
            weights = np.where(accept[:, None], trial, weights)
            objective = np.where(accept, trial_obj, objective)
            todo &= ~better
            if not todo.any():
                break
            t = np.where(todo, t * 0.5, t)
        weights = np.clip(weights, 1e-300, None)
        weights /= weights.sum(axis=1, keepdims=True)
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
    if not (np.isfinite(prior_pairs) and 0 < prior_pairs <= MAX_PRIOR_PAIRS):
        raise ValueError(f"prior_pairs must be finite, > 0 and at most {MAX_PRIOR_PAIRS:g}, got {prior_pairs}")
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
    weights: np.ndarray, basis_scores: np.ndarray, user_idx: np.ndarray, prior_strength: float | np.ndarray,
    prior_mean: np.ndarray | None = None,
) -> np.ndarray:
    """F_u(w) per user (U,): for checks that two solvers reach the same optimum."""
    n_users, n_basis = weights.shape
    logits = np.einsum("nb,nb->n", basis_scores, weights[user_idx])
    counts = np.maximum(np.bincount(user_idx, minlength=n_users), 1)
    loss = np.bincount(user_idx, weights=bt_loss(logits), minlength=n_users) / counts
    log_ratio = np.log(np.clip(weights, 1e-300, None)) - prior_log_mean(prior_mean, n_users, n_basis)
    kl = (weights * log_ratio).sum(axis=1)
    return loss + _user_strengths(prior_strength, n_users) * kl


def prior_log_mean(prior_mean: np.ndarray | None, n_users: int, n_basis: int) -> np.ndarray:
    """log of the prior's mean (n_users, B): uniform without one; a prior_mean must be on the open simplex."""
    if prior_mean is None:
        return np.full((n_users, n_basis), -np.log(n_basis))
    mean = np.broadcast_to(np.asarray(prior_mean, dtype=np.float64), (n_users, n_basis))
    if not (np.all(mean > 0) and np.allclose(mean.sum(axis=1), 1.0, atol=1e-6)):
        raise ValueError("prior_mean must be strictly positive and sum to 1 per user")
    return np.log(mean)
