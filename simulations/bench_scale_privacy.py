"""Benchmark: what user-level DP costs where scale pays, at 10,000 and 100,000 users.

    python -m simulations.bench_scale_privacy [--populations 10000,100000] [--epsilons 0.5,1,2,4,8] [--rounds 100]
                                              [--data DIR] [--out bench_results]

Conventions of pfl-research's DP benchmarks (apple/pfl-research `benchmarks/*/configs`: `central_epsilon: 2.0`,
`central_delta: 1e-6`, the Gaussian mechanism with an accountant, a `noise_cohort_size` for which the noise is
calibrated): epsilon 2 at delta 1e-6, with the users per round chosen for the noise before any training, from public
quantities only: the smallest m of (100, 250, 500, 1000, 2000) whose noise on the mean update, z C sqrt(B D) / m with
z solved for epsilon 2 over the planned rounds, is at most 1/8 of the clip norm C (or the ladder's least noisy m).
Unlike pfl-research's noise cohort (noise computed for a larger cohort than the one simulated), the cohort that
trains here is the one the noise is calibrated for, so the guarantee holds for the simulated population.
Every epsilon of the curve uses that m; the non-private run uses the same m and rounds.

Populations: the files of `simulations.bench_scale` (seed 0, D = 384, 10-20 training pairs per seen user, N/10 new
users); runs: `simulations.bench_privacy.run_in_process` (the ClientApp's training and clip, the ServerApp's
aggregator and optimizer, the ServerApp's final evaluation over all nodes), epsilon from the ledger's accountant.
Writes bench_results/scale_privacy.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

EPSILON, DELTA = 2.0, 1e-6
COHORTS = (100, 250, 500, 1000, 2000)
NOISE_TO_CLIP = 1 / 8


def choose_cohort(population: int, rounds: int, rank: int, dim: int) -> tuple[int, list[dict]]:
    """The users per round for epsilon 2 (module docstring) and the ladder it was chosen from."""
    from lore_core.privacy.accounting import noise_for_target_epsilon

    ladder = []
    for m in (m for m in COHORTS if m < population):  # a cohort of everyone samples at rate >= 1
        z = noise_for_target_epsilon(EPSILON, m / population, rounds, DELTA)
        ladder.append({"users_per_round": m, "noise_multiplier": round(z, 4),
                       "noise_to_clip": round(float(z * np.sqrt(rank * dim) / m), 4)})
    if not ladder:
        raise ValueError(f"a population of {population} seen users is too small: the smallest cohort is {COHORTS[0]}")
    fine = [row for row in ladder if row["noise_to_clip"] <= NOISE_TO_CLIP]
    chosen = fine[0] if fine else min(ladder, key=lambda row: row["noise_to_clip"])
    return chosen["users_per_round"], ladder


def run_point(path: Path, users: int, cohort: int, rounds: int, rank: int, epsilon: float | None) -> dict:
    from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS
    from simulations.bench_privacy import run_in_process
    from simulations.flower_run import nodes_for

    overrides = {"num-server-rounds": rounds, "clients-per-round": cohort, "rank": rank, "seed": 0,
                 "eval-every": 0, "train-prior-pairs": DEFAULT_PRIOR_PAIRS,
                 "prior-pairs": DEFAULT_PRIOR_PAIRS, "run-dir": "runs/bench_scale_privacy",
                 "privacy-mode": "none"}
    if epsilon is not None:
        overrides.update({"privacy-mode": "user", "target-epsilon": epsilon, "delta": DELTA})
    started = time.perf_counter()
    result = run_in_process(path, overrides, nodes_for(users))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["target_epsilon"] = epsilon
    return result


def markdown(report: dict) -> str:
    lines = ["# User-level DP at scale: accuracy against epsilon", "",
             "Written by `python -m simulations.bench_scale_privacy`. pfl-research's conventions: epsilon 2, delta "
             "1e-6, users per round chosen for the noise (the smallest m whose noise on the mean update is at most "
             "1/8 of the clip norm at epsilon 2; ladder below). Same m and rounds for every row of a population; "
             "Poisson sampling, C = 0.25, rank 5, in-process rounds with the apps' code; final evaluation over all "
             "users (seen: w refit on their training pairs; new users: few-shot).", ""]
    for name, pop in report["populations"].items():
        base = next(r for r in pop["runs"] if r["mode"] == "none")
        lines += [f"## {pop['seen_users']:,} seen users (+{pop['users'] - pop['seen_users']:,} new), {pop['rounds']} "
                  f"rounds, {pop['users_per_round']} users per round (q = {pop['users_per_round'] / pop['seen_users']:.4g})",
                  "", "| epsilon target | z | epsilon (PRV) | epsilon (RDP) | seen acc | unseen acc | seen drop (pts) | "
                  "unseen drop (pts) | seconds |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(pop["runs"], key=lambda r: -(r["target_epsilon"] or 1e9)):
            eps = f"{r['epsilon_prv']:.3f} | {r['epsilon_rdp']:.3f}" if "epsilon_prv" in r else "∞ | ∞"
            z = f"{r['noise_multiplier']:.4g}" if "noise_multiplier" in r else "-"
            lines.append(f"| {r['target_epsilon'] or 'non-private'} | {z} | {eps} | "
                         f"{r['seen_test_acc']:.4f} | {r['unseen_test_acc']:.4f} | "
                         f"{100 * (base['seen_test_acc'] - r['seen_test_acc']):.2f} | "
                         f"{100 * (base['unseen_test_acc'] - r['unseen_test_acc']):.2f} | {r['seconds']} |")
        lines += ["", "Users per round, chosen before training: " + ", ".join(
            f"m {row['users_per_round']}: z {row['noise_multiplier']}, noise/C {row['noise_to_clip']}"
            for row in pop["ladder"]), f"Oracle: seen {base['oracle_seen_test_acc']:.4f}, unseen "
            f"{base['oracle_unseen_test_acc']:.4f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", default="10000,100000")
    parser.add_argument("--epsilons", default="0.5,1,2,4,8")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--data", default="runs/bench_scale/data", help="the pair files of simulations.bench_scale")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    from lore_core.atomic_io import atomic_write_json, atomic_write_text
    from lore_core.pair_columns import PairColumns

    out = Path(args.out)
    report_file = out / "scale_privacy.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {"populations": {}}
    for seen in (int(n) for n in args.populations.split(",")):
        path = Path(args.data) / f"scale_{seen}_d384.npz"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `python -m simulations.bench_scale --data {args.data}` first")
        cohort, ladder = choose_cohort(seen, args.rounds, args.rank, PairColumns.open(path).dim)
        print(f"== {seen} seen users: {cohort} users per round ({ladder})", flush=True)
        runs = []
        for epsilon in [None] + [float(e) for e in args.epsilons.split(",")]:
            runs.append(run_point(path, seen + seen // 10, cohort, args.rounds, args.rank, epsilon))
            print({k: v for k, v in runs[-1].items() if k != "by_prior_pairs"}, flush=True)
        report["populations"][str(seen)] = {"seen_users": seen, "users": seen + seen // 10, "rounds": args.rounds,
                                            "users_per_round": cohort, "ladder": ladder, "runs": runs}
        atomic_write_json(report_file, report)
    atomic_write_text(out / "scale_privacy.md", markdown(report))
    print((out / "scale_privacy.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
