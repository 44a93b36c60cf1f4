"""A node's local LoRe work, vectorized over the users it hosts (numpy only, runs on a device).

Per sampled user u: fit w_u on the simplex with the basis A (B, D) frozen, then take `steps` gradient steps of
size `lr` on u's own copy of A with w_u fixed. With w fixed every step is rank one (w_u (x) v_u), so the local
basis stays A - lr * w_u (x) r_u and the whole local run is exact in r_u (D,):
    z_j = w_u . A d_j - lr |w_u|^2 (r_u . d_j),   r_u += v_u(z) = mean_{j in u} dloss/dz_j d_j.
The update sent is dA_u = -lr * w_u (x) r_u  (B, D): the user's pseudo-gradient, nothing per pair.
"""

from __future__ import annotations

import numpy as np

from client.user_block import RowGroup, UserBlock
from lore_core.reward_math import bt_loss_grad, per_user_accuracy
from lore_core.simplex_fit import fit_user_weights

# Tight enough that a warm start (w from the last round) and a cold start (a restarted run) give the same w.
FIT_TOL = 1e-11
FIT_MAX_ITER = 20000


def fit_weights(basis: np.ndarray, rows: RowGroup, n_users: int, prior_strength: float,
                init: np.ndarray | None = None) -> np.ndarray:
    """w (n_users, B) minimising each user's mean BT loss + prior KL(w || uniform) with A frozen."""
    result = fit_user_weights(rows.diff @ basis.T, rows.user_idx, n_users, prior_strength=prior_strength,
                              init=init, max_iter=FIT_MAX_ITER, tol=FIT_TOL)
    return result.weights


def user_mean_matrix(user_idx: np.ndarray, n_users: int) -> np.ndarray:
    """M (n_users, n) with M @ x = per-user mean of rows of x; dense, fine for the tens of users on one node."""
    onehot = (user_idx[None, :] == np.arange(n_users)[:, None]).astype(np.float64)
    return onehot / np.maximum(onehot.sum(axis=1, keepdims=True), 1.0)


def local_basis_updates(basis: np.ndarray, weights: np.ndarray, rows: RowGroup, *, steps: int,
                        lr: float) -> np.ndarray:
    """Per-user basis updates dA_u (U, B, D) after `steps` local GD steps on A with w fixed.

    weights (U, B); rows.user_idx indexes those U users.
    """
    n_users = weights.shape[0]
    mean = user_mean_matrix(rows.user_idx, n_users)
    w_rows = weights[rows.user_idx]  # (n, B)
    z0 = np.einsum("nb,nb->n", rows.diff @ basis.T, w_rows)
    shrink = lr * np.einsum("nb,nb->n", w_rows, w_rows)  # lr |w_u|^2 per row
    r = np.zeros((n_users, basis.shape[1]))
    for _ in range(steps):
        z = z0 - shrink * np.einsum("nd,nd->n", rows.diff, r[rows.user_idx])
        r += mean @ (bt_loss_grad(z)[:, None] * rows.diff)
    return -lr * weights[:, :, None] * r[:, None, :]


def train_sampled_users(basis: np.ndarray, block: UserBlock, weights: np.ndarray, sampled: np.ndarray, *,
                        prior_strength: float, steps: int, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """Fit w and compute dA for the sampled local users.

    weights (S, B): the node's stored w (warm start); sampled (k,) local indices.
    Returns (new weights (S, B) with the sampled rows refit, updates (k, B, D)).
    """
    rows = block.seen_train
    keep = np.isin(rows.user_idx, sampled)
    relabel = np.full(block.n_train_users, -1, dtype=np.int64)
    relabel[sampled] = np.arange(sampled.size)
    sub = RowGroup(diff=rows.diff[keep], user_idx=relabel[rows.user_idx[keep]], logit_true=None)
    fitted = fit_weights(basis, sub, sampled.size, prior_strength, init=weights[sampled])
    updated = weights.copy()
    updated[sampled] = fitted
    return updated, local_basis_updates(basis, fitted, sub, steps=steps, lr=lr)


def accuracy_sums(logits: np.ndarray, rows: RowGroup, n_users: int) -> tuple[float, int, float]:
    """(sum over users of per-user accuracy, number of users with test pairs, same sum for the oracle)."""
    acc = per_user_accuracy(logits, rows.user_idx, n_users)
    has = ~np.isnan(acc)
    oracle = 0.0
    if rows.logit_true is not None:
        oracle = float(np.nansum(per_user_accuracy(rows.logit_true, rows.user_idx, n_users)))
    return float(acc[has].sum()), int(has.sum()), oracle


def evaluate_block(basis: np.ndarray, block: UserBlock, weights: np.ndarray, *,
                   prior_strength: float) -> tuple[np.ndarray, dict[str, float]]:
    """Seen users: refit w on their train pairs (warm start `weights` (S, B)) and test; unseen users: fit w on
    their few-shot pairs from the prior and test. Returns (refit seen weights, per-node sums)."""
    seen_w = fit_weights(basis, block.seen_train, block.n_train_users, prior_strength, init=weights)
    unseen_w = fit_weights(basis, block.unseen_train, block.unseen_users.size, prior_strength)
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
