"""Benchmark: `user+secagg` (the distributed discrete Gaussian: users add their noise shares before masking) against
`user` (the trusted server adds continuous Gaussian noise) at the same epsilon, on the synthetic population.

    python -m simulations.bench_distributed_dp [--users 1400] [--rounds 200] [--clients-per-round 50]
        [--epsilon 3.37] [--repeats 8] [--real-path-rounds 200]

Both modes solve their noise multiplier for the same target epsilon (delta 1e-5) with the accountant that writes
their ledger: Opacus PRV for `user`; for `user+secagg` the distributed discrete Gaussian's RDP bound
(lore_core.privacy.ddg_accounting), which is looser, so it needs more noise; its users also add the slack for the
tolerated drop-outs (std z C sqrt(k / ceil(0.9 k))). Runs are `simulations.bench_privacy.run_in_process` (the
clients' and the server's own functions, no Flower messaging; for `user+secagg` the users' encode_shares and the
server's decoding, the masks cancelling exactly), seeds 0..R-1 for both modes. `--real-path-rounds T` adds one
`user+secagg` run through the real apps and Flower's SecAgg+ on the in-process grid (seed 0, T rounds).
Writes bench_results/distributed_dp_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from lore_core.pairs import PAIRS_FILENAME
from simulations.bench_privacy import base_overrides, make_population, run_in_process
from simulations.bench_flags import add_population_flags

MODES = ("user", "user+secagg")


def _one(job: tuple) -> dict:
    pairs_path, overrides, nodes = job
    return {**run_in_process(Path(pairs_path), overrides, nodes), "seed": overrides["seed"]}


def real_path(pairs_path: Path, overrides: dict, nodes: int, run_dir: Path) -> dict:
    """One `user+secagg` run through the ServerApp's SecAgg+ workflow and the SecAgg+ ClientApp (in-process grid)."""
    import logging
    import shutil

    from flwr.common.config import get_fused_config_from_dir

    from client.secagg_client_app import app as secagg_client_app
    from server.run_settings import ServerSettings
    from server.server_app import run_federated
    from simulations.flower_run import ROOT
    from simulations.in_process_grid import LocalGrid

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = get_fused_config_from_dir(ROOT, {**overrides, "pairs-path": str(pairs_path), "run-dir": str(run_dir),
                                           "eval-every": 0})
    grid = LocalGrid(secagg_client_app, [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)], cfg,
                     keep_messages=False)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    started = time.perf_counter()
    state = run_federated(grid, ServerSettings.from_run_config(cfg))
    final = state.history[-1]
    from lore_core.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger.load(run_dir)
    eps = ledger.epsilon()
    return {"mode": "user+secagg (SecAgg+ on the in-process grid)", "rounds": state.round, "seed": 0,
            "noise_multiplier": ledger.settings.noise_multiplier,
            "train_seconds": round(time.perf_counter() - started, 1), "seen_test_acc": final["seen_test_acc"],
            "unseen_test_acc": final["unseen_test_acc"], "epsilon": eps.headline,
            "epsilon_accountant": eps.accountant, "aborted_rounds": sum(r["secagg_nodes"] == 0 for r in state.history)}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for mode in sorted({r["mode"] for r in rows}, key=lambda m: (m not in MODES, m)):
        runs = [r for r in rows if r["mode"] == mode]
        row = {"mode": mode, "runs": len(runs), "epsilon": runs[0]["epsilon"],
               "epsilon_accountant": runs[0]["epsilon_accountant"], "noise_multiplier": runs[0].get("noise_multiplier")}
        for key in ("seen_test_acc", "unseen_test_acc"):
            values = np.array([r[key] for r in runs])
            row[key] = float(values.mean())
            row[f"{key}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
            row[f"{key}_range"] = [float(values.min()), float(values.max())]
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_population_flags(parser)
    parser.add_argument("--epsilon", type=float, default=3.37, help="target epsilon of both modes (delta 1e-5)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--real-path-rounds", type=int, default=0)
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--work", default="runs/bench_distributed_dp")
    args = parser.parse_args(argv)

    from lore_core.atomic_io import atomic_write_json, atomic_write_text
    from simulations.flower_run import nodes_for

    work = Path(args.work)
    pairs_path = make_population(work / "data" / PAIRS_FILENAME, args.users, args.unseen_users, 0)
    nodes = nodes_for(args.users + args.unseen_users)
    args.work = str(work)
    jobs = [(str(pairs_path), {**base_overrides(args), "privacy-mode": mode, "target-epsilon": args.epsilon,
                               "delta": 1e-5, "seed": seed}, nodes)
            for seed in range(args.repeats) for mode in MODES]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(_one, jobs))
    if args.real_path_rounds:
        overrides = {**base_overrides(args), "privacy-mode": "user+secagg", "target-epsilon": args.epsilon,
                     "delta": 1e-5, "seed": 0, "num-server-rounds": args.real_path_rounds}
        rows.append(real_path(pairs_path, overrides, nodes, work / "real_path"))
    summary = summarize(rows)
    by_mode = {r["mode"]: r for r in summary}
    gap = {key: round(100 * (by_mode["user"][key] - by_mode["user+secagg"][key]), 2)
           for key in ("seen_test_acc", "unseen_test_acc")}
    out = Path(args.out)
    atomic_write_json(out / "distributed_dp_bench.json", {"config": vars(args), "summary": summary,
                                                          "gap_points_user_minus_secagg": gap, "runs": rows})
    lines = [f"# `user+secagg` (distributed discrete Gaussian) vs `user` at epsilon {args.epsilon} (delta 1e-5)", "",
             f"Synthetic pair file, {args.users} seen + {args.unseen_users} unseen users, D = 384, rank {args.rank}, "
             f"{args.clients_per_round} users per round (Poisson), {args.rounds} rounds, seeds 0..{args.repeats - 1}.",
             "", "| mode | accountant | epsilon | z | runs | seen acc (SE) | unseen acc (SE) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        se = {k: f" ({r[k + '_se']:.4f})" if r[k + "_se"] is not None else "" for k in ("seen_test_acc",
                                                                                         "unseen_test_acc")}
        z = f"{r['noise_multiplier']:.3f}" if r["noise_multiplier"] is not None else "as solved"
        lines.append(f"| {r['mode']} | {r['epsilon_accountant']} | {r['epsilon']:.3f} | {z} | {r['runs']} | "
                     f"{r['seen_test_acc']:.4f}{se['seen_test_acc']} | {r['unseen_test_acc']:.4f}"
                     f"{se['unseen_test_acc']} |")
    lines += ["", f"Gap `user` - `user+secagg` (means): seen {gap['seen_test_acc']:+.2f} pts, unseen "
              f"{gap['unseen_test_acc']:+.2f} pts. Each mode's z is solved by its own accountant for the same "
              "epsilon; `user+secagg` users add their shares with the 10 % drop-out slack. In-process rows: "
              "`simulations.bench_privacy.run_in_process`; the SecAgg+ row: the real apps and Flower's SecAgg+ on "
              "the in-process grid.", ""]
    atomic_write_text(out / "distributed_dp_bench.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
