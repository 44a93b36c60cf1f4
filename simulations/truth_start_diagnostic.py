"""Is a missed ceiling a search failure or a data limit? Two checks that choose nothing, for the matrix's misses.

    python -m simulations.truth_start_diagnostic [--populations NAME,...] [--seeds 0,1,2] [--out bench_results]

1. Truth start. The basis is fitted by `train`'s own objectives, joint (`fit_basis_and_weights`) and marginal
   (`fit_basis_marginal`), at the true rank, started from the TRUE basis (and, for the joint fit, every seen user's
   true w) instead of a random start. Each cell of an l2 x personal-prior grid is scored as every run is
   (`lore_core.evaluation`) and the best cell on the test set is kept: optimistic. If even this start ends near BT,
   these objectives on these pairs leave the truth for a basis that does not generalise, so a better start or
   restart is unlikely to do much better with them (other optima are not searched).
2. Detectable signal. The users' debiased second moment of BT residual gradients
   (`compare_basis_methods.personal_moment`) holds the directions along which users differ. Its top eigenvalue is
   compared with the same statistic after moving whole groups of pairs between users at random (no personal
   signal; the same pairs and groups): `ratio` = top eigenvalue / the 95th percentile of the shuffled top
   eigenvalues, `above` = how many eigenvalues exceed the largest shuffled one, `p` = the permutation p-value of
   the top one. Where nothing stands above the shuffles, this second-order statistic, the one a basis learned
   without w has to find the personal subspace from, shows no trace of it (other statistics are not tested).

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
from simulations.known_weights_ceiling import DEFAULT_POPULATIONS, L2_GRID, PRIOR_GRID, gain_over_bt, true_weights

SHUFFLES = 200
SHARED_L2 = 1e-4  # the shared reward's l2, in units of l2_unit (BT's own choice varies by seed)


def truth_start_grid(pairs, truth, seed: int) -> dict[str, dict[str, list[float]]]:
    """{objective: {cell: [seen, new]}} for fits started from the true basis, over L2_GRID x PRIOR_GRID."""
    from lore_core.evaluation import evaluate_model
    from lore_core.joint_trainer import fit_basis_and_weights, fit_basis_marginal, l2_unit
    from lore_core.simplex_fit import prior_from_pairs

    train = pairs.select(seen=True, split="train")
    user_ids, user_idx = np.unique(train.user, return_inverse=True)
    weights = true_weights(truth, user_ids)
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


def signal_check(pairs, seed: int, shuffles: int = SHUFFLES) -> dict:
    """Top eigenvalues of the users' `personal_moment` of BT residual gradients against `shuffles` copies with whole
    groups of pairs moved between users (a group's pairs share a response: their correlation is not personal)."""
    from lore_core.joint_trainer import l2_unit
    from simulations.compare_basis_methods import personal_moment, residual_gradients, shared_reward

    train = pairs.select(seen=True, split="train")
    user_ids, user_idx = np.unique(train.user, return_inverse=True)
    diff = train.diff.astype(np.float64)
    gradients = residual_gradients(diff, shared_reward(diff, user_idx, user_ids.size, SHARED_L2 * l2_unit(diff), seed))
    noise = gradients.T @ gradients
    group = np.arange(len(diff)) if train.group is None else np.unique(train.group, return_inverse=True)[1]
    _, first, unit_idx = np.unique(user_idx * (int(group.max()) + 1) + group, return_index=True, return_inverse=True)
    rng = np.random.default_rng(seed)
    real = np.linalg.eigvalsh(personal_moment(gradients, user_idx, noise))[::-1]
    null_top = np.array([np.linalg.eigvalsh(personal_moment(gradients, rng.permutation(user_idx[first])[unit_idx],
                                                            noise))[-1] for _ in range(shuffles)])
    return {"top": real[:6].tolist(), "null_top": null_top.tolist(),
            "ratio": float(real[0] / np.quantile(null_top, 0.95)), "above": int((real > null_top.max()).sum()),
            "p_value": float((1 + (null_top >= real[0]).sum()) / (1 + shuffles))}


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
             f"`python -m simulations.truth_start_diagnostic --populations {args.populations} --seeds {args.seeds}`.",
             "Points above BT, seen / new users, mean over seeds. `truth start`: `train`'s joint or marginal objective "
             "at the true rank, started from the true basis (joint: and the true w), best of "
             f"{len(L2_GRID)} l2 x {len(PRIOR_GRID)} personal priors on the test set (optimistic). `known w`: "
             "bench_results/known_weights_ceiling.md. `ratio` (mean over seeds): top eigenvalue of the users' "
             "debiased residual-gradient moment over the 95th percentile of its value with groups of pairs shuffled "
             f"between users ({SHUFFLES} shuffles). Per seed: `above`, eigenvalues above every shuffled top one (the "
             "true personal rank is 3), and `p`, the top eigenvalue's permutation p-value.", "",
             "| population | `train` | truth start, joint | truth start, marginal | known w | true basis | ratio | "
             "above | p |", "|---|---|---|---|---|---|---|---|---|"]
    for name, cells in report.items():
        def gain(get):
            return gain_over_bt(cells, get)

        def per_seed(key, form):
            return ", ".join(format(c["signal"][key], form) for c in cells.values())
        ratio = np.mean([c["signal"]["ratio"] for c in cells.values()])
        lines.append(f"| {name} | {gain(lambda c: c['train'])} | "
                     f"{gain(lambda c: c['truth_start_best']['joint'])} | "
                     f"{gain(lambda c: c['truth_start_best']['marginal'])} | {gain(lambda c: c['known_w_best'])} | "
                     f"{gain(lambda c: c['true_basis'])} | {ratio:.2f} | {per_seed('above', 'd')} | "
                     f"{per_seed('p_value', '.3f')} |")
    atomic_write_text(Path(args.out) / "truth_start.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
