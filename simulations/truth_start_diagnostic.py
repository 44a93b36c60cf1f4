"""Is a missed ceiling a search failure or a data limit? Two checks that choose nothing, for the matrix's misses.

    python -m simulations.truth_start_diagnostic [--populations NAME,...] [--seeds 0,1,2] [--out bench_results]

1. Truth start. The basis is fitted by `train`'s own objectives, joint (`fit_basis_and_weights`) and marginal
   (`fit_basis_marginal`), at the true rank, started from the TRUE basis (and, for the joint fit, every seen user's
   true w) instead of a random start. Each cell of an l2 x personal-prior grid is scored as every run is
   (`lore_core.evaluation`) and the best cell on the test set is kept: optimistic. If even this start ends near BT,
   the objective on these pairs prefers a basis that does not generalise, and no better search (restarts,
   spectral starts) can reach the ceiling with it.
2. Detectable signal. The users' debiased second moment of BT residual gradients
   (`compare_basis_methods.personal_directions`) holds the directions along which users differ. Its top eigenvalue
   is compared with the same statistic after shuffling which user made each group of pairs (no personal signal, same pairs and groups):
   `ratio` = top eigenvalue / the 95th percentile of the shuffled top eigenvalues, and `above` = how many
   eigenvalues exceed the largest shuffled one. Below the spectral threshold (ratio near 1, nothing above), the
   second-order statistic that a basis learned without w must find the personal subspace from holds no trace of it.

BT, `train` and the true basis per seed are read from bench_results/known_weights_ceiling.json (same populations
and seeds). Synthetic populations only: the truth is needed. Writes bench_results/truth_start.{md,json}.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from simulations.known_weights_ceiling import DEFAULT_POPULATIONS, L2_GRID, PRIOR_GRID

SHUFFLES = 20


def truth_start_grid(pairs, truth, seed: int) -> dict[str, dict[str, list[float]]]:
    """{objective: {cell: [seen, new]}} for fits started from the true basis, over L2_GRID x PRIOR_GRID."""
    from lore_core.evaluation import evaluate_model
    from lore_core.joint_trainer import fit_basis_and_weights, fit_basis_marginal, l2_unit
    from lore_core.simplex_fit import prior_from_pairs

    train = pairs.select(seen=True, split="train")
    user_ids, user_idx = np.unique(train.user, return_inverse=True)
    row_of = {u: i for i, u in enumerate(truth.user_ids)}
    weights = truth.user_weights[np.array([row_of[u] for u in user_ids])]
    diff = train.diff.astype(np.float32)
    rank, unit = truth.basis.shape[0], l2_unit(diff)
    grid: dict[str, dict[str, list[float]]] = {"joint": {}, "marginal": {}}
    for l2 in L2_GRID:
        marginal = fit_basis_marginal(diff, user_idx, user_ids.size, rank=rank, l2=l2 * unit, init=truth.basis,
                                      max_iter=500)
        for prior in PRIOR_GRID:
            joint = fit_basis_and_weights(diff, user_idx, user_ids.size, rank=rank, l2=l2 * unit,
                                          prior_strength=prior_from_pairs(user_idx, user_ids.size, prior),
                                          max_iter=500, seed=seed, init=(truth.basis, weights))[0]
            for objective, basis in (("joint", joint), ("marginal", marginal)):
                m = evaluate_model(pairs, basis, prior_pairs=prior)
                grid[objective][f"l2 {l2:g}, prior {prior:g}"] = [m["seen_test_acc"], m["unseen_test_acc"]]
    return grid


def signal_check(pairs, seed: int) -> dict:
    """Top eigenvalue of the users' debiased residual-gradient moment against SHUFFLES user-shuffled copies."""
    from simulations.compare_basis_methods import shared_reward
    from lore_core.joint_trainer import l2_unit
    from scipy.special import expit

    train = pairs.select(seen=True, split="train")
    user_ids, user_idx = np.unique(train.user, return_inverse=True)
    diff = train.diff.astype(np.float64)
    shared = shared_reward(diff, user_idx, user_ids.size, 1e-4 * l2_unit(diff), seed)
    weighted = expit(-(diff @ shared))[:, None] * diff
    noise = weighted.T @ weighted  # each pair's own square, removed from the moment

    def eigenvalues(users: np.ndarray) -> np.ndarray:
        per_user = np.zeros((user_ids.size, diff.shape[1]))
        np.add.at(per_user, users, weighted)
        return np.linalg.eigvalsh(per_user.T @ per_user - noise)[::-1]

    # Whole groups move between users (pairs sharing a response stay together, as their correlation is not personal)
    group = np.arange(len(diff)) if train.group is None else np.unique(train.group, return_inverse=True)[1]
    _, first, group_idx = np.unique(user_idx * (int(group.max()) + 1) + group, return_index=True,
                                    return_inverse=True)
    real = eigenvalues(user_idx)
    rng = np.random.default_rng(seed)
    null_top = np.array([eigenvalues(rng.permutation(user_idx[first])[group_idx])[0] for _ in range(SHUFFLES)])
    return {"top": real[:6].tolist(), "null_top": null_top.tolist(),
            "ratio": float(real[0] / np.quantile(null_top, 0.95)), "above": int((real > null_top.max()).sum())}


def diagnose(pop, seed: int, cached: dict) -> dict:
    from simulations.synthetic_pairs import make_synthetic_pairs

    pairs, truth = make_synthetic_pairs(replace(pop.synthetic, seed=seed))
    grid = truth_start_grid(pairs, truth, seed)
    best = {objective: max(cells.values(), key=sum) for objective, cells in grid.items()}
    return {"bt": cached["bt"], "train": cached["train"], "true_basis": cached["true_basis"],
            "known_w_best": cached["known_w_best"], "truth_start_best": best, "truth_start_grid": grid,
            "signal": signal_check(pairs, seed)}


def main(argv: list[str] | None = None) -> int:
    from simulations.bench_matrix import POPULATIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", default=DEFAULT_POPULATIONS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds, names = args.seeds.split(","), args.populations.split(",")
    by_name = {p.name: p for p in POPULATIONS if p.synthetic is not None}
    ceiling = json.loads((Path(args.out) / "known_weights_ceiling.json").read_text())
    missing = [f"{n} seed {s}" for n in names for s in seeds if n not in by_name or s not in ceiling.get(n, {})]
    if missing:
        parser.error(f"not in {args.out}/known_weights_ceiling.json (run simulations.known_weights_ceiling "
                     f"first) or not a synthetic matrix population: {missing}")
    report = {n: {s: diagnose(by_name[n], int(s), ceiling[n][s]) for s in seeds} for n in names}
    atomic_write_json(Path(args.out) / "truth_start.json", report)
    lines = ["# Search or data? Fits started from the true basis, and whether the personal signal is detectable", "",
             f"`python -m simulations.truth_start_diagnostic --populations {args.populations} --seeds {args.seeds}`."
             " Points above BT, seen / new users, mean over seeds. `truth start`: `train`'s joint or marginal "
             "objective at the true rank, started from the true basis (joint: and the true w), best of "
             f"{len(L2_GRID)} l2 x {len(PRIOR_GRID)} personal priors on the test set (optimistic). `known w`: "
             "bench_results/known_weights_ceiling.md. `ratio`: top eigenvalue of the users' debiased residual-gradient"
             f" moment over the 95th percentile of its value with users shuffled ({SHUFFLES} shuffles); `above`: "
             "eigenvalues above every shuffled top one (the true personal rank is 3). Mean over seeds.", "",
             "| population | `train` | truth start, joint | truth start, marginal | known w | true basis | ratio | "
             "above |", "|---|---|---|---|---|---|---|---|"]
    for name, cells in report.items():
        def gain(get):
            g = np.mean([[get(c)[i] - c["bt"][i] for i in (0, 1)] for c in cells.values()], axis=0)
            return f"{100 * g[0]:+.1f} / {100 * g[1]:+.1f}"
        ratio = np.mean([c["signal"]["ratio"] for c in cells.values()])
        above = np.mean([c["signal"]["above"] for c in cells.values()])
        lines.append(f"| {name} | {gain(lambda c: c['train'])} | "
                     f"{gain(lambda c: c['truth_start_best']['joint'])} | "
                     f"{gain(lambda c: c['truth_start_best']['marginal'])} | {gain(lambda c: c['known_w_best'])} | "
                     f"{gain(lambda c: c['true_basis'])} | {ratio:.2f} | {above:.1f} |")
    atomic_write_text(Path(args.out) / "truth_start.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
