"""Joint LoRe training: learn the shared basis A and every seen user's weights at once (torch, CPU or GPU).

Objective (one full batch, vectorized over all users and pairs; no Python loop over either):
    mean_u [ mean_{j in u} softplus(-w_u . A d_j) ]  +  prior * mean_u KL(w_u || uniform)  +  l2 * ||A||_F^2
with w_u = softmax(theta_u). Every user weighs the same, as in the paper. The KL prior is the same one the
few-shot solver and the federated clients use, so centralized, federated and on-device fits agree.
L-BFGS on the smooth full-batch objective. For thin users the basis can instead be refit with every w integrated out
(`lore_core.marginal_fit`, objective "marginal"), a candidate of the same selection.
Rank, l2, the objective and the personal prior of the final w fits are chosen by
`lore_core.model_selection`: whole groups held out of seen users (which also drive early stopping) and a fold of
seen users treated as new, each scored the way it is reported; a rank above 1 (one shared Bradley-Terry reward)
must beat rank 1 by more than its standard error.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from lore_core.marginal_fit import DEFAULT_WEIGHTING, OBJECTIVES, WEIGHTINGS, prior_samples
from lore_core.model_selection import (MIN_NEW_FOLD_USERS, Candidate, dense_groups, heldout_accuracy_folds,
                                       join_repeated_comparisons, make_holdouts, select)
from lore_core.pairs import fit_scales
from lore_core.selection_record import record_of
from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS, DEFAULT_PRIOR_STRENGTH, prior_from_pairs

DEFAULT_RANK_GRID = (1, 2, 3, 4, 6, 8)
# In units of mean |d|^2 / 2 over the training pairs (1 for the synthetic benchmarks): the best l2 scales with the
# square of the embedding's scale, and it ranged over 1e-6 .. 1e-4 on the pilot populations (thin users want more).
DEFAULT_L2_GRID = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
DEFAULT_PRIOR_PAIRS_GRID = (1.0, 3.0, 10.0, 30.0)
# "auto" offers the marginal fit only where users are thin: with a median of this many training pairs per user or
# more, w's posterior is narrow and the two fits agree (iso-150-250 pilot, bench_results/basis_methods.md), while the
# marginal fit costs the most (its work grows with pairs x 260 prior draws).
MARGINAL_MAX_MEDIAN_PAIRS = 100
DEAD_ROW = 0.01  # a basis row under this fraction of the largest row's norm is dead (`dead_rows`)
WALK_TOLERANCE = 0.003  # a held-out score this far below the rank's best ends its l2 walk


class SelectionWarning(UserWarning):
    """The held-out selection had nothing to estimate on and kept its safe default, or too little to trust."""


# A rank above 1 chosen against a rank-1 baseline on fewer scored users than this draws a warning. On pilot seeds
# 101-110 (simulations/pilot_nested_check.py, bench_results/nested_check_bootstrap_pilot.md) the rank chosen past the
# nested check lost 0.66 points to one shared reward for seen users on average at 20 users with 20-40 pairs each
# (worst seed 3.1, in expectation over the test labels), and nothing at 40 users; at 20 users with 150-250 pairs each
# it gained.
SMALL_SELECTION_USERS = 30


@dataclass(frozen=True)
class TrainConfig:
    rank: int | str = "auto"  # an int, or "auto" = the one-SE rule over rank_grid (lore_core.model_selection)
    rank_grid: tuple[int, ...] = DEFAULT_RANK_GRID
    # How the basis is fit: "joint" (w fitted with it), "marginal" (w integrated out, lore_core.marginal_fit, started
    # from the joint fit), or "auto" = both are candidates of the held-out selection (the marginal one where the
    # median user has fewer than MARGINAL_MAX_MEDIAN_PAIRS training pairs).
    objective: str = "auto"
    l2: float | str = "auto"
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID  # relative (see DEFAULT_L2_GRID)
    train_prior_pairs: float = DEFAULT_PRIOR_PAIRS  # KL(w || uniform) of joint training, per user c / n_u
    prior_pairs: float | str = "auto"  # personal prior of the final w fits, or "auto" = selected over the grid
    prior_pairs_grid: tuple[float, ...] = DEFAULT_PRIOR_PAIRS_GRID
    heldout_fraction: float = 0.2  # of each seen user's groups, for the seen-user estimate and early stopping
    new_fraction: float = 0.2  # of the seen users, treated as new
    few_shot: int = 10  # pairs (whole groups) a user of the new fold adapts on
    max_iter: int = 400  # L-BFGS iterations at most of the final fit; fits stop earlier at convergence
    candidate_max_iter: int = 100  # the same for the held-out fits of the selection (warm-started along l2)
    # How much each seen user's pairs weigh in fitting the basis (`user_shares`): "pair" (every pair counts once: the
    # likelihood itself; marginal_fit.DEFAULT_WEIGHTING) or "user" (every user's mean loss counts once).
    weight_by: str = DEFAULT_WEIGHTING
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.rank != "auto" and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive int or 'auto', got {self.rank!r}")
        if self.l2 != "auto" and (not isinstance(self.l2, (int, float)) or not self.l2 >= 0):
            raise ValueError(f"l2 must be >= 0 or 'auto', got {self.l2!r}")
        for name in ("heldout_fraction", "new_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.prior_pairs != "auto" and not (isinstance(self.prior_pairs, (int, float)) and self.prior_pairs > 0):
            raise ValueError(f"prior_pairs must be > 0 or 'auto', got {self.prior_pairs!r}")
        if self.weight_by not in WEIGHTINGS:
            raise ValueError(f"weight_by must be one of {WEIGHTINGS}, got {self.weight_by!r}")
        if self.objective not in (*OBJECTIVES, "auto"):
            raise ValueError(f"objective must be one of {OBJECTIVES} or 'auto', got {self.objective!r}")
        if 1 not in self.rank_grid:
            raise ValueError("rank_grid must include 1 (the single-reward BT baseline)")


@dataclass
class JointFit:
    basis: np.ndarray  # (B, D)
    user_weights: np.ndarray  # (U, B) on the simplex, rows aligned with user_ids
    user_ids: np.ndarray  # (U,)
    rank: int
    l2: float
    prior_pairs: float = DEFAULT_PRIOR_PAIRS  # personal prior of the final w fits that goes with this basis
    objective: str = "joint"  # how the basis was fit (TrainConfig.objective)
    selection: list[dict] = field(default_factory=list)  # one row per (rank, l2, prior_pairs) tried
    held_out: dict = field(default_factory=dict)  # how the held-out sets were made (groups or pairs, sizes)
    heldout_record: dict = field(default_factory=dict)  # the per-user figures selection chose on (selection_record)
    train_seconds: float = 0.0


def resolve_device(device: str) -> torch.device:
    """`device` (cpu, cuda, cuda:N) if this machine has it. Only the exact string "cuda" was checked: cuda:0 without
    CUDA reached torch's own error mid-fit, and cuda:3 on a one-GPU machine too."""
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ValueError(f"--device {device} was asked for but torch sees "
                             f"{'no CUDA device' if not count else f'{count} CUDA device(s)'} on this machine; use "
                             "--device cpu" + (" or cuda:0" if count else ""))
    return dev


def user_shares(counts: torch.Tensor, weight_by: str) -> torch.Tensor:
    """Each user's weight in the basis fit (U,), 0 for users without pairs, mean 1 over the others. "user": 1 for
    each, so a user's mean loss counts once however many pairs it has; "pair": proportional to its pairs, so every
    pair counts once (the likelihood). A user's w is fit to its own terms alone, so its share moves only how much it
    pulls the basis, never its w. With users of very unequal data (2 to 400 pairs), equal shares let the many thin
    users' noise outweigh the few rich users' signal (bench_results/pair_weighting_pilot.md)."""
    active = (counts > 0).to(counts.dtype)
    share = counts * active if weight_by == "pair" else active
    return share * active.sum().clamp(min=1.0) / share.sum().clamp(min=1e-30)


class _Objective:
    """The LoRe objective on tensors; `user_idx` maps pairs to rows of theta."""

    def __init__(self, diff: torch.Tensor, user_idx: torch.Tensor, n_users: int, prior, l2: float,
                 weight_by: str = "user"):
        """prior: one KL weight, or one per user (n_users,) as `simplex_fit.prior_from_pairs` gives; both a user's
        loss and its prior are scaled by its share (`user_shares`)."""
        self.diff, self.user_idx, self.n_users = diff, user_idx, n_users
        self.prior = torch.as_tensor(prior, dtype=diff.dtype, device=diff.device)
        self.l2 = l2
        counts = torch.bincount(user_idx, minlength=n_users).to(diff.dtype)
        share = user_shares(counts, weight_by)
        self.inv_counts = share / counts.clamp(min=1.0)
        self.active = share
        self.n_active = (counts > 0).to(diff.dtype).sum().clamp(min=1.0)

    def data_loss(self, basis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(theta, dim=1)
        logits = ((self.diff @ basis.T) * weights[self.user_idx]).sum(dim=1)
        per_pair = torch.nn.functional.softplus(-logits)
        per_user = torch.zeros(self.n_users, dtype=per_pair.dtype, device=per_pair.device)
        per_user.index_add_(0, self.user_idx, per_pair)
        return (per_user * self.inv_counts).sum() / self.n_active

    def __call__(self, basis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        log_w = torch.log_softmax(theta, dim=1)
        kl = (log_w.exp() * (log_w + math.log(theta.shape[1]))).sum(dim=1)
        prior = (self.prior * kl * self.active).sum() / self.n_active
        return self.data_loss(basis, theta) + prior + self.l2 * (basis**2).sum()


def _lbfgs(params: list[torch.Tensor], objective, max_iter: int, tolerance: float = 1e-7) -> torch.optim.LBFGS:
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=tolerance, tolerance_change=tolerance * 1e-2)

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    return optimizer


def fit_basis_and_weights(
    diff: np.ndarray,
    user_idx: np.ndarray,
    n_users: int,
    *,
    rank: int,
    l2: float,
    prior_strength: float,
    max_iter: int,
    seed: int,
    device: str = "cpu",
    init: tuple[np.ndarray, np.ndarray] | None = None,
    scale: "FitScale | None" = None,
    weight_by: str = "user",
) -> tuple[np.ndarray, np.ndarray]:
    """Joint fit by L-BFGS to convergence (at most max_iter iterations), from a seeded random start or from
    `init` = (basis (B, D), weights (U, B)) of a neighbouring fit, in the units of `scale` (None: FitScale.of(diff);
    train_joint gives every fit its population's, so that no candidate's objective moves with its subset of pairs).
    Returns (basis (B, D), weights (U, B))."""
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    scale = scale or FitScale.of(diff)
    x = scale.pairs(diff, dev)
    idx = torch.as_tensor(user_idx, dtype=torch.long, device=dev)
    dim = x.shape[1]
    if init is None:
        basis = torch.randn(rank, dim, generator=gen) / math.sqrt(dim)
        theta = 0.1 * torch.randn(n_users, rank, generator=gen)
    else:
        # Contiguous copies: L-BFGS updates its parameters in place (the caller may keep the neighbouring fit) and
        # views their gradients flat, which a start with another layout (a transposed or Fortran array) breaks.
        basis = scale.to_fit(torch.tensor(np.ascontiguousarray(init[0]), dtype=torch.float32))
        theta = torch.log(torch.tensor(np.ascontiguousarray(init[1]), dtype=torch.float32).clamp(min=1e-12))
    basis = basis.to(dev).requires_grad_(True)
    theta = theta.to(dev).requires_grad_(True)
    objective = _Objective(x, idx, n_users, prior_strength, scale.l2(l2), weight_by)
    _lbfgs([basis, theta], lambda: objective(basis, theta), max_iter)
    return scale.from_fit(basis.detach()).cpu().numpy(), torch.softmax(theta, 1).detach().cpu().numpy()


class FitScale:
    """What the L-BFGS fits divide each coordinate of the pairs by (a power of two, exact in floating point), and so
    multiply the basis' column by (`pairs.fit_scales`). L-BFGS's tolerances and random start are absolute: pairs
    scaled by 1e-4 stopped at the random start, at chance with exit 0, and so did the other coordinates beside one
    1000 times as large (two testers). All coordinates are divided by `overall`, the common scale where it is far
    from 1 (the same objective, with l2 divided by its square); a coordinate far above it is divided apart too, and
    its column's L2 is then the one it would have at the common scale (ridge on standardized coordinates, with l2's
    unit, `l2_unit`, taken at that scale). Pairs of the usual scale are fitted exactly as before (every factor 1)."""

    def __init__(self, columns: np.ndarray, overall: float) -> None:
        self.columns, self.overall = columns, overall  # (D,) powers of two; the common one

    @classmethod
    def of(cls, diff: np.ndarray) -> "FitScale":
        overall, columns = fit_scales(np.einsum("nd,nd->d", diff, diff, dtype=np.float64), diff.shape[0])
        return cls(columns, overall)

    @property
    def uniform(self) -> bool:
        return bool((self.columns == self.overall).all())

    @property
    def identity(self) -> bool:
        """Every factor 1: the pairs are fitted as they are (the usual scale)."""
        return self.uniform and self.overall == 1.0

    def _factor(self, like: torch.Tensor | np.ndarray) -> float | torch.Tensor | np.ndarray:
        if self.uniform:
            return self.overall
        if isinstance(like, np.ndarray):
            return self.columns.astype(like.dtype)
        return torch.as_tensor(self.columns, dtype=like.dtype, device=like.device)

    def pairs(self, diff: np.ndarray, dev: torch.device) -> torch.Tensor:
        """diff / scale as a float32 tensor on `dev`, cast first (powers of two divide exactly in either precision)."""
        return torch.as_tensor(self.divide(np.asarray(diff, dtype=np.float32)), device=dev)

    def divide(self, diff: np.ndarray) -> np.ndarray:
        """diff / scale in numpy, `diff` itself (no copy) where every factor is 1, as for pairs of the usual scale."""
        return diff if self.identity else diff / self._factor(diff)

    def to_fit(self, basis: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        return basis * self._factor(basis)

    def from_fit(self, basis: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        return basis / self._factor(basis)

    def l2(self, l2: float) -> float:
        """The L2 on the fitted basis (see the class docstring)."""
        return l2 / self.overall**2


class MarginalObjective:
    """The marginal objective (`lore_core.marginal_fit`) on torch tensors; diff (n, D), user_idx (n,) in
    0..n_users-1."""

    def __init__(self, diff: torch.Tensor, user_idx: torch.Tensor, n_users: int, rank: int, l2: float,
                 weight_by: str = "user"):
        self.diff, self.user_idx, self.n_users, self.l2 = diff, user_idx, n_users, l2
        self.samples = torch.as_tensor(prior_samples(rank), dtype=diff.dtype, device=diff.device)  # (M, B)
        counts = torch.bincount(user_idx, minlength=n_users).to(diff.dtype)
        self.active = counts > 0
        self.inv_counts = user_shares(counts, weight_by) / counts.clamp(min=1.0)
        self.n_active = self.active.sum().clamp(min=1)

    def __call__(self, basis: torch.Tensor) -> torch.Tensor:
        logits = (self.diff @ basis.T) @ self.samples.T  # (n, M)
        loglik = torch.zeros(self.n_users, self.samples.shape[0], dtype=logits.dtype, device=logits.device)
        loglik.index_add_(0, self.user_idx, -torch.nn.functional.softplus(-logits))
        log_marginal = torch.logsumexp(loglik, dim=1) - np.log(self.samples.shape[0])
        per_user = torch.where(self.active, -log_marginal * self.inv_counts, torch.zeros_like(log_marginal))
        return per_user.sum() / self.n_active + self.l2 * (basis**2).sum()


def fit_basis_marginal(diff: np.ndarray, user_idx: np.ndarray, n_users: int, *, rank: int, l2: float,
                       init: np.ndarray, max_iter: int, device: str = "cpu",
                       scale: "FitScale | None" = None, weight_by: str = "user") -> np.ndarray:
    """L-BFGS on the marginal objective from `init` (B, D), typically the joint fit's basis. Returns (B, D)."""
    dev = resolve_device(device)
    scale = scale or FitScale.of(diff)  # as fit_basis_and_weights
    objective = MarginalObjective(scale.pairs(diff, dev), torch.as_tensor(user_idx, dtype=torch.long, device=dev),
                                  n_users, rank, scale.l2(l2), weight_by)
    basis = scale.to_fit(torch.as_tensor(np.ascontiguousarray(init), dtype=torch.float32, device=dev))
    basis = basis.clone().requires_grad_(True)
    _lbfgs([basis], lambda: objective(basis), max_iter)
    return scale.from_fit(basis.detach()).cpu().numpy()


def fit_few_shot_torch(
    basis: np.ndarray,
    diff: np.ndarray,
    user_idx: np.ndarray,
    n_users: int,
    *,
    prior_strength: float | np.ndarray = DEFAULT_PRIOR_STRENGTH,
    max_iter: int = 500,
    device: str = "cpu",
) -> np.ndarray:
    """Few-shot fit of new users' weights with the basis frozen, batched over users (same objective as
    `lore_core.simplex_fit`, solved in torch with L-BFGS on softmax parameters). Returns (U, B)."""
    dev = resolve_device(device)
    frozen = torch.as_tensor(basis, dtype=torch.float64, device=dev)
    objective = _Objective(
        torch.as_tensor(diff, dtype=torch.float64, device=dev),
        torch.as_tensor(user_idx, dtype=torch.long, device=dev),
        n_users,
        prior_strength,
        0.0,
    )
    theta = torch.zeros(n_users, basis.shape[0], dtype=torch.float64, device=dev, requires_grad=True)
    # Tight tolerances: optima near the simplex boundary need large |theta|, where gradients are tiny.
    _lbfgs([theta], lambda: objective(frozen, theta), max_iter, tolerance=1e-12)
    return torch.softmax(theta, 1).detach().cpu().numpy()


def l2_unit(diff: np.ndarray, scale: "FitScale | None" = None) -> float:
    """mean |d|^2 / 2: the auto l2 grid is in these units, so that it does not depend on the embedding's scale. Where
    FitScale (None: FitScale.of(diff)) divides coordinates apart, of the pairs with those brought to the common scale:
    a coordinate 1000 times the others would otherwise set the others' penalty (a tester)."""
    scale = scale or FitScale.of(diff)
    if scale.uniform:
        return float(np.mean(np.einsum("nd,nd->n", diff, diff))) / 2.0
    squares = np.einsum("nd,nd->d", diff, diff, dtype=np.float64) * (scale.overall / scale.columns) ** 2
    return float(squares.sum()) / max(diff.shape[0], 1) / 2.0


def collapsed(basis: np.ndarray) -> bool:
    """Rows of the basis (B, D) all (nearly) the same reward: a strong l2 fit that fell back to one shared reward."""
    spread = np.linalg.norm(basis - basis.mean(axis=0), axis=1).max()
    return bool(spread <= 0.05 * np.linalg.norm(basis.mean(axis=0)) + 1e-12)


def dead_rows(basis: np.ndarray) -> np.ndarray:
    """Rows of the basis (B, D) at (nearly) zero beside the largest: no user's w can pull such a row back (its
    gradient is the users' weight on it, and theirs the row), so a walk warm-started from it keeps the rank lost."""
    norms = np.linalg.norm(basis, axis=1)
    return norms < DEAD_ROW * norms.max()


def warm_start(basis: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Where the next fit of an l2 walk starts: this fit, unless it collapsed or lost rows at a strong l2 (then the
    seeded random start). The matrix's iso-150-250 seed 1 lost two rows of four in its first, strongest fit on all
    pairs (one shared reward carried by the other two), the walk kept them dead down to the chosen l2, and `train`
    ended 10 points under its held-out estimate. A fit that is not finite is never handed on (a reviewer: NaN
    norms compare False, so such a fit passed both checks)."""
    if not (np.isfinite(basis).all() and np.isfinite(weights).all()):
        return None
    return None if collapsed(basis) or dead_rows(basis).any() else (basis, weights)


def walk_to(l2s: list[float], l2: float) -> list[float]:
    """The l2 values the selection's walk (strong to weak, each fit warm-started from the previous one) visits up to
    and including `l2`. The final fit repeats that walk: the objective is not convex, and a cold fit at a weak l2
    lands in another optimum than the walk's. On iso-shared (pilot seed 101, `--seed 0`) the walk's rank-4 basis at
    l2 1e-6 scored 0.745 / 0.751 and a cold fit 0.697 / 0.711, below one shared reward (0.729 / 0.728): the
    selection had measured the walk (simulations/final_fit_path_pilot.py). `l2` must be on the grid (ValueError)."""
    ordered = sorted(l2s, reverse=True)
    return ordered[:ordered.index(l2) + 1]


def candidate_objectives(objective: str, pairs_per_user: np.ndarray) -> tuple[str, ...]:
    """The objectives the selection tries (TrainConfig.objective; "auto": both where the median user is thin)."""
    if objective != "auto":
        return (objective,)
    return OBJECTIVES if np.median(pairs_per_user) < MARGINAL_MAX_MEDIAN_PAIRS else ("joint",)


def train_joint(diff: np.ndarray, user: np.ndarray, config: TrainConfig = TrainConfig(),
                group: np.ndarray | None = None) -> JointFit:
    """Train on the seen users' training pairs: diff (n, D), user (n,) ids, group (n,) or None (every pair its own
    group). Selects rank, l2 and the personal prior when 'auto' (module docstring), then refits on all pairs.

    The grid is walked cheaply: l2 from strong to weak within a rank, each fit starting where the previous one
    ended, stopping once the held-out score falls past the rank's best; ranks upward, stopping after two ranks in a
    row that do not improve on the best so far. With both objectives the joint fits walk the grid and the marginal
    fits run only at each rank's best joint l2 and its neighbours (`marginal_near_best`)."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    user_ids, user_idx = np.unique(user, return_inverse=True)
    n_users = user_ids.size
    # A basis has at most D rows: the grid's larger ranks do not exist for a narrow embedding (D = 1, 2, ...).
    # Walked upward from rank 1, each rank once: a tester's grid given high to low (or with a rank repeated) stopped
    # the walk before rank 1, and a higher rank was chosen with no baseline to beat.
    grid = sorted({r for r in config.rank_grid if r <= diff.shape[1]})
    ranks = tuple(grid) if config.rank == "auto" else (config.rank,)
    scale = FitScale.of(diff)
    unit = l2_unit(diff, scale)
    l2s = sorted((unit * v for v in config.l2_grid), reverse=True) if config.l2 == "auto" else [float(config.l2)]
    priors = config.prior_pairs_grid if config.prior_pairs == "auto" else (float(config.prior_pairs),)
    given = dense_groups(user_idx, group)
    groups = join_repeated_comparisons(user_idx, given, diff)  # repeats of the same comparison join one group
    folds = make_holdouts(user_idx, groups, n_users,
                          heldout_fraction=config.heldout_fraction, new_fraction=config.new_fraction,
                          few_shot=config.few_shot, seed=config.seed)
    masks = {}  # the basis fits of one candidate: ("seen" | "new", fold) -> the pairs it is trained on
    for k, fold in enumerate(folds):
        masks["seen", k] = fold.fit_seen
        if fold.new_users.any():  # without users treated as new there is nothing to score a "new" fit on
            masks["new", k] = fold.fit_new

    objectives = candidate_objectives(config.objective, np.bincount(user_idx, minlength=n_users))

    def fit(mask: np.ndarray, rank: int, l2: float, max_iter: int, init=None) -> tuple[np.ndarray, np.ndarray]:
        idx = user_idx[mask]
        return fit_basis_and_weights(diff[mask], idx, n_users, rank=rank, l2=l2, max_iter=max_iter,
                                     prior_strength=prior_from_pairs(idx, n_users, config.train_prior_pairs),
                                     seed=config.seed, device=config.device, init=init, scale=scale,
                                     weight_by=config.weight_by)

    def marginal(mask: np.ndarray, rank: int, l2: float, max_iter: int, joint_basis: np.ndarray) -> np.ndarray:
        return fit_basis_marginal(diff[mask], user_idx[mask], n_users, rank=rank, l2=l2, init=joint_basis,
                                  max_iter=max_iter, device=config.device, scale=scale, weight_by=config.weight_by)

    def joint_bases(rank: int, l2: float, warm: dict) -> dict[tuple[str, int], np.ndarray]:
        """The held-out joint fits of (rank, l2), one per mask; `warm` holds the walk's previous fits."""
        bases = {}
        for key, mask in masks.items():
            basis, weights = fit(mask, rank, l2, config.candidate_max_iter, warm.get(key))
            warm[key] = warm_start(basis, weights)
            bases[key] = basis
        return bases

    def marginal_bases(rank: int, l2: float, joint: dict) -> dict[tuple[str, int], np.ndarray]:
        """The held-out marginal fits of (rank, l2), each started from the joint fit on the same pairs."""
        return {key: marginal(mask, rank, l2, config.candidate_max_iter, joint[key]) for key, mask in masks.items()}

    def scored(bases: dict[tuple[str, int], np.ndarray], rank: int, l2: float, objective: str, t0: float) -> list[Candidate]:
        """Held-out candidates of one (rank, l2, objective), one per personal prior (rank 1: w = 1, one). Each one's
        seconds are those spent since the last (the first's include the fits they share), so that they sum to the
        selection's time (a tester: each counted the fits since t0, and seconds_per_rank read 27 s of a 7.5 s fit)."""
        out = []
        seen_bases = [bases["seen", k] for k in range(len(folds))]
        new_bases = [bases.get(("new", k), seen_bases[k]) for k in range(len(folds))]  # no new users: all NaN
        for prior_pairs in priors[:1] if rank == 1 else priors:
            seen = heldout_accuracy_folds(seen_bases, diff, user_idx, n_users, [f.fit_seen for f in folds],
                                          [f.seen_heldout for f in folds], prior_pairs)
            new = heldout_accuracy_folds(new_bases, diff, user_idx, n_users, [f.new_shots for f in folds],
                                         [f.new_rest for f in folds], prior_pairs)
            now = time.perf_counter()
            out.append(Candidate(rank, l2, prior_pairs, seen, new, now - t0, objective))
            t0 = now
        return out

    def marginal_near_best(rank: int, walked: list[tuple[float, dict, float]]) -> list[Candidate]:
        """Marginal candidates at the rank's best joint l2 and its two neighbours on the grid. On the matrix's
        pilot runs the best marginal l2 sat within one step of the best joint l2 in 33 of 35 (run, rank) cells and
        for all 5 chosen marginal fits (`simulations.marginal_l2_offsets`), so the marginal fits are spent there."""
        best = max(range(len(walked)), key=lambda i: walked[i][2])
        out = []
        for l2, joint, _ in walked[max(best - 1, 0):best + 2]:
            t0 = time.perf_counter()
            out += scored(marginal_bases(rank, l2, joint), rank, l2, "marginal", t0)
        return out

    def final_fit(rank: int, l2: float, objective: str) -> tuple[np.ndarray, np.ndarray]:
        """The chosen candidate's estimator on all pairs: the same warm-started walk down the l2 grid to `l2`
        (`walk_to`), the last step run to convergence (max_iter)."""
        everything = np.ones(user_idx.size, bool)
        warm = None
        for step in walk_to(l2s, l2)[:-1] if rank > 1 else []:  # rank 1 always collapses: each fit starts cold
            basis, weights = fit(everything, rank, step, config.candidate_max_iter, warm)
            warm = warm_start(basis, weights)
        basis, weights = fit(everything, rank, l2, config.max_iter, warm)
        if objective == "marginal" and rank > 1:
            basis = marginal(everything, rank, l2, config.max_iter, basis)
            weights = fit_few_shot_torch(basis, diff, user_idx, n_users, device=config.device,
                                         prior_strength=prior_from_pairs(user_idx, n_users, config.train_prior_pairs))
        return basis, weights

    if len(ranks) * len(l2s) * len(priors) * len(objectives) == 1:  # nothing to select
        basis, weights = final_fit(ranks[0], l2s[0], objectives[0])
        return JointFit(basis=basis, user_weights=weights, user_ids=user_ids, rank=ranks[0], l2=l2s[0],
                        prior_pairs=priors[0], objective=objectives[0] if ranks[0] > 1 else "joint",
                        train_seconds=time.perf_counter() - start)
    candidates: list[Candidate] = []
    best_score, stale = -math.inf, 0
    marginal_only = objectives == ("marginal",)  # asked for: every l2 of the walk is a marginal fit
    for rank in ranks:
        rank_best, warm, walked = -math.inf, {}, []
        objective = "marginal" if marginal_only and rank > 1 else "joint"  # rank 1: one shared reward either way
        for l2 in l2s:
            t0 = time.perf_counter()
            bases = joint_bases(rank, l2, warm)
            found = scored(marginal_bases(rank, l2, bases) if objective == "marginal" else bases, rank, l2,
                           objective, t0)
            candidates += found
            score = max(c.score for c in found)
            walked.append((l2, bases, score))
            if score < rank_best - WALK_TOLERANCE:
                break  # past the peak (a plateau of collapsed, rank-1-like fits at strong l2 does not stop it)
            rank_best = max(rank_best, score)
        if rank > 1 and objectives == OBJECTIVES:
            found = marginal_near_best(rank, walked)
            candidates += found
            rank_best = max(rank_best, *(c.score for c in found))
        stale = 0 if rank_best > best_score else stale + 1
        best_score = max(best_score, rank_best)
        if stale >= 2:
            break
    chosen, table, nested = select(candidates, nested=len(folds) > 1, seed=config.seed)
    record = record_of(candidates, nested=len(folds) > 1, seed=config.seed) if len(candidates) > 1 else {}
    used = int(groups.max(initial=-1)) + 1
    joined = int(given.max(initial=-1)) + 1 - used
    if len(candidates) > 1 and not any(f.seen_heldout.any() or f.new_rest.any() for f in folds):
        repeats = (f" ({joined} groups were merged as repeats of the same comparison: pairs whose diffs are equal "
                   "up to sign)" if joined else "")
        warnings.warn(f"no held-out data: every seen user has too few groups to hold one out{repeats}, and the "
                      "new-user fold has none to score, so no candidate could be estimated and the first was kept "
                      f"(rank {chosen.rank}, l2 {chosen.l2:.1e}, prior {chosen.prior_pairs:g} pairs); give users several "
                      "groups (the pair file's `group` array) or fix rank, l2 and prior", SelectionWarning,
                      stacklevel=2)
    elif len(candidates) > 1 and not any(f.new_users.any() for f in folds):
        warnings.warn(f"no seen user could stand in for a new user (that needs {MIN_NEW_FOLD_USERS} seen users with two "
                      "groups of pairs or more): candidates were compared on seen users' held-out groups alone, so "
                      "the choice says nothing of what new users get" + (
                          "; with one seen user no standard error exists, so one shared reward (rank 1) is kept"
                          if len(user_ids) == 1 else ""), SelectionWarning, stacklevel=2)
    if chosen.rank > 1 and any(c.rank == 1 for c in candidates) and nested["users"] < SMALL_SELECTION_USERS:
        check = ("passed the nested check" if nested["enforced"] else "was chosen without the nested check (one "
                 "held-out fold)")
        gain = (f" (nested gain over rank 1 {100 * nested['gain']:+.1f} ± {100 * nested['se']:.1f} points)"
                if nested["enforced"] else "")
        warnings.warn(f"rank {chosen.rank} {check}{gain} on the held-out figures of only {nested['users']} users, "
                      "too few to trust: on pilot populations of 20 users with 20-40 pairs each, such choices lost up "
                      "to 3 points to one shared reward (bench_results/nested_check_bootstrap_pilot.md), though users "
                      "with a few hundred pairs each gained; before relying on it, compare it with `--rank 1` on pairs "
                      "that neither run trained on", SelectionWarning, stacklevel=2)
    basis, weights = final_fit(chosen.rank, chosen.l2, chosen.objective)
    held_out = {"groups": "group array" if group is not None else "one group per pair (no group array)",
                "groups_used": used, "groups_joined_by_repeats": joined,
                "folds": len(folds), "seen_heldout_pairs": int(sum(f.seen_heldout.sum() for f in folds)),
                "new_fold_users": int(sum(f.new_users.sum() for f in folds)),
                "new_fold_scored_pairs": int(sum(f.new_rest.sum() for f in folds)), "l2_unit": unit,
                "nested_check": nested}
    return JointFit(basis=basis, user_weights=weights, user_ids=user_ids, rank=chosen.rank, l2=chosen.l2,
                    prior_pairs=chosen.prior_pairs, objective=chosen.objective if chosen.rank > 1 else "joint",
                    selection=table, held_out=held_out, heldout_record=record,
                    train_seconds=time.perf_counter() - start)
