"""Benchmark: the canary audit of real runs on a benchmark pair file, an honest run and its control whose server
adds a tenth of the noise its ledger claims.

    python -m simulations.bench_canary_audit DATASET [--canaries 1000] [--users-per-round 100]
        [--target-epsilon 3.49] [--rounds 200] [--name canary_audit_prism]

1. `lore-fed simulate DATASET --canaries K --canary-secrets FILE` (Flower's Ray engine, the real apps) with the
   DP recipe of the README's PRISM-shaped rows: `--users-per-round` real users per round on average (the sampling
   rate over the N + K users is set so), z solved for `--target-epsilon`; then `lore-fed audit canary RUN --secrets
   FILE`, which reads the run's release record.
2. The control: the same run with the server's noise step (`lore_core.privacy.dp_fedavg.add_noise_to_sum`, as
   `server.aggregation.UserDpAggregator` calls it) patched to a tenth, through the same ServerApp and ClientApp on
   the in-process grid (a patch cannot reach into the engine's processes), audited the same way.
3. `--cost-repeats R`: what the canaries cost in accuracy: R in-process runs (`bench_privacy.run_in_process`, seeds
   0..R-1) with the same real users per round and epsilon, without canaries and with the K canaries.
Writes bench_results/<name>.{json,md}; runs and secrets go to --work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from lore_core.atomic_io import atomic_write_json, atomic_write_text

KEYS = ("verdict", "epsilon_lb", "epsilon_claimed", "epsilon_lb_if_all_guesses_right", "noise_multiplier_claimed",
        "noise_multiplier_observed", "auc", "canaries", "canaries_in", "rounds_released",
        "expected_rounds_per_canary", "drift_directions_removed", "source")


def audit(run_dir: Path, secrets: Path) -> dict:
    from lore_cli.main import main as cli

    if cli(["audit", "canary", str(run_dir), "--secrets", str(secrets)]) not in (0, 1):  # 1: a fail verdict
        raise RuntimeError(f"the canary audit of {run_dir} could not run")
    result = json.loads((run_dir / "audits" / "canary.json").read_text())
    return {**{k: result[k] for k in KEYS}, "bound": result["bound"], "gaussian_estimate": result["gaussian_estimate"],
            "released_noise": result["released_noise"]}


def _noise_cell(noise: dict) -> str:
    """The released-noise check's figures (lore_core/audits/released_noise.py) for the table."""
    if noise.get("noise_ratio") is None:
        return noise["verdict"]
    return (f"{noise['verdict']}: {noise['noise_ratio']:.3f}, {noise['lowest_round_ratio']:.2f} "
            f"({noise['pooled_threshold']:.2f}, {noise['round_threshold']:.2f})")


def control_run(pairs_path: Path, run_dir: Path, secrets: Path, overrides: dict, canaries: int) -> None:
    """The simulate run's settings through the real apps on the in-process grid, the server's noise cut to 1/10."""
    import logging

    from flwr.common.config import get_fused_config_from_dir

    import lore_core.privacy.dp_fedavg as dp_fedavg
    from client.client_app import app as client_app
    from lore_core.pairs import read_pair_column
    from server.run_settings import ServerSettings
    from server.server_app import run_federated
    from simulations.flower_run import ROOT, nodes_for
    from simulations.in_process_grid import LocalGrid

    import numpy as np

    users = int(np.unique(read_pair_column(pairs_path, "user")).size)
    canary_nodes = nodes_for(canaries)
    nodes = nodes_for(users) + canary_nodes
    cfg = get_fused_config_from_dir(ROOT, {**overrides, "pairs-path": str(pairs_path), "run-dir": str(run_dir),
                                           "canary-nodes": canary_nodes, "canary-secrets": str(secrets),
                                           "min-nodes": nodes, "progress": "log"})
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)], cfg,
                     keep_messages=False)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    real_noise = dp_fedavg.add_noise_to_sum
    dp_fedavg.add_noise_to_sum = lambda total, z, clip, rng: real_noise(total, z / 10, clip, rng)
    try:
        run_federated(grid, ServerSettings.from_run_config(cfg))
    finally:
        dp_fedavg.add_noise_to_sum = real_noise


def canary_cost(pairs_path: Path, args: argparse.Namespace, per_round: int, secrets: Path) -> dict:
    """Mean accuracy of in-process runs without canaries (users-per-round of N) and with them (per_round of N + K)."""
    from federation.canary_users import load_canaries
    from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS
    from simulations.bench_privacy import run_in_process
    from simulations.flower_run import nodes_for
    from lore_core.pairs import read_pair_column

    import numpy as np

    nodes = nodes_for(int(np.unique(read_pair_column(pairs_path, "user")).size))
    canaries = load_canaries(secrets)
    cost = {}
    for name, m, k in (("no canaries", args.users_per_round, None), (f"{args.canaries} canaries", per_round, canaries)):
        runs = [run_in_process(pairs_path, {"num-server-rounds": args.rounds, "clients-per-round": m, "rank": args.rank,
                                            "seed": seed, "eval-every": 0, "train-prior-pairs": DEFAULT_PRIOR_PAIRS,
                                            "prior-pairs": DEFAULT_PRIOR_PAIRS,
                                            "run-dir": str(Path(args.work) / "cost"), "privacy-mode": "user",
                                            "target-epsilon": args.target_epsilon, "delta": 1e-5}, nodes, canaries=k)
                for seed in range(args.cost_repeats)]
        cost[name] = {key: float(np.mean([r[key] for r in runs])) for key in ("seen_test_acc", "unseen_test_acc")}
        cost[name].update(noise_multiplier=runs[0]["noise_multiplier"], epsilon=runs[0]["epsilon"], runs=len(runs))
    return cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="pair file or dataset directory")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--users-per-round", type=int, default=100, help="real users per round, on average")
    parser.add_argument("--target-epsilon", type=float, default=3.49)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--name", default="canary_audit_prism")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--work", default="runs/bench_canary_audit")
    parser.add_argument("--skip-control", action="store_true")
    parser.add_argument("--cost-repeats", type=int, default=0, help="in-process runs with and without canaries")
    args = parser.parse_args(argv)

    import numpy as np

    from lore_cli.main import main as cli
    from lore_core.pairs import load_pairs, resolve_pair_path

    pairs_path = resolve_pair_path(args.dataset)
    pairs = load_pairs(pairs_path)
    seen = int(np.unique(pairs.user[pairs.seen]).size)
    # the same real users per round as without canaries: m / (N + K) = users-per-round / N
    per_round = round(args.users_per_round * (seen + args.canaries) / seen)
    work = Path(args.work)
    secrets = work / "auditor" / "canaries.npz"
    shutil.rmtree(work, ignore_errors=True)
    honest_dir = work / "honest"
    flags = ["--rounds", str(args.rounds), "--clients-per-round", str(per_round), "--rank", str(args.rank),
             "--target-epsilon", str(args.target_epsilon)]
    started = time.perf_counter()
    if cli(["simulate", str(pairs_path), "--out", str(honest_dir), *flags, "--canaries", str(args.canaries),
            "--canary-secrets", str(secrets)]) != 0:
        raise RuntimeError("the honest simulate run failed")
    metrics = json.loads((honest_dir / "metrics.json").read_text())
    rows = {"honest (lore-fed simulate, Ray)": {**audit(honest_dir, secrets), "seen_test_acc": metrics["seen_test_acc"],
                                                "unseen_test_acc": metrics["unseen_test_acc"],
                                                "noise_multiplier": metrics["noise_multiplier"],
                                                "seconds": round(time.perf_counter() - started, 1)}}
    if not args.skip_control:
        from lore_cli.simulate_command import run_overrides, configure

        parsed = argparse.ArgumentParser()
        configure(parsed)
        overrides = run_overrides(parsed.parse_args([str(pairs_path), "--out", "x", *flags]), seen + args.canaries,
                                  int((pairs.seen & (pairs.split == "train")).sum()))
        started = time.perf_counter()
        control_run(pairs_path, work / "cut", secrets, overrides, args.canaries)
        rows["server noise cut to 1/10 (in-process grid)"] = {**audit(work / "cut", secrets),
                                                             "seconds": round(time.perf_counter() - started, 1)}
    cost = canary_cost(pairs_path, args, per_round, secrets) if args.cost_repeats else {}
    out = Path(args.out)
    atomic_write_json(out / f"{args.name}.json", {"config": vars(args) | {"clients_per_round": per_round,
                                                                          "seen_users": seen}, "runs": rows,
                                                  "accuracy_cost": cost})
    lines = [f"# Canary audit of real runs: {pairs_path.parent.name} ({seen} seen users), {args.canaries} canaries",
             "", f"{args.rounds} rounds, {per_round} of {seen} + {args.canaries} users per round (about "
             f"{args.users_per_round} real), rank {args.rank}, z solved for epsilon {args.target_epsilon}. "
             "The audit reads each run's release record (`source: released-bases`).", "",
             "| run | verdict | epsilon lower bound | ledger epsilon | certifiable at most | z claimed | z observed | "
             "released noise / claimed: pooled, lowest round (thresholds) | AUC | guesses (right) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['verdict']} | {r['epsilon_lb']:.2f} | {r['epsilon_claimed']:.2f} | "
                     f"{r['epsilon_lb_if_all_guesses_right']:.2f} | {r['noise_multiplier_claimed']:.3f} | "
                     f"{r['noise_multiplier_observed']:.3f} | {_noise_cell(r['released_noise'])} | {r['auc']:.3f} | "
                     f"{r['bound']['guesses']} "
                     f"({r['bound']['correct']}) |")
    honest = rows["honest (lore-fed simulate, Ray)"]
    lines += ["", f"Honest run accuracy with the canaries in: seen {honest['seen_test_acc']:.4f}, unseen "
              f"{honest['unseen_test_acc']:.4f}.", ""]
    if cost:
        lines += [f"What the canaries cost (in-process runs, seeds 0..{args.cost_repeats - 1}, same real users per round "
                  "and epsilon; mean seen / unseen accuracy):", ""]
        lines += [f"- {name}: {c['seen_test_acc']:.4f} / {c['unseen_test_acc']:.4f} (z {c['noise_multiplier']:.3f})"
                  for name, c in cost.items()] + [""]
    atomic_write_text(out / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
