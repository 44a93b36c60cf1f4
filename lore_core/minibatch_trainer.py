"""Joint LoRe training for large populations: minibatches of users, each user's w solved exactly.

The joint objective of `joint_trainer` with every user's weights minimised out,
    f(A) = mean_u min_{w_u in simplex} [ mean_{j in u} softplus(-w_u . A d_j) + prior KL(w_u || uniform) ] + l2 ||A||^2,
has the same optimum. For a batch of users its gradient is, by the envelope theorem, the joint objective's gradient
in A at their exact w (`simplex_fit`, warm-started from the user's previous epoch). Adam on A over shuffled batches
of users with a cosine-decayed step: one epoch is one pass over the pairs, memory is the training pairs (float32)
plus w (U, B), and no full-batch line search stalls on millions of per-user parameters (the full-batch L-BFGS of
`joint_trainer` stops after ~10 iterations at 10,000 users and underfits).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lore_core.joint_trainer import user_shares
from lore_core.marginal_fit import DEFAULT_WEIGHTING
from lore_core.pair_columns import rows_of_users
from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS, fit_user_weights, prior_from_pairs

# The inner w solve: Newton from the user's last w; a decrement of 1e-9 leaves the envelope gradient exact to far
# below the minibatch noise, and bounds the work when one user of a batch converges slowly.
W_TOL, W_MAX_ITER = 1e-9, 25


@dataclass(frozen=True)
class MinibatchConfig:
    rank: int
    l2: float
    prior_pairs: float = DEFAULT_PRIOR_PAIRS  # KL(w || uniform) per user, worth this many of its pairs (as train_joint)
    epochs: int = 2  # pilot (seed 101, 10,000 users): test accuracy equal from 1 to 8 epochs, objective -0.3 % from 2 to 8
    batch_users: int = 1000
    lr: float = 0.02
    weight_by: str = DEFAULT_WEIGHTING  # each user's share of the basis fit (joint_trainer.user_shares)
    seed: int = 0
    device: str = "cpu"


@dataclass
class MinibatchFit:
    basis: np.ndarray  # (B, D)
    user_weights: np.ndarray  # (U, B), the exact w of each user for the basis of its last batch
    objective: list[float] = field(default_factory=list)  # per epoch: mean batch objective (at the batch's w)
    seconds: float = 0.0


def fit_minibatch(diff: np.ndarray, starts: np.ndarray, init_basis: np.ndarray, config: MinibatchConfig,
                  init_weights: np.ndarray | None = None) -> MinibatchFit:
    """Train A (and every user's w) on diff (n, D) float32 whose rows are grouped by user: user u owns rows
    starts[u]:starts[u + 1] (starts (U + 1,)). Starts from `init_basis` (B, D), e.g. a fit on a sample of users."""
    started = time.perf_counter()
    device = torch.device(config.device)
    rng = np.random.default_rng(config.seed)
    n_users = starts.size - 1
    x = torch.from_numpy(np.ascontiguousarray(diff, dtype=np.float32))
    basis = torch.tensor(init_basis, dtype=torch.float32, device=device, requires_grad=True)
    weights = np.full((n_users, config.rank), 1.0 / config.rank) if init_weights is None else init_weights.copy()
    batches = max(1, math.ceil(n_users / config.batch_users))
    # Each user's share of the whole population (not of its batch), so that with weight_by "pair" every batch's
    # objective is its part of the mean over all pairs: a batch of thick users weighs more than one of thin users.
    share = user_shares(torch.from_numpy(np.diff(starts)).to(torch.float32), config.weight_by).to(device)
    optimizer = torch.optim.Adam([basis], lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * batches)
    history = []
    for _ in range(config.epochs):
        total = 0.0
        for users in np.array_split(rng.permutation(n_users), batches):
            users.sort()
            rows, owner = rows_of_users(starts, users)
            batch = x[torch.from_numpy(rows)].to(device)
            owner_t = torch.from_numpy(owner).to(device)
            with torch.no_grad():
                scores = (batch @ basis.T).double().cpu().numpy()
            fit = fit_user_weights(scores, owner, users.size,
                                   prior_strength=prior_from_pairs(owner, users.size, config.prior_pairs),
                                   init=weights[users], max_iter=W_MAX_ITER, tol=W_TOL)
            weights[users] = fit.weights
            w = torch.as_tensor(fit.weights, dtype=torch.float32, device=device)
            optimizer.zero_grad()
            loss = _batch_objective(batch, owner_t, users.size, basis, w, config, share[torch.from_numpy(users)])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * users.size
        history.append(total / n_users)
    return MinibatchFit(basis=basis.detach().cpu().numpy().astype(np.float64), user_weights=weights,
                        objective=history, seconds=time.perf_counter() - started)


def _batch_objective(batch: torch.Tensor, owner: torch.Tensor, n_users: int, basis: torch.Tensor, w: torch.Tensor,
                     config: MinibatchConfig, share: torch.Tensor) -> torch.Tensor:
    """The joint objective on a batch of users at their (fixed) w, each user's terms times its population share
    (n_users,) (`joint_trainer.user_shares`); the prior term is a constant in A, kept so that the reported value is
    the objective itself."""
    logits = ((batch @ basis.T) * w[owner]).sum(dim=1)
    per_user = torch.zeros(n_users, dtype=logits.dtype, device=logits.device)
    per_user.index_add_(0, owner, torch.nn.functional.softplus(-logits))
    counts = torch.bincount(owner, minlength=n_users).clamp(min=1).to(logits.dtype)
    kl = (w * torch.log(w.clamp(min=1e-30) * w.shape[1])).sum(dim=1)
    return ((per_user + config.prior_pairs * kl) * share / counts).mean() + config.l2 * (basis**2).sum()
