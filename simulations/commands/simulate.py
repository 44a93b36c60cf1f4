"""`lore-fed simulate PAIRS.npz|DATASET --rounds R --clients-per-round M --rank B --out DIR`: federated LoRe
through Flower's simulation engine. Writes DIR/metrics.json (the keys of `lore-fed train` + rounds, wall_seconds,
privacy_mode), DIR/rounds.jsonl, DIR/report.md (+ plot) and DIR/checkpoint.npz. Re-running with the same DIR and
settings resumes after the last finished round."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from lore_core.atomic_io import atomic_write_json
from lore_core.pairs import resolve_pair_path

TRAIN_KEYS = ("seen_test_acc", "unseen_test_acc", "oracle_seen_test_acc", "oracle_unseen_test_acc")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", help="pair file (.npz) or dataset directory holding pairs.npz")
    parser.add_argument("--rounds", type=int, required=True, help="federated rounds R")
    parser.add_argument("--clients-per-round", type=int, required=True, help="users sampled per round M")
    parser.add_argument("--rank", type=int, required=True, help="basis size B")
    parser.add_argument("--out", required=True, help="run directory (resumed if it holds a checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users-per-node", default="auto",
                        help="users hosted per virtual node, or 'auto' (1 up to 64 users, else ~50)")
    parser.add_argument("--eval-every", type=int, default=10, help="federated evaluation every E rounds (and last)")
    parser.add_argument("--privacy", default="none", choices=["none"], help="privacy mode (DP modes come later)")
    parser.add_argument("--reference", default=None, help="`lore-fed train` run dir or metrics.json for the plot")
    parser.add_argument("--l2", type=float, default=None, help="L2 on the basis (default: the trainer's)")
    parser.add_argument("--server-optimizer", choices=["adam", "sgd"], default=None)
    parser.add_argument("--server-lr", type=float, default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--client-lr", type=float, default=None)


def run_overrides(args: argparse.Namespace) -> dict:
    from lore_core.simplex_fit import DEFAULT_PRIOR_STRENGTH

    overrides = {
        "num-server-rounds": args.rounds, "clients-per-round": args.clients_per_round, "rank": args.rank,
        "seed": args.seed, "eval-every": args.eval_every, "privacy-mode": args.privacy,
        "prior-strength": DEFAULT_PRIOR_STRENGTH,
    }
    if args.l2 is None:
        from lore_core.joint_trainer import DEFAULT_L2

        args.l2 = DEFAULT_L2
    for key, value in (("l2", args.l2), ("server-optimizer", args.server_optimizer), ("server-lr", args.server_lr),
                       ("local-steps", args.local_steps), ("client-lr", args.client_lr)):
        if value is not None:
            overrides[key] = value
    return overrides


def run(args: argparse.Namespace) -> int:
    from server.checkpoint import load_checkpoint
    from simulations.flower_run import simulate_pairs
    from simulations.report import load_reference, write_report

    for name in ("rounds", "clients_per_round", "rank", "eval_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    pairs_path = resolve_pair_path(args.pairs)
    reference = load_reference(args.reference)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"federated LoRe on {pairs_path}: {args.rounds} rounds, {args.clients_per_round} users/round, "
          f"rank {args.rank}, privacy {args.privacy}; run dir {out}", flush=True)
    previous = load_checkpoint(out)
    if previous is not None:
        print(f"resuming after round {previous.round} from {out / 'checkpoint.npz'}", flush=True)
    nodes = simulate_pairs(pairs_path, out, users_per_node=args.users_per_node, overrides=run_overrides(args))
    wall = time.monotonic() - started
    state = load_checkpoint(out)
    if state is None or state.round < args.rounds:
        raise RuntimeError(f"the simulation ended before round {args.rounds}; rerun the same command to resume")
    final = [r for r in state.history if "seen_test_acc" in r][-1]
    metrics = {key: final[key] for key in TRAIN_KEYS if key in final}
    metrics.update(rank=args.rank, train_seconds=round(sum(r["seconds"] for r in state.history), 3),
                   rounds=state.round, wall_seconds=round(wall, 3), privacy_mode=args.privacy,
                   users_per_round=args.clients_per_round, nodes=nodes, seed=args.seed)
    atomic_write_json(out / "metrics.json", metrics)
    command = "lore-fed simulate " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == [
        "simulate"] else "lore-fed simulate"
    report = write_report(out, state.history, metrics, reference, command)
    print(f"seen {metrics['seen_test_acc']:.4f}  unseen {metrics['unseen_test_acc']:.4f}  "
          f"({state.round} rounds, {wall:.1f} s)")
    print(f"wrote {out / 'metrics.json'}, {out / 'rounds.jsonl'} and {report}")
    return 0
