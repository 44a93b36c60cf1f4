"""Did a run labelled private draw its randomness from the debug seed? Read from its ledger's sampled counts.

A `--reproducible-noise` run (debug, NOT PRIVATE) draws each round's user sample and noise from `noise_seed`, 0
unless given. A privacy tester edited such a run's ledger, checkpoint and metrics.json together to say it was
private, and `audit accounting` passed it. Its sampled counts give it away: replayed from the debug seed as the
server draws them (`UserDpAggregator`: the Poisson sample of N users, then the (B, D) noise, each round), they match
the ledger's round after round, which a secret 128-bit stream does only by chance. The check reports a match of
the first rounds whose chance under Poisson sampling falls below CHANCE. The seeds tried are the ones people type
(DEBUG_SEEDS: 0-1023 and common larger ones). A round's count matches a wrong seed's only by chance (about one time
in 18 at 50 users a round), so most seeds cost one Poisson draw of N users, and an honest run is flagged with chance
at most CHANCE per seed, len(DEBUG_SEEDS) x CHANCE (about 1e-6) in all. A resumed or interrupted stream, a seed
outside DEBUG_SEEDS (a tester can give any integer), or a server that changed how it draws is not caught.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

from lore_core.privacy.dp_fedavg import make_private_rng, poisson_sample

# 0 is the default noise_seed of a reproducible run (privacy_settings.validate); the rest are seeds people type
COMMON_SEEDS = (1234, 1337, 2020, 2021, 2022, 2023, 2024, 2025, 2026, 4242, 12345, 31337, 42424, 54321, 65535, 99999,
                3407, 123456, 424242, 999999, 1234567, 12345678, 123456789, 2**31 - 1, 2**32 - 1)
DEBUG_SEEDS = tuple(range(1024)) + COMMON_SEEDS
CHANCE = 1e-9


def debug_stream_match(counts: list[int], population: int, rate: float, noise_shape: tuple[int, ...],
                       seeds: tuple[int, ...] = DEBUG_SEEDS) -> dict | None:
    """{seed, rounds (matched from the first), chance (of those matches under honest Poisson sampling)} for the
    first debug seed whose replayed sample sizes match the ledger's `counts` at a chance below CHANCE; else None.
    Counts that no match could make that unlikely (every user sampled each round: each seed matches every round at
    chance 1, a reviewer's 15-40 s of replays) end the check before any seed is replayed."""
    log_chances = binom.logpmf(np.asarray(counts, dtype=np.int64), population, rate)
    if not log_chances.sum() < np.log(CHANCE):
        return None
    for seed in seeds:
        rng = make_private_rng(seed)
        matched = 0
        for count in counts:
            if poisson_sample(population, rate, rng).size != int(count):
                break  # (most seeds stop at their first round)
            rng.normal(size=noise_shape)  # the round's noise, drawn after its sample
            matched += 1
        log_chance = float(log_chances[:matched].sum())
        if matched and log_chance < np.log(CHANCE):
            return {"seed": seed, "rounds": matched, "chance": float(np.exp(log_chance))}
    return None
