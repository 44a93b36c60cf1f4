"""The distributed discrete Gaussian (Kairouz, Liu & Steinke, ICML 2021) on the integer ring of Flower's SecAgg+, numpy
only (mode `user+secagg`; docs/privacy.md §2b; accounting in lore_core.privacy.ddg_accounting).

Each sampled user, on its own device, before masking:
1. clips its update dA (B, D) to C (flat L2),
2. scales it to the grid (granularity g, a power of two) and rounds each entry stochastically to an integer,
   redrawing until the norm is within KLS21's bound (conditional rounding; that bound is the accounted sensitivity),
3. adds its share of the noise: i.i.d. discrete Gaussian entries of std s / g, s = z C / sqrt(n_min), where
   n_min = ceil((1 - x) k) for the round's k sampled users and dropout tolerance x.
A node sums its users' integer vectors and hands v g to `secaggplus_mod`. Flower quantises an entry v by
(clip(v, -R, R) + R) Q / (2 R) with R = `clipping_range`, Q = `quantization_range`; with R and Q powers of two and
g = 2 R / Q, an integer multiple of g lands exactly on the integer v / g + Q / 2 (no rounding, no randomness), so
the masked ring carries our integers. The server unmasks only the sum over nodes; it holds the clipped, rounded
updates plus the noise of every contributing user: std z C sqrt(n / n_min) >= z C when n >= n_min users
contributed. A round where more than x of the sampled users dropped is aborted before unmasking
(server.secagg_workflow): the server never sees a sum with less noise than accounted.
No random rotation (KLS21 rotate to save bits): the plan keeps every node sum inside the 32-bit ring without it.
RNG: numpy PCG64 seeded from the OS entropy pool per call; the sampler's acceptance test is floating-point (as the
reference implementation), a residual risk like the continuous Gaussian's.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from lore_core.privacy.ddg_accounting import BETA, MIN_CLIP_UNITS, MIN_NOISE_UNITS, rounded_l2_norm_bound
from lore_core.privacy.dp_fedavg import clip_updates

RING_BITS = 32  # Flower's default modulus_range 2**32
MAX_QUANTIZATION_BITS = 30  # Flower rounds into int32
TAIL_STDS = 10.0  # a node sum's entries stay within R unless the noise exceeds 10 std (probability < 1e-23)


class ShareOutOfRange(ValueError):
    """A node's noised sum would leave the clipping range of the ring: the node drops out of the round."""


def min_contributors(sampled: int, dropout_tolerance: float) -> int:
    """n_min: the fewest contributing users whose shares still add up to the accounted noise."""
    return max(1, math.ceil((1.0 - dropout_tolerance) * sampled - 1e-9))


def share_std(noise_multiplier: float, clip_norm: float, sampled: int, dropout_tolerance: float) -> float:
    """One user's noise std s = z C / sqrt(n_min): any n_min of the k sampled users together add std z C."""
    return noise_multiplier * clip_norm / math.sqrt(min_contributors(sampled, dropout_tolerance))


@dataclass(frozen=True)
class DdgEncoding:
    """The grid and the ring: granularity g = 2 R / Q with R (Flower's clipping_range) and Q (quantization_range)
    powers of two."""

    clip_norm: float
    clipping_range: float
    quantization_range: int

    @property
    def granularity(self) -> float:
        return 2.0 * self.clipping_range / self.quantization_range

    @property
    def limit(self) -> int:
        """Largest |entry| of a node's integer vector that Flower's quantiser keeps exactly."""
        return self.quantization_range // 2


def plan_encoding(clip_norm: float, noise_multiplier: float, max_users_per_node: int, num_nodes: int,
                  population: int) -> DdgEncoding:
    """The finest grid whose node sums (at most `max_users_per_node` users, each |entry| <= C plus a share of std
    at most z C) stay inside R, and whose sum over `num_nodes` nodes fits the ring (num_nodes Q < 2^32). Refuses
    (ValueError) a grid too coarse for the accounting's assumptions: C >= MIN_CLIP_UNITS grid units and every
    share (at most `population` of them in a round) >= MIN_NOISE_UNITS grid units."""
    needed = max_users_per_node * clip_norm + TAIL_STDS * math.sqrt(max_users_per_node) * noise_multiplier * clip_norm
    clipping_range = 2.0 ** math.ceil(math.log2(needed))
    quantization_range = 2 ** min(MAX_QUANTIZATION_BITS, RING_BITS - math.ceil(math.log2(num_nodes + 1)))
    encoding = DdgEncoding(clip_norm, clipping_range, quantization_range)
    smallest_share = noise_multiplier * clip_norm / math.sqrt(population)
    if clip_norm / encoding.granularity < MIN_CLIP_UNITS or smallest_share / encoding.granularity < MIN_NOISE_UNITS:
        raise ValueError(f"the 32-bit ring cannot hold {num_nodes} nodes of up to {max_users_per_node} users at a grid "
                         f"fine enough for the accounting (granularity {encoding.granularity:.3g} for clip norm "
                         f"{clip_norm} and noise shares down to {smallest_share:.3g}); use fewer users per node or "
                         "fewer nodes")
    return encoding


def discrete_gaussian(std: float, size: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """i.i.d. discrete Gaussian N_Z(0, std^2) entries (Canonne, Kamath & Steinke 2020, Algorithm 3, vectorized):
    discrete Laplace proposals of scale t = floor(std) + 1, accepted with probability
    exp(-(|y| - std^2 / t)^2 / (2 std^2))."""
    t = math.floor(std) + 1
    p = -math.expm1(-1.0 / t)
    out = np.empty(int(np.prod(size)), dtype=np.int64)
    todo = np.arange(out.size)
    while todo.size:
        y = rng.geometric(p, todo.size) - rng.geometric(p, todo.size)
        accept = rng.random(todo.size) < np.exp(-((np.abs(y) - std * std / t) ** 2) / (2 * std * std))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out.reshape(size)


def conditional_round(scaled: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of each row of `scaled` (k, d) to integers, each row redrawn until its norm is <= bound."""
    low = np.floor(scaled)
    frac = scaled - low
    out = np.empty(scaled.shape, dtype=np.int64)
    todo = np.arange(scaled.shape[0])
    while todo.size:
        rounded = low[todo] + (rng.random(frac[todo].shape) < frac[todo])
        ok = np.einsum("kd,kd->k", rounded, rounded) <= bound * bound
        out[todo[ok]] = rounded[ok].astype(np.int64)
        todo = todo[~ok]
    return out


def encode_shares(updates: np.ndarray, encoding: DdgEncoding, noise_std: float,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Each user's update (k, B, D) -> its noised integer vector (k, B, D): clip to C, scale to the grid,
    conditional rounding, plus discrete Gaussian noise of std noise_std / granularity. Runs on the user's device."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    clipped, _ = clip_updates(updates, encoding.clip_norm)
    k, shape = clipped.shape[0], clipped.shape[1:]
    flat = clipped.reshape(k, -1) / encoding.granularity
    bound = rounded_l2_norm_bound(encoding.clip_norm / encoding.granularity, flat.shape[1], BETA)
    rounded = conditional_round(flat, bound, rng)
    noise = discrete_gaussian(noise_std / encoding.granularity, flat.shape, rng)
    return (rounded + noise).reshape((k,) + shape)


def node_upload(shares: np.ndarray, encoding: DdgEncoding) -> np.ndarray:
    """A node's users' integer vectors (k, B, D) -> their sum as grid multiples (B, D) for `secaggplus_mod`."""
    total = shares.sum(axis=0)
    if np.abs(total).max(initial=0) > encoding.limit:
        raise ShareOutOfRange(f"a noised node sum reaches {np.abs(total).max()} grid units, beyond the ring's "
                              f"{encoding.limit}: this node drops out of the round")
    return total.astype(np.float64) * encoding.granularity


def decode_sum(unmasked_sum: np.ndarray, encoding: DdgEncoding) -> np.ndarray:
    """The server's unmasked sum back on the grid (undoes float round-off of Flower's dequantisation)."""
    return np.round(np.asarray(unmasked_sum, dtype=np.float64) / encoding.granularity) * encoding.granularity
