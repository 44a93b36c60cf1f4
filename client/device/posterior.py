"""Confidence in w: the posterior over a user's weights on the simplex given their answers, basis A frozen.

Model. An answer is a pair the user ordered, scored s = A d (B,) with d = e(chosen) - e(rejected); its likelihood
is sigma(w . s) (Bradley-Terry). The prior is the personal prior of `adapt`: p(w) proportional to
exp(-c KL(w || m)) on the simplex (Lebesgue measure), c = prior_pairs (the prior weighs as much as c answers),
m = uniform (the population reward) or the mean of a declared attribute's group. So the posterior's mode in w is
exactly the w that `adapt` fits (the same objective, summed over answers instead of averaged).

Laplace in the softmax chart. A Gaussian in w leaks mass outside the simplex and cannot follow a user near a vertex.
In additive log-ratio coordinates eta_k = log(w_k / w_B) (k < B) the simplex becomes R^(B-1), the density picks
up the Jacobian prod_k w_k and is much closer to Gaussian (MacKay 1998, "Choice of basis for Laplace
approximation"); the Gaussian is centred at that density's mode, with covariance minus its inverse Hessian. Any
other reference coordinate gives the same Gaussian up to a linear map.

Sampling corrects the Laplace. Self-normalised importance weights p / q turn proposed samples into samples of the
exact posterior; intervals, calibrated probabilities (the logistic integrated over w) and information gains are then
exact up to Monte-Carlo error, reported as the effective sample size. 512 samples, numpy only.

The proposal adapts once (adaptive multiple importance sampling, Cornuet et al. 2012). The Laplace alone is a poor
proposal where it matters: the prior in the chart has log-gamma, not Gaussian, marginals, so the Laplace is too narrow
by a factor 1/trigamma(1) = 0.61 in variance in every direction and the weights collapse as B grows (26 effective
samples of 512 at B = 40, bench_results/posterior_ess.md). So half the samples come from two components:
  - the Dirichlet(1 + c m), which has the prior's mode m and its curvature there (the posterior before any answer,
    nearly; not where c m_k << 1 and m_k ~ 0, where the prior is an exponential tilt toward the face it cannot
    follow, and the samples thin out as with the Laplace alone);
  - the Laplace as a Student-t (5 degrees of freedom, for tails);
and the other half from the same two families refitted to the first half's weighted samples (the t by weighted
mean and covariance in the chart, the Dirichlet by moments on the simplex). Every sample is weighed against the
whole mixture (the balance heuristic), so a component that fits badly costs samples, never correctness (the refit
reuses the first half's samples: a bias of order 1/S, about 1e-3 in w's mean at S = 512, below its Monte-Carlo
error). At least 4 samples.

Where that still leaves fewer than TEMPER_BELOW of the samples effective, those users' samples come from a tempered
sequential Monte Carlo sampler instead (`tempering`): slower (tenths of a second to seconds on a device), but it
follows a posterior far from both families, such as a basis whose answers are nearly hard constraints.

Shapes: U users (1 on a device), n answers each (the same n for all users of one call), B basis size,
S samples. answers (U, n, B) are the answered pairs' basis scores, oriented chosen-minus-rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

from client.device import tempering
from lore_core.reward_math import softmax
from lore_core.simplex_fit import prior_log_mean

DEFAULT_SAMPLES = 512
PROPOSAL_DOF = 5.0
CREDIBLE_LEVEL = 0.9
TEMPER_BELOW = 0.1  # share of effective samples under which the tempered sampler replaces the mixture's
SAMPLE_SEED = 0  # the device draws the same samples for the same posterior: commands are reproducible


@dataclass(frozen=True)
class LaplaceFit:
    """The Gaussian in the softmax chart: mode (U, B-1), covariance (U, B-1, B-1)."""

    mode: np.ndarray
    cov: np.ndarray


@dataclass(frozen=True)
class PosteriorSamples:
    """Weighted samples of the posterior: w (U, S, B) on the simplex, probability (U, S) summing to 1 per user."""

    w: np.ndarray
    probability: np.ndarray

    @property
    def effective_size(self) -> np.ndarray:
        """Kish's effective sample size (U,): S when the proposal is exact, small when it is poor. For tempered users,
        at most the number of distinct particles (tempering.temper): an upper bound on their independent draws."""
        return 1.0 / np.square(self.probability).sum(axis=-1)

    def mean(self) -> np.ndarray:
        """Posterior mean of w (U, B)."""
        return np.einsum("us,usb->ub", self.probability, self.w)


def to_simplex(eta: np.ndarray) -> np.ndarray:
    """Softmax chart -> simplex: (..., B-1) -> (..., B)."""
    return np.exp(_log_simplex(eta))


def _log_simplex(eta: np.ndarray) -> np.ndarray:
    """log w (..., B) of chart points (..., B-1), without underflow far out in the chart."""
    full = np.concatenate([eta, np.zeros(eta.shape[:-1] + (1,))], axis=-1)
    full -= full.max(axis=-1, keepdims=True)
    return full - np.log(np.exp(full).sum(axis=-1, keepdims=True))


def to_chart(w: np.ndarray) -> np.ndarray:
    """Simplex -> softmax chart: (..., B) -> (..., B-1); w must be > 0."""
    log_w = np.log(w)
    return log_w[..., :-1] - log_w[..., -1:]


def log_density(w: np.ndarray, answers: np.ndarray, prior_log: np.ndarray, prior_pairs: float) -> np.ndarray:
    """Unnormalised log posterior density in w (Lebesgue on the simplex) of w (U, S, B) -> (U, S).

    answers (U, n, B); prior_log (U, B) = log m."""
    logits = np.einsum("usb,unb->usn", w, answers)
    log_lik = -np.logaddexp(0.0, -logits).sum(axis=-1)
    w_safe = np.clip(w, 1e-300, None)
    kl = (w * (np.log(w_safe) - prior_log[:, None, :])).sum(axis=-1)
    return log_lik - prior_pairs * kl


def laplace(
    answers: np.ndarray,
    prior_pairs: float,
    prior_mean: np.ndarray | None = None,
    *,
    init: np.ndarray | None = None,
    max_iter: int = 50,
    tol: float = 1e-9,
) -> LaplaceFit:
    """Laplace approximation in the softmax chart for every user at once (damped Newton; see module docstring).

    answers (U, n, B); prior_mean (U, B) or None (uniform); init (U, B): a starting w, e.g. adapt's."""
    answers = np.asarray(answers, dtype=np.float64)
    n_users, _, n_basis = answers.shape
    if n_basis == 1:  # one shared reward (`train --rank 1`, or auto's choice): w = (1,), a chart with no dimension
        return LaplaceFit(mode=np.zeros((n_users, 0)), cov=np.zeros((n_users, 0, 0)))
    prior_log = prior_log_mean(prior_mean, n_users, n_basis)
    eta = to_chart(np.exp(prior_log) if init is None else np.clip(init, 1e-12, None))
    value = _chart_log_density(eta, answers, prior_log, prior_pairs)
    for _ in range(max_iter):
        grad, hess = _chart_derivatives(eta, answers, prior_log, prior_pairs)
        step = _newton_step(grad, hess)
        t = np.ones(n_users)
        todo = np.ones(n_users, bool)
        for _ in range(30):  # backtracking, per user
            trial = np.where(todo[:, None], eta + t[:, None] * step, eta)
            trial_value = _chart_log_density(trial, answers, prior_log, prior_pairs)
            better = trial_value >= value + 1e-4 * t * (grad * step).sum(axis=1)
            accept = todo & better
            eta = np.where(accept[:, None], trial, eta)
            value = np.where(accept, trial_value, value)
            todo &= ~better
            if not todo.any():
                break
            t = np.where(todo, 0.5 * t, t)
        if np.all((grad * step).sum(axis=1) < tol):
            break
    _, hess = _chart_derivatives(eta, answers, prior_log, prior_pairs)
    eigval, eigvec = np.linalg.eigh(-hess)
    # Curvatures of 1e16 beside 1e-8 (answers that are nearly hard constraints) leave a covariance no Cholesky can
    # factor: its condition number is capped at 1e12.
    eigval = np.maximum(eigval, np.maximum(1e-8, 1e-12 * eigval.max(axis=1, keepdims=True)))
    cov = np.einsum("uij,uj,ukj->uik", eigvec, 1.0 / eigval, eigvec)
    return LaplaceFit(mode=eta, cov=cov)


def sample(
    answers: np.ndarray,
    fit: LaplaceFit,
    prior_pairs: float,
    prior_mean: np.ndarray | None = None,
    *,
    n_samples: int = DEFAULT_SAMPLES,
    rng: np.random.Generator | None = None,
    temper_below: float | None = None,
) -> PosteriorSamples:
    """Importance-weighted samples of the exact posterior from the adaptive mixture, or from tempering for users
    whose mixture keeps fewer than temper_below (default TEMPER_BELOW) of its samples (see module docstring; 0 never
    tempers)."""
    answers = np.asarray(answers, dtype=np.float64)
    n_users, _, n_basis = answers.shape
    if n_samples < 4:
        raise ValueError(f"the posterior needs at least 4 samples, got {n_samples}")
    if n_basis == 1:  # w = (1,) for sure: every sample is it, and nothing is left to learn
        return PosteriorSamples(w=np.ones((n_users, n_samples, 1)), probability=np.full((n_users, n_samples),
                                                                                        1.0 / n_samples))
    prior_log = prior_log_mean(prior_mean, n_users, n_basis)
    rng = rng if rng is not None else np.random.default_rng(SAMPLE_SEED)
    first, second = n_samples // 2, n_samples - n_samples // 2
    prior_alpha = 1.0 + prior_pairs * np.exp(prior_log)
    initial = [_Dirichlet(prior_alpha, first // 2),
               _StudentT(fit.mode, np.linalg.cholesky(fit.cov), first - first // 2)]
    eta = np.concatenate([c.draw(rng) for c in initial], axis=1)
    log_p = _chart_log_density_samples(eta, answers, prior_log, prior_pairs)
    log_q = np.stack([c.log_density(eta) for c in initial])  # (2, U, first)
    probability = softmax(log_p - _mixture(log_q, initial), axis=1)
    first_half = PosteriorSamples(w=to_simplex(eta), probability=probability)
    # The refits lean on the first components by dim / (dim + effective samples): a few cannot estimate a spread.
    shrink = (n_basis - 1) / (n_basis - 1 + first_half.effective_size)
    refitted = [_Dirichlet(_dirichlet_moments(first_half, shrink, prior_alpha), second // 2),
                _StudentT(*_t_moments(eta, probability, shrink, fit.cov), second - second // 2)]
    more = np.concatenate([c.draw(rng) for c in refitted], axis=1)
    everyone = initial + refitted
    log_q = np.concatenate([  # every component's density at every sample; the initial ones' at the first half kept
        np.concatenate([log_q, np.stack([c.log_density(eta) for c in refitted])]),
        np.stack([c.log_density(more) for c in everyone])], axis=2)
    log_p = np.concatenate([log_p, _chart_log_density_samples(more, answers, prior_log, prior_pairs)], axis=1)
    probability = softmax(log_p - _mixture(log_q, everyone), axis=1)
    eta = np.concatenate([eta, more], axis=1)
    temper_below = TEMPER_BELOW if temper_below is None else temper_below
    thin = 1.0 / np.square(probability).sum(axis=1) < temper_below * n_samples
    if thin.any():  # the mixture missed: tempering from the Dirichlet does not need a good proposal
        eta[thin], probability[thin] = tempering.temper(
            lambda x: _chart_log_density_samples(x, answers[thin], prior_log[thin], prior_pairs),
            _Dirichlet(prior_alpha[thin], n_samples), rng)
    return PosteriorSamples(w=to_simplex(eta), probability=probability)


def posterior(
    answers: np.ndarray,
    prior_pairs: float,
    prior_mean: np.ndarray | None = None,
    *,
    init: np.ndarray | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    rng: np.random.Generator | None = None,
    temper_below: float | None = None,
) -> PosteriorSamples:
    """Laplace fit, then importance-weighted samples: the posterior every other function here reads."""
    fit = laplace(answers, prior_pairs, prior_mean, init=init)
    return sample(answers, fit, prior_pairs, prior_mean, n_samples=n_samples, rng=rng, temper_below=temper_below)


def preference_probability(samples: PosteriorSamples, pair_scores: np.ndarray) -> np.ndarray:
    """P(first response preferred) (U, P) for pairs scored pair_scores (U, P, B): sigma(w . s) integrated over w."""
    logits = np.einsum("usb,upb->ups", samples.w, pair_scores)
    return np.einsum("ups,us->up", _sigmoid(logits), samples.probability)


def weighted_quantiles(values: np.ndarray, probability: np.ndarray, levels) -> np.ndarray:
    """Quantiles of values (U, S, ...) under sample probabilities (U, S) -> (len(levels), U, ...)."""
    order = np.argsort(values, axis=1)
    sorted_values = np.take_along_axis(values, order, axis=1)
    weights = np.broadcast_to(probability.reshape(probability.shape + (1,) * (values.ndim - 2)), values.shape)
    cumulative = np.cumsum(np.take_along_axis(weights, order, axis=1), axis=1)
    out = []
    for level in np.atleast_1d(levels):
        index = np.minimum((cumulative < level).sum(axis=1, keepdims=True), values.shape[1] - 1)
        out.append(np.take_along_axis(sorted_values, index, axis=1)[:, 0])
    return np.stack(out)


def credible_intervals(samples: PosteriorSamples, values: np.ndarray, level: float = CREDIBLE_LEVEL) -> np.ndarray:
    """Equal-tailed intervals (2, U, ...) of per-sample values (U, S, ...): e.g. each w_k or each reward."""
    tail = 0.5 * (1.0 - level)
    return weighted_quantiles(values, samples.probability, (tail, 1.0 - tail))


def in_credible_region(
    samples: PosteriorSamples,
    w: np.ndarray,
    answers: np.ndarray,
    prior_pairs: float,
    prior_mean: np.ndarray | None = None,
    level: float = CREDIBLE_LEVEL,
) -> np.ndarray:
    """Whether w (U, B) lies in each user's highest-posterior-density region of mass `level` (U,) bool.

    The region is {w : p(w | answers) >= t} in w itself (Lebesgue on the simplex): invariant to the chart and
    continuous up to the simplex boundary, where a region in log-ratios would put a user with w_k = 1e-6 at
    minus infinity. t is the (1 - level) quantile of the density over posterior samples."""
    answers = np.asarray(answers, dtype=np.float64)
    prior_log = prior_log_mean(prior_mean, answers.shape[0], answers.shape[2])
    sample_density = log_density(samples.w, answers, prior_log, prior_pairs)
    threshold = weighted_quantiles(sample_density[:, :, None], samples.probability, 1.0 - level)[0, :, 0]
    return log_density(np.asarray(w, np.float64)[:, None, :], answers, prior_log, prior_pairs)[:, 0] >= threshold


def spread(samples: PosteriorSamples) -> np.ndarray:
    """How far w may be from where the device thinks it is: the expected total-variation distance between w and
    the posterior mean (U,); 0 when sure, about 0.3 before the first answer (4-5 bases, the device prior). It
    shrinks as answers come in. The one number `status` shows."""
    centre = samples.mean()
    return 0.5 * np.einsum("us,us->u", samples.probability, np.abs(samples.w - centre[:, None, :]).sum(axis=-1))


# --- the proposal's components, as densities in the softmax chart --------------------------------------------------


@dataclass(frozen=True)
class _StudentT:
    """Multivariate t in the chart: centre (U, B-1), Cholesky factor of its scale (U, B-1, B-1), count samples."""

    centre: np.ndarray
    chol: np.ndarray
    count: int

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        n_users, dim = self.centre.shape
        normal = rng.standard_normal((n_users, self.count, dim))
        scale = np.sqrt(PROPOSAL_DOF / rng.chisquare(PROPOSAL_DOF, (n_users, self.count, 1)))
        return self.centre[:, None, :] + np.einsum("uij,usj->usi", self.chol, normal * scale)

    def log_density(self, eta: np.ndarray) -> np.ndarray:
        dim = eta.shape[-1]
        z = np.einsum("uij,usj->usi", np.linalg.inv(self.chol), eta - self.centre[:, None, :])
        log_det = np.log(np.diagonal(self.chol, axis1=1, axis2=2)).sum(axis=1)
        constant = gammaln(0.5 * (PROPOSAL_DOF + dim)) - gammaln(0.5 * PROPOSAL_DOF) - 0.5 * dim * np.log(
            PROPOSAL_DOF * np.pi)
        return constant - log_det[:, None] - 0.5 * (PROPOSAL_DOF + dim) * np.log1p(
            np.square(z).sum(axis=-1) / PROPOSAL_DOF)


@dataclass(frozen=True)
class _Dirichlet:
    """Dirichlet(alpha) (U, B) on the simplex, seen in the chart (its density times the chart's Jacobian)."""

    alpha: np.ndarray
    count: int

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        gammas = rng.standard_gamma(self.alpha[:, None, :], size=(self.alpha.shape[0], self.count, self.alpha.shape[1]))
        log_g = np.log(np.clip(gammas, 1e-300, None))  # alpha << 1 underflows: a point on the face, nudged inside
        return log_g[..., :-1] - log_g[..., -1:]

    def log_density(self, eta: np.ndarray) -> np.ndarray:
        log_norm = gammaln(self.alpha.sum(axis=1)) - gammaln(self.alpha).sum(axis=1)
        return np.einsum("usb,ub->us", _log_simplex(eta), self.alpha) + log_norm[:, None]


def _mixture(log_q: np.ndarray, components: list) -> np.ndarray:
    """log sum_c (n_c / n) q_c (U, S) from each component's log density log_q (C, U, S): the balance heuristic's
    proposal density (every count is at least 1: sample() asks for 4 samples or more)."""
    share = np.log(np.array([c.count for c in components], dtype=np.float64) / sum(c.count for c in components))
    return np.logaddexp.reduce(log_q + share[:, None, None], axis=0)


def _t_moments(eta: np.ndarray, probability: np.ndarray, shrink: np.ndarray,
               laplace_cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and Cholesky of the weighted covariance of chart samples, shrunk toward the Laplace covariance
    by `shrink` (U,)."""
    dim = eta.shape[-1]
    centre = np.einsum("us,usi->ui", probability, eta)
    centred = eta - centre[:, None, :]
    cov = np.einsum("us,usi,usj->uij", probability, centred, centred)
    cov = (1.0 - shrink[:, None, None]) * cov + shrink[:, None, None] * laplace_cov
    jitter = 1e-9 * np.trace(cov, axis1=1, axis2=2) / dim + 1e-300  # relative: the covariance's scale can be 1e-12
    cov += jitter[:, None, None] * np.eye(dim)
    return centre, np.linalg.cholesky(cov)


def _dirichlet_moments(samples: PosteriorSamples, shrink: np.ndarray, prior_alpha: np.ndarray) -> np.ndarray:
    """Dirichlet alpha (U, B) with the weighted samples' mean m and variances: each coordinate's variance gives a
    precision m_k (1 - m_k) / v_k - 1; they are pooled by their geometric mean weighted by m. Shrunk toward
    prior_alpha by `shrink` (U,): one heavy sample has no variance."""
    mean = samples.mean()
    var = np.einsum("us,usb->ub", samples.probability, np.square(samples.w - mean[:, None, :]))
    precision = np.clip(mean * (1.0 - mean) / np.maximum(var, 1e-300) - 1.0, 1e-3, 1e8)
    pooled = np.exp((mean * np.log(precision)).sum(axis=1, keepdims=True))
    return (1.0 - shrink[:, None]) * np.clip(mean * pooled, 1e-3, None) + shrink[:, None] * prior_alpha


# --- derivatives in the softmax chart ----------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _chart_log_density(eta, answers, prior_log, prior_pairs) -> np.ndarray:
    """log p(eta) = log p(w(eta)) + sum_k log w_k (Jacobian of the chart) (U,)."""
    return _chart_log_density_samples(eta[:, None, :], answers, prior_log, prior_pairs)[:, 0]


def _chart_log_density_samples(eta, answers, prior_log, prior_pairs) -> np.ndarray:
    """The same for samples eta (U, S, B-1) -> (U, S)."""
    log_w = _log_simplex(eta)
    return log_density(np.exp(log_w), answers, prior_log, prior_pairs) + log_w.sum(axis=-1)


def _chart_derivatives(eta, answers, prior_log, prior_pairs) -> tuple[np.ndarray, np.ndarray]:
    """Gradient (U, B-1) and Hessian (U, B-1, B-1) of log p(eta).

    With g, G the gradient and Hessian of log p(w) in w (any smooth extension off the simplex) and
    J = dw/deta = (diag(w) - w w^T)[:, :B-1]: grad = J^T g; Hess = J^T G J + diag(a) - a w^T - w a^T with
    a = w * (g - w.g) (the softmax's curvature); the Jacobian term sum log w adds 1 - B w and -B (diag(w) - w w^T).
    The prior's -c diag(1/w) in G is taken through J in closed form, J^T diag(1/w) J = (diag(w) - w w^T)[:B-1, :B-1]:
    1/w overflows where a hard-constrained user's w_k underflows to 0.
    """
    log_w = _log_simplex(eta)
    w = np.exp(log_w)
    n_basis = w.shape[-1]
    logits = np.einsum("ub,unb->un", w, answers)
    g = np.einsum("un,unb->ub", _sigmoid(-logits), answers)
    g -= prior_pairs * (log_w - prior_log + 1.0)
    curvature = _sigmoid(logits) * _sigmoid(-logits)
    G = -np.einsum("un,unb,unc->ubc", curvature, answers, answers)
    softmax_jac = np.einsum("ub,bc->ubc", w, np.eye(n_basis)) - w[:, :, None] * w[:, None, :]  # (U, B, B)
    J = softmax_jac[:, :, :-1]
    a = w * (g - (w * g).sum(axis=1, keepdims=True))
    hess = np.einsum("ubi,ubc,ucj->uij", J, G, J)
    hess += (np.einsum("ub,bc->ubc", a, np.eye(n_basis)) - a[:, :, None] * w[:, None, :]
             - w[:, :, None] * a[:, None, :])[:, :-1, :-1]
    hess -= (n_basis + prior_pairs) * softmax_jac[:, :-1, :-1]
    grad = np.einsum("ubi,ub->ui", J, g) + (1.0 - n_basis * w)[:, :-1]
    return grad, hess


def _newton_step(grad: np.ndarray, hess: np.ndarray) -> np.ndarray:
    """Ascent step -H^-1 grad with H's eigenvalues made negative (|lambda|): safe where log p is not concave."""
    eigval, eigvec = np.linalg.eigh(hess)
    inverse = 1.0 / np.maximum(np.abs(eigval), 1e-10)
    return np.einsum("uij,uj,ukj,uk->ui", eigvec, inverse, eigvec, grad)
