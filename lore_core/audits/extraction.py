"""Extraction audit: what served personalised scores reveal about w when the basis A (B, D) is public.

A personalised score of a pair is s(d) = w . A d. With A public, B queries d_k = A^+ e_k (pseudo-inverse columns)
give s_k = w_k exactly; any B queries with A d_k linearly independent give w by least squares. The audit runs that
attack on every user's w against the scorer as served (optionally noised per query), reporting queries needed and
the recovery error, and the advice that follows. A rank-1 basis (B = 1) is `not-applicable`: w = 1 for everybody, so
a served score is the shared reward A d and recovering w reveals nothing.
"""

from __future__ import annotations

import numpy as np

from lore_core.audits.not_applicable import is_rank_one, rank_one_result
from lore_core.audits.statistics import AuditInputError
from lore_core.audits.update_leakage import row_cosine


def served_scores(basis: np.ndarray, weights: np.ndarray, queries: np.ndarray, noise_std: float,
                  rng: np.random.Generator) -> np.ndarray:
    """What a scoring endpoint returns: s = (queries A^T) w^T + noise, (U, Q) for weights (U, B), queries (Q, D)."""
    scores = weights @ (queries @ basis.T).T
    return scores + noise_std * rng.standard_normal(scores.shape) if noise_std > 0 else scores


def extract_weights(basis: np.ndarray, queries: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Least-squares w (U, B) from scores (U, Q) of queries (Q, D): solve (queries A^T) w = s."""
    design = queries @ basis.T  # (Q, B)
    solution, *_ = np.linalg.lstsq(design, scores.T, rcond=None)
    return solution.T


RECOVERED, MARGIN = 0.9, 0.02  # mean cosine of the recovered w to the true one; above the guess without queries


def _noised_verdict(noisy: list[dict], noise_std: float, n_basis: int, exact_error: float,
                    guess: float) -> tuple[str, str]:
    """Verdict and sentence for a scorer whose answers carry noise of std `noise_std`, against `guess`, the mean
    cosine of the population's mean w (what an attacker has without a query: about 0.8 for simplex weights, so a
    fixed bar of 0.5 would call worse than guessing a leak). leak: some query budget tried recovers w (mean cosine
    at least RECOVERED and half-way from the guess to 1); partial-leak: the best beats the guess by MARGIN; else
    no-leak within the largest budget (more repeats would still average the noise away)."""
    bar = max(RECOVERED, (1.0 + guess) / 2)
    found = next((n for n in noisy if n["mean_cosine"] >= bar), None)
    best = max(noisy, key=lambda n: n["mean_cosine"])
    most = noisy[-1]["queries"]
    limits = (f"Without noise {n_basis} queries recover w exactly (max error {exact_error:.1e}); averaging k repeats "
              "cuts the noise by sqrt(k), so rate-limit queries and account for them as a DP release.")
    against = f"the population's mean w, known without a query, reaches {guess:.2f}"
    if found:
        return "leak", (f"LEAK: with noise of std {noise_std:g} per served score, {found['queries']} queries recover "
                        f"every user's w (mean cosine {found['mean_cosine']:.2f}, max error "
                        f"{found['max_abs_error']:.1e}; {against}). {limits}")
    if best["mean_cosine"] > guess + MARGIN:
        return "partial-leak", (f"partial leak: with noise of std {noise_std:g} per served score, {best['queries']} "
                                f"queries recover w in part (mean cosine {best['mean_cosine']:.2f}; {against}). "
                                f"{limits}")
    return "no-leak", (f"no leak within {most} queries: with noise of std {noise_std:g} per served score the "
                       f"recovered w is no closer than a guess (mean cosine {best['mean_cosine']:.2f} at best; "
                       f"{against}). {limits}")


def extraction_audit(basis: np.ndarray, weights: np.ndarray, *, noise_std: float = 0.0,
                     noisy_queries: tuple[int, ...] = (1, 10, 100, 1000), seed: int = 0) -> dict:
    """basis (B, D) public; weights (U, B): the users' private w behind the scorer."""
    basis, weights = np.asarray(basis, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if basis.ndim != 2 or weights.ndim != 2 or weights.shape[1] != basis.shape[0]:
        raise AuditInputError(f"need basis (B, D) and weights (U, B); got {basis.shape} and {weights.shape}")
    if is_rank_one(basis.shape[0]):
        return rank_one_result(
            "extraction", "A personalised score is then the shared reward A d, the same for every user: recovering w "
            "from served scores reveals nothing about the user.", seed=seed, queries_needed=0,
            users=int(len(weights)), noise_std=noise_std)
    rng = np.random.default_rng(seed)
    n_basis = basis.shape[0]
    exact_queries = np.linalg.pinv(basis).T  # (B, D): A d_k = e_k
    rank = int(np.linalg.matrix_rank(basis))
    w_exact = extract_weights(basis, exact_queries, served_scores(basis, weights, exact_queries, 0.0, rng))
    max_error = float(np.abs(w_exact - weights).max())
    # Noised, repeated queries: averaging k repeats of B queries shrinks the noise by sqrt(k).
    noisy = []
    scale = float(np.abs(weights @ (exact_queries @ basis.T).T).mean()) or 1.0
    for repeats in noisy_queries:
        if noise_std <= 0:
            break
        queries = np.repeat(exact_queries, repeats, axis=0)
        estimate = extract_weights(basis, queries, served_scores(basis, weights, queries, noise_std, rng))
        noisy.append({"queries": int(n_basis * repeats), "max_abs_error": float(np.abs(estimate - weights).max()),
                      "mean_cosine": float(row_cosine(estimate, weights).mean())})
    exact = max_error < 1e-8
    verdict = "leak" if exact else "partial-leak"
    sentence = (
        f"{'LEAK' if exact else 'partial leak'}: {n_basis} personalised-score queries (B = basis rank {rank}) recover "
        f"every user's w with max error {max_error:.1e} when A is public. Keep personalised scores on the device; "
        "if they must be served, add noise per answer and rate-limit queries (averaging k repeats cuts the noise by "
        "sqrt(k)), and account for them as a DP release."
    )
    guess = float(row_cosine(np.broadcast_to(weights.mean(axis=0), weights.shape), weights).mean())
    if noisy:  # the scorer as served is noised: judge what the noised answers give (a tester's 1e6 still read LEAK)
        verdict, sentence = _noised_verdict(noisy, noise_std, n_basis, max_error, guess)
    return {
        "audit": "extraction", "verdict": verdict, "passed": verdict == "no-leak", "summary": sentence,
        "mean_cosine_without_queries": guess,
        "queries_needed": n_basis, "basis_rank": rank, "users": int(len(weights)), "max_abs_error": max_error,
        "mean_cosine": float(row_cosine(w_exact, weights).mean()), "noise_std": noise_std, "noisy": noisy,
        "score_scale": scale,
        "method": "queries d_k = A^+ e_k (k = 1..B) against s(d) = w . A d; least squares; noisy variant repeats the "
                  "B queries and averages",
        "seed": seed, "trials": int(len(weights)),
    }
