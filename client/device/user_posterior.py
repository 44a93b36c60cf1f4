"""The device state's beliefs about its user: w, its posterior and how sure they are (glue between state and math).

refit() recomputes w (personalize.adapt) and its Laplace posterior (posterior.laplace) from every stored answer
under the state's prior; the state keeps both and is saved atomically by the caller. samples() turns the stored
Laplace into importance-weighted samples of the exact posterior (the same samples for the same state, so commands
are reproducible). Without answers or a declared prior the posterior is the personal prior around the population.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np

from client.device import personalize, posterior, questions
from client.device.state import DeviceState

# The device's personal prior, worth this many answers, for a basis file that carries none: chosen on the onboarding
# pilots (seeds 101, 102) with `python -m simulations.bench_onboarding --pilot`, for regions that cover the truth at an
# unchanged accuracy (0.5 until the posterior's adaptive proposal; bench_results/onboarding_pilot.md). A basis from
# `lore-fed train` or `simulate` carries the prior chosen on held-out groups.
DEVICE_PRIOR_PAIRS = 1.0


def prior_pairs(state: DeviceState) -> float:
    """The personal prior of this device's fits (`basis_prior_pairs` of its basis)."""
    return basis_prior_pairs(state.basis)


def basis_prior_pairs(basis) -> float:
    """The personal prior a device fits with on `basis` (a BasisFile): the file's, else DEVICE_PRIOR_PAIRS."""
    return DEVICE_PRIOR_PAIRS if basis.prior_pairs is None else float(basis.prior_pairs)


def answer_scores(state: DeviceState) -> np.ndarray:
    """The stored answers' basis scores (1, n, B)."""
    return (np.asarray(state.pair_diff, np.float64) @ state.basis.basis.astype(np.float64).T)[None]


def point_weights(state: DeviceState) -> np.ndarray | None:
    """The w rankings use before strength: fitted w, else the declared prior's centre, else None (population)."""
    return state.user_weights if state.user_weights is not None else state.prior_mean


def refit(state: DeviceState) -> tuple[DeviceState, personalize.Adaptation | None]:
    """w and its posterior from all stored answers; (new state, the fit or None without answers)."""
    result = None
    weights = None
    if state.n_pairs:
        result = personalize.adapt(state.basis.basis, state.pair_diff, init=state.user_weights,
                                   prior_pairs=prior_pairs(state), prior_mean=state.prior_mean)
        weights = result.user_weights
    mode = cov = None
    if state.n_pairs or state.prior_mean is not None:
        fit = _laplace(state, weights)
        mode, cov = fit.mode[0], fit.cov[0]
    return replace(state, user_weights=weights, posterior_mode=mode, posterior_cov=cov), result


# Below this many effective samples the intervals, calibrated probabilities and information gains rest on a handful
# of samples (a hostile-input test: a basis scaled to 1e6, or hundreds of answers at rank 40); every command that
# reads the posterior says so (a `note:` on stderr).
THIN_SAMPLES = 20


def samples(state: DeviceState, n_samples: int = posterior.DEFAULT_SAMPLES) -> posterior.PosteriorSamples:
    """Importance-weighted samples of w's posterior (U = 1)."""
    if state.posterior_mode is None:
        fit = _laplace(state, None)
    else:
        fit = posterior.LaplaceFit(mode=state.posterior_mode[None], cov=state.posterior_cov[None])
    drawn = posterior.sample(answer_scores(state), fit, prior_pairs(state), _prior(state), n_samples=n_samples,
                             rng=np.random.default_rng(posterior.SAMPLE_SEED))
    size = float(drawn.effective_size[0])
    if size < THIN_SAMPLES:
        warnings.warn(f"w's posterior rests on {size:.1f} effective samples of {n_samples}: its intervals, "
                      "probabilities and question choice are unreliable (a basis with extreme scales, or many "
                      "answers at a large rank)")
    return drawn


def next_questions(state: DeviceState, pool_diff: np.ndarray, available: np.ndarray, k: int):
    """The k most informative available pool pairs (pool_diff (P, D), available (P,) bool): (indices, each one's
    added information in bits, the best single pair's information: what the stop rule reads)."""
    scores = (np.asarray(pool_diff, np.float64) @ state.basis.basis.astype(np.float64).T)[None]
    picked, joint = questions.choose_batch(samples(state), scores, available, k)
    # Information is >= 0; a sampled estimate of nothing to learn can come out -1e-17 (printed as -0.0).
    added = np.maximum(np.diff(np.r_[0.0, joint]), 0.0)
    best = max(float(joint[0]), 0.0) if joint.size else 0.0  # the first greedy pick is the best single pair
    return picked, added, best


def confidence(state: DeviceState, drawn: posterior.PosteriorSamples) -> dict:
    """What `status` says about w: where it comes from, w, 90 % intervals of each weight, and one spread number."""
    declared = ", ".join(f"{field}={value}" for field, value in state.attributes)
    if state.n_pairs:
        source = f"personal: learned from {state.n_pairs} answers"
    elif state.prior_mean is not None:
        source = f"cold start: the prior of your declared attributes ({declared}); no answers yet"
    else:
        source = "cold start: the population reward; no answers yet"
    w = point_weights(state)
    w = np.full(state.basis.rank, 1.0 / state.basis.rank) if w is None else w
    low, high = posterior.credible_intervals(drawn, drawn.w)
    return {
        "personalization": source,
        "answers": state.n_pairs,
        "attributes_declared": dict(state.attributes),
        "user_weights": _rounded(w),
        "weights_interval_90": [[round(float(a), 4), round(float(b), 4)] for a, b in zip(low[0], high[0])],
        "spread": round(float(posterior.spread(drawn)[0]), 4),
        "effective_samples": round(float(drawn.effective_size[0]), 1),
    }


def _laplace(state: DeviceState, weights: np.ndarray | None) -> posterior.LaplaceFit:
    init = None if weights is None else weights[None]
    return posterior.laplace(answer_scores(state), prior_pairs(state), _prior(state), init=init)


def _prior(state: DeviceState) -> np.ndarray | None:
    return None if state.prior_mean is None else state.prior_mean[None]


def _rounded(values) -> list[float]:
    return [round(float(v), 6) for v in values]
