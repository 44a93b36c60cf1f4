"""The published LoRe `run()` recipe (facebookresearch/LoRe, utils.py), re-implemented vectorized for comparison.

Recipe as published: joint Adam over (W, V), full batch, 1000 iterations, lr 0.5, loss = sum over users of the
per-user mean NLL, logit = x V w_u / 100, W ~ randn, V ~ randn, no regularization, no validation; few-shot:
V frozen, Adam 500 iterations, lr 0.1, w ~ randn. Our vectorization changes its speed (seconds, not minutes), not
its statistics. Used only by benchmarks, never by lore-fed itself.
"""

from __future__ import annotations

import numpy as np
import torch

TEMPERATURE = 100.0


def _loss(x, idx, n_users, V, W):
    logits = ((x @ V) * torch.softmax(W, 1)[idx]).sum(1) / TEMPERATURE
    per_pair = torch.nn.functional.softplus(-logits)
    per_user = torch.zeros(n_users).index_add_(0, idx, per_pair)
    counts = torch.bincount(idx, minlength=n_users).clamp(min=1)
    return (per_user / counts).sum()


def published_fit(diff, user, rank, iterations=1000, lr=0.5, seed=0):
    torch.manual_seed(seed)
    ids, idx = np.unique(user, return_inverse=True)
    x, i = torch.as_tensor(diff, dtype=torch.float32), torch.as_tensor(idx)
    V = torch.randn(diff.shape[1], rank, requires_grad=True)
    W = torch.randn(ids.size, rank, requires_grad=True)
    opt = torch.optim.Adam([V, W], lr=lr)
    for _ in range(iterations):
        opt.zero_grad()
        _loss(x, i, ids.size, V, W).backward()
        opt.step()
    return (V.detach().numpy().T / TEMPERATURE), ids, torch.softmax(W, 1).detach().numpy()


def published_few_shot(basis, diff, user, iterations=500, lr=0.1, seed=0):
    """basis (B, D) already divided by the temperature; returns (ids, weights)."""
    torch.manual_seed(seed)
    ids, idx = np.unique(user, return_inverse=True)
    if basis.shape[0] == 1:  # the published code does not adapt single-reward users
        return ids, np.ones((ids.size, 1))
    x, i = torch.as_tensor(diff, dtype=torch.float32), torch.as_tensor(idx)
    V = torch.as_tensor(basis.T * TEMPERATURE, dtype=torch.float32)
    W = torch.randn(ids.size, basis.shape[0], requires_grad=True)
    opt = torch.optim.Adam([W], lr=lr)
    for _ in range(iterations):
        opt.zero_grad()
        _loss(x, i, ids.size, V, W).backward()
        opt.step()
    return ids, torch.softmax(W, 1).detach().numpy()
