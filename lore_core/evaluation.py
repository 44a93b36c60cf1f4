"""Evaluation as the LoRe paper reports it: per-user pair accuracy (strict > 0), unweighted mean over users.

Every user is scored as a device would serve them: w fit on the user's own "train" pairs (seen users: their
training pairs; unseen users: their few-shot pairs) with the basis frozen, by the numpy solver that devices and
federated clients run, with the personal prior worth `prior_pairs` pairs (`simplex_fit.prior_from_pairs`); then
scored on "test". The same protocol for centralized, federated and private runs keeps them comparable.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from lore_core.pairs import PairSet
from lore_core.reward_math import mean_user_accuracy, pair_logits, per_user_mean
from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS, fit_user_weights, prior_from_pairs


def _accuracy(logits: np.ndarray, user: np.ndarray) -> float:
    ids, idx = np.unique(user, return_inverse=True)
    return mean_user_accuracy(logits, idx, ids.size)


def weights_for(user: np.ndarray, user_ids: np.ndarray, user_weights: np.ndarray) -> np.ndarray:
    """Rows of user_weights (U, B) for each pair's user (n,); every user must be known."""
    order = np.argsort(user_ids)
    pos = np.searchsorted(user_ids, user, sorter=order)
    pos = np.clip(pos, 0, user_ids.size - 1)
    found = order[pos]
    if not np.array_equal(user_ids[found], user):
        missing = np.setdiff1d(user, user_ids)[:5]
        raise ValueError(f"no weights for users {missing.tolist()}")
    return user_weights[found]


def few_shot_weights(pairs: PairSet, basis: np.ndarray, prior_pairs: float) -> tuple[np.ndarray, np.ndarray]:
    """Fit weights for every user of `pairs` on its rows (basis frozen, personal prior worth `prior_pairs` pairs);
    returns (user_ids, weights)."""
    ids, idx = np.unique(pairs.user, return_inverse=True)
    fit = fit_user_weights(pairs.diff @ basis.T, idx, ids.size,
                           prior_strength=prior_from_pairs(idx, ids.size, prior_pairs))
    return ids, fit.weights


def evaluate_model(
    pairs: PairSet,
    basis: np.ndarray,
    *,
    prior_pairs: float = DEFAULT_PRIOR_PAIRS,
    joint_weights: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """The metrics of `lore-fed train` / `evaluate` for a basis (B, D): every user's w refit as the module says.

    joint_weights (user_ids, weights (U, B)) from joint training add `seen_test_acc_joint_weights`, the score of the
    weights learned together with the basis (the paper's seen-user protocol), for comparison."""
    if basis.shape[1] != pairs.dim:
        raise ValueError(f"basis has dimension {basis.shape[1]} but the pair file has {pairs.dim}")
    metrics: dict = {"rank": int(basis.shape[0]), "prior_pairs": float(prior_pairs)}
    seen_train, seen_test = pairs.select(seen=True, split="train"), pairs.select(seen=True, split="test")
    ids, weights = np.zeros(0, dtype=pairs.user.dtype), np.zeros((0, basis.shape[0]))
    if seen_train.n:
        ids, weights = few_shot_weights(seen_train, basis, prior_pairs)
        metrics["seen_train_acc"], _ = _score(seen_train, basis, ids, weights)
    if seen_test.n:  # a seen user without training pairs is scored with the population reward, and counted
        without = _score_test(metrics, "seen", seen_test, basis, ids, weights)
        if without:
            metrics["seen_users_without_training_pairs"] = without
    if joint_weights is not None and seen_test.n:
        w = weights_for(seen_test.user, *joint_weights)
        metrics["seen_test_acc_joint_weights"] = _accuracy(
            pair_logits(seen_test.diff @ basis.T, w, np.arange(seen_test.n)), seen_test.user)
    few_shot = pairs.select(seen=False, split="train")
    unseen_test = pairs.select(seen=False, split="test")
    if few_shot.n or unseen_test.n:  # one few-shot fit serves both scores (fit_and_score, unfolded)
        ids, weights = few_shot_weights(few_shot, basis, prior_pairs)
    if unseen_test.n:
        metrics["unseen_users_without_few_shot"] = _score_test(metrics, "unseen", unseen_test, basis, ids, weights)
    if few_shot.n:  # also without test pairs, as seen_train_acc (a tester: a file with no test split lacked it)
        metrics["unseen_few_shot_train_acc"], _ = _score(few_shot, basis, ids, weights)
    metrics.update(reference_metrics(pairs))
    return metrics


def _served_logits(test: PairSet, basis: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, int]:
    """Logits of `test` with the fitted (ids, weights); users not among ids keep uniform weights (the population
    reward). Returns (logits, number of such users)."""
    all_ids = np.union1d(ids, test.user)
    all_w = np.full((all_ids.size, basis.shape[0]), 1.0 / basis.shape[0])
    all_w[np.searchsorted(all_ids, ids)] = weights
    w = weights_for(test.user, all_ids, all_w)
    without = int(np.unique(test.user[~np.isin(test.user, ids)]).size)
    return np.einsum("nb,nb->n", test.diff @ basis.T, w), without


def _score(test: PairSet, basis: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> tuple[float, int]:
    """Accuracy of `test` as `_served_logits` scores it: (accuracy, users served the population reward)."""
    logits, without = _served_logits(test, basis, ids, weights)
    return _accuracy(logits, test.user), without


def expected_accuracy(logits: np.ndarray, logit_true: np.ndarray, user: np.ndarray) -> float:
    """Accuracy in expectation over the labels, unweighted mean over users: each pair counts the true probability
    that its user prefers the response the model ranks first (the sigmoid of the true logit, signed by the model's;
    a tie counts 0, as accuracy counts it). The test labels' Bradley-Terry noise drops out, so two models on a few
    hundred test pairs differ by what they predict, not by which labels were drawn. Answers that do not follow the
    true logit (a generator's flips beyond Bradley-Terry, `label_noise`; users who click at random) are not in this
    figure."""
    value = np.where(logits == 0, 0.0, 1.0 / (1.0 + np.exp(-np.sign(logits) * logit_true)))
    ids, idx = np.unique(user, return_inverse=True)
    return float(np.mean(per_user_mean(value, idx, ids.size)))


def _score_test(metrics: dict, label: str, test: PairSet, basis: np.ndarray, ids: np.ndarray,
                weights: np.ndarray) -> int:
    """`{label}_test_acc`, and `{label}_test_expected_acc` (`expected_accuracy`) where the pair file carries the
    true logits; returns the number of users served the population reward."""
    logits, without = _served_logits(test, basis, ids, weights)
    metrics[f"{label}_test_acc"] = _accuracy(logits, test.user)
    if test.logit_true is not None:
        metrics[f"{label}_test_expected_acc"] = expected_accuracy(logits, test.logit_true, test.user)
    return without


def fit_and_score(train: PairSet, test: PairSet, basis: np.ndarray, prior_pairs: float) -> tuple[float, int]:
    """Users fit w on their `train` rows with the basis frozen, then are scored on `test`; users without train rows
    keep the prior (uniform weights: the population reward). Returns (accuracy, users without train rows)."""
    ids, weights = few_shot_weights(train, basis, prior_pairs)
    return _score(test, basis, ids, weights)


def true_basis_metrics(pairs: PairSet, true_basis: np.ndarray, prior_pairs: float = DEFAULT_PRIOR_PAIRS) -> dict:
    """The true-basis ceiling of a benchmark: every user fits only w on its own training (for unseen users:
    few-shot) pairs with the hidden basis (B*, D), in logit units, frozen. Beside the oracle (true basis and true
    w) it separates what the basis costs from what a few pairs per user cost."""
    out = {}
    for seen, label in ((True, "seen"), (False, "unseen")):
        test = pairs.select(seen=seen, split="test")
        if test.n:
            out[f"true_basis_{label}_test_acc"], _ = fit_and_score(
                pairs.select(seen=seen, split="train"), test, true_basis, prior_pairs)
    return out


def load_true_basis(pair_path: str | Path) -> np.ndarray | None:
    """The hidden basis in logit units from `ground_truth.npz` beside a benchmark's pair file, or None."""
    truth = read_truth(pair_path)
    return None if truth is None else true_basis_of(truth)


def read_truth(pair_path: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of `ground_truth.npz` beside a benchmark's pair file (basis and logit_scale at least; user_id,
    user_weights and embedder where it has them), read once, or None without one."""
    from lore_core.npz_file import open_npz
    from lore_core.prism_schema import GROUND_TRUTH_FILE

    path = Path(pair_path).parent / GROUND_TRUTH_FILE
    if not path.exists():
        return None
    with open_npz(path, "the benchmark truth (.npz with arrays basis, logit_scale)") as data:
        if not {"basis", "logit_scale"} <= set(data.files):
            raise ValueError(f"{path}: needs arrays basis and logit_scale, found {sorted(data.files)}")
        return {key: np.asarray(data[key]) for key in ("basis", "logit_scale", "user_id", "user_weights", "embedder")
                if key in data.files}


def true_basis_of(truth: dict[str, np.ndarray]) -> np.ndarray:
    """A truth's (`read_truth`) basis in logit units."""
    return np.asarray(truth["basis"], np.float64) * float(truth["logit_scale"])


def reference_metrics(pairs: PairSet) -> dict:
    """Oracle (true logits) and reference-head accuracies on test pairs, when the pair file carries them."""
    out = {}
    for seen, label in ((True, "seen"), (False, "unseen")):
        test = pairs.select(seen=seen, split="test")
        if not test.n:
            continue
        if test.logit_true is not None:
            out[f"oracle_{label}_test_acc"] = _accuracy(test.logit_true, test.user)
            _warn_of_tied_truth(test.logit_true, label)
        if test.reference_head is not None:
            out[f"reference_{label}_test_acc"] = _accuracy(test.diff @ test.reference_head, test.user)
    return out


def _warn_of_tied_truth(logit_true: np.ndarray, label: str) -> None:
    """A true logit of exactly 0 says the user has no preference; accuracy counts it as an error, as every tie (the
    LoRe paper's rule), so an oracle near 0 is the file's doing, not the model's: say so instead of leaving a puzzle."""
    tied = float(np.mean(logit_true == 0))
    if tied >= 0.01:
        warnings.warn(f"{tied:.0%} of {label} users' test pairs have a true logit of exactly 0 (no preference); "
                      "accuracy counts a tie as an error, so the oracle's accuracy is lowered by as much")
