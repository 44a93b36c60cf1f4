"""Membership-inference audits.

Record level (was this pair used to fit w_i?): the membership game on every user's pairs with the basis A fixed.
Each candidate pair joins the target's training set with probability 1/2; the target w_i is fitted on its members
with the real solver (lore_core.simplex_fit, batched over users). Attacks on the pair logit z = w_i . A d:
- loss threshold (Yeom et al. 2018): lower loss softplus(-z) = "member";
- online LiRA (Carlini et al., S&P 2022): `shadows` random halves per user are fitted (all users and shadows in one
  batched solve: the fits are 10-parameter problems), giving each candidate's z distribution when in and when out;
  score = Gaussian log-likelihood ratio with per-candidate means and global variances.
User level (was this user in training?): members are the seen users, non-members the unseen ones; each is scored by
how well the released basis explains n of its pairs (mean loss at its own fitted w on those pairs, lower = member),
with n the same for everybody.
Figures: AUC (DeLong CI), TPR at 1% and 0.1% FPR, Clopper-Pearson epsilon lower bound at the best threshold.
At rank 1 (B = 1) the record level is `not-applicable` (w = 1 whatever pairs it is fitted on); the user level, a
question about the released basis, still runs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lore_core.audits.statistics import (
    AuditInputError,
    auc,
    delong_auc_ci,
    epsilon_lower_bound,
    roc_curve,
    tpr_at_fpr,
)
from lore_core.audits.not_applicable import is_rank_one, rank_one_result
from lore_core.reward_math import bt_loss
from lore_core.simplex_fit import DEFAULT_PRIOR_STRENGTH, fit_user_weights, prior_from_pairs


class Prior(NamedTuple):
    """A personal prior worth `pairs` of each fit's own pairs (lam_u = pairs / n_u, as devices fit w), where a bare
    float is one strength for every user."""

    pairs: float


SHADOW_CHUNK_ROWS = 400_000  # rows per batched shadow solve (memory ~ rows * B^2 floats)


def _fit(scores: np.ndarray, user_idx: np.ndarray, n_users: int, prior: float | Prior) -> np.ndarray:
    strength = prior_from_pairs(user_idx, n_users, prior.pairs) if isinstance(prior, Prior) else prior
    return fit_user_weights(scores, user_idx, n_users, prior_strength=strength, max_iter=200, tol=1e-9).weights


def _shadow_logits(scores: np.ndarray, user_idx: np.ndarray, n_users: int, masks: np.ndarray, prior: float | Prior
                   ) -> np.ndarray:
    """z of every candidate under every shadow fit: masks (S, n) bool (in-sets) -> logits (S, n)."""
    n_shadows, n = masks.shape
    per_chunk = max(1, SHADOW_CHUNK_ROWS // max(n, 1))
    out = np.empty((n_shadows, n))
    for start in range(0, n_shadows, per_chunk):
        chunk = masks[start:start + per_chunk]
        s_idx, rows = np.nonzero(chunk)
        virtual = s_idx * n_users + user_idx[rows]  # one virtual user per (shadow, user)
        w = _fit(scores[rows], virtual, len(chunk) * n_users, prior).reshape(len(chunk), n_users, -1)
        out[start:start + len(chunk)] = np.einsum("nb,snb->sn", scores, w[:, user_idx, :])
    return out


def _attack_figures(scores: np.ndarray, is_member: np.ndarray, *, delta: float, alpha: float) -> dict:
    fpr, tpr, _ = roc_curve(scores, is_member)
    keep = np.unique(np.r_[np.linspace(0, fpr.size - 1, 200).astype(int), fpr.size - 1])
    return {
        "auc": float(auc(scores, is_member)), "auc_ci": delong_auc_ci(scores, is_member, alpha=alpha),
        "tpr_at_1pct_fpr": tpr_at_fpr(scores, is_member, 0.01),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(scores, is_member, 0.001),
        "epsilon_lb": epsilon_lower_bound(scores[is_member], scores[~is_member], delta=delta, alpha=alpha),
        "roc": {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()},
    }


def record_membership_audit(
    basis: np.ndarray,
    diff: np.ndarray,
    user_idx: np.ndarray,
    n_users: int,
    *,
    shadows: int = 64,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    prior_pairs: float | None = None,
    delta: float = 1e-5,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Candidates: pairs diff (n, D) of users user_idx (n,) in [0, n_users); basis (B, D). prior_pairs: fit w as the
    run's devices do (a prior worth that many of the fit's pairs, `lore-fed audit` passes the basis file's) instead
    of one `prior_strength` for everybody."""
    if shadows < 4:
        raise AuditInputError(f"LiRA needs at least 4 shadow fits; got {shadows}")
    if is_rank_one(np.shape(basis)[0]):
        return rank_one_result(
            "membership", "w_i is 1 whatever pairs it is fitted on, so it cannot tell which pairs those were. Whether "
            "a user took part at all is a question about the basis: `lore-fed audit membership --level user`.",
            seed=seed, level="record", candidates=int(len(diff)), users=int(n_users), shadows=shadows, delta=delta,
            alpha=alpha)
    rng = np.random.default_rng(seed)
    scores = np.asarray(diff, dtype=np.float64) @ np.asarray(basis, dtype=np.float64).T  # (n, B)
    member = rng.random(len(scores)) < 0.5
    prior = prior_strength if prior_pairs is None else Prior(float(prior_pairs))
    target_w = _fit(scores[member], user_idx[member], n_users, prior)
    z = np.einsum("nb,nb->n", scores, target_w[user_idx])
    masks = rng.random((shadows, len(scores))) < 0.5
    shadow_z = _shadow_logits(scores, user_idx, n_users, masks, prior)
    counts_in, counts_out = masks.sum(axis=0), (~masks).sum(axis=0)
    mu_in = np.where(masks, shadow_z, 0).sum(axis=0) / np.maximum(counts_in, 1)
    mu_out = np.where(~masks, shadow_z, 0).sum(axis=0) / np.maximum(counts_out, 1)
    var_in = np.sum(np.where(masks, shadow_z - mu_in, 0) ** 2) / max(masks.sum() - 1, 1)
    var_out = np.sum(np.where(~masks, shadow_z - mu_out, 0) ** 2) / max((~masks).sum() - 1, 1)
    lira = -(z - mu_in) ** 2 / (2 * var_in) + (z - mu_out) ** 2 / (2 * var_out) - 0.5 * np.log(var_in / var_out)
    # The verdict reads the better of two attacks, so each is judged at alpha / 2 (Bonferroni): at alpha each, the
    # pick alone would raise the false-leak rate (a tester's "LEAK" whose interval began at 0.5004)
    each = alpha / 2
    attacks = {"loss_threshold": _attack_figures(-bt_loss(z), member, delta=delta, alpha=each),
               "lira": _attack_figures(lira, member, delta=delta, alpha=each)}
    best = max(attacks, key=lambda k: attacks[k]["auc"])
    fig = attacks[best]
    leak = fig["auc_ci"][0] > 0.5
    sentence = (f"{'LEAK' if leak else 'no leak'}: whether a pair was used to fit w_i is guessed with AUC "
                f"{fig['auc']:.3f} [{fig['auc_ci'][0]:.3f}, {fig['auc_ci'][1]:.3f}] ({best}; a {100 * (1 - each):g} % "
                f"interval, as the better of two attacks), TPR "
                f"{fig['tpr_at_1pct_fpr']:.3f} at 1% FPR, epsilon >= {fig['epsilon_lb']['epsilon_lb']:.2f}. "
                + ("w_i remembers its pairs: treat w_i (and anything derived from it) as personal data."
                   if leak else "w_i does not single out its training pairs at this sample size."))
    return {
        "audit": "membership", "level": "record", "verdict": "leak" if leak else "no-leak", "passed": not leak,
        "summary": sentence, "attacks": attacks, "best_attack": best, "candidates": int(len(scores)),
        "members": int(member.sum()), "users": int(n_users), "shadows": shadows, "delta": delta, "alpha": alpha,
        "alpha_per_attack": each,
        **({"prior_pairs": float(prior_pairs)} if prior_pairs is not None else {"prior_strength": prior_strength}),
        "method": "membership game (each pair in w.p. 1/2), target and shadow w fitted with the batched simplex "
                  "solver at the fixed basis; loss threshold and online LiRA (per-candidate means, global variances); "
                  "DeLong AUC CI; Clopper-Pearson epsilon LB over a Bonferroni-corrected threshold grid; each attack "
                  "at alpha / 2, as the verdict reads the better one",
        "seed": seed, "trials": int(len(scores)),
    }


def user_membership_audit(
    basis: np.ndarray,
    diff: np.ndarray,
    user_idx: np.ndarray,
    is_member_user: np.ndarray,
    *,
    pairs_per_user: int | None = None,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    delta: float = 1e-5,
    alpha: float = 0.05,
    seed: int = 0,
    trained_mode: str | None = None,
) -> dict:
    """diff (n, D), user_idx (n,) in [0, U): each user's pairs as seen by training (members: its training pairs;
    non-members: pairs never used for the basis); is_member_user (U,) bool. Uses the first `pairs_per_user`
    (default: the smallest count) pairs of each user so that every user is scored on the same amount of data."""
    is_member_user = np.asarray(is_member_user, dtype=bool)
    n_users = is_member_user.size
    counts = np.bincount(user_idx, minlength=n_users)
    have = counts > 0
    n_keep = int(pairs_per_user or counts[have].min())
    order = np.argsort(user_idx, kind="stable")
    rank_in_user = np.empty(len(user_idx), dtype=np.int64)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rank_in_user[order] = np.arange(len(user_idx)) - starts[user_idx[order]]
    keep = rank_in_user < n_keep
    users = have & (counts >= n_keep)
    if users[is_member_user].sum() < 2 or users[~is_member_user].sum() < 2:
        raise AuditInputError("user-level membership needs at least 2 member and 2 non-member users with "
                              f"{n_keep} pairs each")
    keep &= users[user_idx]
    scores = np.asarray(diff, dtype=np.float64)[keep] @ np.asarray(basis, dtype=np.float64).T
    idx = user_idx[keep]
    w = _fit(scores, idx, n_users, prior_strength)
    loss = np.bincount(idx, weights=bt_loss(np.einsum("nb,nb->n", scores, w[idx])), minlength=n_users)
    user_score = -loss[users] / n_keep
    labels = is_member_user[users]
    fig = _attack_figures(user_score, labels, delta=delta, alpha=alpha)
    leak = fig["auc_ci"][0] > 0.5
    sentence = (f"{'LEAK' if leak else 'no leak'}: whether a user took part in training is guessed from the released "
                f"basis with AUC {fig['auc']:.3f} [{fig['auc_ci'][0]:.3f}, {fig['auc_ci'][1]:.3f}] ({n_keep} pairs "
                f"per user), epsilon >= {fig['epsilon_lb']['epsilon_lb']:.2f}. "
                + (_leak_advice(trained_mode) if leak
                   else "The released basis does not single out its training users at this sample size."))
    return {
        "audit": "membership", "level": "user", "verdict": "leak" if leak else "no-leak", "passed": not leak,
        "summary": sentence, "attacks": {"fit_loss": fig}, "best_attack": "fit_loss",
        "members": int(labels.sum()), "non_members": int((~labels).sum()), "pairs_per_user": n_keep,
        "delta": delta, "alpha": alpha,
        "method": "score = -(mean BT loss of the user's first n pairs at its own w fitted on them under the released "
                  "basis); DeLong AUC CI; Clopper-Pearson epsilon LB",
        "seed": seed, "trials": int(users.sum()),
    }


def _leak_advice(trained_mode: str | None) -> str:
    """What to do about a user-level leak, given how the run was trained (None: unknown)."""
    if trained_mode in ("user", "user+secagg"):
        return ("The run is already user-level DP: compare epsilon_lb with the ledger's epsilon, and check the noise "
                "that was really added with `lore-fed audit canary`.")
    return "Train with user-level DP (mode user) before releasing the basis."
