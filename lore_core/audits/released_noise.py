"""Did the run release the noise its ledger claims? Read from the run's own release record; no canaries needed.

Each released sum S_t (B D entries) is the clipped users' sum plus noise of std z_t C per entry (`user`: the
server's Gaussian; `user+secagg`: the users' discrete shares, at least z_t C in all), z_t being what the ledger
recorded for that round. Divided by z_t C, the noise has std 1. Outside the users' few strong drift directions
(singular values above the Marchenko-Pastur edge of pure noise, `observed_noise`) the release holds that noise
plus the drift's weak part, and the weak part only adds variance (each round's noise is fresh, independent of the
drift that came before it). So an observed std below 1 by more than the estimate's error means the run added less
noise than the ledger claims. The check is one-sided: more noise than claimed, or a drift spread thin, passes.
"""

from __future__ import annotations

import numpy as np

# Fail below this fraction of the claimed noise std. Honest runs' estimates sit within about 2 % of the claim (the
# estimate's own error is 1 / sqrt(2 x released entries)); a tenfold cut reads about 0.1.
SHORTFALL = 0.8
# Fewer released entries than this: the estimate's error (1 / sqrt(2 x entries)) is too large to check anything.
MIN_ENTRIES = 200


def observed_noise(sums: np.ndarray, directions: np.ndarray) -> tuple[float | None, np.ndarray]:
    """What the release shows outside the span of the canary directions (K, d), where it holds only noise and the
    real users' drift: the noise's per-entry std (None when the canaries span everything, K >= d) and the drift's
    time courses, orthonormal columns (R, k) of the directions whose singular values stand above the pure-noise
    edge sigma (sqrt(R) + sqrt(d - K))."""
    rounds, dim = sums.shape
    if directions.shape[0] >= dim:
        return None, np.zeros((rounds, 0))
    outside = sums
    if directions.shape[0]:
        span = np.linalg.qr(directions.T)[0]  # (d, K) orthonormal
        outside = sums - (sums @ span) @ span.T
    u, singular, _ = np.linalg.svd(outside, full_matrices=False)
    dof = dim - directions.shape[0]
    most = min(rounds, dof) // 2  # spikes dropped at most: the rest estimates the noise
    dropped = 0
    for _ in range(20):  # drop the spikes above the pure-noise edge, re-estimate until the set stops changing
        # k spikes dropped take k of the rows' and k of the columns' degrees of freedom with them (without this
        # correction the estimate fell with each spike dropped, dropping more: 0 for a run with 8 strong ones)
        sigma = np.sqrt((singular[dropped:] ** 2).sum() / ((rounds - dropped) * (dof - dropped)))
        now = min(int((singular > sigma * (np.sqrt(rounds) + np.sqrt(dof))).sum()), most)
        if now == dropped:
            break
        dropped = now
    return float(sigma), u[:, :dropped]


def released_noise_check(sums: np.ndarray, claimed_std: np.ndarray, directions: np.ndarray | None = None) -> dict:
    """Compare the noise in released sums (R, ...) with the std each round claims (R,) (z_t C), outside the span
    of `directions` (K, d) when given (the canary audit's own canaries). Returns `verdict` (pass | fail |
    not-checked), `noise_ratio` (observed / claimed, None when not checked) and `summary`."""
    sums = np.asarray(sums, dtype=np.float64).reshape(len(sums), -1)
    claimed_std = np.asarray(claimed_std, dtype=np.float64).reshape(-1)
    if claimed_std.shape != (len(sums),) or not (np.isfinite(claimed_std).all() and (claimed_std > 0).all()):
        raise ValueError(f"need one finite positive claimed std per released round ({len(sums)}); got "
                         f"{claimed_std.shape}")
    directions = np.zeros((0, sums.shape[1])) if directions is None else \
        np.asarray(directions, dtype=np.float64).reshape(len(directions), -1)
    entries = len(sums) * max(sums.shape[1] - len(directions), 0)
    base = {"audit_part": "released-noise", "rounds_released": int(len(sums)), "entries": int(entries),
            "shortfall_threshold": SHORTFALL}
    if entries < MIN_ENTRIES:
        return {**base, "verdict": "not-checked", "noise_ratio": None,
                "summary": f"released noise not checked: {entries} released entries outside the canaries' span, "
                           f"fewer than {MIN_ENTRIES}"}
    ratio, _ = observed_noise(sums / claimed_std[:, None], directions)
    error = 1.0 / np.sqrt(2.0 * entries)
    base.update(noise_ratio=float(ratio), noise_ratio_error=float(error))
    if ratio < SHORTFALL:
        return {**base, "verdict": "fail",
                "summary": f"the released sums carry noise of {ratio:.2f} times the std the ledger claims (z C per "
                           f"entry; error about {error:.3f}): the run added less noise than its ledger says"}
    return {**base, "verdict": "pass",
            "summary": f"the released sums carry noise of {ratio:.2f} times the claimed std (at least "
                       f"{SHORTFALL} required)"}
