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
LOG_STEP = 30.0  # the few-shot fit changes no weight more than e^30-fold in one step (a trust region in log w)


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
    once (batched B x B solves), then backtracks to stay inside the simplex and decrease F_u. It stops when
    the Newton decrement and the Frank-Wolfe gap (a bound on F_u - min F_u) are both small. Converges in tens of
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
    objective = few_shot_objective(weights, scores, user_idx, lam, prior_mean)
    converged, stalled, decrement = False, False, np.full(n_users, np.inf)
    for iteration in range(max_iter + 1):
        g_pair, grad = _gradient(weights, scores, user_idx, lam, log_prior, inv_counts)
        # Frank-Wolfe gap grad . w - min_k grad_k: an upper bound on F_u(w) - min F_u. The Newton decrement alone is
        # no certificate here: the KL term is not self-concordant near the boundary, so at w_k ~ 1e-12 (a device
        # refitting from its last w, a vertex) the curvature lam / w_k makes it vanish far from the optimum (a
        # tester: [1, 0, 0] was returned as converged after one step, the optimum being [0.48, 0.20, 0.31]).
        gap = (grad * weights).sum(axis=1) - grad.min(axis=1)
        if iteration:
            done = settled(decrement, gap, grad, objective, tol)
            if np.all(done):
                converged = True
                break
            if stalled:  # no weight moved in the last step (rounding): more iterations would not either
                break
        if iteration == max_iter:
            break
        curvature = -g_pair * (1.0 + g_pair)  # sigma(z) * (1 - sigma(z))
        # The Newton system scaled by sqrt(w) on both sides: the prior's curvature lam / w_k becomes lam on the
        # diagonal, so a weight of 1e-200 does not make the solve lose every digit of the step (condition 1e200).
        root = np.sqrt(weights)
        hess = segment_sum(curvature[:, None, None] * outer, user_idx, n_users) * inv_counts[:, None, None]
        kkt[:, :n_basis, :n_basis] = root[:, :, None] * hess * root[:, None, :]
        diagonal = kkt[:, np.arange(n_basis), np.arange(n_basis)]
        # + a ridge at 1e-10 of the largest curvature: a prior too weak to outweigh rounding (lam = 1e-14 against
        # saturated pairs) left the system singular. Still a descent direction; the gap test still decides the end.
        kkt[:, np.arange(n_basis), np.arange(n_basis)] += lam[:, None] + 1e-10 * np.abs(diagonal).max(axis=1)[:, None]
        kkt[:, :n_basis, n_basis] = kkt[:, n_basis, :n_basis] = root  # sum of the step = sum_k root_k y_k = 0
        rhs = np.concatenate([-root * grad, np.zeros((n_users, 1))], axis=1)
        step = root * np.linalg.solve(kkt, rhs[:, :, None])[:, :n_basis, 0]
        slope = (grad * step).sum(axis=1)
        decrement = -slope
        # Backtrack along w * exp(t step / w) (renormalized) until F_u decreases (per user, vectorized): the same
        # first-order move as w + t step, but it never leaves the simplex, so no step is cut short because one weight
        # heads for the boundary (a weight whose optimum is 1e-200 under large scores and a weak prior shrank only
        # 100-fold per iteration, and held the user's other weights back as long). No weight changes more than
        # e^LOG_STEP-fold in one step. A user already within `tol` keeps its weights: its change is rounding noise.
        log_move = np.where((weights <= 1e-290) & (step < 0), 0.0, np.abs(step / weights))  # at the floor already
        t = np.minimum(1.0, LOG_STEP / np.maximum(log_move.max(axis=1), 1e-300))
        todo = ~settled(decrement, gap, grad, objective, tol)
        slack = 1e-13 * (1.0 + np.abs(objective))  # rounding: a move too small to change F_u is not refused
        before = weights
        for _ in range(60):
            trial = np.where(todo[:, None], multiplicative_step(weights, step, t), weights)
            trial_obj = few_shot_objective(trial, scores, user_idx, lam, prior_mean)
            better = trial_obj <= objective + 1e-4 * t * slope + slack
            accept = todo & better
            weights = np.where(accept[:, None], trial, weights)
            objective = np.where(accept, trial_obj, objective)
            todo &= ~better
            if not todo.any():
                break
            t = np.where(todo, t * 0.5, t)
        stalled = np.abs(np.log(weights) - np.log(before)).max(initial=0.0) < 1e-12
    if not converged and n_users:
        unconverged = int((~done).sum()) if max_iter else n_users
        why = f"in {max_iter} iterations" if iteration == max_iter else \
            f"(stopped after {iteration} iterations: no weight could move further)"
        warnings.warn(f"the few-shot w fit did not converge {why} for {unconverged} of {n_users} "
                      f"users (largest Frank-Wolfe gap {gap.max():.3g}, Newton decrement "
                      f"{decrement.max():.3g}; tol {tol:g}); their weights are the "
                      "last iterate (a stronger prior, prior_pairs or prior_strength, makes the fit better posed)",
                      ConvergenceWarning, stacklevel=2)
    return SimplexFitResult(weights=weights, iterations=iteration, converged=converged)


def settled(decrement, gap, grad, objective, tol: float) -> np.ndarray:
    """(U,) users at their optimum to `tol`, relative to the size of their objective and gradient (at scores of 1e4
    rounding alone exceeds an absolute 1e-11)."""
    return (decrement < tol * (1.0 + np.abs(objective))) & (gap < tol * (1.0 + np.abs(grad).max(axis=1)))


def multiplicative_step(weights: np.ndarray, step: np.ndarray, t: np.ndarray) -> np.ndarray:
    """w * exp(t step / w), renormalized, each weight at least 1e-300 (U, B)."""
    log_moved = np.log(weights) + t[:, None] * step / weights
    moved = np.exp(log_moved - log_moved.max(axis=1, keepdims=True))  # the largest is 1: no overflow
    moved = np.clip(moved / moved.sum(axis=1, keepdims=True), 1e-300, None)
    return moved / moved.sum(axis=1, keepdims=True)


def _gradient(weights, scores, user_idx, lam, log_prior, inv_counts) -> tuple[np.ndarray, np.ndarray]:
    """The pairs' loss gradients (n,) and grad F_u (U, B) at `weights`."""
    logits = np.einsum("nb,nb->n", scores, weights[user_idx])
    g_pair = bt_loss_grad(logits)
    grad = segment_sum(g_pair[:, None] * scores, user_idx, len(weights)) * inv_counts[:, None]
    grad += lam[:, None] * (np.log(weights) - log_prior + 1.0)
    return g_pair, grad


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
