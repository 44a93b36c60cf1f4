"""Mechanism unit-audit: many runs of ONE aggregation step of the real user-level DP mechanism with a worst-case
canary user; a Clopper-Pearson lower bound on epsilon against the accountant's epsilon for that step.

Each run aggregates k fixed "other" updates (B, D), plus, in the "in" runs, a canary that sends 10 C u for a random
unit direction u (the clip must cap it at C u). The attacker knows everything but the noise (worst case) and scores a
run by <u, released sum>. The runs are vectorized with the mechanism's own pieces (`clip_updates` per user, then
`add_noise_to_sum` on a stack of sums, / (q N)): exactly `aggregate_user_dp`, whose single-run output the result
checks against (`matches_aggregate_user_dp`). The step is audited without sampling (the canary is always present in
"in" runs), so the claim is the accountant's epsilon of one step at q = 1.
A mechanism passes if the bound stays at or below the claim. `noise_scale` < 1 builds the deliberately broken
control: it releases with noise multiplier z * noise_scale while claiming z.
"""

from __future__ import annotations

import numpy as np

from lore_core.audits.statistics import AuditInputError, epsilon_lower_bound, gaussian_epsilon_estimate, gdp_epsilon
from lore_core.privacy.accounting import epsilon as accountant_epsilon
from lore_core.privacy.dp_fedavg import add_noise_to_sum, aggregate_user_dp, clip_updates

CANARY_NORM_FACTOR = 10.0  # the canary sends 10 C u: only a working clip keeps its influence at C
BATCH_RUNS = 1000  # runs per vectorized batch (memory: BATCH_RUNS * B * D floats)


def _release(sums: np.ndarray, z: float, clip_norm: float, rate: float, population: int,
             rng: np.random.Generator) -> np.ndarray:
    """Stack of sums (R, B, D) -> released means (R, B, D): the noise draw of aggregate_user_dp, per run."""
    return add_noise_to_sum(sums, z, clip_norm, rng) / (rate * population)


def mechanism_audit(
    *,
    noise_multiplier: float,
    clip_norm: float,
    shape: tuple[int, int] = (10, 384),
    other_updates: np.ndarray | None = None,
    sample_rate: float = 1.0,
    population: int = 1,
    runs: int = 4000,
    delta: float = 1e-5,
    alpha: float = 0.05,
    noise_scale: float = 1.0,
    accountant: str = "prv",
    seed: int = 0,
) -> dict:
    """`runs` in-runs and `runs` out-runs of one step. other_updates (k, B, D): the other users of the step (real
    client updates if given; none = the canary alone, also worst case). Returns the result dict with the verdict."""
    if runs < 100:
        raise AuditInputError(f"runs must be >= 100 for a meaningful Clopper-Pearson bound; got {runs}")
    if not 0 < noise_scale:
        raise AuditInputError(f"noise_scale must be > 0; got {noise_scale}")
    shape = tuple(int(x) for x in (other_updates.shape[1:] if other_updates is not None else shape))
    others = np.zeros((0,) + shape) if other_updates is None else np.asarray(other_updates, dtype=np.float64)
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(shape)
    u /= np.linalg.norm(u)
    canary = CANARY_NORM_FACTOR * clip_norm * u
    clipped_others, _ = clip_updates(others, clip_norm) if len(others) else (others, None)
    clipped_canary, canary_norm = clip_updates(canary[None], clip_norm)
    base = clipped_others.sum(axis=0)
    z_used = noise_multiplier * noise_scale
    scale = sample_rate * population
    scores = {}
    for name, total in (("in", base + clipped_canary[0]), ("out", base)):
        chunks = []
        for start in range(0, runs, BATCH_RUNS):
            size = min(BATCH_RUNS, runs - start)
            released = _release(np.broadcast_to(total, (size,) + shape), z_used, clip_norm, sample_rate, population,
                                rng)
            chunks.append(np.einsum("rbd,bd->r", released * scale, u))
        scores[name] = np.concatenate(chunks)
    # The vectorized path must be the real mechanism: replay one run through aggregate_user_dp with the same draws.
    check_rng, replay_rng = np.random.default_rng(seed + 1), np.random.default_rng(seed + 1)
    with_canary = np.concatenate([others, canary[None]])
    real = aggregate_user_dp(with_canary, z_used, clip_norm, sample_rate, population, check_rng)
    mine = _release((base + clipped_canary[0])[None], z_used, clip_norm, sample_rate, population, replay_rng)[0]
    matches = bool(np.allclose(real, mine, rtol=1e-10, atol=1e-12))

    bound = epsilon_lower_bound(scores["in"], scores["out"], delta=delta, alpha=alpha)
    estimate = gaussian_epsilon_estimate(scores["in"], scores["out"], delta=delta)
    claim = accountant_epsilon(noise_multiplier, 1.0, 1, delta, accountant)
    exact = gdp_epsilon(1.0 / noise_multiplier, delta)
    passed = bound["epsilon_lb"] <= claim and matches
    control = "" if noise_scale == 1.0 else f" (control: noise secretly x{noise_scale:.3g})"
    if not matches:
        sentence = "FAIL: the vectorized replay does not reproduce aggregate_user_dp; the audit is not valid."
    elif passed:
        sentence = (f"PASS{control}: empirical epsilon >= {bound['epsilon_lb']:.2f} (95% CP lower bound, {runs} runs "
                    f"each) is within the claimed {claim:.2f} for one step at z={noise_multiplier}, C={clip_norm}; "
                    "the clip caps a 10C canary and the noise is as large as claimed.")
    else:
        sentence = (f"FAIL{control}: empirical epsilon >= {bound['epsilon_lb']:.2f} exceeds the claimed {claim:.2f} "
                    "for one step: the released noise (or clip) is weaker than the accountant assumes; fix the "
                    "mechanism before trusting any epsilon from it.")
    return {
        "audit": "mechanism", "verdict": "pass" if passed else "fail", "passed": bool(passed), "summary": sentence,
        "noise_multiplier_claimed": noise_multiplier, "noise_multiplier_used": z_used, "noise_scale": noise_scale,
        "clip_norm": clip_norm, "shape": list(shape), "other_users": int(len(others)),
        "canary_norm_sent": float(canary_norm[0]), "epsilon_lb": bound["epsilon_lb"], "bound": bound,
        "epsilon_claimed": claim, "epsilon_claimed_accountant": accountant, "epsilon_exact_gaussian": exact,
        "gaussian_estimate": estimate, "matches_aggregate_user_dp": matches, "delta": delta, "alpha": alpha,
        "score_in_mean": float(scores["in"].mean()), "score_out_mean": float(scores["out"].mean()),
        "score_std": float(np.r_[scores["in"], scores["out"]].std()),
        "histogram": _histogram(scores["in"], scores["out"]),
        "method": "one aggregation step of aggregate_user_dp (vectorized over runs), canary 10*C*u, score <u, sum>, "
                  "Clopper-Pearson over a 100-threshold grid with Bonferroni; claim = accountant epsilon at q=1, 1 "
                  "step",
        "seed": seed, "trials": 2 * runs, "runs_in": runs, "runs_out": runs,
    }


def _histogram(scores_in: np.ndarray, scores_out: np.ndarray, bins: int = 40) -> dict:
    edges = np.histogram_bin_edges(np.r_[scores_in, scores_out], bins=bins)
    return {"edges": edges.round(6).tolist(), "in": np.histogram(scores_in, edges)[0].tolist(),
            "out": np.histogram(scores_out, edges)[0].tolist()}
