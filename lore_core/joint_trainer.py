"""Joint LoRe training: learn the shared basis A and every seen user's weights at once (torch, CPU or GPU).

Objective (one full batch, vectorized over all users and pairs; no Python loop over either):
    mean_u [ mean_{j in u} softplus(-w_u . A d_j) ]  +  prior * mean_u KL(w_u || uniform)  +  l2 * ||A||_F^2
with w_u = softmax(theta_u). Every user weighs the same, as in the paper. The KL prior is the same one the
few-shot solver and the federated clients use, so centralized, federated and on-device fits agree.
L-BFGS on the smooth full-batch objective; validation pairs held out of each seen user's training pairs drive
early stopping and the choice of rank and l2 (a grid that includes rank 1 = one shared Bradley-Terry reward).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lore_core.simplex_fit import DEFAULT_PRIOR_STRENGTH

DEFAULT_RANK_GRID = (1, 2, 3, 5, 8)
DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class TrainConfig:
    rank: int | str = "auto"  # an int, or "auto" = select on validation likelihood over rank_grid
    rank_grid: tuple[int, ...] = DEFAULT_RANK_GRID
    l2: float | str = "auto"
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID
    prior_strength: float = DEFAULT_PRIOR_STRENGTH
    val_fraction: float = 0.2
    max_iter: int = 400
    check_every: int = 10
    patience: int = 4
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.rank != "auto" and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive int or 'auto', got {self.rank!r}")
        if self.l2 != "auto" and (not isinstance(self.l2, (int, float)) or not self.l2 >= 0):
            raise ValueError(f"l2 must be >= 0 or 'auto', got {self.l2!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if 1 not in self.rank_grid:
            raise ValueError("rank_grid must include 1 (the single-reward BT baseline)")


@dataclass
class JointFit:
    basis: np.ndarray  # (B, D)
    user_weights: np.ndarray  # (U, B) on the simplex, rows aligned with user_ids
    user_ids: np.ndarray  # (U,)
    rank: int
    l2: float
    iterations: int
    val_nll: float = math.nan
    selection: list[dict] = field(default_factory=list)  # one row per (rank, l2) tried
    train_seconds: float = 0.0


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


class _Objective:
    """The LoRe objective on tensors; `user_idx` maps pairs to rows of theta."""

    def __init__(self, diff: torch.Tensor, user_idx: torch.Tensor, n_users: int, prior, l2: float):
        """prior: one KL weight, or one per user (n_users,) as `simplex_fit.prior_from_pairs` gives."""
        self.diff, self.user_idx, self.n_users = diff, user_idx, n_users
        self.prior = torch.as_tensor(prior, dtype=diff.dtype, device=diff.device)
        self.l2 = l2
        counts = torch.bincount(user_idx, minlength=n_users).to(diff.dtype)
        self.inv_counts = 1.0 / counts.clamp(min=1.0)
        self.active = (counts > 0).to(diff.dtype)
        self.n_active = self.active.sum().clamp(min=1.0)

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
    val: tuple[np.ndarray, np.ndarray] | None = None,
    check_every: int = 10,
    patience: int = 4,
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Joint fit; with `val` = (val_diff, val_user_idx) stop early on validation NLL and keep the best iterate.

    Returns (basis (B, D), weights (U, B), iterations, best validation NLL or nan).
    """
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(diff, dtype=torch.float32, device=dev)
    idx = torch.as_tensor(user_idx, dtype=torch.long, device=dev)
    dim = x.shape[1]
    basis = (torch.randn(rank, dim, generator=gen) / math.sqrt(dim)).to(dev).requires_grad_(True)
    theta = (0.1 * torch.randn(n_users, rank, generator=gen)).to(dev).requires_grad_(True)
    objective = _Objective(x, idx, n_users, prior_strength, l2)
    closure = lambda: objective(basis, theta)  # noqa: E731
    if val is None:
        _lbfgs([basis, theta], closure, max_iter)
        return basis.detach().cpu().numpy(), torch.softmax(theta, 1).detach().cpu().numpy(), max_iter, math.nan

    val_objective = _Objective(
        torch.as_tensor(val[0], dtype=torch.float32, device=dev),
        torch.as_tensor(val[1], dtype=torch.long, device=dev),
        n_users,
        0.0,
        0.0,
    )
    best = (math.inf, basis.detach().clone(), theta.detach().clone(), 0)
    stale = 0
    for done in range(check_every, max_iter + check_every, check_every):
        _lbfgs([basis, theta], closure, check_every)
        with torch.no_grad():
            val_nll = float(val_objective.data_loss(basis, theta))
        if val_nll < best[0] - 1e-5:
            best, stale = (val_nll, basis.detach().clone(), theta.detach().clone(), done), 0
        else:
            stale += 1
            if stale >= patience:
                break
    nll, best_basis, best_theta, iterations = best
    return best_basis.cpu().numpy(), torch.softmax(best_theta, 1).cpu().numpy(), iterations, nll


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


def split_validation(user_idx: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (n,) of validation pairs: `fraction` of each user's pairs (at least one user keeps >= 1 train)."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(user_idx.size), user_idx))  # shuffled within each user
    sorted_users = user_idx[order]
    starts = np.searchsorted(sorted_users, sorted_users, side="left")
    rank_in_user = np.arange(user_idx.size) - starts
    counts = np.bincount(user_idx)[sorted_users]
    n_val = np.floor(counts * fraction).astype(int)
    mask = np.zeros(user_idx.size, bool)
    mask[order] = rank_in_user < n_val
    return mask


def train_joint(diff: np.ndarray, user: np.ndarray, config: TrainConfig = TrainConfig()) -> JointFit:
    """Train on the seen users' training pairs: diff (n, D), user (n,) ids. Selects rank/l2 when 'auto'."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    user_ids, user_idx = np.unique(user, return_inverse=True)
    n_users = user_ids.size
    ranks = config.rank_grid if config.rank == "auto" else (config.rank,)
    l2s = config.l2_grid if config.l2 == "auto" else (float(config.l2),)

    val_mask = split_validation(user_idx, config.val_fraction, config.seed)
    fit_args = dict(prior_strength=config.prior_strength, seed=config.seed, device=config.device)
    selection = []
    needs_selection = len(ranks) * len(l2s) > 1
    best = None
    for rank in ranks:
        for l2 in l2s:
            t0 = time.perf_counter()
            _, _, iterations, val_nll = fit_basis_and_weights(
                diff[~val_mask], user_idx[~val_mask], n_users, rank=rank, l2=l2, max_iter=config.max_iter,
                val=(diff[val_mask], user_idx[val_mask]), check_every=config.check_every,
                patience=config.patience, **fit_args,
            )
            row = {"rank": rank, "l2": l2, "val_nll": val_nll, "iterations": iterations,
                   "seconds": time.perf_counter() - t0}
            selection.append(row)
            if best is None or val_nll < best["val_nll"]:
                best = row
    # Refit on all training pairs with the selected settings for the iterations validation chose.
    basis, weights, iterations, _ = fit_basis_and_weights(
        diff, user_idx, n_users, rank=best["rank"], l2=best["l2"], max_iter=max(best["iterations"], 1), **fit_args
    )
    return JointFit(
        basis=basis, user_weights=weights, user_ids=user_ids, rank=best["rank"], l2=best["l2"],
        iterations=iterations, val_nll=best["val_nll"], selection=selection if needs_selection else selection,
        train_seconds=time.perf_counter() - start,
    )
