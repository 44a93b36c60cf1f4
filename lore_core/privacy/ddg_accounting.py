"""Accounting of the distributed discrete Gaussian under Poisson sampling (mode `user+secagg`; docs/privacy.md §2b).

Kairouz, Liu & Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation"
(ICML 2021, arXiv 2102.06387), as their reference code (google-research/federated, distributed_dp/accounting_utils)
computes it:
- Quantisation: a client's update, clipped to C and scaled to the grid (c = C / granularity units), is rounded
  stochastically and re-rounded until its norm is at most the bound of their Theorem 1 (conditional rounding,
  beta = exp(-1/2)); that bound, not c, is the L2 sensitivity of the integer sum (`rounded_l2_norm_bound`).
- The sum of n discrete Gaussian shares is not a discrete Gaussian; Proposition 14 bounds its Renyi divergence with
  an extra tau = 10 sum_{k<n} exp(-2 pi^2 s^2 k / (k + 1)) (s = one share's std in grid units). With s >= 64 grid
  units, which the encoding plan guarantees, tau underflows to exactly 0.
- Poisson subsampling of users at rate q: the general upper bound of Zhu & Wang, "Poisson Subsampled Renyi
  Differential Privacy" (ICML 2019, Theorem 5), valid for any mechanism given its RDP at integer orders (it is
  looser than Opacus' exact bound for the continuous Gaussian, which does not apply to a discrete sum).
- RDP composed over rounds, converted to (epsilon, delta) as Opacus converts RDP (Balle et al. 2020).
The noise std on the sum is z C (the accounted minimum: at most the tolerated fraction of a round's users dropped).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np
from scipy import special

BETA = math.exp(-0.5)  # conditional rounding: a rounding is redrawn with probability at most beta
ORDERS = tuple(range(2, 129)) + (160, 192, 256)  # integer orders: Zhu & Wang's bound needs them
MIN_CLIP_UNITS = 2**16  # the encoding puts C at >= this many grid units: rounding inflates sensitivity by ~1e-5
MIN_NOISE_UNITS = 64.0  # one share's std in grid units at least: tau of Proposition 14 is then 0.0


def rounded_l2_norm_bound(l2_norm: float, dim: int, beta: float = BETA) -> float:
    """Norm bound of a vector of norm <= l2_norm (grid units) after conditional stochastic rounding to integers
    (KLS21 Theorem 1)."""
    bound = l2_norm + math.sqrt(dim)
    if beta == 0:
        return bound
    squared = l2_norm**2 + 0.25 * dim + math.sqrt(2.0 * math.log(1.0 / beta)) * (l2_norm + 0.5 * math.sqrt(dim))
    return min(bound, math.sqrt(squared))


def sum_tau(share_std_units: float, shares: int) -> float:
    """tau of KLS21 Proposition 14 for the sum of `shares` discrete Gaussians of std `share_std_units` each."""
    k = np.arange(1, max(int(shares), 1), dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * (math.pi * share_std_units) ** 2 * k / (k + 1)).sum())


def _ddg_rdp(order: int, l2_scale: float, l1_scale: float, tau: float, dim: int) -> float:
    """One unsampled round: KLS21 Proposition 14 (scales = sensitivity / std of the summed noise)."""
    return min(order / 2.0 * l2_scale**2 + tau * dim,
               order / 2.0 * (l2_scale**2 + 2.0 * l1_scale * tau + tau**2 * dim),
               order / 2.0 * (l2_scale + math.sqrt(dim) * tau) ** 2)


def _poisson_subsampled_rdp(order: int, q: float, rdp: list[float]) -> float:
    """Zhu & Wang 2019 Theorem 5 (general upper bound); rdp[l] = the unsampled mechanism's RDP at order l."""
    if q == 1:
        return rdp[order]
    l = np.arange(3, order + 1)
    log_terms = [0.0, rdp[2]] + list((l - 1) * np.array([rdp[i] for i in l]) + special.gammaln(order + 1)
                                     - special.gammaln(l + 1) - special.gammaln(order - l + 1)
                                     + (order - l) * math.log1p(-q) + l * math.log(q))
    weights = [(1 - q) ** (order - 1) * (order * q - q + 1), special.comb(order, 2) * q**2 * (1 - q) ** (order - 2)]
    weights += [3.0] * (order - 2)
    return float(special.logsumexp(log_terms, b=weights) / (order - 1))


def ddg_rdp(noise_multiplier: float, sample_rate: float, dim: int, *, clip_units: float = MIN_CLIP_UNITS,
            share_std_units: float = MIN_NOISE_UNITS, shares: int = 1_000_000) -> np.ndarray:
    """RDP (len(ORDERS),) of one Poisson-sampled round whose summed noise has std noise_multiplier * C, for a clip
    norm of `clip_units` grid units and shares of at least `share_std_units` grid units (at most `shares` of them)."""
    sensitivity = rounded_l2_norm_bound(clip_units, dim)
    l1 = sensitivity * min(math.sqrt(dim), sensitivity)
    std = noise_multiplier * clip_units
    tau = sum_tau(share_std_units, shares)
    base = [0.0, 0.0] + [_ddg_rdp(a, sensitivity / std, l1 / std, tau, dim) for a in range(2, ORDERS[-1] + 1)]
    return np.array([min(_poisson_subsampled_rdp(a, sample_rate, base), base[a]) for a in ORDERS])


def ddg_epsilon(history: Iterable[Sequence], delta: float, dim: int) -> tuple[float, float]:
    """(epsilon, optimal order) of a history of (z, q, steps) segments of the distributed discrete Gaussian."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    total = np.zeros(len(ORDERS))
    for z, q, steps in history:
        total += steps * ddg_rdp(float(z), float(q), int(dim))
    if not total.any():
        return 0.0, float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # optimal order at the grid's edge: the bound stays valid
        eps, order = get_privacy_spent(orders=list(ORDERS), rdp=list(total), delta=delta)
    return float(eps), float(order)
