"""Ways to learn the basis from thin users, compared on pilot populations of the stress matrix.

    python -m simulations.compare_basis_methods [--populations NAME,...] [--seed 101] [--work runs/bench_matrix]
                                                [--previous /work/main]

Each method fits the basis on the seen users' training pairs at the rank, l2 and personal prior that `lore-fed
train` chose on that population (taken from the matrix cache), and is scored like every run (w refit per user,
`lore_core.evaluation`):
  joint           the shipped trainer: per-user training prior c / n_u (c = 3), random start, L-BFGS
  weak-prior      the same with the earlier training prior: one weak KL weight 0.02 for every user
  moment-init     start from the mean pair diff plus the top eigenvectors of the debiased second moment of the
                  users' mean pair diffs (a spectral start from per-user statistics)
  restarts        the lowest training objective of three random starts
  shared+lowrank  A_b = a0 + D_b with l2 on the personal parts D_b and l2 / 10 on the shared reward a0
  marginal        w integrated out over fixed prior draws (lore_core.marginal_fit), started from the joint fit: the
                  candidate `lore-fed train --objective auto` adds to its selection
  spectral        the shared reward (rank-1 fit) plus a personal part inside the top 10 eigenvectors of the users'
                  debiased second moment of BT residual gradients (`personal_directions`); only the rank x 10
                  coordinates and the shared reward's scale are fitted, by the marginal likelihood (few parameters)
`previous` is the earlier `lore-fed train --rank auto` end to end (pair-split validation, early stopping on
validation likelihood), run from the checkout given by --previous on a copy of the pair file without `group`.
Seeds >= 100 only: the method that ships is chosen on pilots. Writes bench_results/basis_methods.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.evaluation import evaluate_model
from lore_core.joint_trainer import _lbfgs, _Objective, fit_basis_and_weights, fit_basis_marginal
from lore_core.pairs import load_pairs
from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS, DEFAULT_PRIOR_STRENGTH, prior_from_pairs

PILOTS = ("iso-20-40", "iso-5-15", "iso-5-15-1400", "aniso-20-40", "iso-shared", "iso-150-250")
METHODS = ("joint", "weak-prior", "moment-init", "restarts", "shared+lowrank", "marginal", "spectral")
SPECTRAL_DIRECTIONS = 10


def moment_start(diff: np.ndarray, user_idx: np.ndarray, n_users: int, rank: int) -> np.ndarray:
    """Rows mean + eigenvector b of sum_u n_u m_u m_u^T / U - Cov(d) (m_u: user u's mean diff), scaled to the
    mean's norm: the directions along which users' average preferences differ beyond the pair noise."""
    counts = np.bincount(user_idx, minlength=n_users).astype(float)
    means = np.zeros((n_users, diff.shape[1]))
    np.add.at(means, user_idx, diff)
    means /= np.maximum(counts, 1)[:, None]
    moment = (means.T * counts) @ means / n_users - diff.T @ diff / len(diff)
    _, vectors = np.linalg.eigh(moment)
    center = means.mean(axis=0)
    return center + np.linalg.norm(center) * vectors[:, ::-1][:, :rank].T


def residual_gradients(diff: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """r_j d_j (n, D): each pair's gradient of the BT loss at the shared reward (r_j = P(pair j wrong))."""
    return expit(-(diff @ shared))[:, None] * diff


def personal_moment(gradients: np.ndarray, unit_idx: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """sum_u (m_u m_u^T - sum_j g_j g_j^T) (D, D), m_u = sum_j g_j over unit u's pairs: the products of pairs within
    a unit (a user), without each pair's own square (its noise, gradients.T @ gradients, which a caller shuffling
    the units may pass once), so only directions along which units differ remain."""
    from scipy.sparse import csr_matrix

    n = len(unit_idx)
    members = csr_matrix((np.ones(n), (unit_idx, np.arange(n))), shape=(int(unit_idx.max()) + 1, n))
    per_unit = members @ gradients
    return per_unit.T @ per_unit - (gradients.T @ gradients if noise is None else noise)


def personal_directions(diff: np.ndarray, user_idx: np.ndarray, shared: np.ndarray, k: int) -> np.ndarray:
    """Top k eigenvectors (D, k) of the users' `personal_moment` of BT residual gradients at the shared reward."""
    moment = personal_moment(residual_gradients(diff, shared), user_idx)
    return np.ascontiguousarray(np.linalg.eigh(moment)[1][:, ::-1][:, :k])


def shared_reward(diff: np.ndarray, user_idx: np.ndarray, n_users: int, l2: float, seed: int) -> np.ndarray:
    """One shared reward (D,): the rank-1 fit, from which users' residual gradients are taken."""
    return fit_basis_and_weights(diff, user_idx, n_users, rank=1, l2=l2, prior_strength=0.0, max_iter=400,
                                 seed=seed)[0][0].astype(np.float64)


def spectral_marginal(diff, user_idx, n_users, rank, l2, seed) -> np.ndarray:
    from lore_core.joint_trainer import MarginalObjective

    shared = shared_reward(diff, user_idx, n_users, l2, seed)
    directions = torch.as_tensor(personal_directions(diff, user_idx, shared, SPECTRAL_DIRECTIONS))
    objective = MarginalObjective(torch.as_tensor(diff), torch.as_tensor(user_idx), n_users, rank, l2)
    gen = torch.Generator().manual_seed(seed)
    coords = (0.3 * np.linalg.norm(shared) * torch.randn(rank, SPECTRAL_DIRECTIONS, generator=gen,
                                                         dtype=torch.float64)).requires_grad_(True)
    scale = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    shared_t = torch.as_tensor(shared)

    def basis():
        return (1 + scale) * shared_t[None] + coords @ directions.T

    _lbfgs([coords, scale], lambda: objective(basis()), 400)
    return basis().detach().numpy()


def shared_plus_lowrank(diff, user_idx, n_users, rank, l2, seed) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    x, idx = torch.as_tensor(diff, dtype=torch.float32), torch.as_tensor(user_idx)
    shared = (torch.randn(diff.shape[1], generator=gen) / math.sqrt(diff.shape[1])).requires_grad_(True)
    personal = (torch.randn(rank, diff.shape[1], generator=gen) / math.sqrt(diff.shape[1])).requires_grad_(True)
    theta = (0.1 * torch.randn(n_users, rank, generator=gen)).requires_grad_(True)
    objective = _Objective(x, idx, n_users, prior_from_pairs(user_idx, n_users, DEFAULT_PRIOR_PAIRS), 0.0)

    def loss():
        personal_part = personal - personal.mean(dim=0)
        return objective(shared + personal_part, theta) + l2 * (personal_part**2).sum() + \
            (l2 / 10) * rank * (shared**2).sum()

    _lbfgs([shared, personal, theta], loss, 400)
    return (shared + personal - personal.mean(dim=0)).detach().numpy()


def fit_method(method: str, diff, user_idx, n_users, rank, l2, seed) -> np.ndarray:
    personal_prior = prior_from_pairs(user_idx, n_users, DEFAULT_PRIOR_PAIRS)
    common = dict(rank=rank, l2=l2, max_iter=400, seed=seed)
    if method == "joint":
        return fit_basis_and_weights(diff, user_idx, n_users, prior_strength=personal_prior, **common)[0]
    if method == "weak-prior":
        return fit_basis_and_weights(diff, user_idx, n_users, prior_strength=DEFAULT_PRIOR_STRENGTH, **common)[0]
    if method == "moment-init":
        start = moment_start(diff, user_idx, n_users, rank)
        return fit_basis_and_weights(diff, user_idx, n_users, prior_strength=personal_prior,
                                     init=(start, np.full((n_users, rank), 1.0 / rank)), **common)[0]
    if method == "restarts":
        best = None
        for restart in range(3):
            basis, weights = fit_basis_and_weights(diff, user_idx, n_users, prior_strength=personal_prior,
                                                   **{**common, "seed": seed + restart})
            value = float(_Objective(torch.as_tensor(diff, dtype=torch.float32), torch.as_tensor(user_idx), n_users,
                                     personal_prior, l2)(torch.as_tensor(basis),
                                                         torch.log(torch.as_tensor(weights, dtype=torch.float32))))
            if best is None or value < best[0]:
                best = (value, basis)
        return best[1]
    if method == "shared+lowrank":
        return shared_plus_lowrank(diff, user_idx, n_users, rank, l2, seed)
    if method == "marginal":
        joint = fit_basis_and_weights(diff, user_idx, n_users, prior_strength=personal_prior, **common)[0]
        return fit_basis_marginal(diff, user_idx, n_users, rank=rank, l2=l2, init=joint, max_iter=400)
    if method == "spectral":
        return spectral_marginal(diff, user_idx, n_users, rank, l2, seed)
    raise ValueError(method)


def previous_recipe(path: Path, checkout: Path, work: Path) -> dict:
    """The earlier `lore-fed train --rank auto` from another checkout, on a copy of the file without `group`."""
    pairs = load_pairs(path)
    work.mkdir(parents=True, exist_ok=True)
    legacy = work / "legacy_pairs.npz"
    np.savez(legacy, diff=pairs.diff, user=pairs.user, split=pairs.split, seen=pairs.seen,
             **({} if pairs.logit_true is None else {"logit_true": pairs.logit_true}))
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "train", str(legacy.resolve()), "--out",
                           str((work / "previous").resolve())], cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the earlier trainer in {checkout} failed: {done.stderr[-2000:]}")
    metrics = json.loads((work / "previous" / "metrics.json").read_text())
    return {"seen_test_acc": metrics["seen_test_acc"], "unseen_test_acc": metrics["unseen_test_acc"],
            "rank": metrics["rank"], "checkout": str(checkout)}


def main(argv: list[str] | None = None) -> int:
    from simulations.bench_matrix import POPULATIONS, population_file, run_cell

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", default=",".join(PILOTS))
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--work", default="runs/bench_matrix")
    parser.add_argument("--previous", default=None,
                        help="a checkout of the earlier trainer, e.g. `git archive a5dd29b | tar -x -C DIR`")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    if args.seed < 100:
        parser.error("pilot seeds are >= 100: the method is never chosen on a reported population")
    work, results = Path(args.work), {}
    for pop in (p for p in POPULATIONS if p.name in args.populations.split(",")):
        cell = run_cell(pop, args.seed, ("bt", "train", "true_basis", "oracle"), work, quick=False)
        path, _ = population_file(pop, args.seed, work, quick=False)
        pairs = load_pairs(path)
        train = pairs.select(seen=True, split="train")
        ids, idx = np.unique(train.user, return_inverse=True)
        chosen = cell["train"]
        row = {"bt": cell["bt"], "true_basis": cell["true_basis"], "settings": {k: chosen[k] for k in
                                                                                 ("rank", "l2", "prior_pairs")}}
        for method in METHODS:
            started = time.perf_counter()
            basis = fit_method(method, train.diff.astype(np.float64), idx, ids.size, chosen["rank"], chosen["l2"],
                               args.seed)
            metrics = evaluate_model(pairs, basis, prior_pairs=chosen["prior_pairs"])
            row[method] = {"seen_test_acc": metrics["seen_test_acc"], "unseen_test_acc": metrics["unseen_test_acc"],
                           "seconds": time.perf_counter() - started}
            print(f"{pop.name} {method}: {metrics['seen_test_acc']:.3f} / {metrics['unseen_test_acc']:.3f}",
                  flush=True)
        if args.previous:
            row["previous"] = previous_recipe(path, Path(args.previous), work / "runs" / pop.name / "previous")
        results[pop.name] = row
    columns = ["bt", *METHODS] + (["previous"] if args.previous else []) + ["true_basis"]
    lines = ["# Learning the basis from thin users: methods compared on pilot populations", "",
             f"`python -m simulations.compare_basis_methods --seed {args.seed}`; seen / new-user test accuracy at "
             "the rank, l2 and personal prior `lore-fed train` chose (bt: `--rank 1`; previous: the earlier "
             "trainer end to end, its own rank).", "",
             "| population | settings | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, row in results.items():
        s = row["settings"]
        cells = " | ".join(f"{row[c]['seen_test_acc']:.3f} / {row[c]['unseen_test_acc']:.3f}" for c in columns)
        lines.append(f"| {name} | rank {s['rank']}, l2 {s['l2']:.1e}, prior {s['prior_pairs']:g} | {cells} |")
    mean = {c: float(np.mean([(r[c]["seen_test_acc"] + r[c]["unseen_test_acc"]) / 2 for r in results.values()]))
            for c in columns}
    lines += ["", "Mean over populations of the mean of seen and new: " +
              ", ".join(f"{c} {v:.4f}" for c, v in mean.items()), ""]
    out = Path(args.out)
    atomic_write_json(out / "basis_methods.json", {"seed": args.seed, "results": results, "mean": mean})
    atomic_write_text(out / "basis_methods.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
