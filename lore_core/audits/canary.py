"""One-run canary audit of the run that really happened (Steinke, Nasr & Jagielski, NeurIPS 2023; canary clients as
in Andrew et al., ICLR 2024), from the noisy sums the run released, never from a re-simulation.

Inputs: the released noisy sums S_t (R, B, D) of a user-level DP run (read from its verified release record: the
recorded mean updates times the fixed denominator q N, which the record proves drove the released bases), the
auditor's canary directions u_j (K, B, D) and coins, and what the ledger claims (z, C, q, epsilon).
Each canary whose coin said "in" added C u_j to every round in which the server sampled it (about q R rounds).
Scoring, for each canary:
1. The noise actually released: outside the span of the canaries (orthonormal, K < B D) the released sums hold
   only noise and the real users' drift; with the drift's few strong directions left out (singular values above
   the Marchenko-Pastur edge sigma (sqrt(R) + sqrt(dof)) of pure noise), their per-entry std is the noise std
   sigma actually added, whatever the ledger says (z_obs = sigma / C; the claimed z when K >= B D).
2. The real users' updates drift along a few time courses (the left singular vectors of those strong directions);
   their shadow inside the canaries' span follows the same time courses, so each canary's series is projected
   off them (a canary's participation rounds are independent of the drift: it loses k of R degrees of freedom).
3. x_tj = <S_t, u_j> / C (drift shadow removed): N(1, z_obs^2) in a round where the canary took
   part, N(0, z_obs^2) otherwise, so the score is the log-likelihood ratio of "sampled with probability q each
   round" against "absent": llr_j = sum_t log(1 - q + q exp((x_tj - 1/2) / z_obs^2)).
Any score computed from the release and the directions (never the coins) gives a valid bound; this one is sharp
exactly when the run added less noise than it claims.
Guessing "in" for the k highest scores, for each k of a grid (Bonferroni over the grid), gives the one-run lower
bound on epsilon. Verdict: fail if the bound exceeds the ledger's epsilon (the run leaks more than it claims), or if
the noise observed outside the canaries' span is below the claimed z C by more than released_noise allows (a run
whose canaries never reached the sums certifies nothing, yet its noise still shows: found by a reviewer, whose
under-noised run with failing canary nodes passed); inconclusive if even all guesses right could not certify more
than the claim (too few canaries for this epsilon); pass otherwise. The Gaussian estimate (Andrew et al.) is
reported beside it, not used for the verdict.
"""

from __future__ import annotations

import numpy as np

from lore_core.audits.released_noise import observed_noise, released_noise_check
from lore_core.audits.statistics import AuditInputError, auc, gaussian_epsilon_estimate, one_run_audit, one_run_epsilon

GUESSES = (10, 20, 50, 100, 200, 300, 400, 500, 1000, 2000)


def canary_scores(sums: np.ndarray, directions: np.ndarray, *, noise_multiplier: float, clip_norm: float,
                  sample_rate: float) -> tuple[np.ndarray, dict]:
    """Log-likelihood-ratio score (K,) of each canary direction (K, d) on the released sums (R, d), and what the
    scoring saw: the observed noise multiplier and the number of drift time courses removed."""
    sigma, drift = observed_noise(sums, directions)
    z = max(noise_multiplier if sigma is None else sigma / clip_norm, 1e-6)
    x = directions @ sums.T / clip_norm  # (K, R)
    x = x - (x @ drift) @ drift.T  # the drift's shadow in each canary's series; participation is independent of it
    q = sample_rate
    absent = np.log1p(-q) if q < 1 else -np.inf
    scores = np.logaddexp(absent, np.log(q) + (x - 0.5) / (z * z)).sum(axis=1)
    return scores, {"noise_multiplier_observed": None if sigma is None else sigma / clip_norm,
                    "drift_directions_removed": int(drift.shape[1])}


def canary_audit(sums: np.ndarray, directions: np.ndarray, included: np.ndarray, *, noise_multiplier: float,
                 clip_norm: float, sample_rate: float, claimed_epsilon: float, delta: float,
                 alpha: float = 0.05) -> dict:
    """Audit released noisy sums (R, B, D) with canaries (K, B, D) and their coins (K,). Returns the result with
    `verdict`, `epsilon_lb` and `epsilon_claimed`."""
    sums = np.asarray(sums, dtype=np.float64).reshape(len(sums), -1)
    directions = np.asarray(directions, dtype=np.float64).reshape(len(directions), -1)
    included = np.asarray(included, dtype=bool)
    if sums.shape[1] != directions.shape[1]:
        raise AuditInputError(f"canaries of {directions.shape[1]} entries against releases of {sums.shape[1]}: "
                              "the secrets file is not this run's")
    if len(sums) == 0 or not included.any() or included.all():
        raise AuditInputError(f"need released rounds and canaries on both sides of the coin; got {len(sums)} "
                              f"rounds, {int(included.sum())} of {included.size} canaries in")
    guesses = tuple(k for k in GUESSES if k <= included.size)
    if not guesses:
        raise AuditInputError(f"need at least {GUESSES[0]} canaries; got {included.size}")
    scores, seen = canary_scores(sums, directions, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                 sample_rate=sample_rate)
    noise = released_noise_check(sums, np.full(len(sums), noise_multiplier * clip_norm), directions)
    bound = one_run_audit(scores, included, delta=delta, alpha=alpha, guesses=guesses)
    best_case = max((one_run_epsilon(included.size, k, k, delta=delta, alpha=alpha / len(guesses))
                     for k in guesses if k <= included.sum()), default=0.0)  # < 10 in: nothing can be certified
    estimate = gaussian_epsilon_estimate(scores[included], scores[~included], delta=delta)
    lb = bound["epsilon_lb"]
    if noise["verdict"] == "fail":
        verdict = "fail"
        sentence = f"FAIL: {noise['summary']} (canaries' lower bound {lb:.2f}, ledger {claimed_epsilon:.2f})."
    elif lb > claimed_epsilon:
        verdict = "fail"
        sentence = (f"FAIL: {included.size} canaries certify epsilon >= {lb:.2f} ({bound['correct']} of "
                    f"{bound['guesses']} guesses right) from the released sums, above the ledger's {claimed_epsilon:.2f}: "
                    "the run leaks more than its ledger says; check the noise actually added and the clip.")
    elif best_case <= claimed_epsilon:
        verdict = "inconclusive"
        sentence = (f"INCONCLUSIVE: lower bound {lb:.2f}, but {included.size} canaries could certify at most "
                    f"{best_case:.2f} even with every guess right, not more than the ledger's {claimed_epsilon:.2f}; "
                    "use more canaries.")
    else:
        verdict = "pass"
        sentence = (f"PASS: {included.size} canaries over {len(sums)} released rounds certify epsilon >= {lb:.2f}, "
                    f"within the ledger's {claimed_epsilon:.2f} (they could have certified up to {best_case:.2f}).")
    return {
        "audit": "canary", "verdict": verdict, "passed": verdict == "pass", "summary": sentence,
        "source": "released-bases", "epsilon_lb": lb, "epsilon_claimed": float(claimed_epsilon),
        "epsilon_lb_if_all_guesses_right": best_case, "bound": bound, "gaussian_estimate": estimate,
        "auc": float(auc(scores, included)), "rounds_released": int(len(sums)), "canaries": int(included.size),
        "canaries_in": int(included.sum()), "expected_rounds_per_canary": float(sample_rate * len(sums)),
        **seen, "released_noise": noise, "noise_multiplier_claimed": noise_multiplier, "clip_norm": clip_norm,
        "sample_rate": sample_rate, "delta": delta, "alpha": alpha,
        "score_in": np.sort(scores[included]).round(4).tolist(), "score_out": np.sort(scores[~included]).round(4).tolist(),
        "method": "released noisy sums (verified release record) scored per canary by the log-likelihood ratio of "
                  "Poisson participation under the noise observed outside the canaries' span, each canary's series "
                  "projected off the real users' drift time courses; Steinke-Nasr-Jagielski one-run bound over top-k "
                  "guesses (Bonferroni over k); Gaussian estimate (Andrew et al.) for information",
        "trials": int(included.size),
    }
