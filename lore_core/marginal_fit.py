"""The basis by marginal likelihood: each user's w integrated out instead of fitted (thin users).

With 5-15 pairs a user's fitted w overfits its few pairs, and the basis learned jointly with those fitted w's
follows the overfit (the joint estimate of the basis is not consistent when users stay thin as their number grows).
Integrating w over a prior removes that: each user contributes log p(pairs_u | A) = log mean_m p(pairs_u | w_m, A)
over fixed draws w_m of the prior, uniform on the simplex (Dirichlet(1), plus its corners and centre). The
objective, per pair of each user and every user weighed the same as in `joint_trainer`, is
    mean_u [ -log p(pairs_u | A) / n_u ]  +  l2 * ||A||_F^2
and depends on A only. A user's own w is still fitted afterwards the way it is reported (personal prior, on the
device); only the basis changes. `lore-fed train` offers it as a candidate of its held-out selection
(`objective` "marginal"; the torch objective is `joint_trainer.MarginalObjective`), and federated clients send its
per-user gradient (`marginal_user_gradients`). Numpy only: federated clients and devices import it.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

OBJECTIVES = ("joint", "marginal")  # how a basis is fit: w fitted with it, or w integrated out (this module)
WEIGHTINGS = ("user", "pair")  # how much each user pulls it: its mean loss once, or each pair once (user_shares)
# Chosen on pilot populations (bench_results/pair_weighting_pilot.md: +0.48 points on average over 16 pilot cells,
# +2 to +4 where users' pair counts are heavy-tailed). DP runs weigh users equally: the clip bounds each.
DEFAULT_WEIGHTING = "pair"
PRIOR_SAMPLES = 256  # draws of w; with the corners and the centre about 260 mixture components per user
PRIOR_SEED = 20250  # fixed: a server, its clients and a rerun use the same draws


def prior_samples(rank: int) -> np.ndarray:
    """(M, rank) fixed points of the simplex: Dirichlet(1) draws, the corners and the centre."""
    draws = np.random.default_rng([PRIOR_SEED, rank]).dirichlet(np.ones(rank), size=PRIOR_SAMPLES)
    return np.vstack([draws, np.eye(rank), np.full((1, rank), 1.0 / rank)])


def marginal_user_gradients(basis: np.ndarray, diff: np.ndarray, user_idx: np.ndarray, n_users: int) -> np.ndarray:
    """Per-user gradient of -log p(pairs_u | A) / n_u with respect to A: (U, B, D), numpy, vectorized.

    d/dA = -(1/n_u) sum_j (sum_m post_um sigmoid(-z_jm) w_m) (x) d_j, with z_jm = w_m . A d_j and post_um the
    posterior weight of draw m given user u's pairs."""
    samples = prior_samples(basis.shape[0])  # (M, B)
    logits = (diff @ basis.T) @ samples.T  # (n, M)
    members = sparse.csr_matrix((np.ones(user_idx.size), (user_idx, np.arange(user_idx.size))),
                                shape=(n_users, user_idx.size))
    loglik = members @ -np.logaddexp(0.0, -logits)  # (U, M)
    loglik -= loglik.max(axis=1, keepdims=True)
    posterior = np.exp(loglik)
    posterior /= posterior.sum(axis=1, keepdims=True)
    coef = (0.5 * (1.0 - np.tanh(0.5 * logits)) * posterior[user_idx]) @ samples  # sigmoid(-z), weighted: (n, B)
    counts = np.maximum(np.bincount(user_idx, minlength=n_users), 1).astype(float)
    per_pair = sparse.diags(1.0 / counts) @ members
    return -np.stack([per_pair @ (coef[:, b, None] * diff) for b in range(basis.shape[0])], axis=1)
