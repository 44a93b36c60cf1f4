"""How much of the true-basis ceiling can a basis learned from the data reach? A diagnostic for the matrix.

    python -m simulations.known_weights_ceiling [--populations NAME,...] [--seeds 0,1,2] [--work runs/bench_matrix]
                                                [--out bench_results]

The matrix's `true_basis` row is the true basis itself, not anything learnable from the pairs. This fits the basis
with more information than any estimator has: every seen user's TRUE w given (a logistic regression of the labels on
w_u (x) e, l2 over a grid), then scores it as every run is scored (w refit per user, `lore_core.evaluation`, with
each personal prior of a grid), and keeps the one grid cell with the best mean of seen and new accuracy on the test
set. It is a reference, not a proof of a limit (a regularised fit, tuned on the test set, so optimistic): where even
it gains under 2 points over BT, the matrix's 2-point criterion asks for more than the pairs teach a basis. Also
reported: the number of within-user pairs of training pairs, sum_u n_u(n_u-1)/2, and how much of the true personal
subspace (the span of the true basis rows minus their mean) the top K-1 directions of the users' debiased second
moment hold (mean cos^2; chance (K-1)/D): the second-order statistic a basis learned without w has to find it from
(`compare_basis_methods.personal_directions`). The matrix's `bt`, `true_basis` and `train` rows are read from its
cache under --work (computed there if missing: `train` is the slow one). Synthetic populations only: the true w is
needed. Writes bench_results/known_weights_ceiling.{md,json}.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lore_core.atomic_io import atomic_write_json, atomic_write_text

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3)  # in units of lore_core.joint_trainer.l2_unit, as `train`'s grid
PRIOR_GRID = (1.0, 3.0, 10.0, 30.0)
DEFAULT_POPULATIONS = "iso-20-40,iso-5-15,iso-5-15-1400,iso-shared,iso-noise"


def known_weights_basis(diff: np.ndarray, weights: np.ndarray, l2: float) -> np.ndarray:
    """argmin_A mean softplus(-(w_n . A d_n)) + l2 |A|^2 for known per-pair weights w_n (n, K): convex."""
    from lore_core.joint_trainer import _lbfgs

    x, w = torch.as_tensor(diff, dtype=torch.float64), torch.as_tensor(weights, dtype=torch.float64)
    basis = torch.zeros(w.shape[1], x.shape[1], dtype=torch.float64, requires_grad=True)
    _lbfgs([basis], lambda: torch.nn.functional.softplus(-((x @ basis.T) * w).sum(1)).mean()
           + l2 * (basis**2).sum(), 500)
    return basis.detach().numpy()


def spectral_overlap(diff: np.ndarray, user_idx: np.ndarray, shared: np.ndarray, true_basis: np.ndarray) -> float:
    """Mean cos^2 between the true personal subspace and the top K-1 directions of the users' debiased second
    moment (`compare_basis_methods.personal_directions`)."""
    from simulations.compare_basis_methods import personal_directions

    k = true_basis.shape[0] - 1
    personal = np.linalg.qr((true_basis - true_basis.mean(axis=0)).T)[0][:, :k]
    return float(np.linalg.norm(personal_directions(diff, user_idx, shared, k).T @ personal) ** 2 / k)


def true_weights(truth, users: np.ndarray) -> np.ndarray:
    """Each given user id's true w (len(users), K), from a synthetic population's truth."""
    row_of = {u: i for i, u in enumerate(truth.user_ids)}
    return truth.user_weights[np.array([row_of[u] for u in users])]


def gain_over_bt(cells: dict, get) -> str:
    """'seen / new' points above BT, mean over a population's seed cells; get(cell) gives [seen, new] accuracy."""
    g = np.mean([[get(c)[i] - c["bt"][i] for i in (0, 1)] for c in cells.values()], axis=0)
    return f"{100 * g[0]:+.1f} / {100 * g[1]:+.1f}"


def ceiling_cell(pop, seed: int, work: Path) -> dict:
    from lore_core.evaluation import evaluate_model
    from lore_core.joint_trainer import l2_unit
    from simulations.compare_basis_methods import shared_reward
    from simulations.bench_matrix import run_cell
    from simulations.synthetic_pairs import make_synthetic_pairs

    pairs, truth = make_synthetic_pairs(replace(pop.synthetic, seed=seed))
    cached = run_cell(pop, seed, ("bt", "true_basis", "train"), work, False)
    train = pairs.select(seen=True, split="train")
    weights = true_weights(truth, train.user)
    diff = train.diff.astype(np.float64)
    grid = {}
    for l2 in L2_GRID:
        basis = known_weights_basis(diff, weights, l2 * l2_unit(diff))
        for prior in PRIOR_GRID:
            m = evaluate_model(pairs, basis, prior_pairs=prior)
            grid[f"l2 {l2:g}, prior {prior:g}"] = [m["seen_test_acc"], m["unseen_test_acc"]]
    user_ids, user_idx, counts = np.unique(train.user, return_inverse=True, return_counts=True)
    shared = shared_reward(diff, user_idx, user_ids.size, cached["bt"]["l2"], seed)
    best = max(grid, key=lambda cell: sum(grid[cell]))
    return {"bt": [cached["bt"]["seen_test_acc"], cached["bt"]["unseen_test_acc"]],
            "train": [cached["train"]["seen_test_acc"], cached["train"]["unseen_test_acc"]],
            "true_basis": [cached["true_basis"]["seen_test_acc"], cached["true_basis"]["unseen_test_acc"]],
            "known_w_best": grid[best], "known_w_best_cell": best,
            "chance_overlap": (truth.basis.shape[0] - 1) / diff.shape[1],
            "within_user_pair_pairs": int((counts * (counts - 1) // 2).sum()),
            "spectral_overlap": spectral_overlap(diff, user_idx, shared, truth.basis), "grid": grid}


def main(argv: list[str] | None = None) -> int:
    from simulations.bench_matrix import POPULATIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", default=DEFAULT_POPULATIONS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", default="runs/bench_matrix")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    by_name = {p.name: p for p in POPULATIONS if p.synthetic is not None}
    names = args.populations.split(",")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"--populations: {unknown} are not synthetic matrix populations (true w needed): {list(by_name)}")
    report = {name: {str(s): ceiling_cell(by_name[name], s, Path(args.work)) for s in seeds} for name in names}
    atomic_write_json(Path(args.out) / "known_weights_ceiling.json", report)
    lines = ["# How much of the true-basis ceiling is learnable: a basis fitted with every seen user's true w", "",
             f"`python -m simulations.known_weights_ceiling --populations {args.populations} --seeds {args.seeds}`. "
             "Points above BT, seen / new users, mean over seeds. `known w` fits the basis with each seen user's "
             "true w given and keeps the one cell of "
             f"{len(L2_GRID)} l2 x {len(PRIOR_GRID)} personal priors with the best mean of seen and new on the test "
             "set: a reference with more information than any basis learned without w (optimistic; not a proof of "
             "a limit). `pair pairs`: sum over seen users of n_u(n_u-1)/2 training pairs "
             "(mean over seeds). `overlap`: mean cos^2 between the true personal subspace and the top K-1 "
             "eigenvectors of the users' debiased second moment (1 = found; chance (K-1)/D in brackets).", "",
             "| population | `train` | known w (reference) | true basis | pair pairs | overlap (chance) |",
             "|---|---|---|---|---|---|"]
    for name, cells in report.items():
        def gain(key):
            return gain_over_bt(cells, lambda c: c[key])
        pair_pairs = np.mean([c["within_user_pair_pairs"] for c in cells.values()])
        overlap = np.mean([c["spectral_overlap"] for c in cells.values()])
        chance = np.mean([c["chance_overlap"] for c in cells.values()])
        lines.append(f"| {name} | {gain('train')} | {gain('known_w_best')} | {gain('true_basis')} | "
                     f"{pair_pairs:,.0f} | {overlap:.2f} ({chance:.3f}) |")
    atomic_write_text(Path(args.out) / "known_weights_ceiling.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
