"""Calibrate a basis' probabilities: fit its logit temperature on the SEEN users' held-out pairs, as a device scores.

    python -m simulations.basis_temperature PAIRS --basis BASIS --out CALIBRATED_BASIS.npz [--prior-pairs C]

Why. Rankings only need the sign of w . A d, but a device also shows how sure it is (`rank --json`). A learned
basis is trained for accuracy: the L2 penalty on A (chosen on validation) and the simplex compress its logits. On
the pilot populations, a new user's fitted logits were about half the true ones, so the posterior-integrated
probabilities were underconfident (ECE 0.05). One scalar fixes the scale: A' = T A (temperature scaling, Guo et al.
2017, folded into the basis so that every device command and every fit uses it unchanged).

Procedure (fixed before any reported run). Each seen user plays a new user: w's posterior from their first n train
pairs (n = 0, 1, 2, 5, 10, 20, 30, capped by what they have) with the device's prior, then the probabilities of their
test pairs integrated over it. T maximises the summed Bradley-Terry log-likelihood over users and n (golden-section
search on log T). The new users of a benchmark are never used. Writes T A with the source's version and embedder.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from client.device import posterior
from client.device.user_posterior import DEVICE_PRIOR_PAIRS
from lore_core.basis_file import load_basis, save_basis
from lore_core.pairs import load_pairs
from lore_core.simplex_fit import fit_user_weights

ANSWER_COUNTS = (0, 1, 2, 5, 10, 20, 30)
LOG_T_RANGE = (np.log(0.5), np.log(5.0))
MAX_USERS = 300  # seen users used (the first by id): plenty for one scalar, and bounded work


def seen_user_arrays(pairs, basis: np.ndarray, max_users: int = MAX_USERS, seed: int = 0):
    """Seen users with train and test pairs as padded arrays: train (U, N, B) in a random order per user,
    test (U, T, B) with mask (U, T), and the train counts (U,)."""
    seen = pairs.subset(pairs.seen)
    ids, idx = np.unique(seen.user, return_inverse=True)
    train = seen.split == "train"
    has_both = (np.bincount(idx[train], minlength=ids.size) > 0) & (np.bincount(idx[~train], minlength=ids.size) > 0)
    users = np.flatnonzero(has_both)[:max_users]
    if not users.size:
        raise ValueError(f"{pairs.source}: no seen user with both train and test pairs to calibrate on")
    rng = np.random.default_rng(seed)
    scores = seen.diff.astype(np.float64) @ basis.T
    arrays = []
    for rows_mask in (train, ~train):
        rows = np.flatnonzero(rows_mask & np.isin(idx, users))
        rows = rows[rng.permutation(rows.size)] if rows_mask is train else rows
        user = np.searchsorted(users, idx[rows])
        order = np.argsort(user, kind="stable")
        rows, user = rows[order], user[order]
        slot = np.arange(rows.size) - np.searchsorted(user, user)
        arr = np.zeros((users.size, int(slot.max()) + 1, basis.shape[0]))
        arr[user, slot] = scores[rows]
        mask = np.zeros(arr.shape[:2], bool)
        mask[user, slot] = True
        arrays += [arr, mask]
    return arrays[0], arrays[1].sum(axis=1), arrays[2], arrays[3]


def log_likelihood(temperature: float, train, counts, test, test_mask, prior_pairs: float) -> float:
    """Summed log-likelihood of the seen users' test pairs under posterior-integrated probabilities, basis T A."""
    total = 0.0
    for n in ANSWER_COUNTS:
        users = counts >= n
        answers = temperature * train[users, :n]
        w = None
        if n:
            fit = fit_user_weights(answers.reshape(-1, answers.shape[2]), np.repeat(np.arange(users.sum()), n),
                                   int(users.sum()), prior_strength=prior_pairs / n)
            w = fit.weights
        drawn = posterior.posterior(answers, prior_pairs, init=w, rng=np.random.default_rng(n))
        p = posterior.preference_probability(drawn, temperature * test[users])
        total += float(np.log(np.clip(p, 1e-12, None))[test_mask[users]].sum())
    return total


def fit_temperature(train, counts, test, test_mask, prior_pairs: float, iterations: int = 14) -> float:
    """Golden-section search for the T maximising `log_likelihood` (unimodal in log T in practice)."""
    low, high = LOG_T_RANGE
    golden = (np.sqrt(5.0) - 1.0) / 2.0

    def value(log_t):
        return log_likelihood(float(np.exp(log_t)), train, counts, test, test_mask, prior_pairs)

    a, b = high - golden * (high - low), low + golden * (high - low)
    fa, fb = value(a), value(b)
    for _ in range(iterations):
        if fa >= fb:
            high, b, fb = b, a, fa
            a = high - golden * (high - low)
            fa = value(a)
        else:
            low, a, fa = a, b, fb
            b = low + golden * (high - low)
            fb = value(b)
    return float(np.exp(0.5 * (low + high)))


def calibrate(pairs_path, basis_path, out_path, prior_pairs: float = DEVICE_PRIOR_PAIRS) -> float:
    """Fit T for the basis on the pair file's seen users and write T A to out_path; returns T."""
    source = load_basis(basis_path)
    pairs = load_pairs(pairs_path)
    if pairs.dim != source.dim:
        raise ValueError(f"{pairs.source}: dimension {pairs.dim} does not match the basis {basis_path} ({source.dim})")
    arrays = seen_user_arrays(pairs, source.basis.astype(np.float64))
    temperature = fit_temperature(*arrays, prior_pairs)
    save_basis(out_path, temperature * source.basis.astype(np.float64), version=source.version,
               embedder=source.embedder)
    return temperature


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", help="pair file or dataset directory (its seen users calibrate)")
    parser.add_argument("--basis", required=True)
    parser.add_argument("--out", required=True, help="the calibrated basis file")
    parser.add_argument("--prior-pairs", type=float, default=DEVICE_PRIOR_PAIRS)
    args = parser.parse_args(argv)
    try:
        from lore_core.atomic_io import check_output_path

        check_output_path(args.out, "--out", directory=False)  # before the fit, not a traceback after it
        if not (np.isfinite(args.prior_pairs) and args.prior_pairs > 0):
            raise ValueError(f"--prior-pairs must be a finite number > 0, got {args.prior_pairs}")
        temperature = calibrate(args.pairs, args.basis, args.out, args.prior_pairs)
    except (ValueError, FileNotFoundError) as exc:
        print(f"basis_temperature: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # permission denied, read-only or full disk: about a path the user gave
        if exc.filename is None:
            raise
        print(f"basis_temperature: error: {exc}", file=sys.stderr)
        return 2
    print(f"logit temperature {temperature:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
