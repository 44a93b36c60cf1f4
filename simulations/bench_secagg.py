"""Time cost of privacy mode `user+secagg` against `user` on one small synthetic file, in-process (LocalGrid: the
real apps, no engine) and through Flower's Ray simulation engine. Prints seconds per round (median of rounds >= 2;
round 1 also pays imports / engine start) for both modes. Each mode runs its own accountant per round (user: PRV;
user+secagg: the distributed discrete Gaussian's).

    python -m simulations.bench_secagg [--users 64] [--nodes 16] [--rounds 4] [--clients-per-round 16] [--no-ray]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from simulations.flower_run import ROOT

MODES = {"user": "client.client_app:app", "user+secagg": "client.secagg_client_app:app"}


def run_config(pairs_path: Path, run_dir: Path, mode: str, args: argparse.Namespace) -> dict:
    return {"pairs-path": str(pairs_path), "run-dir": str(run_dir), "rank": args.rank,
            "num-server-rounds": args.rounds, "clients-per-round": args.clients_per_round, "server-lr": 0.1,
            "privacy-mode": mode, "noise-multiplier": 1.0, "clip-norm": 0.5, "delta": 1e-5,
            "min-nodes": args.nodes}


def in_process(pairs_path: Path, run_dir: Path, mode: str, args: argparse.Namespace) -> list[float]:
    from flwr.common.config import get_fused_config_from_dir

    from simulations.in_process_grid import LocalGrid
    from server.server_app import run_federated
    from server.run_settings import ServerSettings

    module, attr = MODES[mode].split(":")
    client_app = getattr(__import__(module, fromlist=[attr]), attr)
    cfg = get_fused_config_from_dir(ROOT, run_config(pairs_path, run_dir, mode, args))
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": args.nodes} for i in range(args.nodes)], cfg,
                     keep_messages=False)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    state = run_federated(grid, ServerSettings.from_run_config(cfg))
    return [r["seconds"] for r in state.history]


def with_ray(pairs_path: Path, run_dir: Path, mode: str, args: argparse.Namespace) -> list[float]:
    """`simulations.flower_run.run_simulation` with the mode's ClientApp (it names client.client_app:app only)."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from server.checkpoint import load_checkpoint
    from server.engine_stop import engine_in_this_process
    from simulations.flower_run import backend_config, check_app_modules

    for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                       ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"), ("OMP_NUM_THREADS", "1")):
        os.environ.setdefault(key, value)
    check_app_modules()
    overrides = run_config(pairs_path, run_dir, mode, args)
    run = Run.create_empty(run_id=int(time.time_ns() % 2**62))
    run.override_config, run.primary_task_id, run.federation_id = dict(overrides), run.run_id + 1, NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run.primary_task_id, run.run_id, SUPERLINK_NODE_ID
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with engine_in_this_process():  # Ctrl-C stops the ServerApp's thread too (server/engine_stop.py)
        _run_simulation(num_supernodes=args.nodes, exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
                        server_app_attr="server.server_app:app", client_app_attr=MODES[mode],
                        backend_config=backend_config(), app_dir=str(ROOT), run=run, is_app=True,
                        server_app_context=Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={},
                                                   state=RecordDict(),
                                                   run_config=get_fused_config_from_dir(ROOT, overrides)))
    state = load_checkpoint(run_dir)
    if state is None or state.round < args.rounds:
        raise RuntimeError(f"the {mode} Ray run did not finish its {args.rounds} rounds (see the log)")
    return [r["seconds"] for r in state.history]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=64, help="seen (training) users")
    parser.add_argument("--nodes", type=int, default=16, help="virtual nodes (users are split into blocks)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients-per-round", type=int, default=16)
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)

    from lore_core.pairs import save_pairs
    from lore_core.privacy.ledger import _report
    from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

    work = Path(tempfile.mkdtemp(prefix="bench_secagg_"))
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=args.dim, true_rank=args.rank, seen_users=args.users,
                                                         unseen_users=max(args.users // 4, 1), seed=0))
    pairs_path = save_pairs(pairs, work / "pairs.npz")
    backends = {"in-process": in_process} if args.no_ray else {"in-process": in_process, "ray": with_ray}
    rows = []
    print(f"{args.users} users on {args.nodes} nodes, D={args.dim}, B={args.rank}, {args.clients_per_round} "
          f"users/round (Poisson), {args.rounds} rounds")
    print(f"{'backend':<11} {'mode':<12} {'round 1 s':>9} {'s/round (median r>=2)':>22}")
    for backend, run in backends.items():
        for mode in MODES:
            _report.cache_clear()  # the ledger caches epsilon per history: each mode pays its own accounting
            seconds = run(pairs_path, work / f"{backend}-{mode}", mode, args)
            steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
            rows.append({"backend": backend, "mode": mode, "first_round_s": seconds[0], "steady_round_s": steady,
                         "rounds_s": seconds})
            print(f"{backend:<11} {mode:<12} {seconds[0]:>9.2f} {steady:>22.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
