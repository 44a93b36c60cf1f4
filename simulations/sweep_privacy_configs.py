"""Sweeps of user-level DP configurations at a fixed epsilon on one pair file (in-process rounds, the same client,
aggregator and server-optimizer code as the apps).

    python -m simulations.sweep_privacy_configs PAIRS [--epsilon 3] [--repeats 2]            # (T, m, lr) grid
    python -m simulations.sweep_privacy_configs PILOT --screen [--epsilon 3.5] [--repeats 4]  # one knob at a time

The grid: rounds T, users per round m, server Adam lr; for each, the z that gives `--epsilon` (delta 1e-5) for the
file's N users, one non-private run and `--repeats` DP runs (fresh secret noise each). The screen varies one knob of
the default recipe at a time (clip norm, server lr, users per round, rounds, rank), z solved the same way, and
reports the mean DP accuracy over `--repeats` runs: run it on a public pilot population, since choosing a
configuration on the private data itself is hyper-parameter search, which no ledger covers.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from lore_core.pairs import load_pairs, resolve_pair_path
from lore_core.privacy.accounting import noise_for_target_epsilon
from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS
from simulations.bench_privacy import run_in_process
from simulations.flower_run import nodes_for

CONFIGS = ((200, 50, 0.05), (200, 200, 0.05), (200, 200, 0.1), (100, 200, 0.2), (60, 200, 0.2), (100, 400, 0.2))
SCREEN = (("default (C 0.25, lr 0.05, m 50, T 200, rank 5)", {}),
          ("clip norm 0.18", {"clip-norm": 0.18}), ("clip norm 0.35", {"clip-norm": 0.35}),
          ("server lr 0.03", {"server-lr": 0.03}), ("server lr 0.08", {"server-lr": 0.08}),
          ("100 users per round", {"clients-per-round": 100}), ("300 rounds", {"num-server-rounds": 300}),
          ("400 rounds, 25 per round", {"num-server-rounds": 400, "clients-per-round": 25}),
          ("rank 4", {"rank": 4}), ("rank 6", {"rank": 6}))


def _run(job: tuple) -> dict:
    path, overrides, nodes = job
    return run_in_process(Path(path), overrides, nodes)


def _dp(cfg: dict, population: int, epsilon: float) -> dict:
    z = noise_for_target_epsilon(epsilon, cfg["clients-per-round"] / population, cfg["num-server-rounds"], 1e-5)
    return {**cfg, "privacy-mode": "user", "noise-multiplier": z, "delta": 1e-5}


def _acc(runs: list[dict]) -> str:
    return " / ".join(f"{np.mean([r[k] for r in runs]):.4f}" for k in ("seen_test_acc", "unseen_test_acc"))


def grid(path: Path, base: dict, population: int, nodes: int, args: argparse.Namespace) -> None:
    print("| T | m | z | lr | non-private seen / unseen | user DP seen / unseen (each run) |\n|---|---|---|---|---|---|")
    for rounds, m, lr in CONFIGS:
        cfg = {**base, "num-server-rounds": rounds, "clients-per-round": m, "server-lr": lr}
        dp = _dp(cfg, population, args.epsilon)
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            plain, *private = pool.map(_run, [(str(path), {**cfg, "privacy-mode": "none"}, nodes)]
                                       + [(str(path), dp, nodes)] * args.repeats)
        runs = ", ".join(f"{r['seen_test_acc']:.4f} / {r['unseen_test_acc']:.4f}" for r in private)
        print(f"| {rounds} | {m} | {dp['noise-multiplier']:.3f} | {lr} | {_acc([plain])} | {runs} |", flush=True)


def screen(path: Path, base: dict, population: int, nodes: int, args: argparse.Namespace) -> None:
    default = {**base, "num-server-rounds": 200, "clients-per-round": 50, "server-lr": 0.05}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        plain = list(pool.map(_run, [(str(path), {**default, "privacy-mode": "none", "seed": s}, nodes)
                                     for s in range(args.repeats)]))
    print(f"Non-private default, seeds 0-{args.repeats - 1}: {_acc(plain)} (seen / unseen)\n\n"
          f"| variant (epsilon {args.epsilon:g}) | z | user DP seen / unseen (mean of {args.repeats}) |\n|---|---|---|")
    for name, change in SCREEN:
        dp = _dp({**default, **change}, population, args.epsilon)
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            private = list(pool.map(_run, [(str(path), {**dp, "seed": s}, nodes) for s in range(args.repeats)]))
        print(f"| {name} | {dp['noise-multiplier']:.3f} | {_acc(private)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs")
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--screen", action="store_true", help="one knob of the default recipe at a time")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="runs/privacy_sweep")
    args = parser.parse_args()
    path = resolve_pair_path(args.pairs)
    pairs = load_pairs(path)
    population = int(np.unique(pairs.user[pairs.seen]).size)
    nodes = nodes_for(np.unique(pairs.user).size)
    base = {"rank": args.rank, "seed": 0, "eval-every": 0, "train-prior-pairs": DEFAULT_PRIOR_PAIRS,
            "prior-pairs": DEFAULT_PRIOR_PAIRS,
            "run-dir": args.work}
    (screen if args.screen else grid)(path, base, population, nodes, args)


if __name__ == "__main__":
    main()
