"""Benchmark: the accuracy cost of user-level DP-FedAvg against the non-private federated run (issue 4).

    python -m simulations.bench_privacy [--users 1400] [--rounds 200] [--clients-per-round 50] [--out bench_results]
    python -m simulations.bench_privacy --pilot        # the clip-norm pilot on a separate, public synthetic population

Population: `simulations.synthetic_pairs` (D = 384, `--users` seen users + `--unseen-users` few-shot users).
Runs: mode `none`, and mode `user` at z in (0.5, 1, 2), delta 1e-5, Poisson q = m/N. Each run is the federated
round in one process, without Flower's messaging: the ClientApp's training functions (`federation.local_training`, with
the client-side clip), the ServerApp's aggregator (`server.aggregation.make_aggregator`: secret Poisson sampler,
server re-clip, noise on the sum, fixed denominator; for `user+secagg` the users' discrete Gaussian shares on the
SecAgg+ grid and the server's decoding, without the masks, which cancel) and server optimizer; epsilon from the
accountant that writes the ledger (`lore_core.privacy.accounting`). Final evaluation as the ServerApp's (all nodes, seen and unseen users).
`--repeats R` runs every setting R times with seeds 0..R-1 (the table gives means and ranges). Writes
bench_results/privacy_bench.{json,md} and privacy_accuracy_vs_epsilon.png; the pair files and the Ray run
directory go to --work (runs/bench_privacy, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from lore_core.pairs import PAIRS_FILENAME, save_pairs
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs
from simulations.bench_flags import add_population_flags

NOISE_MULTIPLIERS = (0.5, 1.0, 2.0)
PILOT_SEED = 101  # the pilot population is not the benchmark's (seed 0): C is never tuned on the run it protects


def run_in_process(pairs_path: Path, overrides: dict, num_nodes: int, *, record_norms: bool = False,
                   prior_pairs_grid: tuple[float, ...] = (), canaries=None) -> dict:
    """One federated run (see module docstring) -> final metrics, epsilon and, optionally, update norms per round
    and the final basis evaluated with each personal prior of `prior_pairs_grid` (`by_prior_pairs`).
    `canaries` (federation.canary_users.CanarySecrets): K canary users join the population on a node of their own,
    as `lore-fed simulate --canaries` adds them."""
    from flwr.common.config import get_fused_config_from_dir

    from federation.canary_users import CanaryBlock
    from federation.local_training import pair_weighted, train_sampled_users
    from federation.protocol import ClientSettings
    from federation.user_block import load_partition_users
    from lore_core.privacy.accounting import epsilon_report
    from lore_core.privacy.dp_fedavg import clip_updates
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
    counts = [b.n_train_users for b in blocks]
    canary_block = None if canaries is None else CanaryBlock(canaries.directions, canaries.included)
    if canary_block is not None:
        counts.append(canary_block.n_train_users)  # node `num_nodes`
    population = Population(node_ids=np.arange(len(counts), dtype=np.uint64), partition_ids=np.arange(len(counts)),
                            counts=np.array(counts), dim=blocks[0].dim)
    privacy = settings.privacy_settings(population.size, population.dim)
    aggregator = make_aggregator(settings, privacy)
    if privacy.mode == "user+secagg":  # the users' noise shares on the grid the SecAgg+ workflow would plan
        from lore_core.privacy.distributed_dp import plan_encoding

        aggregator.encoding = plan_encoding(privacy.clip_norm, privacy.noise_multiplier, int(population.counts.max()),
                                            num_nodes, population.size)
    optimizer = settings.new_optimizer()
    basis = initial_basis(settings.rank, population.dim, settings.seed, settings.init_scale)
    norms, sampled_counts = [], []
    started = time.perf_counter()
    for _ in range(settings.rounds):
        updates = [np.zeros((0,) + basis.shape)]
        sampled = aggregator.sample(population.size)
        sampled_counts.append(int(sampled.size))
        for node, local in population.assign(sampled).items():
            if node == num_nodes:  # the canaries' uploads
                updates.append(canary_block.updates(local, privacy.clip_norm))
                continue
            block = blocks[node].training_block(local)
            weights[node], upd = train_sampled_users(basis, block, weights[node], local,
                                                     prior_pairs=client.train_prior_pairs, steps=client.local_steps,
                                                     lr=client.client_lr, objective=client.objective)
            if privacy.mode == "user":
                upd, _ = clip_updates(upd, privacy.clip_norm)  # the client's clip (client/client_app.py)
            elif client.weight_by == "pair":  # mode none, as the ClientApp scales (train_clipped)
                upd = pair_weighted(upd, block, local, client.pairs_per_user)
            updates.append(upd)
        updates = np.concatenate(updates)
        if record_norms:
            norms.append(np.linalg.norm(updates.reshape(len(updates), -1), axis=1).tolist())
        mean = aggregator.aggregate(updates, population.size)
        if mean is not None:
            basis = optimizer.step(basis, pseudo_gradient(basis, mean, client_lr=client.client_lr,
                                                          local_steps=client.local_steps, l2=settings.l2))
    train_seconds = time.perf_counter() - started
    basis = optimizer.reported(basis)  # the tail average the ServerApp reports
    sums = _evaluate(basis, blocks, weights, client.prior_pairs)
    result = {"mode": privacy.mode, "rounds": settings.rounds, "train_seconds": round(train_seconds, 1),
              "mean_sampled": float(np.mean(sampled_counts)), "prior_pairs": client.prior_pairs,
              **_accuracies(sums),
              "oracle_seen_test_acc": sums["oracle-seen-acc-sum"] / sums["seen-users"],
              "oracle_unseen_test_acc": sums["oracle-unseen-acc-sum"] / sums["unseen-users"]}
    if prior_pairs_grid:
        result["by_prior_pairs"] = {str(c): list(_accuracies(_evaluate(basis, blocks, weights, c)).values())
                                    for c in prior_pairs_grid}
    if privacy.is_dp:
        eps = epsilon_report([(privacy.noise_multiplier, privacy.sample_rate, settings.rounds)], privacy.delta,
                             privacy.dimension if privacy.mode == "user+secagg" else None)
        result.update(noise_multiplier=privacy.noise_multiplier, clip_norm=privacy.clip_norm, delta=privacy.delta,
                      sample_rate=privacy.sample_rate, epsilon=eps.headline, epsilon_accountant=eps.accountant,
                      epsilon_prv=eps.prv, epsilon_rdp=eps.rdp)
    if record_norms:
        result["update_norms"] = norms
    return result


def _evaluate(basis: np.ndarray, blocks: list, weights: list, prior_pairs: float) -> dict[str, float]:
    """The ServerApp's final evaluation summed over all nodes (seen and unseen users)."""
    from federation.local_training import evaluate_node

    sums: dict[str, float] = {}
    for block, w in zip(blocks, weights):
        for key, value in evaluate_node(basis, block, w, prior_pairs=prior_pairs)[1].items():
            sums[key] = sums.get(key, 0.0) + value
    return sums


def _accuracies(sums: dict[str, float]) -> dict[str, float]:
    return {"seen_test_acc": sums["seen-acc-sum"] / sums["seen-users"],
            "unseen_test_acc": sums["unseen-acc-sum"] / sums["unseen-users"]}


def make_population(path: Path, users: int, unseen: int, seed: int) -> Path:
    if not path.exists():
        pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(seen_users=users, unseen_users=unseen, seed=seed))
        save_pairs(pairs, path)
    return path


def base_overrides(args: argparse.Namespace) -> dict:
    from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS

    return {"num-server-rounds": args.rounds, "clients-per-round": args.clients_per_round, "rank": args.rank,
            "seed": 0, "eval-every": 0, "train-prior-pairs": DEFAULT_PRIOR_PAIRS,
            "prior-pairs": DEFAULT_PRIOR_PAIRS, "run-dir": str(args.work)}


def pilot(args: argparse.Namespace) -> int:
    """Median per-user update norm of a non-private run on a separate synthetic population: the default C."""
    from simulations.flower_run import nodes_for

    path = make_population(Path(args.work) / "pilot" / PAIRS_FILENAME, 300, 20, PILOT_SEED)
    overrides = {**base_overrides(args), "num-server-rounds": args.pilot_rounds, "clients-per-round": 50,
                 "privacy-mode": "none"}
    result = run_in_process(path, overrides, nodes_for(320), record_norms=True)
    per_round = [float(np.median(n)) for n in result["update_norms"]]
    every = max(1, len(per_round) // 10)
    report = {"population": "synthetic seed %d, 300 seen users, D=384" % PILOT_SEED, "rounds": args.pilot_rounds,
              "median_update_norm_per_round": per_round[::every],
              "median_update_norm_all_rounds": float(np.median(np.concatenate(result["update_norms"])))}
    print(json.dumps(report, indent=2))
    return 0


def _one(job: tuple) -> dict:
    pairs_path, overrides, nodes = job
    return run_in_process(Path(pairs_path), overrides, nodes)


def ray_point(pairs_path: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    """User mode, z = 1, through the real ServerApp/ClientApp on Flower's Ray engine (a fresh run directory)."""
    import shutil

    from lore_cli.main import main as cli
    from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS

    shutil.rmtree(run_dir, ignore_errors=True)
    code = cli(["simulate", str(pairs_path), "--rounds", str(args.rounds), "--clients-per-round",
                str(args.clients_per_round), "--rank", str(args.rank), "--out", str(run_dir), "--noise-multiplier", "1",
                "--prior-pairs", str(DEFAULT_PRIOR_PAIRS)]  # the in-process rows' prior, not the DP default
               + (["--clip-norm", str(args.clip_norm)] if args.clip_norm is not None else []))
    if code != 0:
        raise RuntimeError(f"the Ray run failed (exit {code})")
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"mode": "user (Ray engine)", "rounds": m["rounds"], "train_seconds": m["wall_seconds"],
            "seen_test_acc": m["seen_test_acc"], "unseen_test_acc": m["unseen_test_acc"],
            "oracle_seen_test_acc": m["oracle_seen_test_acc"], "oracle_unseen_test_acc": m["oracle_unseen_test_acc"],
            "noise_multiplier": m["noise_multiplier"], "clip_norm": m["clip_norm"], "delta": m["delta"],
            "sample_rate": m["sample_rate"], "epsilon_prv": m["epsilon"], "epsilon_rdp": m["epsilon_rdp"]}


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (mode, z): mean accuracy over its repeats, with the range, and the drop from the mean of the
    non-private runs (each DP run draws fresh secret noise; the non-private runs differ by seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r.get("noise_multiplier")), []).append(r)
    out = []
    for (mode, z), runs in groups.items():
        row = {k: v for k, v in runs[0].items() if k not in ("seen_test_acc", "unseen_test_acc", "train_seconds")}
        for key in ("seen_test_acc", "unseen_test_acc"):
            values = [r[key] for r in runs]
            row[key], row[f"{key}_range"] = float(np.mean(values)), [min(values), max(values)]
        row["runs"], row["train_seconds"] = len(runs), round(float(np.median([r["train_seconds"] for r in runs])), 1)
        out.append(row)
    base = next(r for r in out if r["mode"] == "none")
    for r in out:
        r["seen_drop_points"] = round(100 * (base["seen_test_acc"] - r["seen_test_acc"]), 2)
        r["unseen_drop_points"] = round(100 * (base["unseen_test_acc"] - r["unseen_test_acc"]), 2)
    return out


def write_outputs(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lore_core.atomic_io import atomic_write_json, atomic_write_text

    summary = summarize(rows)
    base = next(r for r in summary if r["mode"] == "none")
    atomic_write_json(out / f"{args.name}_bench.json",
                      {"config": vars(args) | {"out": str(out)}, "summary": summary, "runs": rows})
    source = f"pair file {args.pairs}" if args.pairs else "synthetic pair file"
    lines = [f"# User-level DP-FedAvg vs non-private ({source}): {args.users} seen users (+{args.unseen_users} unseen), "
             f"D={getattr(args, 'dim', 384)}, {args.clients_per_round} users/round (Poisson), {args.rounds} rounds, "
             f"delta 1e-5, personal prior {base['prior_pairs']:g} pairs", "",
             "| mode | z | C | epsilon (PRV) | epsilon (RDP) | runs | seen acc (range) | unseen acc (range) | "
             "seen drop (pts) | unseen drop (pts) | seconds (median) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        eps = (f"{r['epsilon_prv']:.2f} | {r['epsilon_rdp']:.2f}" if "epsilon_prv" in r else "∞ | ∞")
        acc = {k: f"{r[k]:.4f} ({r[k + '_range'][0]:.4f}–{r[k + '_range'][1]:.4f})" if r["runs"] > 1 else f"{r[k]:.4f}"
               for k in ("seen_test_acc", "unseen_test_acc")}
        lines.append(f"| {r['mode']} | {r.get('noise_multiplier', '-')} | {r.get('clip_norm', '-')} | {eps} | "
                     f"{r['runs']} | {acc['seen_test_acc']} | {acc['unseen_test_acc']} | {r['seen_drop_points']} | "
                     f"{r['unseen_drop_points']} | {r['train_seconds']} |")
    lines += ["", f"Oracle (true basis and weights): seen {base['oracle_seen_test_acc']:.4f}, unseen "
              f"{base['oracle_unseen_test_acc']:.4f}. Rows `none`/`user`: in-process rounds (no Flower messaging), "
              "same client, aggregator and server-optimizer code as the ServerApp/ClientApp, seconds = training "
              "rounds; `user (Ray engine)`: `lore-fed simulate` through Flower's simulation engine, seconds = wall "
              "time incl. engine start, ledger and evaluation. Each DP run draws its own secret noise; `none` runs "
              "differ by experiment seed; drops are between means.", ""]
    atomic_write_text(out / f"{args.name}_bench.md", "\n".join(lines))

    dp = sorted((r for r in summary if r["mode"] == "user"), key=lambda r: r["epsilon_prv"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, color, label in (("seen_test_acc", "tab:blue", "seen users"),
                              ("unseen_test_acc", "tab:orange", "unseen users (few-shot)")):
        errors = np.array([[r[key] - r[key + "_range"][0], r[key + "_range"][1] - r[key]] for r in dp]).T
        ax.errorbar([r["epsilon_prv"] for r in dp], [r[key] for r in dp], yerr=errors, fmt="o-", color=color,
                    capsize=3, label=f"user DP, {label} (mean, range)")
        ax.axhline(base[key], color=color, ls="--", lw=1, label=f"non-private, {label}")
        for r in summary:
            if r["mode"] == "user (Ray engine)":
                ax.plot(r["epsilon_prv"], r[key], "x", color=color, ms=8, label=f"user DP via Ray, {label}")
        for r in dp:
            ax.annotate(f"z={r['noise_multiplier']}", (r["epsilon_prv"], r[key]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (PRV, delta 1e-5)")
    ax.set_ylabel("held-out pair accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}_accuracy_vs_epsilon.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_population_flags(parser)
    parser.add_argument("--clip-norm", type=float, default=None, help="default: the run config's (docs/privacy.md §4)")
    parser.add_argument("--noise-multipliers", default=",".join(str(z) for z in NOISE_MULTIPLIERS),
                        help="comma-separated z values of the user-mode rows")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per setting, with seeds 0..R-1 (DP runs also draw fresh noise)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench_results", help="table, JSON and plot")
    parser.add_argument("--work", default="runs/bench_privacy", help="pair files and run directories")
    parser.add_argument("--pilot", action="store_true", help="only the clip-norm pilot")
    parser.add_argument("--pilot-rounds", type=int, default=60)
    parser.add_argument("--pairs", default=None,
                        help="benchmark pair file or dataset (e.g. from lore-fed synth/prepare/embed) instead of a "
                             "synthetic population; --users/--unseen-users are then read from it")
    parser.add_argument("--name", default="privacy", help="output file prefix in --out")
    parser.add_argument("--ray", action="store_true",
                        help="also run user mode at z = 1 through Flower's Ray simulation engine (`lore-fed simulate`)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.pilot:
        return pilot(args)

    from simulations.flower_run import nodes_for

    work = Path(args.work)
    if args.pairs:
        from lore_core.pairs import load_pairs, resolve_pair_path

        pairs_path = resolve_pair_path(args.pairs)
        pairs = load_pairs(pairs_path)
        args.users = int(np.unique(pairs.user[pairs.seen]).size)
        args.unseen_users = int(np.unique(pairs.user[~pairs.seen]).size)
        args.dim = pairs.dim
    else:
        pairs_path = make_population(work / "data" / PAIRS_FILENAME, args.users, args.unseen_users, 0)
    nodes = nodes_for(args.users + args.unseen_users)
    jobs = [(str(pairs_path), {**base_overrides(args), "privacy-mode": "none", "seed": seed}, nodes)
            for seed in range(args.repeats)]
    for z in (float(v) for v in args.noise_multipliers.split(",")):
        dp = {**base_overrides(args), "privacy-mode": "user", "noise-multiplier": z, "delta": 1e-5}
        if args.clip_norm is not None:
            dp["clip-norm"] = args.clip_norm
        jobs += [(str(pairs_path), {**dp, "seed": seed}, nodes) for seed in range(args.repeats)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(_one, jobs))
    if args.ray:
        rows.append(ray_point(pairs_path, work / "ray_user_z1", args))
    write_outputs(out, rows, args)
    print((out / f"{args.name}_bench.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
