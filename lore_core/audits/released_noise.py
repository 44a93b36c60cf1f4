"""Did the run release the noise its ledger claims? Read from the run's own release record; no canaries needed.

Each released sum S_t (B D entries) is the clipped users' sum plus noise of std z_t C per entry (`user`: the
server's Gaussian; `user+secagg`: the users' discrete shares, at least z_t C in all), z_t being what the ledger
recorded for that round. Divided by z_t C, the noise has std 1. Outside the users' few strong drift directions
(singular values above the Marchenko-Pastur edge of pure noise, `observed_noise`) the release holds that noise
plus the drift's weak part, and the weak part only adds variance (each round's noise is fresh, independent of the
drift that came before it). So an observed std below 1 by more than the estimate's error means the run added less
noise than the ledger claims. The checks (a reviewer found the pooled one alone passed z x 0.85, and runs with a
tenth of their rounds released without noise; testers, noise that was not fresh or not Gaussian):
- pooled over every round: fail below 1 - max(0.1, 6 x its error 1 / sqrt(2 (R - k)(d - k))), k spikes dropped;
- each round alone (where d - k >= 20): fail below clip(1 - 6 / sqrt(2 (d - k)), 0.3, 0.7), so one round released
  with little or no noise fails however many honest rounds surround it.
- across rounds (where d - k >= 20 and 3 rounds are left): each round's noise must be fresh. A server that
  correlates it keeps every round's std, so the checks above pass when the correlation is weak, but a combination
  of releases then holds less noise than the accountant assumes (rounds t and t + 1 cancel part of it, or round t
  copies round s and S_t - S_s is bare). Outside the dropped directions an honest run's rounds are uncorrelated up
  to the projection the drop makes (taken off); fail where the mean correlation at some lag l falls below
  -max(0.1, 6 / sqrt((R - l)(d - k))) (below only: the drift's weak part correlates neighbouring rounds upward), or
  where one pair's is beyond +-max(0.3, z / sqrt(d - k)), z = max(6, sqrt(2 ln(1e4 R (R - 1)))) for the strongest
  of the pairs, either sign.
- the noise's shape (`shape_problems`): the least noisy combination of rounds, the entries' kurtosis and their
  characteristic function (an adversarial tester's servers hid a combination of rounds without noise, released
  entries of exactly +-zC, and left part of the entries without noise).
What it cannot see (one-sided, and said so in the README): noise cut by less than about a tenth over the whole run
(a twentieth where the drift is weak: the characteristic function), more noise than claimed, noise removed only
inside the drift's strong directions (a server that knows the clean sums can subtract its noise there), and single
rounds' cuts in short runs or under a drift many times the noise (it leaks past the cross-fitted directions).
"""

from __future__ import annotations

import functools

import numpy as np

# Pooled: fail below 1 - max(POOLED_MARGIN, ERRORS x error). Honest releases read about 1 or more (the weak drift
# only adds; bench_results/released_noise_check.md); a tenfold cut reads about 0.1.
POOLED_MARGIN, ERRORS = 0.1, 6.0
# One round: fail below clip(1 - ERRORS / sqrt(2 (d - k)), ROUND_FLOOR) where d - k >= MIN_ROUND_DOF.
ROUND_FLOOR, MIN_ROUND_DOF = (0.3, 0.7), 20
# Across rounds: fail below -max(MARGIN, ERRORS x error) for a lag's mean correlation and for one pair's.
LAG_MARGIN, PAIR_MARGIN, PAIR_CHANCE = 0.1, 0.3, 1e-4
MIN_ROUNDS_ACROSS = 3  # rounds left once the drift's directions are dropped
# The noise's shape (shape_problems): the least-noisy combination of rounds over the pure-noise lower edge, the
# entries' kurtosis and their characteristic function; with fewer entries left than MIN_EDGE_ENTRIES none is read.
EDGE_FLOOR, EDGE_SCALES, EDGE_MAX_RATIO, MIN_EDGE_ENTRIES = 0.85, 6.0, 0.5, 2000
# Kurtosis is judged below only: honest drift that is sparse or decaying reads 4-7 (a reviewer), as high as noise
# missing from half the entries, so no upper bound separates them.
KURTOSIS_MARGIN = 0.5
# The characteristic function: at each t the entries' mean cos(t r) may exceed its value for noise of the claimed std
# alone by ERRORS x its error (sqrt(0.5 / n): cos has variance at most about 0.5 whatever the drift) or CF_MARGIN
# (scaled by the share of the noise the residual keeps: canaries' directions take most of it), whichever is larger.
CF_POINTS, CF_MARGIN = (1.0, 2.0), 0.02
GRAM_BLOCK = 256  # rounds per block of the rounds' Gram matrix (memory: GRAM_BLOCK x R)
# Fewer released entries than this: the estimate's error (1 / sqrt(2 x entries)) is too large to check anything.
MIN_ENTRIES = 200
# The checks' names, as a result's `failed_checks` lists those that failed.
CHECKS = ("pooled", "per-round", "across-rounds", "least-noisy-combination", "kurtosis", "characteristic-function")


def observed_noise(sums: np.ndarray, directions: np.ndarray) -> tuple[float | None, np.ndarray]:
    """What the release shows outside the span of the canary directions (K, d), where it holds only noise and the
    real users' drift: the noise's per-entry std (None when the canaries span everything, K >= d) and the drift's
    time courses, orthonormal columns (R, k) of the directions whose singular values stand above the pure-noise
    edge sigma (sqrt(R) + sqrt(d - K))."""
    if directions.shape[0] >= sums.shape[1]:
        return None, np.zeros((len(sums), 0))
    fit = _NoiseFit(sums, directions)
    return fit.sigma, fit.u[:, :fit.dropped]


class _NoiseFit:
    """The release outside the canaries' span (R, d), its SVD, and the noise std once the k spikes above the
    pure-noise edge are dropped."""

    def __init__(self, sums: np.ndarray, directions: np.ndarray) -> None:
        rounds, dim = sums.shape
        outside = sums
        if directions.shape[0]:
            span = np.linalg.qr(directions.T)[0]  # (d, K) orthonormal
            outside = sums - (sums @ span) @ span.T
        self.span = span if directions.shape[0] else np.zeros((dim, 0))
        self.outside, self.dof = outside, dim - directions.shape[0]
        self.u, singular, self.vt = np.linalg.svd(outside, full_matrices=False)
        most = min(rounds, self.dof) // 2  # spikes dropped at most: the rest estimates the noise
        dropped = 0
        for _ in range(20):  # drop the spikes above the pure-noise edge, re-estimate until the set stops changing
            # k spikes dropped take k of the rows' and k of the columns' degrees of freedom with them (without this
            # correction the estimate fell with each spike dropped, dropping more: 0 for a run with 8 strong ones)
            sigma = np.sqrt((singular[dropped:] ** 2).sum() / ((rounds - dropped) * (self.dof - dropped)))
            now = min(int((singular > sigma * (np.sqrt(rounds) + np.sqrt(self.dof))).sum()), most)
            if now == dropped:
                break
            dropped = now
        self.sigma, self.dropped, self.singular = float(sigma), dropped, singular
        self.capped = dropped >= most > 0  # as many spikes dropped as allowed: stronger drift may be left in
        self.entries = (rounds - dropped) * (self.dof - dropped)

    @functools.cached_property
    def residual(self) -> np.ndarray:
        """The release outside the canaries' span and the k dropped directions (R, d)."""
        k = self.dropped
        return self.outside - (self.outside @ self.vt[:k].T) @ self.vt[:k]

    def noise_left(self) -> np.ndarray:
        """The variance that noise of std 1 per entry keeps in each entry of the residual (R, d): it is P N Q with
        P = I - U U^T over rounds and Q = I - span span^T - V V^T over entries, so entry (t, j) keeps P_tt Q_jj for
        projections fixed in advance. The dropped directions were chosen by the data, so they took more: a spike of
        strength theta^2 (its singular value s^2 = theta^2 + R' + d' + R' d' / theta^2 in noise units, R' and d'
        the rounds and entries left) takes about R' d' / theta^2 more, most near the edge (a reviewer's 55 spikes
        just above it failed 7 honest draws of 30 without this), so that much is taken off, spread evenly."""
        k = self.dropped
        rounds = (1.0 - (self.u[:, :k] ** 2).sum(axis=1)).clip(0.0, 1.0)
        entries = (1.0 - (self.span ** 2).sum(axis=1) - (self.vt[:k] ** 2).sum(axis=0)).clip(0.0, 1.0)
        kept = np.outer(rounds, entries)
        left_rounds, left_entries = len(self.outside) - k, self.dof - k
        b = self.singular[:k] ** 2 - left_rounds - left_entries
        floor = np.sqrt(left_rounds * left_entries)  # the edge: no spike is weaker than it
        strength = np.maximum((b + np.sqrt(np.clip(b * b - 4 * left_rounds * left_entries, 0.0, None))) / 2, floor)
        taken = float((left_rounds * left_entries / strength).sum())
        return kept * max(1.0 - taken / max(float(kept.sum()), 1e-12), 0.0)

    def round_stds(self) -> tuple[np.ndarray, int]:
        """Each round's own std outside the canaries' span and the drift's strong directions (R,), and the
        degrees of freedom left per round. The directions are cross-fitted: found on the odd rounds for the even
        ones and on the even for the odd, so a round's own noise never chooses what is removed from it (fitted on
        all rounds they took 0.55 of an honest round's noise at R = 25 with 8 spikes)."""
        rounds = len(self.outside)
        even = np.arange(rounds) % 2 == 0
        kept = min(self.dropped, max(min(int(even.sum()), int((~even).sum())) - 1, 0))
        stds = np.empty(rounds)
        for test in (even, ~even):
            spikes = np.linalg.svd(self.outside[~test], full_matrices=False)[2][:kept]
            residual = self.outside[test] - (self.outside[test] @ spikes.T) @ spikes
            stds[test] = np.linalg.norm(residual, axis=1) / np.sqrt(self.dof - kept)
        return stds, self.dof - kept

    def round_correlations(self) -> dict:
        """How the rounds' noise correlates, outside the dropped directions: for each lag l the mean correlation of
        rounds t and t + l, and the pair of rounds whose correlation is furthest from 0 (either sign), each less what
        the drop itself makes (removing k round-space directions U leaves honest residuals with covariance
        sigma^2 (I - U U^T)). Read from the rounds' Gram matrix, GRAM_BLOCK rounds at a time."""
        rounds, k, residual = len(self.outside), self.dropped, self.residual
        scale = (self.dof - k) * self.sigma ** 2
        u = self.u[:, :k]
        norms = np.sqrt((residual ** 2).sum(axis=1) / scale)  # each round's residual; its null norm after the drop:
        kept = np.sqrt(np.clip(1.0 - (u ** 2).sum(axis=1), 1e-12, None))
        lag_sums, strongest, pair = np.zeros(rounds), 0.0, (0, 1)
        for start in range(0, rounds, GRAM_BLOCK):
            rows = np.arange(start, min(start + GRAM_BLOCK, rounds))
            gram, made = residual[rows] @ residual.T / scale, u[rows] @ u.T
            excess = gram + made  # minus (I - U U^T), off the diagonal
            lags = np.arange(rounds)[None, :] - rows[:, None]
            later = lags > 0
            lag_sums += np.bincount(lags[later], weights=excess[later], minlength=rounds)
            correlation = np.where(later, gram / np.outer(norms[rows], norms).clip(1e-12)
                                   + made / np.outer(kept[rows], kept), 0.0)
            at = np.unravel_index(np.argmax(np.abs(correlation)), correlation.shape)
            if abs(correlation[at]) > abs(strongest):
                strongest, pair = float(correlation[at]), (int(rows[at[0]]), int(at[1]))
        lag_means = lag_sums[1:] / np.arange(rounds - 1, 0, -1)  # lag l: R - l pairs
        return {"lag_means": lag_means, "strongest_pair": strongest, "pair": pair, "dof": self.dof - k}


def across_rounds_problem(fit: _NoiseFit) -> tuple[dict, str | None]:
    """The across-rounds check's figures and its failure message (None: passed). The lags' means are judged below
    0 only (the drift's weak part correlates neighbouring rounds upward: +0.1 at lag 1 with 32 entries a round);
    one pair either way (a round's noise copying another's, at either sign, leaves their difference or sum bare)."""
    found = fit.round_correlations()
    rounds, dof = len(fit.outside), found["dof"]
    floors = -np.maximum(LAG_MARGIN, ERRORS / np.sqrt(np.arange(rounds - 1, 0, -1) * dof))
    margin = found["lag_means"] - floors
    lag = int(np.argmin(margin)) + 1
    tests = rounds * (rounds - 1)  # pairs x 2 signs: the strongest of many, its error count grows with them
    pair_bound = max(PAIR_MARGIN, max(ERRORS, np.sqrt(2 * np.log(tests / PAIR_CHANCE))) / np.sqrt(dof))
    strongest = float(np.clip(found["strongest_pair"], -1.0, 1.0))  # the drop's correction can pass +-1
    figures = {"lowest_lag_correlation": float(found["lag_means"][lag - 1]), "lowest_lag": lag,
               "lag_threshold": float(floors[lag - 1]), "strongest_pair_correlation": strongest,
               "strongest_pair": [r + 1 for r in found["pair"]], "pair_threshold": pair_bound}
    problems = []
    if margin[lag - 1] < 0:
        problems.append(f"the noise of rounds {lag} apart correlates at {found['lag_means'][lag - 1]:.2f} on average "
                        f"(at least {floors[lag - 1]:.2f} required)")
    if abs(strongest) > pair_bound:
        first, second = figures["strongest_pair"]
        problems.append(f"the noise of releases {first} and {second} correlates at {strongest:+.2f} (each pair "
                        f"within +-{pair_bound:.2f})")
    return figures, ("; ".join(problems) + ", so part of it cancels across rounds") if problems else None


def shape_problems(fit: _NoiseFit) -> tuple[dict, list[tuple[str, str]]]:
    """The noise's shape, beyond each round's std and each pair's correlation (a privacy tester's server passed both
    with a combination of rounds carrying no noise, and with noise of exactly +-sigma per entry):
    - the least-noisy combination of rounds: the residual's smallest singular value over the pure-noise lower edge
      sqrt(d - k) - sqrt(R - k) (Bai-Yin; the drift only adds), where R - k <= (d - k) / 2 and at least
      MIN_EDGE_ENTRIES entries are left; fail below min(EDGE_FLOOR, 1 - 6 x the edge's Tracy-Widom scale);
    - the entries' kurtosis (a Gaussian's is 3): fail below 3 - max(0.5, 8 e), e = sqrt(24 / n), where
      n >= MIN_EDGE_ENTRIES; not above (sparse or decaying honest drift reads up to 7);
    - the characteristic function (`characteristic_excess`): noise missing from part of the entries, or mostly
      exact zeros, which kurtosis judged below only and the least noisy combination can miss.
    Returns the figures and each failed check as (name, message)."""
    rounds, dof = len(fit.outside) - fit.dropped, fit.dof - fit.dropped
    figures, problems = {}, []
    if rounds * dof < MIN_EDGE_ENTRIES:
        return figures, problems
    if 3 <= rounds <= EDGE_MAX_RATIO * dof:
        edge = np.sqrt(dof) - np.sqrt(rounds)
        ratio = float(fit.singular[len(fit.outside) - 1] / edge)
        # the edge's finite-size (Tracy-Widom) scale, relative to it: pure noise dipped 4.5 of them below in 30,000
        # draws (a reviewer: 0.85 alone failed 1 % of pure-noise releases of 32 x 64)
        scale = 0.5 * (1 / np.sqrt(rounds) - 1 / np.sqrt(dof)) ** (1 / 3) / edge
        floor = float(min(EDGE_FLOOR, 1 - EDGE_SCALES * scale))
        figures.update(least_noisy_combination_ratio=ratio, least_noisy_threshold=floor)
        if ratio < floor:
            problems.append(("least-noisy-combination", f"the least noisy combination of the rounds carries "
                             f"{ratio:.2f} times the noise that noise of the claimed std leaves it (at least "
                             f"{floor:.2f} required)"))
    standard = fit.residual / fit.sigma
    kurtosis = float(np.mean(standard ** 4) / np.mean(standard ** 2) ** 2)
    low = 3.0 - max(KURTOSIS_MARGIN, 8 * np.sqrt(24.0 / (rounds * dof)))
    figures.update(kurtosis=kurtosis, kurtosis_floor=low)
    if kurtosis < low:
        problems.append(("kurtosis", f"the noise's entries have kurtosis {kurtosis:.2f} (a Gaussian's is 3; at least "
                                     f"{low:.2f} required): not the Gaussian noise the accountant assumes"))
    excess, point, bound = characteristic_excess(fit)
    figures.update(characteristic_excess=excess, characteristic_point=point, characteristic_threshold=bound)
    if excess > bound:
        problems.append(("characteristic-function", f"the entries' mean cos({point:g} r) stands {excess:.3f} above "
                         f"what noise of the claimed std allows (at most {bound:.3f}): some entries, or some "
                         "combinations of rounds, carry less noise than claimed"))
    return figures, problems


def characteristic_excess(fit: _NoiseFit) -> tuple[float, float, float]:
    """The residual's mean cos(t r) less its bound for noise of the claimed std, at the t of CF_POINTS where it
    stands highest against its threshold: (excess, t, threshold). Noise N(0, c) added to anything a gives
    E cos(t (a + n)) = cos(t a) exp(-t^2 c / 2) <= exp(-t^2 c / 2), whatever the drift left in the residual, so an
    honest run's mean cos stays at or below the mean of exp(-t^2 c_tj / 2) over entries (c_tj: the noise the
    residual keeps, `noise_left`); more noise than claimed lowers it further. Noise missing from a share s of the
    entries raises it by about s (cos(t a) near 1 where the drift is dropped), however the rest is scaled. The
    threshold: ERRORS x sqrt(0.5 / n), or CF_MARGIN scaled by how far the bound stands below 1 against pure noise's
    (canaries' directions take most of the noise; an unscaled margin let a reviewer's cheat pass with 1,000)."""
    kept, residual = fit.noise_left(), fit.residual
    error = ERRORS * np.sqrt(0.5 / residual.size)
    excesses, thresholds = [], []
    for t in CF_POINTS:
        allowed = np.exp(-0.5 * t * t * kept).mean()
        excesses.append(float(np.cos(t * residual).mean() - allowed))
        thresholds.append(float(max(error, CF_MARGIN * (1.0 - allowed) / (1.0 - np.exp(-0.5 * t * t)))))
    at = int(np.argmax(np.array(excesses) - np.array(thresholds)))
    return excesses[at], CF_POINTS[at], thresholds[at]


def released_noise_check(sums: np.ndarray, claimed_std: np.ndarray, directions: np.ndarray | None = None) -> dict:
    """Compare the noise in released sums (R, ...) with the std each round claims (R,) (z_t C), outside the span
    of `directions` (K, d) when given (the canary audit's own canaries): pooled, and round by round. Returns
    `verdict` (pass | fail | not-checked), `failed_checks` (the names of the checks that failed, of CHECKS),
    `noise_ratio` (pooled observed / claimed, None when not checked), `lowest_round_ratio` and `summary`."""
    sums = np.asarray(sums, dtype=np.float64).reshape(len(sums), -1)
    claimed_std = np.asarray(claimed_std, dtype=np.float64).reshape(-1)
    if claimed_std.shape != (len(sums),) or not (np.isfinite(claimed_std).all() and (claimed_std > 0).all()):
        raise ValueError(f"need one finite positive claimed std per released round ({len(sums)}); got "
                         f"{claimed_std.shape}")
    directions = np.zeros((0, sums.shape[1])) if directions is None else \
        np.asarray(directions, dtype=np.float64).reshape(len(directions), -1)
    entries = len(sums) * max(sums.shape[1] - len(directions), 0)
    base = {"audit_part": "released-noise", "rounds_released": int(len(sums)), "entries": int(entries),
            "failed_checks": []}
    if entries < MIN_ENTRIES:
        return {**base, "verdict": "not-checked", "noise_ratio": None,
                "summary": f"released noise not checked: {entries} released entries"
                           + (" outside the canaries' span" if len(directions) else "") + f", fewer than {MIN_ENTRIES}"}
    fit = _NoiseFit(sums / claimed_std[:, None], directions)
    error = 1.0 / np.sqrt(2.0 * fit.entries)
    pooled_floor = 1.0 - max(POOLED_MARGIN, ERRORS * error)
    stds, round_dof = fit.round_stds() if len(sums) >= 2 else (np.array([fit.sigma]), 0)
    round_floor = float(np.clip(1.0 - ERRORS / np.sqrt(2.0 * round_dof), *ROUND_FLOOR)) \
        if round_dof >= MIN_ROUND_DOF and len(sums) >= 2 else None
    low = int(np.argmin(stds))
    base.update(noise_ratio=fit.sigma, noise_ratio_error=float(error), pooled_threshold=pooled_floor,
                lowest_round_ratio=float(stds[low]), lowest_round=low + 1, round_threshold=round_floor,
                drift_directions_dropped=fit.dropped)
    # The rounds' correlations and shape need one round's degrees of freedom, and 3 rounds left once the drift's are
    # dropped (with 2 rounds and 1 dropped both figures are 0 by construction: a reviewer's cancelling pair passed);
    # nor are they read where the drop hit its cap (half the rounds): the drift it left correlates rounds and skews
    # the residual (a reviewer's 11 rounds with 8 strong directions failed every honest draw)
    unchecked = ("too few entries per round to check rounds one by one or across" if round_floor is None else
                 "too few rounds left to check across them" if len(sums) - fit.dropped < MIN_ROUNDS_ACROSS else
                 "the drift has as many strong directions as half the rounds: not checked across them"
                 if fit.capped else None)
    problems, across, shape = [], None, []
    if unchecked is None:
        figures, across = across_rounds_problem(fit)
        base.update(figures)
        figures, shape = shape_problems(fit)
        base.update(figures)
    if fit.sigma < pooled_floor:
        problems.append(("pooled", f"the released sums carry noise of {fit.sigma:.2f} times the std the ledger claims "
                                   f"(z C per entry; at least {pooled_floor:.2f} required, error about {error:.3f})"))
    if round_floor is not None and stds[low] < round_floor:
        problems.append(("per-round", f"release {low + 1} of {len(sums)} carries noise of {stds[low]:.2f} times its "
                                      f"claimed std (each round at least {round_floor:.2f})"))
    problems += ([("across-rounds", across)] if across else []) + shape
    if problems:
        failed = [name for name, _ in problems]
        assert set(failed) <= set(CHECKS), f"checks named outside CHECKS: {sorted(set(failed) - set(CHECKS))}"
        return {**base, "verdict": "fail", "failed_checks": failed,
                "summary": "; ".join(text for _, text in problems) + ": the run added less noise than its ledger says"}
    return {**base, "verdict": "pass", "summary": _pass_summary(base, unchecked)}


def _pass_summary(figures: dict, unchecked: str | None) -> str:
    """What a passed check read, each figure beside its threshold; `unchecked`: why some checks were not read."""
    parts = [f"the released sums carry noise of {figures['noise_ratio']:.2f} times the claimed std (at least "
             f"{figures['pooled_threshold']:.2f} required), the lowest round {figures['lowest_round_ratio']:.2f}"
             + (f" (at least {figures['round_threshold']:.2f})" if figures["round_threshold"] is not None else "")
             + (f" ({unchecked})" if unchecked else
                f", and no part of it cancels across rounds (the lowest mean correlation "
                f"{figures['lowest_lag_correlation']:.2f} at lag {figures['lowest_lag']}, the strongest pair "
                f"{figures['strongest_pair_correlation']:+.2f})")]
    if "least_noisy_threshold" in figures:
        parts.append(f"its least noisy combination of rounds {figures['least_noisy_combination_ratio']:.2f} (at "
                     f"least {figures['least_noisy_threshold']:.2f})")
    if "kurtosis" in figures:
        parts.append(f"its kurtosis {figures['kurtosis']:.2f} (at least {figures['kurtosis_floor']:.2f})")
    if "characteristic_excess" in figures:
        parts.append(f"its mean cos({figures['characteristic_point']:g} r) {figures['characteristic_excess']:+.3f} "
                     f"from the claimed noise's (at most +{figures['characteristic_threshold']:.3f})")
    return "; ".join(parts)
