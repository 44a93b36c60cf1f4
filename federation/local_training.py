"""A node's local LoRe work, vectorized over the users it hosts (numpy only, runs on a device).

Per sampled user u: fit w_u on the simplex with the basis A (B, D) frozen, then take `steps` gradient steps of
size `lr` on u's own copy of A with w_u fixed. With w fixed every step is rank one (w_u (x) v_u), so the local
basis stays A - lr * w_u (x) r_u and the whole local run is exact in r_u (D,):
    z_j = w_u . A d_j - lr |w_u|^2 (r_u . d_j),   r_u += v_u(z) = mean_{j in u} dloss/dz_j d_j.
The update sent is dA_u = -lr * w_u (x) r_u  (B, D): the user's pseudo-gradient, nothing per pair.
With the marginal objective (`lore_core.marginal_fit`: w integrated out, for thin users) the update is one exact
step, dA_u = -lr * grad_A [-log p(pairs_u | A) / n_u], and no w is fitted for training (run config `objective`).
"""

from __future__ import annotations

import logging

import numpy as np

from federation.user_block import EVAL_BLOCK_USERS, NodeUsers, RowGroup, UserBlock
from lore_core.reward_math import bt_loss_grad, per_user_accuracy, segment_sum
from lore_core.marginal_fit import OBJECTIVES, marginal_user_gradients
from lore_core.simplex_fit import fit_user_weights, prior_from_pairs

# Tight enough that a warm start (w from the last round) and a cold start (a restarted run) give the same w.
FIT_TOL = 1e-11
FIT_MAX_ITER = 20000


def fit_weights(basis: np.ndarray, rows: RowGroup, n_users: int, prior_strength: float | np.ndarray,
                init: np.ndarray | None = None) -> np.ndarray:
    """w (n_users, B) minimising each user's mean BT loss + prior KL(w || uniform) with A frozen."""
    result = fit_user_weights(rows.diff @ basis.T, rows.user_idx, n_users, prior_strength=prior_strength,
                              init=init, max_iter=FIT_MAX_ITER, tol=FIT_TOL)
    return result.weights


def local_basis_updates(basis: np.ndarray, weights: np.ndarray, rows: RowGroup, *, steps: int,
                        lr: float) -> np.ndarray:
    """Per-user basis updates dA_u (U, B, D) after `steps` local GD steps on A with w fixed.

    weights (U, B); rows.user_idx indexes those U users.
    """
    n_users = weights.shape[0]
    counts = np.maximum(np.bincount(rows.user_idx, minlength=n_users), 1)[:, None]
    w_rows = weights[rows.user_idx]  # (n, B)
    z0 = np.einsum("nb,nb->n", rows.diff @ basis.T, w_rows)
    shrink = lr * np.einsum("nb,nb->n", w_rows, w_rows)  # lr |w_u|^2 per row
    r = np.zeros((n_users, basis.shape[1]))
    for _ in range(steps):
        z = z0 - shrink * np.einsum("nd,nd->n", rows.diff, r[rows.user_idx])
        r += segment_sum(bt_loss_grad(z)[:, None] * rows.diff, rows.user_idx, n_users) / counts
    return -lr * weights[:, :, None] * r[:, None, :]


def sampled_rows(block: UserBlock, sampled: np.ndarray) -> RowGroup:
    """The training rows of the sampled local users (k,), user_idx relabelled to 0..k-1."""
    rows = block.seen_train
    keep = np.isin(rows.user_idx, sampled)
    relabel = np.full(block.n_train_users, -1, dtype=np.int64)
    relabel[sampled] = np.arange(sampled.size)
    return RowGroup(diff=rows.diff[keep], user_idx=relabel[rows.user_idx[keep]], logit_true=None)


def fit_sampled_users(basis: np.ndarray, block: UserBlock, weights: np.ndarray, sampled: np.ndarray, *,
                      prior_pairs: float) -> tuple[np.ndarray, RowGroup]:
    """Refit w of the sampled local users (k,) with A frozen (warm start from `weights` (S, B)), each with the
    training prior worth `prior_pairs` of its pairs (as `lore_core.joint_trainer` trains); `block` holds
    at least their training rows (`NodeUsers.training_block`).
    Returns (their w (k, B), their train rows with user_idx relabelled to 0..k-1)."""
    sub = sampled_rows(block, sampled)
    prior = prior_from_pairs(sub.user_idx, sampled.size, prior_pairs)
    return fit_weights(basis, sub, sampled.size, prior, init=weights[sampled]), sub


def train_sampled_users(basis: np.ndarray, block: UserBlock, weights: np.ndarray, sampled: np.ndarray, *,
                        prior_pairs: float, steps: int, lr: float,
                        objective: str = "joint") -> tuple[np.ndarray, np.ndarray]:
    """Fit w and compute dA for the sampled local users (module docstring; `objective` "joint" or "marginal").

    weights (S, B): the node's stored w (warm start); sampled (k,) local indices.
    Returns (new weights (S, B) with the sampled rows refit, updates (k, B, D)).
    """
    if objective == "marginal":  # w integrated out: one exact gradient step, the stored w untouched
        sub = sampled_rows(block, sampled)
        return weights, -lr * marginal_user_gradients(basis, sub.diff, sub.user_idx, sampled.size)
    if objective != "joint":
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    fitted, sub = fit_sampled_users(basis, block, weights, sampled, prior_pairs=prior_pairs)
    updated = weights.copy()
    updated[sampled] = fitted
    return updated, local_basis_updates(basis, fitted, sub, steps=steps, lr=lr)


def pair_weighted(updates: np.ndarray, block: UserBlock, sampled: np.ndarray, pairs_per_user: float) -> np.ndarray:
    """Run config weight-by pair (mode none): each sampled user's update (k, B, D) times its training pairs in
    `block` / pairs-per-user, so that the server's plain mean counts every pair once (federation.protocol
    pairs_per_user). The ClientApp and the audits' recomputed uploads both scale here."""
    pairs = np.bincount(block.seen_train.user_idx, minlength=int(sampled.max(initial=-1)) + 1)[sampled]
    return updates * (pairs / pairs_per_user)[:, None, None]


def record_dp_updates(basis: np.ndarray, block: UserBlock, logits: np.ndarray, sampled: np.ndarray,
                      states: list, *, lr: float, noise_multiplier: float, max_grad_norm: float, batch_size: int,
                      sample_rate: float, epochs: int, delta: float, max_epsilon: float | None = None,
                      noise_seed: int | None = None, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, list]:
    """Record mode: per sampled user, Opacus DP-SGD per pair over the user's weights and the basis together
    (lore_core.privacy.record_dp): w is never fitted outside the private step.

    logits (S, B): every local user's private weights as w = softmax(logits), DP-SGD outputs kept on the node
    (zeros = uniform before a user's first round). states: one RecordDpState per sampled user (its accountant
    history so far, never reset). Returns (new logits (S, B), updates (k, B, D), new states). A user whose next step
    would exceed max_epsilon trains nothing: zero update, unchanged logits and history. A seen user without a
    training pair on a device's own file takes the same noise-only steps: with one pair or none, what leaves is
    alike (it sent a zero update and no spending, which told a server whether its only pair was there; a reviewer).
    One Opacus engine per user: a Python loop over the sampled users is the price of per-user accountants (a
    baseline mode).
    """
    from lore_core.privacy.accounting import PrivacyBudgetExhausted
    from lore_core.privacy.record_dp import check_request, dp_sgd_update

    check_request(noise_multiplier, max_grad_norm, batch_size, sample_rate, epochs)  # before any user: alike for all
    rows = block.seen_train
    updated = logits.copy()
    updates = np.zeros((sampled.size,) + basis.shape)
    new_states = list(states)
    exhausted = 0
    for i, user in enumerate(sampled):
        seed = None if noise_seed is None else noise_seed + 7919 * int(user)  # debug runs only
        pairs = rows.diff[rows.user_idx == user]
        try:
            updates[i], updated[user], new_states[i] = dp_sgd_update(
                basis, logits[user], pairs, noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm, batch_size=batch_size, sample_rate=sample_rate, epochs=epochs, lr=lr,
                state=states[i],
                device=device, delta=delta, max_epsilon=max_epsilon, reproducible_seed=seed)
        except PrivacyBudgetExhausted:
            exhausted += 1  # this user's record-level budget is spent: it sends a zero update (the server counts it)
    if exhausted:
        logging.getLogger("lore_fed.client").warning(
            "record mode: %d of %d sampled users have spent their record-level budget (max-epsilon) and send a zero "
            "update", exhausted, sampled.size)
    return updated, updates, new_states


def accuracy_sums(logits: np.ndarray, rows: RowGroup, n_users: int) -> tuple[float, int, float]:
    """(sum over users of per-user accuracy, number of users with test pairs, same sum for the oracle)."""
    acc = per_user_accuracy(logits, rows.user_idx, n_users)
    has = ~np.isnan(acc)
    oracle = 0.0
    if rows.logit_true is not None:
        oracle = float(np.nansum(per_user_accuracy(rows.logit_true, rows.user_idx, n_users)))
    return float(acc[has].sum()), int(has.sum()), oracle


def personal_fit_weights(basis: np.ndarray, rows: RowGroup, n_users: int, prior_pairs: float,
                         init: np.ndarray | None = None) -> np.ndarray:
    """`fit_weights` with the personal prior worth `prior_pairs` of each user's pairs: how a user's final w is fit
    (evaluation, new users), batched over a simulated node's users."""
    return fit_weights(basis, rows, n_users, prior_from_pairs(rows.user_idx, n_users, prior_pairs), init=init)


def device_fit_weights(basis: np.ndarray, rows: RowGroup, n_users: int, prior_pairs: float,
                       init: np.ndarray | None = None) -> np.ndarray:
    """`personal_fit_weights` through the on-device code (`client.device.personalize.adapt`), user by user: in
    deployment a node is one device with its one user (a few in local trials), and it adapts as the device app does."""
    from client.device.personalize import adapt

    weights = np.full((n_users, basis.shape[0]), 1.0 / basis.shape[0])
    for u in range(n_users):
        mine = rows.user_idx == u
        if mine.any():
            weights[u] = adapt(basis, rows.diff[mine], init=None if init is None else init[u],
                               prior_pairs=prior_pairs).user_weights
    return weights


def evaluate_block(basis: np.ndarray, block: UserBlock, weights: np.ndarray, *, prior_pairs: float,
                   fit=personal_fit_weights) -> tuple[np.ndarray, dict[str, float]]:
    """Seen users: refit w on their train pairs (warm start `weights` (S, B)) and test; unseen users: fit w on
    their few-shot pairs from the prior and test; both with the personal prior (`prior_pairs`), as
    `lore_core.evaluation` does. Returns (refit seen weights, per-node sums).
    `fit` is `personal_fit_weights` (batched over a simulated node's users) or `device_fit_weights` (deployment)."""
    seen_w = fit(basis, block.seen_train, block.n_train_users, prior_pairs, init=weights)
    unseen_w = fit(basis, block.unseen_train, block.unseen_users.size, prior_pairs)
    sums: dict[str, float] = {}
    for prefix, w, rows, n_users in (
        ("seen", seen_w, block.seen_test, block.n_train_users),
        ("unseen", unseen_w, block.unseen_test, block.unseen_users.size),
    ):
        logits = np.einsum("nb,nb->n", rows.diff @ basis.T, w[rows.user_idx])
        acc_sum, users, oracle_sum = accuracy_sums(logits, rows, n_users)
        sums[f"{prefix}-acc-sum"] = acc_sum
        sums[f"{prefix}-users"] = users
        if rows.logit_true is not None:
            sums[f"oracle-{prefix}-acc-sum"] = oracle_sum
    return seen_w, sums


def evaluate_node(basis: np.ndarray, node: NodeUsers, weights: np.ndarray, *, prior_pairs: float,
                  fit=personal_fit_weights, max_users: int = EVAL_BLOCK_USERS) -> tuple[np.ndarray, dict[str, float]]:
    """`evaluate_block` over all of a node's users, `max_users` at a time (the sums add up over blocks): memory
    bounded by a block, time linear in the node's users. Returns (refit seen weights (S, B), per-node sums)."""
    refit = np.array(weights, dtype=np.float64)
    sums: dict[str, float] = {}
    for seen, block in node.evaluation_blocks(max_users):
        refit[seen], part = evaluate_block(basis, block, weights[seen], prior_pairs=prior_pairs, fit=fit)
        for key, value in part.items():
            sums[key] = sums.get(key, 0.0) + value
    return refit, sums
