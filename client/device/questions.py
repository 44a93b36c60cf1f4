"""Which pairs to ask a new user next: expected information gain about w, and when to stop asking.

Criterion. The answer y to pair j is Bernoulli(sigma(w . s_j)) given w. Its expected information about w is the
mutual information I(y; w) = H(E_w[p]) - E_w[H(p)] (in bits), with the expectation over the posterior samples of
`posterior` (BALD, Houlsby et al. 2011). It is high where the posterior disagrees about the answer and each w is
sure of it, so it skips pairs that are unclear to everyone (label noise, |s| small) as well as pairs all of the
posterior already agrees on. Unlike PReF's `max_dist` rule (Fisher norm at a point estimate, no prior), it reads
the whole posterior, the simplex and the personal prior, and it asks a first question by the same rule.

Several at once (K > 1): greedy joint information of the batch, I(y_1..y_K; w) (BatchBALD, Kirsch et al. 2019),
so a batch does not ask the same thing twice. The joint answer distribution is enumerated while it has at most
MAX_CONFIGURATIONS outcomes, then followed by sampled outcomes.

Stop rule. Asking pays while a question can still teach something: stop when the best remaining pair's expected
information falls below STOP_BITS (chosen on six pilot populations by `simulations.pilot_stop_threshold`: the
largest threshold that loses at most one accuracy point against 30 answers on every pilot; 0.08, chosen on two,
lost 1.2-1.9 on fresh populations), or the pool is used up.

All numpy, vectorized over the pool (and over users for benchmarks).
"""

from __future__ import annotations

import numpy as np

from client.device.posterior import PosteriorSamples

STOP_BITS = 0.05
MAX_CONFIGURATIONS = 256
# The most pairs asked at once (`next-question --k`): past about 35 picks the sampled joint information is noise
# (greedy gains below -0.01 bits on random pools of 200-2000 pairs, rank 4-10), and each pick is a pass over the pool
# (`--k 10**30` ran 163 s on 2,000 pairs, its figures turning to NaN); onboarding asks 30 questions in all.
MAX_BATCH = 32
_LN2 = np.log(2.0)


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Binary entropy in bits, 0 at p = 0 or 1."""
    p = np.clip(p, 1e-12, 1.0 - 1e-12)
    return -(p * np.log(p) + (1.0 - p) * np.log1p(-p)) / _LN2


def answer_probabilities(samples: PosteriorSamples, pool_scores: np.ndarray) -> np.ndarray:
    """P(first response chosen | w_s) (U, S, P) for pool pairs scored (U, P, B): 0.5 (1 + tanh(z / 2)), computed in
    place (one (U, S, P) array: a 50,000-pair pool holds 200 MB of it at 512 samples)."""
    p = np.einsum("usb,upb->usp", samples.w, pool_scores)
    p *= 0.5
    np.tanh(p, out=p)
    p += 1.0
    p *= 0.5
    return p


def _conditional_entropy_bits(prob: np.ndarray, p: np.ndarray, block: int = 4096) -> np.ndarray:
    """E_w H(y_j | w) (P,) for p (S, P), a block of pairs at a time: the entropy's temporaries stay (S, block)."""
    return np.concatenate([prob @ _entropy_bits(p[:, start:start + block]) for start in range(0, p.shape[1], block)])


def expected_information(samples: PosteriorSamples, pool_scores: np.ndarray) -> np.ndarray:
    """I(y_j; w) in bits (U, P) for every pool pair at once."""
    p = answer_probabilities(samples, pool_scores)
    mean = np.einsum("us,usp->up", samples.probability, p)
    return _entropy_bits(mean) - np.einsum("us,usp->up", samples.probability, _entropy_bits(p))


def choose_next(samples: PosteriorSamples, pool_scores: np.ndarray, available: np.ndarray) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """The most informative available pair per user: (index (U,), bits (U,)); available (U, P) bool."""
    gain = np.where(available, expected_information(samples, pool_scores), -np.inf)
    index = gain.argmax(axis=1)
    return index, gain[np.arange(gain.shape[0]), index]


def choose_batch(samples: PosteriorSamples, pool_scores: np.ndarray, available: np.ndarray, k: int,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """K pairs for ONE user, greedily maximising their joint information I(y_1..y_K; w) (BatchBALD).

    samples for one user (U = 1), pool_scores (1, P, B), available (P,) bool. Returns (indices (k',), the joint
    information after each pick (k',), bits), k' = min(k, available pairs).

    Configurations: joint (S, M) holds P(outcome m | w_s) for the M outcomes followed so far; rho (M,) weighs them:
    rho = P(m) while outcomes are enumerated, 1/M once they are sampled. The batch entropy is then
    H = sum_m rho_m sum_y P(y | m) (-log P(m, y)), which is exact for the enumeration and unbiased when sampled.

    Lazy evaluation (Minoux 1978): answers are independent given w, so a pair's added information
    I(y_j; w | y_batch) = I(y_j; w) - I(y_j; y_batch) only shrinks as the batch grows. Each pair's last computed gain
    bounds its next one, and each pick scores pairs in order of that bound until no bound left beats the best gain:
    the picks of scoring the whole pool every time (the same while outcomes are enumerated; sampled outcomes carry
    their noise either way), at a few hundred pairs per pick instead of all (a tester's 32 picks from 20,000 pairs
    took 12 s).
    """
    if not 1 <= k <= MAX_BATCH:
        raise ValueError(f"a batch is 1 to {MAX_BATCH} pairs, got {k}")
    rng = rng if rng is not None else np.random.default_rng(0)
    prob = samples.probability[0]  # (S,)
    p = answer_probabilities(samples, pool_scores)[0]  # (S, P)
    conditional = _conditional_entropy_bits(prob, p)  # (P,) E_w H(y_j | w)
    joint = np.ones((prob.size, 1))
    rho = np.ones(1)
    enumerated = True
    free = np.asarray(available, bool).copy()
    bound = np.full(free.size, np.inf)  # each pair's last computed added information: a bound of its next
    chosen, info = [], []
    conditional_sum = 0.0
    for _ in range(min(k, int(free.sum()))):
        p_m = prob @ joint  # (M,)
        outcome = (prob[:, None] * joint).T  # (M, S): P(m, w_s)
        weight = np.divide(rho, p_m, out=np.zeros_like(rho), where=p_m > 0)[:, None]

        batch_info = info[-1] if info else 0.0  # I(y_batch; w) so far

        def added(pairs: np.ndarray) -> np.ndarray:
            """I(y_batch, y_j; w) - I(y_batch; w) for each pair j: what it adds (the bound shrinks, not the sum)."""
            p_m1 = outcome @ p[:, pairs]  # (M, n): P(m, y_j = 1)
            batch_entropy = (weight * (_xlogx_neg(p_m1) + _xlogx_neg(p_m[:, None] - p_m1))).sum(axis=0) / _LN2
            return batch_entropy - conditional[pairs] - conditional_sum - batch_info

        j, gain = _lazy_best(np.flatnonzero(free), bound, added)
        chosen.append(j)
        info.append(batch_info + gain)
        conditional_sum += conditional[j]
        free[j] = False
        pj = p[:, j : j + 1]
        p_m1 = outcome @ p[:, j]
        p_m0 = p_m - p_m1
        if enumerated and 2 * joint.shape[1] <= MAX_CONFIGURATIONS:
            joint = np.concatenate([joint * pj, joint * (1.0 - pj)], axis=1)
            rho = np.concatenate([p_m1, p_m0])
            continue
        if enumerated:  # switch to MAX_CONFIGURATIONS outcomes drawn from P(m, y_j)
            outcome_p = np.concatenate([p_m1, p_m0])
            draw = rng.choice(outcome_p.size, size=MAX_CONFIGURATIONS, p=outcome_p / outcome_p.sum())
            both = np.concatenate([joint * pj, joint * (1.0 - pj)], axis=1)
            joint, rho, enumerated = both[:, draw], np.full(MAX_CONFIGURATIONS, 1.0 / MAX_CONFIGURATIONS), False
            continue
        y = rng.random(joint.shape[1]) < p_m1 / p_m  # y ~ P(y_j | m) for each followed outcome
        joint = joint * np.where(y[None, :], pj, 1.0 - pj)
    return np.asarray(chosen, dtype=np.int64), np.asarray(info)


LAZY_BLOCK = 256  # pairs scored at once by a lazy pick


def _lazy_best(candidates: np.ndarray, bound: np.ndarray, added) -> tuple[int, float]:
    """The candidate with the largest added(.) (the lowest index among equals), scoring blocks in order of `bound`
    (each pair's last gain, updated here) until no unscored bound reaches the best gain found."""
    order = candidates[np.argsort(-bound[candidates], kind="stable")]
    best, best_gain = int(order[0]), -np.inf
    for start in range(0, order.size, LAZY_BLOCK):
        block = order[start:start + LAZY_BLOCK]
        if bound[block[0]] < best_gain:
            break
        gains = np.nan_to_num(added(block), nan=-np.inf)  # a NaN gain is no gain (and never hides a block)
        bound[block] = gains
        top = gains.max()
        if top > best_gain or (top == best_gain and block[gains == top].min() < best):
            best, best_gain = int(block[gains == top].min()), float(top)
    return best, best_gain


def should_stop(best_bits: np.ndarray | float, remaining: np.ndarray | int, threshold: float = STOP_BITS):
    """The stop rule: no remaining pair, or the best one is expected to teach less than `threshold` bits."""
    return (np.asarray(remaining) == 0) | (np.asarray(best_bits) < threshold)


def fisher_choice(w: np.ndarray, answers: np.ndarray, pool_scores: np.ndarray, available: np.ndarray,
                  ridge: float = 1e-3) -> np.ndarray:
    """PReF's `max_dist` rule (Shenfeld et al. 2025, idanshen/PReF_code `max_norm_vector`), the baseline.

    Sigma = ridge I + sum_answered sigma'(w.s) s s^T (Fisher information at the point estimate w); pick the pair
    maximising sigma'(w.s)^2 s^T Sigma^-1 s. w (U, B), answers (U, n, B), pool_scores (U, P, B) -> index (U,).
    (PReF asks its first question at random; the benchmark does the same.)"""
    def slope(z):
        s = 0.5 * (1.0 + np.tanh(0.5 * z))
        return s * (1.0 - s)

    n_basis = w.shape[1]
    fisher = ridge * np.eye(n_basis) + np.einsum(
        "un,unb,unc->ubc", slope(np.einsum("ub,unb->un", w, answers)), answers, answers)
    norm = np.einsum("upb,ubc,upc->up", pool_scores, np.linalg.inv(fisher), pool_scores)  # s^T Sigma^-1 s
    value = slope(np.einsum("ub,upb->up", w, pool_scores)) ** 2 * norm
    return np.where(available, value, -np.inf).argmax(axis=1)


def _xlogx_neg(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 1e-300, None)
    return -x * np.log(x)
