"""One-run canary audit of the run that really happened (Steinke, Nasr & Jagielski, NeurIPS 2023; canary clients as
in Andrew et al., ICLR 2024), from the noisy sums the run released, never from a re-simulation.

Inputs: the released noisy sums S_t (R, B, D) of a user-level DP run (read from its verified release record: the
recorded mean updates times the fixed denominator q N, which the record proves drove the released bases), the
auditor's canary directions u_j (K, B, D) and coins, and what the ledger claims (z, C, q, epsilon).
Each canary whose coin said "in" added C u_j to every round in which the server sampled it (about q R rounds).
Scoring, for each canary:
1. The real users' updates drift in a few directions round after round; in those directions the released sums
   carry more energy than the claimed noise could give (singular values above the Marchenko-Pastur edge
   z C (sqrt(R) + sqrt(B D)) of pure noise). They are projected out of every u_j (a random u_j loses almost
   nothing: its share of a k-dimensional subspace is about k / (B D)).
2. x_tj = <S_t, u_j'> / C with u_j' the projected unit direction: under the claim, N(1, z^2) in a round where the
   canary took part, N(0, z^2) otherwise, so the score is the log-likelihood ratio of "sampled with probability q
   each round" against "absent": llr_j = sum_t log(1 - q + q exp((x_tj - 1/2) / z^2)).
Guessing "in" for the k highest scores, for each k of a grid (Bonferroni over the grid), gives the one-run lower
bound on epsilon. Verdict: fail if the bound exceeds the ledger's epsilon (the run leaks more than it claims);
inconclusive if even all guesses right could not certify more than the claim (too few canaries for this epsilon);
pass otherwise. The Gaussian estimate (Andrew et al.) is reported beside it, not used for the verdict.
"""

from __future__ import annotations

import numpy as np

from lore_core.audits.statistics import AuditInputError, auc, gaussian_epsilon_estimate, one_run_audit, one_run_epsilon

GUESSES = (10, 20, 50, 100, 200, 300, 400, 500, 1000, 2000)


def signal_subspace(sums: np.ndarray, noise_std: float) -> np.ndarray:
    """Orthonormal rows (k, d) of the directions in which the released sums (R, d) carry more energy than noise of
    std `noise_std` per entry could (singular values above noise_std * (sqrt(R) + sqrt(d)))."""
    _, singular, vt = np.linalg.svd(sums, full_matrices=False)
    edge = noise_std * (np.sqrt(sums.shape[0]) + np.sqrt(sums.shape[1]))
    return vt[singular > edge]


def canary_scores(sums: np.ndarray, directions: np.ndarray, *, noise_multiplier: float, clip_norm: float,
                  sample_rate: float) -> tuple[np.ndarray, int]:
    """Log-likelihood-ratio score (K,) of each canary direction (K, d) on the released sums (R, d); also the number
    of signal directions projected out."""
    signal = signal_subspace(sums, noise_multiplier * clip_norm)
    projected = directions - (directions @ signal.T) @ signal
    projected /= np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-300)
    x = projected @ sums.T / clip_norm  # (K, R)
    z, q = noise_multiplier, sample_rate
    absent = np.log1p(-q) if q < 1 else -np.inf
    return np.logaddexp(absent, np.log(q) + (x - 0.5) / (z * z)).sum(axis=1), int(signal.shape[0])


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
    scores, removed = canary_scores(sums, directions, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                    sample_rate=sample_rate)
    bound = one_run_audit(scores, included, delta=delta, alpha=alpha, guesses=guesses)
    best_case = max(one_run_epsilon(included.size, k, k, delta=delta, alpha=alpha / len(guesses))
                    for k in guesses if k <= included.sum())
    estimate = gaussian_epsilon_estimate(scores[included], scores[~included], delta=delta)
    lb = bound["epsilon_lb"]
    if lb > claimed_epsilon:
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
        "signal_directions_removed": removed, "noise_multiplier_claimed": noise_multiplier, "clip_norm": clip_norm,
        "sample_rate": sample_rate, "delta": delta, "alpha": alpha,
        "score_in": np.sort(scores[included]).round(4).tolist(), "score_out": np.sort(scores[~included]).round(4).tolist(),
        "method": "released noisy sums (verified release record) scored per canary by the log-likelihood ratio of "
                  "Poisson participation under the claimed z, after projecting out the directions whose energy "
                  "exceeds the claimed noise; Steinke-Nasr-Jagielski one-run bound over top-k guesses (Bonferroni "
                  "over k); Gaussian estimate (Andrew et al.) for information",
        "trials": int(included.size),
    }
