"""The posterior's fallback where importance sampling thins out: a tempered sequential Monte Carlo sampler.

Why. The adaptive mixture of `posterior.sample` draws from two families fitted near the mode. A posterior far from
both (a basis with extreme scales, where each answer is nearly a hard constraint and the density is a polytope; or
hundreds of answers at B = 40, where small errors in a 39-dimensional covariance compound) leaves a handful of
effective samples whatever their number. Tempering does not need a good proposal: it moves particles from a
distribution it can sample, pi_0 = start, to the posterior p through pi_beta ~ start^(1 - beta) p^beta, choosing
each step of beta so that the incremental weights keep half the particles' effective size (Del Moral, Doucet & Jasra
2006; Jasra et al. 2011's adaptive schedule), resampling, and diversifying them with random-walk Metropolis moves at
the new beta, scaled by the particles' own covariance (2.38^2 / dim, Roberts & Rosenthal 2001). At beta = 1 the
moves go on until the median particle has moved FINAL_ACCEPTED times: with a fixed 20 moves the population still
lagged the posterior's tail near a face of the simplex (a bias of 8 % of w's posterior sd, about 100 independent
draws' worth of error where 512 were reported); with this rule the error is that of 410 to 720 independent draws in
the reviewer's three cases (more than 512 is possible: resampled particles are not independent either way).

What it returns. Particles at beta = 1 with equal weights, where copies of one particle that no move displaced
are merged into one sample (their weights summed, the copies' set to 0): Kish's effective size of the merged
weights is then at most the number of distinct particles, and copies do not count. It is still an upper bound on
the number of independent draws (moved particles stay correlated with their siblings), so callers that warn on thin
samples keep warning where the moves could not mix. A user still tempering after MAX_STEPS - 1 steps jumps to
beta = 1 and gets that jump's importance weights, unresampled and unmoved: a collapsed population then shows as the
handful of effective samples it is, not as 512 moved copies. The other users of the call are not affected.

Shapes as in `posterior`: U users, S particles, dim = B - 1 chart coordinates. Everything is vectorised over users
and particles; the loops are over tempering steps and moves.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lore_core.reward_math import softmax

SURVIVING_SHARE = 0.5  # each step keeps this share of the particles' effective size (the usual choice)
MOVES_PER_STEP = 5
FINAL_ACCEPTED = 20  # at beta = 1, moves go on until the median particle has moved this many times...
MAX_FINAL_MOVES = 200  # ... or this many moves were tried
_FINAL_CHUNK = 10
MAX_STEPS = 200  # a step halves the effective size (roughly a bit of information each): 200 is far beyond need
_BISECTIONS = 60
_LOG_RANGE = 700.0  # the smallest step tried is room * e^-700


def temper(
    log_target: Callable[[np.ndarray], np.ndarray],
    start,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Particles of the target and their probabilities: eta (U, S, dim), probability (U, S) summing to 1.

    log_target maps chart points (U, S, dim) to the target's unnormalised log density (U, S); start has draw(rng)
    -> (U, S, dim) and log_density(eta) -> (U, S), S = start.count."""
    eta = start.draw(rng)
    log_start = start.log_density(eta)
    log_p = log_target(eta)
    n_users, n_particles, _ = eta.shape
    identity = np.arange(n_users * n_particles).reshape(n_users, n_particles)  # which particle is a copy of which
    beta, step = np.zeros(n_users), 0
    probability = np.full((n_users, n_particles), 1.0 / n_particles)
    jumped = np.zeros(n_users, bool)  # out of steps: these users keep the jump's weights and are not moved
    while not np.all(beta >= 1.0):
        room, finished = 1.0 - beta, beta >= 1.0  # room: how far beta still has to go
        if step == MAX_STEPS - 1:  # out of steps: weigh the rest of the way, and show the weights as they are
            jumped = ~finished
            probability[jumped] = softmax(room[jumped, None] * (log_p[jumped] - log_start[jumped]), axis=1)
            beta[:] = 1.0
            break
        increment = _next_increment(log_p - log_start, room)  # 0 for users already at beta = 1
        increment = np.where(room - increment <= 1e-12, room, increment)  # the last step takes all the room
        beta = np.where(increment == room, 1.0, beta + increment)
        index = _systematic_resample(softmax(increment[:, None] * (log_p - log_start), axis=1), rng)
        eta = np.take_along_axis(eta, index[..., None], axis=1)
        log_start, log_p, identity = (np.take_along_axis(x, index, axis=1) for x in (log_start, log_p, identity))
        moves = np.where(finished, 0, MOVES_PER_STEP)  # done users wait
        eta, log_start, log_p, accepted = _metropolis(eta, log_start, log_p, beta, moves, log_target, start, rng)
        identity = _relabel_moved(identity, accepted > 0)
        step += 1
    # At beta = 1: the population lags the target after a few moves per step (near a face of the simplex, 20 moves
    # left a bias of 8 % of w's posterior sd). Move until the median particle has moved FINAL_ACCEPTED times.
    moved_times = np.zeros(identity.shape, np.int64)
    for _ in range(0, MAX_FINAL_MOVES, _FINAL_CHUNK):
        more = np.where((np.median(moved_times, axis=1) < FINAL_ACCEPTED) & ~jumped, _FINAL_CHUNK, 0)
        if not more.any():
            break
        eta, log_start, log_p, accepted = _metropolis(eta, log_start, log_p, beta, more, log_target, start, rng)
        identity, moved_times = _relabel_moved(identity, accepted > 0), moved_times + accepted
    return eta, _merge_copies(identity, probability)


def _relabel_moved(identity: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """Copy labels (U, S) with a fresh one for each moved particle: it is no longer a copy of anything. Equal labels
    mean equal positions, which is what lets _merge_copies add copies' weights."""
    identity = np.where(moved, identity.size + np.arange(identity.size).reshape(identity.shape), identity)
    return np.unique(identity, return_inverse=True)[1].reshape(identity.shape)  # keep the labels small


def _next_increment(log_ratio: np.ndarray, room: np.ndarray) -> np.ndarray:
    """The largest beta step (U,) in (0, room] whose incremental weights exp(step * log_ratio) keep SURVIVING_SHARE
    of the particles' effective size (bisection on log step, per user, down to room * e^-_LOG_RANGE: log ratios
    spread over 1e12 need steps of 1e-12 and less)."""
    n_particles = log_ratio.shape[1]
    wanted = SURVIVING_SHARE * n_particles

    def effective(log_step):
        return 1.0 / np.square(softmax(np.exp(log_step)[:, None] * log_ratio, axis=1)).sum(axis=1)

    high = np.log(np.maximum(room, 1e-300))
    low = high - _LOG_RANGE
    fits = effective(high) >= wanted
    for _ in range(_BISECTIONS):
        middle = 0.5 * (low + high)
        keep = effective(middle) >= wanted
        low, high = np.where(keep, middle, low), np.where(keep, high, middle)
    return np.where(fits, room, np.exp(low))


def _systematic_resample(probability: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices (U, S) of systematic resampling: each particle kept about S * probability times."""
    n_users, n_particles = probability.shape
    positions = (rng.random((n_users, 1)) + np.arange(n_particles)) / n_particles
    cumulative = np.cumsum(probability, axis=1)
    cumulative[:, -1] = 1.0
    offset = np.arange(n_users)[:, None]  # users side by side on one line: one searchsorted for all of them
    index = np.searchsorted((cumulative + offset).ravel(), (positions + offset).ravel(), side="right")
    # side="right" skips particles of weight 0, except a position within ~S * 2^-53 of the line's end, which rounds
    # onto it (or a neighbour's line): the clip then keeps the user's last particle, whatever its weight
    return np.clip(index.reshape(n_users, n_particles) - offset * n_particles, 0, n_particles - 1)


def _metropolis(eta, log_start, log_p, beta, moves, log_target, start, rng):
    """Random-walk Metropolis moves at each user's beta, `moves` (U,) of them, proposal scaled by the particles'
    covariance; users with fewer moves left keep their particles. Also returns how often each particle moved (U, S)."""
    n_users, n_particles, dim = eta.shape
    centred = eta - eta.mean(axis=1, keepdims=True)
    cov = np.einsum("usi,usj->uij", centred, centred) / n_particles
    scale = np.mean(np.diagonal(cov, axis1=1, axis2=2), axis=1)
    cov += (1e-9 * scale + 1e-300)[:, None, None] * np.eye(dim)  # relative: a chart variance can be 1e-12
    chol = np.linalg.cholesky((2.38 ** 2 / dim) * cov)
    accepted_count = np.zeros((n_users, n_particles), np.int64)
    for move in range(int(moves.max())):
        trial = eta + np.einsum("uij,usj->usi", chol, rng.standard_normal(eta.shape))
        trial_start, trial_p = start.log_density(trial), log_target(trial)
        log_accept = ((1.0 - beta)[:, None] * (trial_start - log_start) + beta[:, None] * (trial_p - log_p))
        accept = (np.log(rng.random(log_accept.shape)) < log_accept) & (move < moves)[:, None]
        eta = np.where(accept[..., None], trial, eta)
        log_start = np.where(accept, trial_start, log_start)
        log_p = np.where(accept, trial_p, log_p)
        accepted_count += accept
    return eta, log_start, log_p, accepted_count


def _merge_copies(identity: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """Probabilities (U, S) with copies of one particle merged: each distinct particle (by its label in identity,
    unique across users) gets its copies' total probability, carried by its first copy."""
    _, first, inverse = np.unique(identity.ravel(), return_index=True, return_inverse=True)
    merged = np.zeros(identity.size)
    merged[first] = np.bincount(inverse.reshape(-1), weights=probability.ravel(), minlength=first.size)
    return merged.reshape(identity.shape)

