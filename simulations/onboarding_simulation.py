"""New users replayed against the device's onboarding code: the simulation behind `bench_onboarding`.

A new user is an unseen user of a pair file: their train pairs are the pool (an answer is revealed only when its pair
is asked), their test pairs the held-out set. `simulate` asks every user `answers` questions by one method, one at a
time, refits w after each answer exactly as the device does (simplex_fit with the device's prior) and records
held-out accuracy, calibrated probabilities (client.device.posterior), and where the truth is known, whether the
90 % region of w holds the true w. Users are batched (padded arrays, posterior chunks of CHUNK users).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.device import posterior, questions
from client.device.user_posterior import DEVICE_PRIOR_PAIRS
from lore_core.evaluation import load_true_basis
from lore_core.repeated_comparisons import same_comparison
from lore_core.pairs import PairFileError, load_pairs
from lore_core.prism_schema import GROUND_TRUTH_FILE
from lore_core.simplex_fit import fit_user_weights, prior_log_mean

CHECKPOINTS = (0, 1, 2, 5, 10, 20, 30)
MAX_ANSWERS = 30
MIN_POOL = 60
CHUNK = 50  # users per posterior batch (memory: CHUNK x samples x pool)


@dataclass(frozen=True)
class NewUsers:
    """New users as padded arrays: pool (U, P, B) and test (U, T, B) basis scores with masks; optional truth."""

    ids: np.ndarray
    pool: np.ndarray
    pool_mask: np.ndarray
    test: np.ndarray
    test_mask: np.ndarray
    true_pool: np.ndarray | None = None  # pool scores under the true basis x logit scale (U, P, K)
    true_weights: np.ndarray | None = None  # (U, K)
    test_logit_true: np.ndarray | None = None  # (U, T)

    @property
    def n(self) -> int:
        return int(self.ids.size)


@dataclass
class Run:
    """One method's trajectory: accuracy (31, U), asked pool indices (U, 30), best information before each question
    (30, U; lore only), calibrated test probabilities at checkpoints {n: (U, T)}, coverage {n: (U,) bool}."""

    accuracy: np.ndarray
    asked: np.ndarray
    best_bits: np.ndarray | None
    probabilities: dict
    map_probabilities: dict
    coverage: dict
    logit_coverage: dict
    effective_samples: dict  # {n: (U,)} importance-sampling effective sample size of each user's posterior


# --- data -----------------------------------------------------------------------------------------------------------


def load_new_users(pairs_path, basis: np.ndarray, min_pool: int = MIN_POOL) -> tuple[NewUsers, dict]:
    """Unseen users with >= min_pool train pairs and >= 1 test pair, as padded score arrays. A test pair that
    repeats one of the user's pool pairs (the same two responses in the same context) is dropped: the test set
    must be disjoint from what the user may be asked."""
    pairs = load_pairs(pairs_path)
    if basis.shape[1] != pairs.dim:
        raise PairFileError(f"{pairs.source}: pair dimension {pairs.dim} does not match the basis ({basis.shape[1]})")
    unseen = pairs.subset(~pairs.seen)
    ids, idx = np.unique(unseen.user, return_inverse=True)
    repeats = _test_repeats_pool(unseen.diff, idx, unseen.split == "train")
    unseen = unseen.subset(~repeats)
    idx = idx[~repeats]
    train = unseen.split == "train"
    pool_n = np.bincount(idx[train], minlength=ids.size)
    test_n = np.bincount(idx[~train], minlength=ids.size)
    keep = (pool_n >= min_pool) & (test_n >= 1)
    info = {"unseen_users": int(ids.size), "new_users": int(keep.sum()),
            "dropped_small_pool": int((pool_n < min_pool).sum()),
            "test_pairs_repeating_the_pool_dropped": int(repeats.sum()),
            "pool_pairs_median": float(np.median(pool_n[keep])) if keep.any() else 0.0,
            "test_pairs_median": float(np.median(test_n[keep])) if keep.any() else 0.0}
    if not keep.any():
        raise PairFileError(f"{pairs.source}: no unseen user has {min_pool} train pairs and a test pair")
    remap = np.full(ids.size, -1)
    remap[keep] = np.arange(keep.sum())
    truth = _load_truth(pairs.source, pairs.dim)
    scores = unseen.diff.astype(np.float64) @ np.asarray(basis, np.float64).T
    true_scores = None if truth is None else unseen.diff.astype(np.float64) @ truth["basis"].T
    out = {}
    for name, rows in (("pool", train), ("test", ~train)):
        rows = rows & keep[idx]
        user = remap[idx[rows]]
        slot = _slots(user)
        width = int(slot.max()) + 1
        arr = np.zeros((keep.sum(), width, basis.shape[0]))
        arr[user, slot] = scores[rows]
        mask = np.zeros((keep.sum(), width), bool)
        mask[user, slot] = True
        out[name], out[f"{name}_mask"] = arr, mask
        if truth is not None and name == "pool":
            out["true_pool"] = np.zeros((keep.sum(), width, truth["basis"].shape[0]))
            out["true_pool"][user, slot] = true_scores[rows]
        if name == "test" and unseen.logit_true is not None:
            out["test_logit_true"] = np.zeros((keep.sum(), width))
            out["test_logit_true"][user, slot] = unseen.logit_true[rows]
    if truth is not None:
        order = {u: i for i, u in enumerate(truth["user_id"])}
        missing = [u for u in ids[keep] if u not in order]
        if missing:
            raise PairFileError(f"{pairs.source}: users without ground-truth weights: {missing[:5]}")
        out["true_weights"] = truth["user_weights"][[order[u] for u in ids[keep]]]
    return NewUsers(ids=ids[keep], **out), info


def _test_repeats_pool(diff: np.ndarray, user: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(n,) bool: test rows equal, up to sign, to a train row of the same user: equal float32 bits
    (repeated_comparisons.same_comparison; all-zero rows compare nothing and never match), without a loop over
    pairs. A key from a float matrix
    product was not exact: BLAS sums a row in an order that depends on where the row sits, so copies differed in the
    last bit (it missed 1 of 1,384 repeats in the PRISM-shaped population)."""
    key = same_comparison(diff)
    order = np.lexsort((key, user))
    same = (user[order][1:] == user[order][:-1]) & (key[order][1:] == key[order][:-1])
    group = np.empty(user.size, np.int64)
    group[order] = np.cumsum(np.r_[True, ~same]) - 1
    has_train = np.bincount(group, weights=train, minlength=group.max() + 1) > 0
    return ~train & has_train[group]


def _slots(user: np.ndarray) -> np.ndarray:
    """Position of each row among its user's rows (rows grouped in any order)."""
    order = np.argsort(user, kind="stable")
    sorted_user = user[order]
    starts = np.r_[0, np.flatnonzero(sorted_user[1:] != sorted_user[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, user.size]))
    slot = np.empty_like(user)
    slot[order] = np.arange(user.size) - run_start
    return slot


def _load_truth(source: str, dim: int) -> dict | None:
    """The truth beside the pair file: basis in logit units (evaluation.load_true_basis), user ids and weights."""
    basis = load_true_basis(source)
    if basis is None or basis.shape[1] != dim:
        return None
    with np.load(Path(source).parent / GROUND_TRUTH_FILE, allow_pickle=False) as data:
        return {"basis": basis, "user_id": data["user_id"].astype(str),
                "user_weights": np.asarray(data["user_weights"], np.float64)}


# --- simulation -----------------------------------------------------------------------------------------------------


def simulate(users: NewUsers, method: str, *, prior_pairs: float = DEVICE_PRIOR_PAIRS,
             prior_mean: np.ndarray | None = None, seed: int = 0, answers: int = MAX_ANSWERS,
             checkpoints=CHECKPOINTS) -> Run:
    """Ask `answers` questions of every new user by `method`; refit w after each answer; record the figures."""
    rng = np.random.default_rng(seed)
    n_users, n_basis = users.n, users.pool.shape[2]
    rows = np.arange(n_users)
    available = users.pool_mask.copy()
    random_order = np.argsort(np.where(available, rng.random(available.shape), np.inf), axis=1)
    asked = np.zeros((n_users, answers), np.int64)
    accuracy = np.zeros((answers + 1, n_users))
    best_bits = np.zeros((answers, n_users)) if method == "lore" else None
    run = Run(accuracy, asked, best_bits, {}, {}, {}, {}, {})
    w = np.exp(_prior_log(prior_mean, n_users, n_basis))
    for t in range(answers + 1):
        answered = users.pool[rows[:, None], asked[:, :t]]  # (U, t, B)
        w = _fit(answered, prior_pairs, prior_mean, w)
        accuracy[t] = _accuracy(users.test, users.test_mask, w)
        need_posterior = method == "lore" and t < answers
        samples = None
        if t in checkpoints or need_posterior:
            samples = _posterior(answered, prior_pairs, prior_mean, w, seed + t)
        if t in checkpoints:
            _record_checkpoint(run, users, t, answered, w, samples, prior_pairs, rows)
        if t == answers:
            break
        if method == "random":
            choice = random_order[:, t]
        elif method == "uncertainty":
            choice = random_order[:, 0] if t == 0 else questions.fisher_choice(w, answered, users.pool, available)
        else:
            choice, bits = _chunked_choice(samples, users.pool, available)
            best_bits[t] = bits
        asked[:, t] = choice
        available[rows, choice] = False
    return run


def _record_checkpoint(run: Run, users: NewUsers, t: int, answered, w, samples, prior_pairs, rows) -> None:
    run.probabilities[t] = _chunked_probability(samples, users.test)
    run.effective_samples[t] = samples.effective_size
    run.map_probabilities[t] = _sigmoid(np.einsum("utb,ub->ut", users.test, w))
    if users.test_logit_true is not None:
        run.logit_coverage[t] = _logit_coverage(samples, users)
    if users.true_pool is not None:
        true_answered = users.true_pool[rows[:, None], run.asked[:, :t]]
        true_map = _fit(true_answered, prior_pairs, None, None)
        true_samples = _posterior(true_answered, prior_pairs, None, true_map, 7919 + t)
        run.coverage[t] = np.concatenate([
            posterior.in_credible_region(_take(true_samples, c), users.true_weights[c], true_answered[c], prior_pairs)
            for c in _chunks(users.n)])


def _fit(answered: np.ndarray, prior_pairs: float, prior_mean, init) -> np.ndarray:
    """adapt's w for every user (U, B): the personal prior worth prior_pairs answers, as on the device."""
    n_users, n, n_basis = answered.shape
    if n == 0:
        return np.exp(_prior_log(prior_mean, n_users, n_basis))
    fit = fit_user_weights(answered.reshape(-1, n_basis), np.repeat(np.arange(n_users), n), n_users,
                           prior_strength=prior_pairs / n, init=init, prior_mean=prior_mean)
    return fit.weights


def _posterior(answered, prior_pairs, prior_mean, w, seed) -> posterior.PosteriorSamples:
    rng = np.random.default_rng(seed)
    parts = [posterior.posterior(answered[c], prior_pairs, None if prior_mean is None else prior_mean[c],
                                 init=w[c], rng=rng) for c in _chunks(answered.shape[0])]
    return posterior.PosteriorSamples(w=np.concatenate([p.w for p in parts]),
                                      probability=np.concatenate([p.probability for p in parts]))


def _chunks(n: int):
    return [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


def _take(samples: posterior.PosteriorSamples, c: slice) -> posterior.PosteriorSamples:
    return posterior.PosteriorSamples(w=samples.w[c], probability=samples.probability[c])


def _chunked_choice(samples, pool, available) -> tuple[np.ndarray, np.ndarray]:
    picks = [questions.choose_next(_take(samples, c), pool[c], available[c]) for c in _chunks(pool.shape[0])]
    return np.concatenate([p[0] for p in picks]), np.concatenate([p[1] for p in picks])


def _chunked_probability(samples, test) -> np.ndarray:
    return np.concatenate([posterior.preference_probability(_take(samples, c), test[c])
                           for c in _chunks(test.shape[0])])


def _logit_coverage(samples, users: NewUsers) -> np.ndarray:
    """Per user, the share of test pairs whose 90 % logit interval (learned basis) holds the true logit (U,)."""
    out = []
    for c in _chunks(users.n):
        s = _take(samples, c)
        logits = np.einsum("usb,utb->ust", s.w, users.test[c])
        low, high = posterior.credible_intervals(s, logits)
        inside = (low <= users.test_logit_true[c]) & (users.test_logit_true[c] <= high)
        out.append(np.where(users.test_mask[c], inside, False).sum(axis=1) / users.test_mask[c].sum(axis=1))
    return np.concatenate(out)


def _prior_log(prior_mean, n_users, n_basis) -> np.ndarray:
    return prior_log_mean(prior_mean, n_users, n_basis)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _accuracy(test: np.ndarray, mask: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-user held-out accuracy (U,) with a strict > 0 (a tie is an error), as the evaluation counts it."""
    correct = np.einsum("utb,ub->ut", test, w) > 0
    return np.where(mask, correct, False).sum(axis=1) / mask.sum(axis=1)
