"""One-run canary audit (Steinke, Nasr & Jagielski, NeurIPS 2023; Andrew et al., ICLR 2024) of a DP-FedAvg run.

What is simulated (and why it is faithful): the released sequence of a user-level DP-FedAvg run, round by round, with
the real mechanism pieces (`poisson_sample`, `clip_updates`, `add_noise_to_sum`, fixed denominator q N) over the
run's real client updates (N users, (B, D) each, computed by the caller with the client code at the run's basis and
held fixed over rounds: the basis evolves in a real run, but only the canaries' contribution to the released sum
matters for the audit) plus `canaries` canary users. Each canary j is inserted with probability 1/2 and, whenever
Poisson sampling picks it, uploads C u_j for a random unit direction u_j (B*D dims; random canaries suffice for a
linear aggregate, notes §10). The auditor sees only the released means Delta_t and scores each canary by
    llr_j = sum_t log(1 - q + q exp(s_tj / z - 1 / (2 z^2))),   s_tj = <q N Delta_t, u_j> / (z C),
the likelihood ratio of "sampled with prob. q" vs "absent" under the CLAIMED z. Guessing "in" for the top-k scores
gives the one-run lower bound (Bonferroni over k) and the in/out score means the Gaussian estimate.
Verdict: fail if the lower bound exceeds the claimed epsilon, or the Gaussian estimate exceeds it (the estimate is not
a bound, but the one-run bound saturates near 3.7 with 200 guesses, so the estimate is the red flag at large
epsilon). `noise_scale` < 1 secretly shrinks the noise: the control that must be flagged.
"""

from __future__ import annotations

import numpy as np

from lore_core.audits.statistics import AuditInputError, auc, gaussian_epsilon_estimate, one_run_audit
from lore_core.privacy.accounting import epsilon as accountant_epsilon
from lore_core.privacy.dp_fedavg import add_noise_to_sum, clip_updates, poisson_sample

GUESSES = (10, 20, 50, 100, 200)


def _round_sums(real: np.ndarray, canary_dirs: np.ndarray, canary_in: np.ndarray, *, rounds: int, rate: float,
                clip_norm: float, z_used: float, rng: np.random.Generator) -> np.ndarray:
    """Released q N * Delta_t for every round, flattened: (T, B*D)."""
    clipped_real, _ = clip_updates(real, clip_norm) if len(real) else (real, None)
    flat_real = clipped_real.reshape(len(real), canary_dirs.shape[1])
    canary_ids = np.flatnonzero(canary_in)
    released = np.empty((rounds, canary_dirs.shape[1]))
    for t in range(rounds):  # rounds are sequential by nature; each round is vectorized over users
        users = poisson_sample(len(real), rate, rng) if len(real) else np.zeros(0, dtype=np.int64)
        canaries = canary_ids[poisson_sample(canary_ids.size, rate, rng)] if canary_ids.size else canary_ids
        uploads = np.concatenate([flat_real[users], clip_norm * canary_dirs[canaries]])
        clipped, _ = clip_updates(uploads, clip_norm)
        released[t] = add_noise_to_sum(clipped.sum(axis=0), z_used, clip_norm, rng)
    return released


def canary_audit(
    *,
    noise_multiplier: float,
    clip_norm: float,
    sample_rate: float,
    rounds: int,
    delta: float = 1e-5,
    real_updates: np.ndarray | None = None,
    shape: tuple[int, int] = (10, 384),
    canaries: int = 1000,
    claimed_epsilon: float | None = None,
    noise_scale: float = 1.0,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Audit a (simulated) run of `rounds` DP-FedAvg rounds at Poisson rate `sample_rate`.

    real_updates (N, B, D): the population's client updates (optional; the canaries alone are the worst case).
    claimed_epsilon: the ledger's epsilon (default: the accountant's PRV epsilon for (z, q, rounds))."""
    if canaries < min(GUESSES):
        raise AuditInputError(f"need at least {min(GUESSES)} canaries; got {canaries}")
    if rounds < 1 or not 0 < sample_rate <= 1:
        raise AuditInputError(f"need rounds >= 1 and sample_rate in (0, 1]; got {rounds}, {sample_rate}")
    rng = np.random.default_rng(seed)
    real = np.zeros((0,) + tuple(shape)) if real_updates is None else np.asarray(real_updates, dtype=np.float64)
    dim = int(np.prod(real.shape[1:]))
    dirs = rng.standard_normal((canaries, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    canary_in = rng.random(canaries) < 0.5
    z_used = noise_multiplier * noise_scale
    released = _round_sums(real, dirs, canary_in, rounds=rounds, rate=sample_rate, clip_norm=clip_norm,
                           z_used=z_used, rng=rng)
    s = dirs @ released.T / (noise_multiplier * clip_norm)  # (canaries, T), under the claimed z
    z = noise_multiplier
    q = sample_rate
    llr = np.logaddexp(np.log1p(-q) if q < 1 else -np.inf, np.log(q) + s / z - 1 / (2 * z * z)).sum(axis=1)
    bound = one_run_audit(llr, canary_in, delta=delta, alpha=alpha, guesses=GUESSES)
    estimate = gaussian_epsilon_estimate(llr[canary_in], llr[~canary_in], delta=delta)
    accountant = accountant_epsilon(noise_multiplier, sample_rate, rounds, delta, "prv")
    claim = accountant if claimed_epsilon is None else float(claimed_epsilon)
    flag_bound = bound["epsilon_lb"] > claim
    flag_estimate = estimate["epsilon"] > claim
    passed = not (flag_bound or flag_estimate)
    control = "" if noise_scale == 1.0 else f" (control: noise secretly x{noise_scale:.3g})"
    if passed:
        sentence = (f"PASS{control}: {canaries} canaries over {rounds} rounds give a one-run lower bound of "
                    f"{bound['epsilon_lb']:.2f} and a Gaussian estimate of {estimate['epsilon']:.2f}, both within the "
                    f"claimed epsilon {claim:.2f}.")
    else:
        why = "lower bound" if flag_bound else "Gaussian estimate"
        sentence = (f"FAIL{control}: the canaries' {why} ({bound['epsilon_lb']:.2f} bound, {estimate['epsilon']:.2f} "
                    f"estimate) exceeds the claimed epsilon {claim:.2f}: the run leaks more than its ledger says; "
                    "check the noise actually added and the clip before publishing its epsilon.")
    return {
        "audit": "canary", "verdict": "pass" if passed else "fail", "passed": bool(passed), "summary": sentence,
        "epsilon_lb": bound["epsilon_lb"], "bound": bound, "gaussian_estimate": estimate,
        "epsilon_claimed": claim, "epsilon_accountant_prv": accountant, "auc": float(auc(llr, canary_in)),
        "flagged_by_bound": bool(flag_bound), "flagged_by_estimate": bool(flag_estimate),
        "noise_multiplier_claimed": noise_multiplier, "noise_multiplier_used": z_used, "noise_scale": noise_scale,
        "clip_norm": clip_norm, "sample_rate": sample_rate, "rounds": rounds, "real_users": int(len(real)),
        "dim": dim, "canaries": canaries, "canaries_in": int(canary_in.sum()), "delta": delta, "alpha": alpha,
        "score_in": np.sort(llr[canary_in]).round(4).tolist(), "score_out": np.sort(llr[~canary_in]).round(4).tolist(),
        "method": "simulated DP-FedAvg rounds with the real mechanism pieces (Poisson sampling, flat clip, Gaussian "
                  "noise on the sum) over the run's client updates held fixed + canary users C*u_j inserted w.p. 1/2; "
                  "llr score under the claimed z; Steinke-Nasr-Jagielski one-run bound (top-k guesses, Bonferroni "
                  "over k) and Gaussian-DP estimate (Andrew et al.)",
        "seed": seed, "trials": canaries,
    }
