"""User-level (and per-client record-level) accounting of the Poisson-subsampled Gaussian with Opacus accountants.

A history is a list of segments (noise_multiplier z, sample_rate q, steps): `steps` compositions of the
Poisson-subsampled Gaussian with rate q and noise std z * sensitivity, under add/remove adjacency. Segments may
differ (heterogeneous composition), exactly as Opacus' `accountant.history`.
PRV (Gopi, Lee & Wutschitz 2021) is the headline: we report its guaranteed upper value and how far it may lie
above the estimate; RDP (Mironov 2017) is the conservative second number. Mode `user+secagg` releases a sum of
discrete Gaussian shares instead: accountant "ddg-rdp" (lore_core.privacy.ddg_accounting, which needs the
dimension B*D) is then its only, and headline, number. Facts (the history) are stored by the caller; epsilon is
derived here, on demand.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from lore_core.setting_names import SettingError, as_field, setting

ACCOUNTANTS = ("prv", "rdp", "ddg-rdp")
PRV_EPS_ERROR = 0.01  # Opacus' default precision of the PRV epsilon
MAX_NOISE_MULTIPLIER = 1e6  # as Opacus get_noise_multiplier: beyond this the budget is unreachable
MAX_ROUNDS = 1_000_000  # rounds_within_budget stops searching here
# Opacus' PRV grid grows with epsilon until it fails or asks for exabytes (z = 1e-6). Above this RDP bound PRV is not
# run: the RDP bound (always >= PRV) stands in, so no epsilon is under-reported; user-mode plans above it are refused
# by validation (they promise nothing), record mode's per-pair epsilon may legitimately go there.
MAX_PRV_EPSILON = 100.0
Segment = tuple[float, float, int]


class AccountingError(SettingError):
    """The accountant failed or returned NaN/inf: the round must be aborted, never released without noise. Advice
    names the settings by `setting` (as PrivacySettings' fields, which the callers render as their users type them)."""

    spelling = staticmethod(as_field)


class PrivacyBudgetExhausted(RuntimeError):
    """Releasing the next round would exceed max_epsilon."""


@dataclass(frozen=True)
class EpsilonReport:
    """The accountants on one history. `prv` is the guaranteed upper value (Opacus get_epsilon); for the
    distributed discrete Gaussian (`accountant` "ddg-rdp") PRV does not apply (nan) and `rdp` is its bound."""

    delta: float
    prv: float
    prv_estimate: float
    prv_error_bound: float  # prv - prv_estimate
    rdp: float
    rdp_optimal_order: float
    prv_is_rdp_bound: bool = False  # above MAX_PRV_EPSILON PRV is not run; the RDP bound stands in
    accountant: str = "prv"  # which number is the headline: "prv", or "ddg-rdp" (then rdp)

    @property
    def headline(self) -> float:
        return self.rdp if self.accountant == "ddg-rdp" else self.prv

    def to_dict(self) -> dict:
        return asdict(self)


def check_history(history: Iterable[Sequence]) -> list[Segment]:
    """Validate segments -> list of (z, q, steps) with float z > 0, q in (0, 1], int steps > 0 (empty ones dropped)."""
    segments = []
    for segment in history:
        if len(segment) != 3:
            raise AccountingError(f"a history segment is (noise_multiplier, sample_rate, steps); got {segment!r}")
        z, q, steps = float(segment[0]), float(segment[1]), segment[2]
        if not (math.isfinite(z) and z > 0):
            raise AccountingError(f"noise multiplier must be finite and > 0; got {z} (a DP round never skips noise)")
        if not (0 < q <= 1):
            raise AccountingError(f"sample rate must be in (0, 1]; got {q}")
        if int(steps) != steps or steps < 0:
            raise AccountingError(f"steps must be a non-negative integer; got {steps!r}")
        if steps:
            segments.append((z, q, int(steps)))
    return segments


def _composed(segments: list[Segment]) -> list[Segment]:
    """The same composition with each mechanism (z, q) once, its steps summed (in order of first appearance).
    Composition does not depend on order, and Opacus runs its RDP orders and PRV discretisation once per segment:
    stored histories are merged, but every budget check adds the planned round as a second segment of the same
    mechanism, which doubled to tripled its cost (bench_results/accounting_speed.md)."""
    steps: dict[tuple[float, float], int] = {}
    for z, q, k in segments:
        steps[(z, q)] = steps.get((z, q), 0) + k
    return [(z, q, k) for (z, q), k in steps.items()]


def _prv_bounds(segments: list[Segment], delta: float) -> tuple[float, float, float]:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = list(segments)
    delta_error = delta / 1000  # Opacus' default
    # Same computation as PRVAccountant.get_epsilon (which returns only the upper value); we also want the estimate.
    with np.errstate(divide="ignore"), warnings.catch_warnings():  # q = 1 takes log(0) inside Opacus, harmlessly
        warnings.simplefilter("ignore", UserWarning)  # its domain-size RDP bound warns at the edge of its orders
        dprv = accountant._get_dprv(eps_error=PRV_EPS_ERROR, delta_error=delta_error)
        lower, estimate, upper = dprv.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)
    return float(lower), float(estimate), float(upper)


def _rdp(segments: list[Segment], delta: float) -> tuple[float, float]:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(segments)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Opacus warns when the optimal order is at the grid's edge
        eps, order = accountant.get_privacy_spent(delta=delta)
    return float(eps), float(order)


def _bounds(segments: list[Segment], delta: float) -> tuple[float, float, float, float]:
    """(PRV estimate, PRV upper, RDP, RDP order); above MAX_PRV_EPSILON the RDP bound stands in for both PRV values."""
    rdp, order = _rdp(segments, delta)
    if not rdp <= MAX_PRV_EPSILON:
        return rdp, rdp, rdp, order
    _, estimate, upper = _prv_bounds(segments, delta)
    return estimate, upper, rdp, order


def _finite(value: float, what: str, segments: list[Segment]) -> float:
    if not math.isfinite(value):
        raise AccountingError(f"{what} epsilon is {value} for history {segments}; refusing to release this round")
    return value


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise AccountingError(f"delta must be in (0, 1); got {delta}")


def history_epsilon(history: Iterable[Sequence], delta: float, accountant: str = "prv",
                    dim: int | None = None) -> float:
    """Epsilon spent by a whole history at `delta` (0.0 for an empty history); "ddg-rdp" needs the dimension."""
    if accountant not in ACCOUNTANTS:
        raise AccountingError(f"accountant must be one of {ACCOUNTANTS}; got {accountant!r}")
    _check_delta(delta)
    segments = _composed(check_history(history))
    if not segments:
        return 0.0
    try:
        if accountant == "ddg-rdp":
            value = _ddg(segments, delta, dim)[0]
        else:
            value = _bounds(segments, delta)[1] if accountant == "prv" else _rdp(segments, delta)[0]
    except (ValueError, RuntimeError, ArithmeticError, MemoryError) as exc:
        raise AccountingError(f"{accountant} accountant failed on {segments}: {exc}") from exc
    return _finite(value, accountant, segments)


def _ddg(segments: list[Segment], delta: float, dim: int | None) -> tuple[float, float]:
    from lore_core.privacy.ddg_accounting import ddg_epsilon

    if not (isinstance(dim, int) and dim > 0):
        raise AccountingError(f"the ddg-rdp accountant needs the dimension B*D of the released sum; got {dim!r}")
    return ddg_epsilon(segments, delta, dim)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv",
            dim: int | None = None) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian (or, "ddg-rdp", distributed discrete Gaussian) steps (z, q)."""
    return history_epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant, dim)


def epsilon_report(history: Iterable[Sequence], delta: float, dim: int | None = None) -> EpsilonReport:
    """PRV (headline, with error bound) and RDP (upper bound, with its optimal order) for one history; with `dim`,
    the distributed discrete Gaussian's RDP bound (mode user+secagg) instead, PRV nan."""
    _check_delta(delta)
    segments = _composed(check_history(history))
    if dim is not None:
        if not segments:
            return EpsilonReport(delta, math.nan, math.nan, 0.0, 0.0, math.nan, accountant="ddg-rdp")
        try:
            eps, order = _ddg(segments, delta, dim)
        except (ValueError, RuntimeError, ArithmeticError) as exc:
            raise AccountingError(f"ddg-rdp accountant failed on {segments}: {exc}") from exc
        return EpsilonReport(delta, math.nan, math.nan, 0.0, _finite(eps, "ddg-rdp", segments), order,
                             accountant="ddg-rdp")
    if not segments:
        return EpsilonReport(delta, 0.0, 0.0, 0.0, 0.0, float("nan"))
    try:
        estimate, upper, rdp, order = _bounds(segments, delta)
    except (ValueError, RuntimeError, ArithmeticError, MemoryError) as exc:
        raise AccountingError(f"accountant failed on {segments}: {exc}") from exc
    upper, estimate, rdp = (_finite(v, name, segments) for v, name in ((upper, "PRV"), (estimate, "PRV"), (rdp, "RDP")))
    return EpsilonReport(delta, upper, estimate, upper - estimate, rdp, order, prv_is_rdp_bound=rdp > MAX_PRV_EPSILON)


def noise_for_target_epsilon(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "prv",
    tolerance: float = 0.01,
    dim: int | None = None,
) -> float:
    """Smallest z (within `tolerance` in epsilon) with epsilon(z, q, steps) <= target; bisection as Opacus
    get_noise_multiplier, but bracketed from z = 1 so the accountant never sees a vanishing z. A target that epsilon
    jumps over is refused, not undershot: PRV jumps where the RDP bound stands in for it (above MAX_PRV_EPSILON)."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise AccountingError(f"target epsilon must be finite and > 0; got {target_epsilon}")

    def eps(z: float) -> float:
        try:
            return epsilon(z, sample_rate, steps, delta, accountant, dim)
        except AccountingError:
            return math.inf  # too little noise for the accountant to resolve: certainly above target

    high = 1.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise AccountingError(f"target epsilon {target_epsilon} is unreachable at q={sample_rate}, {steps} steps "
                                  f"with any noise multiplier up to {MAX_NOISE_MULTIPLIER:g}: raise "
                                  f"{setting('target_epsilon')}")
        eps_high = eps(high)
    low = high / 2
    while eps(low) <= target_epsilon:  # move the bracket down until low is above target
        high, low = low, low / 2
        if low < 1e-3:
            break
    eps_high = eps(high)
    while target_epsilon - eps_high > tolerance and high - low > 1e-9 * high:
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    # The bracket closed on PRV's jump (above MAX_PRV_EPSILON the RDP bound stands in for it), not on the target.
    # Elsewhere a short bracket is safe as it is: z = high meets the target (at worst with a little more noise).
    if accountant == "prv" and target_epsilon - eps_high > tolerance and eps(low) > MAX_PRV_EPSILON >= eps_high:
        raise AccountingError(f"target epsilon {target_epsilon:g} is unreachable with the {accountant} accountant at "
                              f"q={sample_rate:.6g}, {steps} steps: z = {high:.4g} gives epsilon {eps_high:.4g}, and "
                              f"with less noise the RDP bound exceeds {MAX_PRV_EPSILON:g}, where PRV is not computed "
                              f"and a plan promises no meaningful privacy; set {setting('target_epsilon')} <= "
                              f"{math.floor(eps_high * 100) / 100:g}")
    return high


def rounds_within_budget(
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    max_epsilon: float,
    history: Iterable[Sequence] = (),
    accountant: str = "prv",
    steps_per_round: int = 1,
    limit: int | None = None,
    dim: int | None = None,
) -> int:
    """Largest k such that `history` + k more rounds (each `steps_per_round` steps of (z, q)) stays <= max_epsilon;
    at most `limit` (a planned run length makes the search cheaper), else at most MAX_ROUNDS (the caller says so
    when the answer is that cap). One accountant call costs seconds at a large epsilon, so the search makes few: the
    cheap RDP bound brackets the answer, then interpolation on epsilon(k), probing the guess's neighbour, pins it
    (bisection steps keep the worst case logarithmic)."""
    if not (math.isfinite(max_epsilon) and max_epsilon > 0):
        raise AccountingError(f"max epsilon must be finite and > 0; got {max_epsilon}")
    base = check_history(history)
    cap = MAX_ROUNDS if limit is None else limit
    known: dict[int, float] = {}

    def spent(k: int, how: str = accountant) -> float:
        if how != accountant:
            return history_epsilon(base + [(noise_multiplier, sample_rate, k * steps_per_round)], delta, how)
        if k not in known:
            extra = [(noise_multiplier, sample_rate, k * steps_per_round)] if k else []
            known[k] = history_epsilon(base + extra, delta, accountant, dim)
        return known[k]

    if spent(0) > max_epsilon:
        return 0
    low, high = 0, None  # spent(low) fits; spent(high) does not (None: not found yet)
    if accountant == "prv":  # RDP >= PRV in practice: its last fitting k is a cheap first guess
        rdp_low, rdp_high = 0, 1
        while rdp_high <= cap and spent(rdp_high, "rdp") <= max_epsilon:
            rdp_low, rdp_high = rdp_high, 2 * rdp_high
        while rdp_high - rdp_low > 1 and rdp_low < cap:
            mid = (rdp_low + rdp_high) // 2
            rdp_low, rdp_high = (mid, rdp_high) if spent(mid, "rdp") <= max_epsilon else (rdp_low, mid)
        guess = min(rdp_low, cap)
        if guess:
            low, high = (guess, None) if spent(guess) <= max_epsilon else (0, guess)
    step = max(1, low // 8)
    while high is None:  # grow from low until a k that does not fit, or the cap
        k = min(low + step, cap)
        if spent(k) > max_epsilon:
            high = k
        elif k == cap:
            return cap
        else:
            low, step = k, 2 * step
    bisect = False
    while high - low > 1:
        width = high - low
        if bisect:
            guess = (low + high) // 2
        else:
            e_low, e_high = spent(low), spent(high)
            guess = low + round((max_epsilon - e_low) / (e_high - e_low) * width)
            guess = min(max(guess, low + 1), high - 1)
        if spent(guess) <= max_epsilon:
            low = guess
            if guess + 1 < high and spent(guess + 1) > max_epsilon:
                high = guess + 1
        else:
            high = guess
            if guess - 1 > low and spent(guess - 1) <= max_epsilon:
                low = guess - 1
        bisect = not bisect and high - low > width // 2  # interpolation that did not halve: bisect next
    return low
