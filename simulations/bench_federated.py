"""Benchmark: federated LoRe through Flower's simulation engine on a 1,400-user population.

    python -m simulations.bench_federated [--users 1400] [--rounds 200] [--clients-per-round 50] [--out DIR]

Reports wall time, peak memory (getrusage of this process and its reaped children, and the peak summed RSS of the
whole process tree incl. Ray workers, sampled every 0.5 s), and per-round overhead: the engine's round time
against the same work done directly (the same client and server functions called in one process, no Flower).
Compares with `lore-fed train` when `--reference DIR` (a train run on the same file) is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from pathlib import Path

import numpy as np

from lore_core.pairs import PAIRS_FILENAME, load_pairs, save_pairs
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs
from simulations.bench_flags import add_population_flags


class TreeMemory(threading.Thread):
    """Peak summed RSS (bytes) of a process (default: this one) and all its descendants, polled from /proc."""

    def __init__(self, interval: float = 0.5, root: int | None = None) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, 0, threading.Event()
        self.root = os.getpid() if root is None else root

    @staticmethod
    def _tree_rss(root: int) -> int:
        parents: dict[int, int] = {}
        rss: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as handle:
                    fields = dict(line.split(":", 1) for line in handle if ":" in line)
                parents[int(entry)] = int(fields["PPid"])
                rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
            except (OSError, KeyError, ValueError):
                continue
        tree, frontier = {root}, [root]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
            tree.update(children)
            frontier.extend(children)
        return sum(rss.get(pid, 0) for pid in tree)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self._tree_rss(self.root))
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def direct_compute(pairs_path: Path, overrides: dict, num_nodes: int, rounds: int, eval_rounds: int) -> dict:
    """The same per-round work without Flower: sample, every node's train step, aggregate, server step; and one
    full evaluation (all nodes), timed and scaled to `eval_rounds`."""
    from flwr.common.config import get_fused_config_from_dir

    from federation.local_training import evaluate_node, train_sampled_users
    from federation.protocol import ClientSettings
    from federation.user_block import load_partition_users
    from server.aggregation import make_aggregator
    from server.checkpoint import initial_basis
    from server.optimizer import pseudo_gradient
    from server.population import Population
    from server.run_settings import ServerSettings
    from simulations.flower_run import ROOT

    cfg = get_fused_config_from_dir(ROOT, {**overrides, "pairs-path": str(pairs_path)})
    settings, client = ServerSettings.from_run_config(cfg), ClientSettings.from_run_config(cfg)
    blocks = [load_partition_users(str(pairs_path), i, num_nodes) for i in range(num_nodes)]
    weights = [np.full((b.n_train_users, settings.rank), 1.0 / settings.rank) for b in blocks]
    population = Population(node_ids=np.arange(num_nodes, dtype=np.uint64), partition_ids=np.arange(num_nodes),
                            counts=np.array([b.n_train_users for b in blocks]), dim=blocks[0].dim)
    aggregator = make_aggregator(settings, settings.privacy_settings(population.size, population.dim))
    optimizer = settings.new_optimizer()
    basis = initial_basis(settings.rank, population.dim, settings.seed, settings.init_scale)
    started = time.perf_counter()
    for _ in range(rounds):
        updates = []
        for node, local in population.assign(aggregator.sample(population.size)).items():
            weights[node], upd = train_sampled_users(basis, blocks[node].training_block(local), weights[node],
                                                     local, prior_pairs=client.train_prior_pairs,
                                                     steps=client.local_steps, lr=client.client_lr,
                                                     objective=client.objective)
            updates.append(upd)
        mean = aggregator.aggregate(np.concatenate(updates), population.size)
        basis = optimizer.step(basis, pseudo_gradient(basis, mean, client_lr=client.client_lr,
                                                      local_steps=client.local_steps, l2=settings.l2))
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for block, w in zip(blocks, weights):
        evaluate_node(basis, block, w, prior_pairs=client.prior_pairs)
    eval_seconds = time.perf_counter() - started
    return {"train_seconds_per_round": train_seconds / rounds, "eval_seconds_per_eval": eval_seconds,
            "total_seconds": train_seconds + eval_seconds * eval_rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_population_flags(parser)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--out", default="runs/bench_federated")
    parser.add_argument("--reference", default=None, help="`lore-fed train` run dir on the same pair file")
    args = parser.parse_args(argv)

    from lore_cli.simulate_command import configure, run_overrides
    from simulations.flower_run import nodes_for, simulate_pairs

    out = Path(args.out)
    pairs_path = out / "data" / PAIRS_FILENAME
    if not pairs_path.exists():
        pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(seen_users=args.users, unseen_users=args.unseen_users))
        save_pairs(pairs, pairs_path)
    pairs = load_pairs(pairs_path)
    run_dir = out / "run"
    if (run_dir / "checkpoint.npz").exists():
        raise SystemExit(f"{run_dir} holds a previous run; remove it to benchmark from round 1")
    simulate_flags = argparse.ArgumentParser()
    configure(simulate_flags)  # the flags of `lore-fed simulate`, so every default is the command's own
    overrides = run_overrides(simulate_flags.parse_args([
        str(pairs_path), "--rounds", str(args.rounds), "--clients-per-round", str(args.clients_per_round),
        "--rank", str(args.rank), "--out", str(run_dir), "--eval-every", str(args.eval_every), "--privacy", "none"]),
        seen_users=args.users, seen_train_pairs=int((pairs.seen & (pairs.split == "train")).sum()))
    overrides["progress"] = "log"
    memory = TreeMemory()
    memory.start()
    started = time.perf_counter()
    num_nodes = simulate_pairs(pairs_path, run_dir, overrides=overrides)
    wall = time.perf_counter() - started
    tree_peak = memory.stop()
    history = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    train_rounds = [r["seconds"] for r in history if "seen_test_acc" not in r]
    eval_rounds = [r["seconds"] for r in history if "seen_test_acc" in r]
    direct = direct_compute(pairs_path, overrides, num_nodes, args.rounds, len(eval_rounds))
    final = history[-1]
    steady = train_rounds[2:] or train_rounds
    report = {
        "users": args.users, "unseen_users": args.unseen_users, "rounds": args.rounds,
        "clients_per_round": args.clients_per_round, "virtual_nodes": num_nodes,
        "wall_seconds": round(wall, 1),
        "engine_start_and_stop_seconds": round(wall - sum(r["seconds"] for r in history), 1),
        "peak_rss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_reaped_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "peak_rss_process_tree_mb": round(tree_peak / 2**20, 1),
        "train_round_seconds_median": round(float(np.median(steady)), 4),
        "eval_round_seconds_median": round(float(np.median(eval_rounds)), 4),
        "direct_train_round_seconds": round(direct["train_seconds_per_round"], 4),
        "direct_eval_seconds": round(direct["eval_seconds_per_eval"], 4),
        "overhead_per_train_round_seconds": round(float(np.median(steady)) - direct["train_seconds_per_round"], 4),
        "seen_test_acc": final.get("seen_test_acc"), "unseen_test_acc": final.get("unseen_test_acc"),
        "oracle_seen_test_acc": final.get("oracle_seen_test_acc"),
        "oracle_unseen_test_acc": final.get("oracle_unseen_test_acc"),
        "nodes_formula": f"nodes_for({args.users + args.unseen_users}) = {nodes_for(args.users + args.unseen_users)}",
    }
    if args.reference:
        from lore_cli.run_report import load_reference

        ref = load_reference(args.reference)
        report["centralized"] = {k: ref.get(k) for k in ("seen_test_acc", "unseen_test_acc", "train_seconds", "rank",
                                                        "objective")}
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
