"""Update-leakage audit: what the server learns about w_i and about a user's pairs from what it observes.

With w held fixed in the local step, a client's update is rank one, dA_i = -lr w_i (x) r_i (B, D) (notes §1): the
left singular vector is w_i up to sign and scale, the right one a weighted sum of the user's pair diffs. The audit
replays the server's view per privacy mode from real client updates (computed by the caller with the client's own
code) and attacks it:
  single   one user's update of one round (modes none / user: the server sees it before clipping matters; mode
           record: the client's DP-SGD uploads themselves, clipped per pair and noised by the client's own code,
           summed over the user's rounds by the caller)
  summed   one user's uploads summed over the rounds it took part in (only differs when uploads carry local noise)
  secagg   the sum of `clients_per_round` users' clipped updates (mode user+secagg: the server sees only sums)
Recovered w_hat = top left singular vector, sign fixed to a positive sum, negatives cut, scaled onto the simplex.
Figures: mean cos(w_hat_i, w_i) with a bootstrap CI against prior-only guesses (another user's w, uniform w, the
population mean w: what an attacker knows without the user's update), and the AUC of telling the user's own training
pairs from its held-out pairs by |cos(v, d)| with the right singular vector v.
At rank 1 (B = 1) w = 1 for every user, so recovering it tells nothing: the verdict is then about the pairs alone
(`w_applicable` False), which the update still carries.
"""

from __future__ import annotations

import numpy as np

from lore_core.audits.not_applicable import RANK_ONE_REASON, is_rank_one
from lore_core.audits.statistics import AuditInputError, auc, bootstrap_mean_ci, delong_auc_ci

VIEWS = ("single", "summed", "secagg")
MODE_VIEW = {"none": "single", "user": "single", "record": "single", "user-local": "summed", "user+secagg": "secagg"}
# Record mode: a user's uploads over R rounds, each with fresh noise, carry R times the signal and sqrt(R) times the
# noise, so the audit attacks their sum over as many rounds as the run's users took part in (the ledger's median),
# at most MAX_RECORD_ROUNDS (the cost is one DP-SGD run per user and round; past it the audit says it measured less).
MAX_RECORD_ROUNDS = 20


def _rounds(count: int) -> str:
    return f"{count} round{'s' if count != 1 else ''}"


def record_scope(rounds: int, ledger_rounds: int | None) -> str:
    """What a record-mode audit measured: `rounds` uploads per user summed, against the run's `ledger_rounds` (None:
    no ledger; 0: a ledger that lists no client's spending)."""
    of_run = ("no ledger: the run's participation is unknown" if ledger_rounds is None else
              "the ledger lists no client's spending: no record-mode upload left a device in this run (a budget "
              "that refused every round, or a run in another mode), so the upload attacked here was never sent"
              if ledger_rounds == 0 else
              f"the run's users took part in {_rounds(ledger_rounds)} (median in its ledger)")
    capped = ledger_rounds is not None and rounds < ledger_rounds
    return (f"each user's DP-SGD uploads summed over {_rounds(rounds)} (the client's own "
            f"code, fresh noise each round, the run's basis held fixed); {of_run}"
            + (f"; capped at {MAX_RECORD_ROUNDS}: the rounds beyond carry more signal and are not measured"
               if capped else ""))
# A leak must beat the best prior-only guess by this much mean cosine (lower CI bound) to count as "leak":
# smaller gains are within what a population-level attacker already knows.
COSINE_MARGIN = 0.02
AUC_MARGIN = 0.05


def recover_from_updates(updates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched SVD attack. updates (U, B, D) -> (w_hat (U, B) on the simplex, v (U, D) unit right singular vectors,
    sigma2/sigma1 (U,): ~0 for a rank-one update)."""
    updates = np.asarray(updates, dtype=np.float64)
    if updates.ndim != 3:
        raise AuditInputError(f"updates must be (U, B, D); got shape {updates.shape}")
    left, sing, right = np.linalg.svd(updates, full_matrices=False)
    u1, v1 = left[:, :, 0], right[:, 0, :]
    sign = np.where(u1.sum(axis=1) < 0, -1.0, 1.0)  # w >= 0, so its direction has a positive sum
    u1, v1 = u1 * sign[:, None], v1 * sign[:, None]
    w_hat = np.clip(u1, 0.0, None)
    total = w_hat.sum(axis=1, keepdims=True)
    n_basis = updates.shape[1]
    w_hat = np.where(total > 0, w_hat / np.where(total > 0, total, 1.0), 1.0 / n_basis)
    ratio = sing[:, 1] / np.maximum(sing[:, 0], 1e-300) if sing.shape[1] > 1 else np.zeros(len(updates))
    return w_hat, v1, ratio


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos of matching rows (n, k) x (n, k) -> (n,)."""
    num = np.einsum("nk,nk->n", a, b)
    return num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)


def clip_rows(updates: np.ndarray, clip_norm: float | None) -> np.ndarray:
    """Flat L2 clip per user (the same rule as lore_core.privacy.dp_fedavg.clip_updates)."""
    if clip_norm is None:
        return updates
    norms = np.linalg.norm(updates.reshape(len(updates), -1), axis=1)
    return updates * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-300))[:, None, None]


def server_view(updates: np.ndarray, view: str, *, clients_per_round: int, rounds_per_user: int, clip_norm: float | None,
                local_noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """What the server holds for each user: (observed (G, B, D), group (U,) index of each user's observation).

    single: each user's one upload; summed: sum of `rounds_per_user` uploads (fresh local noise each); secagg: users
    shuffled into rounds of `clients_per_round`, each round's sum shared by its members. local_noise = std of the
    per-entry Gaussian noise a client adds to its (clipped) upload, in units of clip_norm (or absolute if no clip)."""
    if view not in VIEWS:
        raise AuditInputError(f"view must be one of {VIEWS}; got {view!r}")
    clipped = clip_rows(updates, clip_norm)
    n_users = len(updates)
    std = local_noise * (clip_norm if clip_norm is not None else 1.0)
    if view == "single":
        return clipped + std * rng.standard_normal(clipped.shape), np.arange(n_users)
    if view == "summed":
        noise = std * np.sqrt(rounds_per_user) * rng.standard_normal(clipped.shape)  # sum of R independent draws
        return rounds_per_user * clipped + noise, np.arange(n_users)
    if clients_per_round < 1:
        raise AuditInputError(f"clients_per_round must be >= 1; got {clients_per_round}")
    order = rng.permutation(n_users)
    group = np.empty(n_users, dtype=np.int64)
    group[order] = np.arange(n_users) // clients_per_round
    sums = np.zeros((group.max() + 1,) + updates.shape[1:])
    np.add.at(sums, group, clipped + std * rng.standard_normal(clipped.shape))
    return sums, group


def prior_guesses(true_weights: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Cosines (U,) of guesses that use no per-user information: another random user's w, uniform w, and the
    leave-one-out population mean w (the best of the three is the chance level a leak must beat)."""
    n_users, n_basis = true_weights.shape
    other = (np.arange(n_users) + rng.integers(1, max(n_users, 2), n_users)) % n_users
    loo_mean = (true_weights.sum(axis=0)[None, :] - true_weights) / max(n_users - 1, 1)
    return {
        "random_user": row_cosine(true_weights[other], true_weights),
        "uniform": row_cosine(np.full_like(true_weights, 1.0 / n_basis), true_weights),
        "population_mean": row_cosine(loo_mean, true_weights),
    }


def pair_membership_scores(v: np.ndarray, diff: np.ndarray, user_idx: np.ndarray) -> np.ndarray:
    """|cos(v_user, d)| per pair (n,) for unit v (U, D), diffs (n, D), user_idx (n,)."""
    dots = np.einsum("nd,nd->n", diff, v[user_idx])
    return np.abs(dots) / np.maximum(np.linalg.norm(diff, axis=1), 1e-300)


def update_leakage_audit(
    updates: np.ndarray,
    true_weights: np.ndarray,
    member_diff: np.ndarray,
    member_user: np.ndarray,
    nonmember_diff: np.ndarray,
    nonmember_user: np.ndarray,
    *,
    mode: str = "none",
    clients_per_round: int = 50,
    rounds_per_user: int = 1,
    clip_norm: float | None = None,
    local_noise: float = 0.0,
    record_scope_text: str | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Attack every view; the verdict is about the view of `mode` (MODE_VIEW).

    updates (U, B, D) and true_weights (U, B): per user, from the client's own code; member_* (n, D) / (n,): each
    user's training pairs (row user index into U); nonmember_*: the same users' held-out pairs. Mode record: updates
    are what the server holds of each user (its DP-SGD uploads, summed over its rounds) and `record_scope_text` says
    over how many (record_scope)."""
    if mode not in MODE_VIEW:
        raise AuditInputError(f"mode must be one of {sorted(MODE_VIEW)}; got {mode!r}")
    updates = np.asarray(updates, dtype=np.float64)
    true_weights = np.asarray(true_weights, dtype=np.float64)
    if updates.ndim != 3 or true_weights.shape != updates.shape[:2]:
        raise AuditInputError(f"updates (U, B, D) and true_weights (U, B) must match; got {updates.shape} and "
                              f"{true_weights.shape}")
    if len(updates) < 2:
        raise AuditInputError(f"need at least 2 users; got {len(updates)}")
    rng = np.random.default_rng(seed)
    priors = prior_guesses(true_weights, rng)
    prior_figures = {name: {"mean": float(c.mean()), "ci": bootstrap_mean_ci(c, n_boot=n_boot, alpha=alpha, rng=rng)}
                     for name, c in priors.items()}
    chance_name = max(prior_figures, key=lambda k: prior_figures[k]["mean"])
    labels = np.r_[np.ones(len(member_user), bool), np.zeros(len(nonmember_user), bool)]
    views = {}
    # record mode: the updates are already what the server holds (summed over the rounds `rounds_per_user` says);
    # re-deriving sums or SecAgg sums of them described views no record run has (a tester)
    for view in (("single",) if mode == "record" else VIEWS):
        observed, group = server_view(updates, view, clients_per_round=clients_per_round,
                                      rounds_per_user=rounds_per_user, clip_norm=clip_norm, local_noise=local_noise,
                                      rng=rng)
        w_hat, v, ratio = recover_from_updates(observed)
        cos = row_cosine(w_hat[group], true_weights)
        gain = cos - priors[chance_name]
        scores = np.r_[pair_membership_scores(v[group], member_diff, member_user),
                       pair_membership_scores(v[group], nonmember_diff, nonmember_user)]
        pair_auc = auc(scores, labels)
        views[view] = {
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "cosine_ci": bootstrap_mean_ci(cos, n_boot=n_boot, alpha=alpha, rng=rng),
            "gain_over_chance": float(gain.mean()),
            "gain_ci": bootstrap_mean_ci(gain, n_boot=n_boot, alpha=alpha, rng=rng),
            "pair_membership_auc": float(pair_auc),
            "pair_membership_auc_ci": delong_auc_ci(scores, labels, alpha=alpha),
            "sigma2_over_sigma1_median": float(np.median(ratio)),
            "observations": int(len(observed)),
            "cosines_sample": [round(float(c), 4) for c in cos[:400]],
        }
    target = views[MODE_VIEW[mode]]
    w_applicable = not is_rank_one(updates.shape[1])  # rank 1: w = 1 for everybody, recovering it tells nothing
    leaks_w = w_applicable and target["gain_ci"][0] > COSINE_MARGIN
    leaks_pairs = target["pair_membership_auc_ci"][0] > 0.5 + AUC_MARGIN
    leak = leaks_w or leaks_pairs
    # Too few users to tell: the CIs reach past the margins without clearing them (e.g. 6 users at rank 2, where the
    # best prior guess already has cosine 0.9). Not "at chance", which would claim what was not measured.
    unsure = not leak and ((w_applicable and target["gain_ci"][1] > COSINE_MARGIN)
                           or target["pair_membership_auc_ci"][1] > 0.5 + AUC_MARGIN)
    verdict = "leak" if leak else "inconclusive" if unsure else "no-leak"
    chance = prior_figures[chance_name]
    verdict_text = {"leak": "LEAK", "inconclusive": "inconclusive", "no-leak": "no leak"}[verdict]
    auc_ci = target["pair_membership_auc_ci"]
    if w_applicable:
        finding = (f"from the {MODE_VIEW[mode]} view (mode {mode}) the server recovers w with mean cosine "
                   f"{target['cosine_mean']:.3f} [{target['cosine_ci'][0]:.3f}, {target['cosine_ci'][1]:.3f}] vs "
                   f"{chance['mean']:.3f} for the best guess without the update ({chance_name}); pair-membership AUC "
                   f"{target['pair_membership_auc']:.3f}. ")
        margins = f"({COSINE_MARGIN} in cosine, {0.5 + AUC_MARGIN} in AUC)"
    else:
        finding = (f"from the {MODE_VIEW[mode]} view (mode {mode}) the server tells a user's training pairs from its "
                   f"held-out pairs with AUC {target['pair_membership_auc']:.3f} [{auc_ci[0]:.3f}, {auc_ci[1]:.3f}]; "
                   f"recovering w is not applicable: {RANK_ONE_REASON}. ")
        margins = f"({0.5 + AUC_MARGIN} in AUC)"
    scope = (record_scope_text or record_scope(1, None)) if mode == "record" else None
    if scope:
        finding += f"Measured on {scope}. "
    sentence = (
        f"{verdict_text}: {finding}"
        + {"leak": "Hide single updates from the server (SecAgg with many users per round, or local noise)"
                   + (" or treat w_i as known to the server." if w_applicable else "."),
           "inconclusive": f"The confidence intervals reach past the margins {margins} without clearing them: too "
                           f"wide to tell over {len(updates)} users; audit a larger population.",
           "no-leak": "At chance: the server's view does not single out users' "
                      + ("w or pairs." if w_applicable else "pairs.")}[verdict]
    )
    return {
        "audit": "update-leakage", "verdict": verdict, "passed": verdict == "no-leak", "summary": sentence,
        "mode": mode, "view": MODE_VIEW[mode], "users": int(len(updates)), "rank": int(updates.shape[1]),
        "clients_per_round": clients_per_round, "rounds_per_user": rounds_per_user, "clip_norm": clip_norm,
        "local_noise": local_noise, "views": views, "chance": prior_figures, "chance_level": chance_name,
        "leaks_w": bool(leaks_w), "leaks_pairs": bool(leaks_pairs), "w_applicable": w_applicable,
        "method": "batched SVD of the observed update(s); w_hat = top left singular vector on the simplex; pair "
                  "membership |cos(v, d)| with the top right singular vector; bootstrap percentile CIs over users "
                  f"(DeLong normal CI for the pair AUC); leak = gain over the best prior-only guess with CI above {COSINE_MARGIN} or pair "
                  f"AUC CI above {0.5 + AUC_MARGIN}; inconclusive = neither, with a CI reaching past its "
                  "margin" + ("" if w_applicable else "; rank 1: w not judged (the same for every user)"),
        "seed": seed, "trials": int(len(updates)), "n_boot": n_boot, "alpha": alpha,
        **({"scope": scope} if scope else {}),
    }
