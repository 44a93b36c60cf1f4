"""The statistics every audit shares (numpy/scipy; design and references: docs/privacy.md §11.2).

- AUC (rank-based Mann-Whitney, ties count one half), TPR at a fixed FPR, batched over rows so bootstrap and
  permutation replicates are one call.
- Bootstrap percentile CIs, permutation p-values (with the +1 correction), Bonferroni and Holm.
- Lower bounds on epsilon: Clopper-Pearson on a threshold attack (Jagielski et al. 2020; Nasr et al. 2021), the
  one-run bound of Steinke, Nasr & Jagielski (NeurIPS 2023), and the Gaussian-DP estimate of Andrew et al.
  (ICLR 2024), which is an estimate, not a bound.
(eps, delta)-DP implies TPR <= e^eps FPR + delta for every test, so a significant violation refutes the claim.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import optimize, special, stats


class AuditInputError(ValueError):
    """Audit input that cannot give a meaningful figure (empty class, wrong shape, bad alpha)."""


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise AuditInputError(f"alpha (significance level) must be in (0, 1); got {alpha}")


# --- classification figures ----------------------------------------------------------------------------------------
def auc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray | float:
    """P(score of a positive > score of a negative) + 1/2 P(tie). scores (n,) or (R, n) with labels (n,) or (R, n)
    of 0/1 -> float or (R,). Higher score = more likely positive."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.broadcast_to(np.asarray(labels).astype(bool), scores.shape)
    ranks = stats.rankdata(scores, axis=-1)
    n_pos = labels.sum(axis=-1)
    n_neg = labels.shape[-1] - n_pos
    if np.any(n_pos == 0) or np.any(n_neg == 0):
        raise AuditInputError(f"AUC needs both classes; got {np.min(n_pos)} positives and {np.min(n_neg)} negatives")
    value = ((ranks * labels).sum(axis=-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(value) if np.ndim(value) == 0 else value


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for the rule `score >= threshold`, thresholds descending (distinct scores)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]  # end of each block of tied scores
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos], np.r_[np.inf, s[last]]


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """Largest TPR of a threshold rule whose FPR is <= `fpr` (0 if even the strictest one exceeds it)."""
    f, t, _ = roc_curve(scores, labels)
    return float(t[f <= fpr].max())


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray | float:
    """Mean over classes present of per-class recall. predicted/labels int (n,) or (R, n)."""
    predicted, labels = np.asarray(predicted), np.broadcast_to(np.asarray(labels), np.shape(predicted))
    recalls = []
    for c in range(n_classes):
        mask = labels == c
        count = mask.sum(axis=-1)
        recalls.append(np.where(count > 0, ((predicted == c) & mask).sum(axis=-1) / np.maximum(count, 1), np.nan))
    value = np.nanmean(np.stack(recalls), axis=0)
    return float(value) if np.ndim(value) == 0 else value


# --- resampling ----------------------------------------------------------------------------------------------------
def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Percentile CI of a statistic over units resampled with replacement. `statistic(idx)` takes an index array
    (n_boot, n) and returns (n_boot,) values (vectorized, e.g. `lambda i: x[i].mean(axis=1)`)."""
    _check_alpha(alpha)
    if n < 1:
        raise AuditInputError("bootstrap needs at least one unit")
    values = np.asarray(statistic(rng.integers(0, n, size=(n_boot, n))), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_mean_ci(values: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05,
                      rng: np.random.Generator) -> tuple[float, float]:
    """Percentile CI of the mean of `values` (n,)."""
    values = np.asarray(values, dtype=np.float64)
    return bootstrap_ci(lambda idx: values[idx].mean(axis=1), values.size, n_boot=n_boot, alpha=alpha, rng=rng)


def bootstrap_auc_ci(scores: np.ndarray, labels: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05,
                     rng: np.random.Generator) -> tuple[float, float]:
    """Stratified bootstrap CI of the AUC (positives and negatives resampled separately, so both stay present)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        raise AuditInputError("AUC needs both classes")
    boot = np.concatenate([pos[rng.integers(0, pos.size, (n_boot, pos.size))],
                           neg[rng.integers(0, neg.size, (n_boot, neg.size))]], axis=1)
    values = auc(boot, np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def delong_auc_ci(scores: np.ndarray, labels: np.ndarray, *, alpha: float = 0.05) -> tuple[float, float]:
    """Normal CI of the AUC with DeLong's variance (DeLong et al. 1988): O(n log n), for the large pair sets where a
    bootstrap of ranks would be slow. Clipped to [0, 1]."""
    _check_alpha(alpha)
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if pos.size < 2 or neg.size < 2:
        raise AuditInputError("DeLong's AUC variance needs at least two positives and two negatives")
    ranks = stats.rankdata(np.r_[pos, neg])
    v10 = (ranks[: pos.size] - stats.rankdata(pos)) / neg.size  # per positive: fraction of negatives below
    v01 = 1.0 - (ranks[pos.size:] - stats.rankdata(neg)) / pos.size  # per negative: fraction of positives above
    value = v10.mean()
    half = stats.norm.ppf(1 - alpha / 2) * math.sqrt(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)
    return float(max(0.0, value - half)), float(min(1.0, value + half))


def permutation_pvalue(observed: float, null_values: np.ndarray) -> float:
    """One-sided p = (1 + #{null >= observed}) / (1 + n_perm): never 0, valid for any number of permutations."""
    null_values = np.asarray(null_values, dtype=np.float64)
    return float((1 + np.sum(null_values >= observed - 1e-12)) / (1 + null_values.size))


def bonferroni(pvalues: np.ndarray) -> np.ndarray:
    p = np.asarray(pvalues, dtype=np.float64)
    return np.minimum(1.0, p * p.size)


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (controls the family-wise error like Bonferroni, uniformly more power)."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p)
    adjusted = np.maximum.accumulate(np.minimum(1.0, p[order] * (p.size - np.arange(p.size))))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


# --- epsilon lower bounds and estimates ----------------------------------------------------------------------------
def clopper_pearson_upper(successes: np.ndarray, trials: np.ndarray, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson upper bound of a binomial proportion (vectorized)."""
    successes, trials = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    upper = special.betaincinv(successes + 1, np.maximum(trials - successes, 1e-300), 1 - alpha)
    return np.where(successes >= trials, 1.0, upper)


def clopper_pearson_epsilon(tp, fn, fp, tn, *, delta: float, alpha: float = 0.05) -> np.ndarray | float:
    """epsilon LB from confusion counts (vectorized over thresholds):
    max(ln((1 - delta - FNR_u) / FPR_u), ln((1 - delta - FPR_u) / FNR_u), 0), FPR_u/FNR_u the Clopper-Pearson
    upper bounds at alpha/2 each (notes §11.2). The caller divides alpha by the number of thresholds it tried."""
    _check_alpha(alpha)
    fpr_u = clopper_pearson_upper(fp, np.asarray(fp) + np.asarray(tn), alpha / 2)
    fnr_u = clopper_pearson_upper(fn, np.asarray(fn) + np.asarray(tp), alpha / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(1 - delta - fnr_u, 1e-300) / fpr_u)
        b = np.log(np.maximum(1 - delta - fpr_u, 1e-300) / fnr_u)
    value = np.maximum(np.maximum(a, b), 0.0)
    return float(value) if np.ndim(value) == 0 else value


def epsilon_lower_bound(scores_in: np.ndarray, scores_out: np.ndarray, *, delta: float, alpha: float = 0.05,
                        n_thresholds: int = 100) -> dict:
    """Best Clopper-Pearson epsilon LB over a grid of thresholds (rule: score >= t means "in").

    The grid: `n_thresholds` quantiles of all scores, denser in both tails where the bound is decided; alpha is
    Bonferroni-split over the grid so the reported maximum is a valid (1 - alpha) lower bound."""
    scores_in = np.asarray(scores_in, dtype=np.float64)
    scores_out = np.asarray(scores_out, dtype=np.float64)
    if scores_in.size == 0 or scores_out.size == 0:
        raise AuditInputError("need scores of both the 'in' and the 'out' runs")
    pooled = np.r_[scores_in, scores_out]
    levels = 0.5 + 0.5 * np.tanh(np.linspace(-3.5, 3.5, n_thresholds))  # quantile levels packed into the tails
    thresholds = np.unique(np.quantile(pooled, levels))
    si, so = np.sort(scores_in), np.sort(scores_out)
    tp = si.size - np.searchsorted(si, thresholds, side="left")
    fp = so.size - np.searchsorted(so, thresholds, side="left")
    eps = np.atleast_1d(clopper_pearson_epsilon(tp, si.size - tp, fp, so.size - fp, delta=delta,
                                                alpha=alpha / thresholds.size))
    best = int(np.argmax(eps))
    return {"epsilon_lb": float(eps[best]), "threshold": float(thresholds[best]), "tp": int(tp[best]),
            "fp": int(fp[best]), "n_in": int(si.size), "n_out": int(so.size),
            "thresholds_tried": int(thresholds.size), "alpha": alpha, "delta": delta}


def _steinke_p(eps: float, m: int, r: int, v: int, delta: float) -> float:
    """p-value of v correct out of r guesses among m canaries under (eps, delta)-DP (Steinke et al. 2023, Thm 5.2)."""
    prob = math.exp(eps) / (1 + math.exp(eps))
    tail = stats.binom.sf(np.arange(v, -1, -1) - 1, r, prob)  # P[Bin >= v - i], i = 0..v
    beta = tail[0]
    if v == 0 or delta == 0:
        return float(beta)
    alpha_delta = np.max((tail[1:] - beta) / np.arange(1, v + 1))
    return float(beta + alpha_delta * delta * 2 * m)


def one_run_epsilon(m: int, r: int, v: int, *, delta: float, alpha: float = 0.05) -> float:
    """Largest eps whose p-value is < alpha (the one-run lower bound); 0 when even eps = 0 is not rejected."""
    _check_alpha(alpha)
    if not (0 <= v <= r <= m):
        raise AuditInputError(f"need 0 <= correct v <= guesses r <= canaries m; got v={v}, r={r}, m={m}")
    if r == 0 or _steinke_p(0.0, m, r, v, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while _steinke_p(hi, m, r, v, delta) < alpha:
        lo, hi = hi, hi * 2
        if hi > 100:
            return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _steinke_p(mid, m, r, v, delta) < alpha else (lo, mid)
    return lo


def one_run_audit(scores: np.ndarray, is_in: np.ndarray, *, delta: float, alpha: float = 0.05,
                  guesses: tuple[int, ...] = (10, 20, 50, 100, 200)) -> dict:
    """Guess "in" for the top-k canary scores, for each k in `guesses` (Bonferroni over the k grid); returns the
    best one-run lower bound with its k and number correct."""
    scores, is_in = np.asarray(scores, dtype=np.float64), np.asarray(is_in).astype(bool)
    m = scores.size
    ks = [k for k in guesses if k <= m]
    if not ks:
        raise AuditInputError(f"{m} canaries are fewer than the smallest guess count {min(guesses)}")
    order = np.argsort(-scores, kind="stable")
    correct = np.cumsum(is_in[order])
    bounds = [(one_run_epsilon(m, k, int(correct[k - 1]), delta=delta, alpha=alpha / len(ks)), k,
               int(correct[k - 1])) for k in ks]
    eps, k, v = max(bounds)
    return {"epsilon_lb": eps, "guesses": k, "correct": v, "canaries": m, "alpha": alpha, "delta": delta,
            "grid": list(ks)}


def gdp_epsilon(mu: float, delta: float) -> float:
    """epsilon of mu-GDP at delta: solve delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong et al.)."""
    if not mu > 0:
        return 0.0

    def gap(eps: float) -> float:
        # e^eps Phi(.) in log space: at large mu (tiny noise) e^eps alone overflows a float
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(min(eps + stats.norm.logcdf(-eps / mu - mu / 2), 700.0)) \
            - delta

    if gap(0.0) <= 0:
        return 0.0
    hi = 1.0
    while gap(hi) > 0:
        hi *= 2
        if hi > 1e4:
            return float("inf")
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-10))


def gaussian_epsilon_estimate(scores_in: np.ndarray, scores_out: np.ndarray, *, delta: float) -> dict:
    """mu = (mean_in - mean_out) / pooled std of canary scores, and the epsilon of mu-GDP at delta (Andrew et al.
    2024): an estimate of what the mechanism leaks, not a bound."""
    scores_in = np.asarray(scores_in, dtype=np.float64)
    scores_out = np.asarray(scores_out, dtype=np.float64)
    if scores_in.size < 2 or scores_out.size < 2:
        raise AuditInputError("the Gaussian estimate needs at least two 'in' and two 'out' scores")
    pooled = math.sqrt((scores_in.var(ddof=1) * (scores_in.size - 1) + scores_out.var(ddof=1) * (scores_out.size - 1))
                       / (scores_in.size + scores_out.size - 2))
    mu = float((scores_in.mean() - scores_out.mean()) / max(pooled, 1e-300))
    return {"mu": mu, "epsilon": gdp_epsilon(mu, delta), "delta": delta}
