"""Did a run labelled private draw its randomness from the debug seed? Read from its ledger's sampled counts.

A `--reproducible-noise` run (debug, NOT PRIVATE) draws each round's user sample and noise from `noise_seed`, 0
unless given. A privacy tester edited such a run's ledger, checkpoint and metrics.json together to say it was
private, and `audit accounting` passed it. Its sampled counts give it away: replayed from the debug seed as the
server draws them (`UserDpAggregator`: the Poisson sample of N users, then the (B, D) noise, each round), they match
the ledger's round after round, which a secret 128-bit stream does only by chance. The check reports a match of
the first rounds whose chance under Poisson sampling falls below CHANCE; a resumed or interrupted stream, a seed
other than the default ones, or a server that changed how it draws is not caught.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

from lore_core.privacy.dp_fedavg import make_private_rng, poisson_sample

DEBUG_SEEDS = (0,)  # the default noise_seed of a reproducible run (privacy_settings.validate)
CHANCE = 1e-9


def debug_stream_match(counts: list[int], population: int, rate: float, noise_shape: tuple[int, ...],
                       seeds: tuple[int, ...] = DEBUG_SEEDS) -> dict | None:
    """{seed, rounds (matched from the first), chance (of those matches under honest Poisson sampling)} for the
    first debug seed whose replayed sample sizes match the ledger's `counts` at a chance below CHANCE; else None."""
    for seed in seeds:
        rng = make_private_rng(seed)
        matched, log_chance = 0, 0.0
        for count in counts:
            drawn = poisson_sample(population, rate, rng).size
            rng.normal(size=noise_shape)  # the round's noise, drawn after its sample
            if drawn != int(count):
                break
            matched += 1
            log_chance += float(binom.logpmf(int(count), population, rate))
        if matched and log_chance < np.log(CHANCE):
            return {"seed": seed, "rounds": matched, "chance": float(np.exp(log_chance))}
    return None
