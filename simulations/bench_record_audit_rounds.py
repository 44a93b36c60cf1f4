"""What a record-mode server learns from one round's upload per user against all of a user's uploads.

    python -m simulations.bench_record_audit_rounds     # -> bench_results/record_audit_rounds.{md,json}

For each noise multiplier z: a record-mode run through the real apps on the in-process grid (40 synthetic users,
D = 128, true rank 4, every user in each of 10 rounds), then `lore-fed audit update-leakage` on it, once as the
audit now runs (each user's uploads summed over the rounds its ledger shows) and once on one round's upload (the
audit before). The attack needs a basis that knows the users' directions, so both use a `lore-fed train` basis of
the same pairs (the audit's --basis). Figures: the mean cosine of the recovered w to the user's non-private fit
against the best guess without the update, the pair-membership AUC and the verdict.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from flwr.common.config import get_fused_config_from_dir

from lore_core.atomic_io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
USERS, ROUNDS, RANK, DIM, NODES = 40, 10, 4, 128, 4


def record_run(pair_file: Path, run_dir: Path, z: float) -> None:
    from client.client_app import app as client_app
    from server.run_settings import ServerSettings
    from server.server_app import run_federated
    from simulations.in_process_grid import LocalGrid

    cfg = get_fused_config_from_dir(ROOT, {
        "pairs-path": str(pair_file), "run-dir": str(run_dir), "rank": RANK, "num-server-rounds": ROUNDS,
        "clients-per-round": USERS, "server-lr": 0.05, "privacy-mode": "record", "noise-multiplier": z,
        "max-grad-norm": 1.0})
    grid = LocalGrid(client_app, [{"partition-id": i, "num-partitions": NODES} for i in range(NODES)], cfg,
                     keep_messages=False)
    run_federated(grid, ServerSettings.from_run_config(cfg))


def audit(run_dir: Path, pair_file: Path, basis: Path, out: Path, max_rounds: int) -> dict:
    """`lore-fed audit update-leakage` with at most `max_rounds` rounds summed (1: the audit before)."""
    import lore_core.audits.update_leakage as update_leakage
    from lore_cli.main import main

    kept = update_leakage.MAX_RECORD_ROUNDS
    update_leakage.MAX_RECORD_ROUNDS = max_rounds
    try:
        assert main(["audit", "update-leakage", str(run_dir), "--pairs", str(pair_file), "--basis", str(basis),
                     "--out", str(out)]) == 0
    finally:
        update_leakage.MAX_RECORD_ROUNDS = kept
    result = json.loads((out / "audits" / "update-leakage.json").read_text())
    view = result["views"]["single"]
    return {"verdict": result["verdict"], "cosine": view["cosine_mean"], "cosine_ci": view["cosine_ci"],
            "best_guess": result["chance"][result["chance_level"]]["mean"], "gain_ci": view["gain_ci"],
            "pair_auc": view["pair_membership_auc"], "scope": result["scope"]}


def main(argv: list[str] | None = None) -> None:
    from lore_cli.main import main as cli
    from lore_core.pairs import save_pairs
    from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", default="1.0,0.3", help="comma-separated noise multipliers")
    parser.add_argument("--out", default=str(ROOT / "bench_results"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=DIM, true_rank=RANK, seen_users=USERS,
                                                             unseen_users=4, train_pairs=(20, 30), seed=5))
        pair_file = save_pairs(pairs, work / "pairs.npz")
        assert cli(["train", str(pair_file), "--rank", str(RANK), "--out", str(work / "trained")]) == 0
        for z in (float(v) for v in args.noise.split(",")):
            run_dir = work / f"run-z{z}"
            record_run(pair_file, run_dir, z)
            for label, cap in (("one round (before)", 1), ("summed over the ledger's rounds", ROUNDS)):
                rows.append({"z": z, "view": label, **audit(run_dir, pair_file, work / "trained" / "basis.npz",
                                                            work / f"audit-z{z}-{cap}", cap)})
    out = Path(args.out)
    atomic_write_json(out / "record_audit_rounds.json", {"users": USERS, "rounds": ROUNDS, "rows": rows})
    lines = ["# Record-mode update leakage: one round's upload against a user's uploads summed",
             "", f"`python -m simulations.bench_record_audit_rounds` ({USERS} synthetic users, D = {DIM}, true rank "
             f"{RANK}, every user in each of {ROUNDS} rounds of a record-mode run, per-pair clip 1).", "",
             "| z | what the audit attacks | verdict | cosine of w (95 % CI) | best guess without the update | "
             "pair AUC |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['z']:g} | {r['view']} | {r['verdict']} | {r['cosine']:.3f} [{r['cosine_ci'][0]:.3f}, "
              f"{r['cosine_ci'][1]:.3f}] | {r['best_guess']:.3f} | {r['pair_auc']:.3f} |" for r in rows]
    atomic_write_text(out / "record_audit_rounds.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
