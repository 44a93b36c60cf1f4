"""Mechanism unit-audit through the server's own aggregation code: many runs of ONE aggregation step with a
worst-case canary user; a Clopper-Pearson lower bound on epsilon against the accountant's epsilon for that step.

`aggregate(updates (k, B, D), population) -> mean update (B, D)` is the function the server's strategy calls
(`server.aggregation.UserDpAggregator.aggregate`, or for `user+secagg` the clients' noise shares and the server's
decoding of their sum), passed in by the caller, so what is audited is the code that ran, not a copy. Each run
aggregates k fixed "other" updates plus a canary user that sends 10 C u for a random unit direction u in the "in"
runs (the clip must cap it at C u) and a zero update in the "out" runs (zero-out neighbours: the same users take
part, so in `user+secagg` the same number of noise shares is added; in `user` a zero update is no user at all). The attacker knows everything but the noise (worst case) and scores a run by
<u, released mean> q N. The step is audited without sampling (the canary is always present in "in" runs), so the
claim is the accountant's epsilon of one step at q = 1. A mechanism passes if the bound stays at or below the claim.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lore_core.audits.statistics import AuditInputError, epsilon_lower_bound, gaussian_epsilon_estimate, gdp_epsilon

CANARY_NORM_FACTOR = 10.0  # the canary sends 10 C u: only a working clip keeps its influence at C


def mechanism_audit(
    aggregate: Callable[[np.ndarray, int], np.ndarray],
    *,
    noise_multiplier: float,
    clip_norm: float,
    claimed_epsilon: float,
    denominator: float,
    population: int,
    shape: tuple[int, int] = (10, 384),
    other_updates: np.ndarray | None = None,
    runs: int = 4000,
    delta: float = 1e-5,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """`runs` in-runs and `runs` out-runs of `aggregate`. denominator: the fixed q N the mean is divided by;
    claimed_epsilon: the accountant's epsilon for one step at q = 1. other_updates (k, B, D): the other users of the
    step (none = the canary alone, also worst case). Returns the result dict with the verdict."""
    if runs < 100:
        raise AuditInputError(f"runs must be >= 100 for a meaningful Clopper-Pearson bound; got {runs}")
    shape = tuple(int(x) for x in (other_updates.shape[1:] if other_updates is not None else shape))
    others = np.zeros((0,) + shape) if other_updates is None else np.asarray(other_updates, dtype=np.float64)
    u = np.random.default_rng(seed).standard_normal(shape)
    u /= np.linalg.norm(u)
    canary = CANARY_NORM_FACTOR * clip_norm * u
    scores = {}
    for name, stack in (("in", np.concatenate([others, canary[None]])),
                        ("out", np.concatenate([others, np.zeros((1,) + shape)]))):
        scores[name] = np.array([np.sum(aggregate(stack, population) * u) * denominator for _ in range(runs)])
    bound = epsilon_lower_bound(scores["in"], scores["out"], delta=delta, alpha=alpha)
    estimate = gaussian_epsilon_estimate(scores["in"], scores["out"], delta=delta)
    shift = float(scores["in"].mean() - scores["out"].mean())
    # two standard errors of the shift: a noisy mean, negative at times (a tester read "capped at -0.376")
    margin = 2.0 * float(np.sqrt(scores["in"].var() / runs + scores["out"].var() / runs))
    passed = bound["epsilon_lb"] <= claimed_epsilon
    if passed:
        sentence = (f"PASS: empirical epsilon >= {bound['epsilon_lb']:.2f} (95% CP lower bound, {runs} runs each) is "
                    f"within the claimed {claimed_epsilon:.2f} for one step at z={noise_multiplier}, C={clip_norm}; "
                    f"a {CANARY_NORM_FACTOR:g}C canary moved the released sum by {shift:.3g} +- {margin:.2g} on "
                    f"average (the clip allows at most C = {clip_norm:g}) and the noise is as large as claimed.")
    else:
        sentence = (f"FAIL: empirical epsilon >= {bound['epsilon_lb']:.2f} exceeds the claimed {claimed_epsilon:.2f} "
                    "for one step of the server's aggregation: the released noise (or clip) is weaker than the "
                    "accountant assumes; fix the mechanism before trusting any epsilon from it.")
    return {
        "audit": "mechanism", "verdict": "pass" if passed else "fail", "passed": bool(passed), "summary": sentence,
        "source": "the server's aggregation code", "noise_multiplier_claimed": noise_multiplier,
        "clip_norm": clip_norm, "shape": list(shape), "other_users": int(len(others)),
        "canary_norm_sent": float(np.linalg.norm(canary)), "canary_shift": shift, "epsilon_lb": bound["epsilon_lb"],
        "bound": bound, "epsilon_claimed": float(claimed_epsilon),
        "epsilon_exact_gaussian": gdp_epsilon(1.0 / noise_multiplier, delta), "gaussian_estimate": estimate,
        "delta": delta, "alpha": alpha, "score_in_mean": float(scores["in"].mean()),
        "score_out_mean": float(scores["out"].mean()), "score_std": float(np.r_[scores["in"], scores["out"]].std()),
        "histogram": _histogram(scores["in"], scores["out"]),
        "method": "one aggregation step through the server's aggregation function per run, canary 10*C*u, score "
                  "<u, mean> q N, Clopper-Pearson over a 100-threshold grid with Bonferroni; claim = accountant "
                  "epsilon at q=1, 1 step",
        "seed": seed, "trials": 2 * runs, "runs_in": runs, "runs_out": runs,
    }


def _histogram(scores_in: np.ndarray, scores_out: np.ndarray, bins: int = 40) -> dict:
    edges = np.histogram_bin_edges(np.r_[scores_in, scores_out], bins=bins)
    return {"edges": edges.round(6).tolist(), "in": np.histogram(scores_in, edges)[0].tolist(),
            "out": np.histogram(scores_out, edges)[0].tolist()}
