"""Sweep of user-level DP configurations at a fixed epsilon on one pair file (in-process rounds, the same client,
aggregator and server-optimizer code as the apps). Used to look for a configuration that keeps `user` mode at
epsilon ~ 3 within 2 points of the non-private run on the PRISM-shaped benchmark.

    python -m simulations.sweep_privacy_configs PAIRS [--population N]

Each row: rounds T, users per round m, the z that gives epsilon 3 (delta 1e-5) for N users, server Adam lr; each
DP configuration runs twice (fresh secret noise each time). Note: choosing a configuration on the private data
itself is hyper-parameter search, which no ledger covers.
"""

from __future__ import annotations

import argparse

import numpy as np

from lore_core.pairs import load_pairs, resolve_pair_path
from lore_core.privacy.accounting import noise_for_target_epsilon
from lore_core.simplex_fit import DEFAULT_PRIOR_STRENGTH
from simulations.bench_privacy import run_in_process
from simulations.flower_run import nodes_for

CONFIGS = ((200, 50, 0.05), (200, 200, 0.05), (200, 200, 0.1), (100, 200, 0.2), (60, 200, 0.2), (100, 400, 0.2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs")
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default="runs/privacy_sweep")
    args = parser.parse_args()
    path = resolve_pair_path(args.pairs)
    pairs = load_pairs(path)
    population = int(np.unique(pairs.user[pairs.seen]).size)
    nodes = nodes_for(np.unique(pairs.user).size)
    base = {"rank": args.rank, "seed": 0, "eval-every": 0, "prior-strength": DEFAULT_PRIOR_STRENGTH}
    print("| T | m | z | lr | non-private seen / unseen | user DP seen / unseen (each run) |\n|---|---|---|---|---|---|")
    for rounds, m, lr in CONFIGS:
        cfg = {**base, "num-server-rounds": rounds, "clients-per-round": m, "server-lr": lr}
        z = noise_for_target_epsilon(args.epsilon, m / population, rounds, 1e-5)
        plain = run_in_process(path, {**cfg, "privacy-mode": "none", "run-dir": f"{args.work}/none-{rounds}-{m}-{lr}"},
                               nodes)
        private = [run_in_process(path, {**cfg, "privacy-mode": "user", "noise-multiplier": z, "delta": 1e-5,
                                         "run-dir": f"{args.work}/user-{rounds}-{m}-{lr}-{i}"}, nodes)
                   for i in range(args.repeats)]
        runs = ", ".join(f"{r['seen_test_acc']:.4f} / {r['unseen_test_acc']:.4f}" for r in private)
        print(f"| {rounds} | {m} | {z:.3f} | {lr} | {plain['seen_test_acc']:.4f} / {plain['unseen_test_acc']:.4f} "
              f"| {runs} |", flush=True)


if __name__ == "__main__":
    main()
