"""LoRe math in numpy, vectorized over users and pairs; the single source used by clients and devices.

Shapes: basis A (B, D); user weights W (U, B) on the simplex; pair diffs d (n, D); user_idx (n,) in [0, U).
Pair logit z_j = w_{u_j} . A d_j;  pair loss softplus(-z_j);  objective = mean over users of the per-user mean loss.
"""

from __future__ import annotations

import numpy as np

DEFAULT_L2 = 1e-4  # L2 penalty on A: the usual selection on LoRe-shaped data; federated runs start from it
MAX_L2 = 1e6  # larger penalties only flatten A to zero (and near float32's range they overflow into NaN)


def softmax(theta: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = theta - theta.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def bt_loss(logits: np.ndarray) -> np.ndarray:
    """Bradley-Terry negative log-likelihood softplus(-z), stable for large |z|."""
    return np.logaddexp(0.0, -logits)


def bt_loss_grad(logits: np.ndarray) -> np.ndarray:
    """d softplus(-z) / dz = -sigmoid(-z)."""
    return -0.5 * (1.0 - np.tanh(0.5 * logits))


def pair_logits(basis_scores: np.ndarray, weights: np.ndarray, user_idx: np.ndarray) -> np.ndarray:
    """z_j = w_{u_j} . s_j for basis scores s = d A^T (n, B)."""
    return np.einsum("nb,nb->n", basis_scores, weights[user_idx])


def segment_sum(values: np.ndarray, user_idx: np.ndarray, n_users: int) -> np.ndarray:
    """Sum rows of `values` (n, ...) per user -> (n_users, ...), without a Python loop (sort + reduceat)."""
    out = np.zeros((n_users,) + values.shape[1:], dtype=np.result_type(values, np.float32))
    if user_idx.size == 0:
        return out
    order = np.argsort(user_idx, kind="stable")
    sorted_idx = user_idx[order]
    starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
    out[sorted_idx[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


def per_user_mean(values: np.ndarray, user_idx: np.ndarray, n_users: int) -> np.ndarray:
    """Mean of a per-pair quantity per user (n,) -> (n_users,); NaN for users without pairs."""
    counts = np.bincount(user_idx, minlength=n_users).astype(np.float64)
    sums = np.bincount(user_idx, weights=values, minlength=n_users)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def per_user_accuracy(logits: np.ndarray, user_idx: np.ndarray, n_users: int) -> np.ndarray:
    """Per-user pair accuracy with a strict `> 0` (a tie is an error), as the LoRe paper reports."""
    return per_user_mean((logits > 0).astype(np.float64), user_idx, n_users)


def mean_user_accuracy(logits: np.ndarray, user_idx: np.ndarray, n_users: int) -> float:
    """Unweighted mean over users (every user counts the same) of per-user accuracy."""
    acc = per_user_accuracy(logits, user_idx, n_users)
    acc = acc[~np.isnan(acc)]
    return float(acc.mean()) if acc.size else float("nan")


def user_basis_directions(
    basis: np.ndarray, weights: np.ndarray, diff: np.ndarray, user_idx: np.ndarray, n_users: int
) -> np.ndarray:
    """v_i = (1/n_i) sum_{j in i} dloss/dz_j d_j  (n_users, D).

    User i's gradient of its mean loss w.r.t. the basis is the rank-one matrix w_i (x) v_i.
    """
    logits = pair_logits(diff @ basis.T, weights, user_idx)
    g = bt_loss_grad(logits)
    counts = np.maximum(np.bincount(user_idx, minlength=n_users), 1)
    return segment_sum(g[:, None] * diff, user_idx, n_users) / counts[:, None]
