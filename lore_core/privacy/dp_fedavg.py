"""User-level DP-FedAvg mechanism (McMahan et al. 2018) in numpy: Poisson user sampling, flat clip, noise on the sum,
fixed denominator q*N (design: docs/privacy.md §2, §11.1).

Shapes: one user's update dA is (B, D); a round's updates are stacked as (k, B, D) for the k sampled users
(any trailing shape works: the clip is flat over everything after the first axis).
The noise and sampling RNG must be secret: amplification assumes nobody knows who was sampled, and anyone who knows
the noise seed can subtract the noise. It is seeded from the OS entropy pool, never from the experiment seed.
"""

from __future__ import annotations

import math
import secrets

import numpy as np


class SecretRng(np.random.Generator):
    """A numpy Generator (PCG64) that knows whether its seed is secret. `reproducible` = debug seed, NOT PRIVATE.

    PCG64 is not a cryptographic generator: its state could in principle be inferred from many outputs, and textbook
    floating-point Gaussian samplers have known attacks (Jin et al., S&P 2022); the seed itself is secret.
    """

    def __init__(self, seed: int, reproducible: bool):
        super().__init__(np.random.PCG64(np.random.SeedSequence(seed)))
        self.reproducible = reproducible

    @property
    def source(self) -> str:
        if self.reproducible:
            return "numpy PCG64 from a fixed debug seed (NOT PRIVATE)"
        return "numpy PCG64 seeded with 128 bits from secrets (os.urandom)"


def make_private_rng(reproducible_seed: int | None = None) -> SecretRng:
    """The server's noise/sampling RNG: 128 secret bits, or a debug seed that marks the run NOT PRIVATE."""
    if reproducible_seed is None:
        return SecretRng(secrets.randbits(128), reproducible=False)
    return SecretRng(int(reproducible_seed), reproducible=True)


def _check_noise(noise_multiplier: float, clip_norm: float) -> None:
    # Never skip noise: a DP release with z = 0 (or NaN) is a silent no-privacy bug.
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be finite and > 0 for a DP release; got {noise_multiplier}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0; got {clip_norm}")


def poisson_sample(n_users: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each of n_users joins independently with probability `rate` -> sorted user indices (k,), k ~ Bin(n, rate)."""
    if not 0 < rate <= 1:
        raise ValueError(f"sampling rate must be in (0, 1]; got {rate}")
    return np.flatnonzero(rng.random(int(n_users)) < rate)


def clip_updates(updates: np.ndarray, clip_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat L2 clip of each user's update: (k, B, D) -> (clipped (k, B, D), norms before clipping (k,)).

    u_i <- u_i * min(1, C / ||u_i||_F); updates already within C are returned unchanged.
    """
    updates = np.asarray(updates, dtype=np.float64)
    if updates.ndim < 2:
        raise ValueError(f"updates must be stacked per user, shape (k, B, D); got shape {updates.shape}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0; got {clip_norm}")
    flat = updates.reshape(len(updates), int(np.prod(updates.shape[1:])))  # also for k = 0 users
    if not np.all(np.isfinite(flat)):
        raise ValueError("an update contains NaN or inf; drop that client before aggregation")
    # Scaled by each update's largest entry, so that a finite update of 1e200 (a faulty or hostile node) has a
    # finite norm and is clipped like any other (its squares overflowed, and the round failed: a privacy reviewer).
    peak = np.abs(flat).max(axis=1, initial=0.0)
    safe_peak = np.where(peak > 0, peak, 1.0)
    relative = np.linalg.norm(flat / safe_peak[:, None], axis=1)  # ||u|| / peak: in [1, sqrt(B D)], 0 for u = 0
    with np.errstate(over="ignore"):  # norms: inf only past 1.8e308; C / peak: inf for a subnormal peak (scale 1)
        norms = peak * relative
        scale = np.minimum(1.0, clip_norm / safe_peak / np.maximum(relative, 1e-300))
    return updates * scale.reshape((-1,) + (1,) * (updates.ndim - 1)), norms


def add_noise_to_sum(update_sum: np.ndarray, noise_multiplier: float, clip_norm: float, rng: np.random.Generator
                     ) -> np.ndarray:
    """sum (B, D) + N(0, (z C)^2 I). Under SecAgg the server gets only this sum of client-clipped updates."""
    _check_noise(noise_multiplier, clip_norm)
    update_sum = np.asarray(update_sum, dtype=np.float64)
    return update_sum + rng.normal(0.0, noise_multiplier * clip_norm, size=update_sum.shape)


def noisy_sum(clipped: np.ndarray, noise_multiplier: float, clip_norm: float, rng: np.random.Generator) -> np.ndarray:
    """Sum of already-clipped updates (k, B, D) plus Gaussian noise -> (B, D). k = 0 gives pure noise (correct)."""
    clipped = np.asarray(clipped, dtype=np.float64)
    return add_noise_to_sum(clipped.sum(axis=0), noise_multiplier, clip_norm, rng)


def aggregate_user_dp(
    updates: np.ndarray,
    noise_multiplier: float,
    clip_norm: float,
    sample_rate: float,
    population: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """One DP-FedAvg aggregation: (k, B, D) raw updates -> mean update (B, D) = (sum clipped + noise) / (q N).

    The denominator is the fixed expected count q*N, not k: with the actual count, adding or removing a user would
    also change the denominator (sensitivity ~2C/m). Drop-outs then cost utility, not privacy.
    """
    if not 0 < sample_rate <= 1 or population < 1:
        raise ValueError(f"need sample_rate in (0, 1] and population >= 1; got {sample_rate}, {population}")
    clipped, _ = clip_updates(updates, clip_norm)
    return noisy_sum(clipped, noise_multiplier, clip_norm, rng) / (sample_rate * population)
