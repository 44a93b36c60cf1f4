"""Benchmark: lore-fed from 1,400 to 100,000 users (and 1,000,000 at a smaller D) on one machine.

    python -m simulations.bench_scale [--populations 1400,10000,100000] [--dim 384] [--data DIR] [--work DIR]
                                      [--skip-train] [--out bench_results]

Populations: `python -m simulations.synthetic_pairs` (seed 0): N seen users with 10-20 training pairs, N/10 new users
with 10 few-shot pairs, 10 test pairs per user (the shape of issue 15's measurements). Every command runs in its own
process and is measured from outside: wall time and the peak summed RSS of its whole process tree (Ray workers
included), polled every 0.5 s.
  - generation: file size, seconds, memory (a file already in --data is reused with the figures of its generation);
  - `lore-fed simulate FILE --rounds 20 --clients-per-round 100 --rank 5` (user-level DP, the command's defaults):
    time to round 1 (launch until rounds.jsonl has its first line), median seconds per round (all rounds but the
    last, which also evaluates), final evaluation (last round minus that median), memory, accuracy, epsilon;
  - `lore-fed train FILE` (defaults): wall time, memory, accuracy.
Populations of one invocation run one after another, smallest first, and the smallest is simulated again after
the largest: the median round at the largest is reported against the mean of the smallest's two (side by side). Results are merged into bench_results/scale.json by population (a
later invocation adds or replaces populations), with a fitted cost law y = a + b N for every figure and a
projection to 10^6 and 10^7 users on Flower's Deployment Engine; bench_results/scale.md is written from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from simulations.bench_federated import TreeMemory

ROUNDS, USERS_PER_ROUND, RANK = 20, 100, 5
GIB = 2**30


def measure(command: list[str], *, first_line_of: Path | None = None) -> dict:
    """Run `command`; its wall time, its process tree's peak RSS and (first_line_of) the seconds until that file
    has a first line. Raises when the command fails."""
    started = time.monotonic()
    process = subprocess.Popen(command)
    memory = TreeMemory(root=process.pid)
    memory.start()
    first_line = None
    while process.poll() is None:
        if first_line is None and first_line_of is not None and first_line_of.exists() and \
                first_line_of.read_text().count("\n"):
            first_line = time.monotonic() - started
        time.sleep(0.2)
    peak = memory.stop()
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
    return {"seconds": round(time.monotonic() - started, 2), "peak_tree_rss_gib": round(peak / GIB, 3),
            "first_line_seconds": None if first_line is None else round(first_line, 2)}


def generate(users: int, dim: int, data: Path) -> tuple[Path, dict]:
    path = data / f"scale_{users}_d{dim}.npz"
    figures = path.with_suffix(".gen.json")
    if path.exists() and figures.exists():
        return path, {**json.loads(figures.read_text()), "reused": True}
    run = measure([sys.executable, "-m", "simulations.synthetic_pairs", "--seen-users", str(users),
                   "--unseen-users", str(users // 10), "--dim", str(dim), "--train-pairs", "10-20",
                   "--few-shot-pairs", "10", "--test-pairs", "10", "--seed", "0", "--out", str(path)])
    from lore_core.pair_columns import PairColumns

    result = {"file_mib": round(path.stat().st_size / 2**20, 1), "pairs": PairColumns.open(path).n,
              "seconds": run["seconds"], "peak_tree_rss_gib": run["peak_tree_rss_gib"]}
    figures.write_text(json.dumps(result) + "\n")
    return path, result


def simulate(path: Path, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    run = measure([sys.executable, "-m", "lore_cli.main", "simulate", str(path), "--out", str(run_dir),
                   "--rounds", str(ROUNDS), "--clients-per-round", str(USERS_PER_ROUND), "--rank", str(RANK)],
                  first_line_of=run_dir / "rounds.jsonl")
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    median = float(np.median([r["seconds"] for r in rounds[:-1]]))
    return {"seconds": run["seconds"], "peak_tree_rss_gib": run["peak_tree_rss_gib"],
            "time_to_round_1_seconds": run["first_line_seconds"], "median_round_seconds": round(median, 4),
            "final_evaluation_seconds": round(rounds[-1]["seconds"] - median, 2), "nodes": metrics["nodes"],
            "seen_test_acc": metrics["seen_test_acc"], "unseen_test_acc": metrics["unseen_test_acc"],
            "epsilon": metrics.get("epsilon"), "delta": metrics.get("delta"),
            "noise_multiplier": metrics.get("noise_multiplier")}


def train(path: Path, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    run = measure([sys.executable, "-m", "lore_cli.main", "train", str(path), "--out", str(run_dir)])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"seconds": run["seconds"], "peak_tree_rss_gib": run["peak_tree_rss_gib"],
            "train_seconds": round(metrics["train_seconds"], 1),
            "evaluate_seconds": round(metrics["evaluate_seconds"], 1), "rank": metrics["rank"],
            "trainer": metrics.get("trainer", "full-batch"), "seen_test_acc": metrics["seen_test_acc"],
            "unseen_test_acc": metrics["unseen_test_acc"], "oracle_seen_test_acc": metrics["oracle_seen_test_acc"]}


# --- the cost law and the projection ---------------------------------------------------------------------------

LAW_FIGURES = {
    "file_mib": ("generation", "file_mib"), "generation_seconds": ("generation", "seconds"),
    "generation_rss_gib": ("generation", "peak_tree_rss_gib"),
    "train_seconds": ("train", "seconds"), "train_rss_gib": ("train", "peak_tree_rss_gib"),
    "time_to_round_1_seconds": ("simulate", "time_to_round_1_seconds"),
    "median_round_seconds": ("simulate", "median_round_seconds"),
    "final_evaluation_seconds": ("simulate", "final_evaluation_seconds"),
    "simulate_rss_gib": ("simulate", "peak_tree_rss_gib"),
}


def cost_law(rows: list[dict]) -> dict:
    """Least squares y = a + b N per figure over the populations of one D (N = all users, seen and new)."""
    law = {}
    for name, (part, key) in LAW_FIGURES.items():
        points = [(r["users"], r[part][key]) for r in rows if r.get(part) and r[part].get(key) is not None]
        if len(points) < 2:
            continue
        n, y = np.array(points, dtype=float).T
        b, a = np.polyfit(n, y, 1)
        law[name] = {"a": float(a), "b_per_user": float(b), "points": len(points),
                     "max_relative_residual": float(np.max(np.abs(a + b * n - y) / np.maximum(np.abs(y), 1e-9)))}
    return law


def projection(largest: dict, law: dict, rank: int = RANK) -> list[dict]:
    """10^6 and 10^7 users on the Deployment Engine, from the measured per-user figures of the largest population:
    K machines, one SuperNode each, hosting N/K users (as a virtual node does here)."""
    users, dim = largest["users"], largest["dim"]
    bytes_per_user = largest["generation"]["file_mib"] * 2**20 / users
    pairs_per_user = largest["generation"]["pairs"] / users
    eval_cpu_per_user = largest["simulate"]["final_evaluation_seconds"] * largest["cpus"] / users
    basis_bytes = rank * dim * 8
    rows = []
    for n in (10**6, 10**7):
        for machines in (8, 64):
            hosted = n // machines
            asked = machines * (1 - (1 - 1 / machines) ** USERS_PER_ROUND)  # expected nodes with a sampled user
            rows.append({
                "users": n, "supernodes": machines, "users_per_supernode": hosted,
                "supernode_pairs_gib": round(bytes_per_user * hosted / GIB, 2),
                "supernode_user_state_mib": round(hosted * (rank * 8 + 8) / 2**20, 2),
                "supernode_index_mib": round(hosted * 8 * (1 + pairs_per_user) / 2**20, 2),
                "supernode_final_evaluation_seconds_16_cores": round(eval_cpu_per_user * hosted / 16, 1),
                "superlink_train_round_messages": round(2 * asked),
                "superlink_train_round_mib": round((asked + USERS_PER_ROUND) * basis_bytes / 2**20, 2),
                "superlink_evaluation_round_mib": round(machines * basis_bytes / 2**20, 3),
                "server_population_state_kib": round(machines * 16 / 2**10, 2),
                "server_poisson_sampling_seconds": round(law.get("sampling_seconds_per_user", 0.0) * n, 3),
            })
    return rows


def sampling_cost() -> float:
    """Seconds per user of the DP sampler (one uniform per user per round: the one O(N) step of a round)."""
    from lore_core.privacy.dp_fedavg import poisson_sample

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(5):
        poisson_sample(10**7, 1e-5, rng)
    return (time.perf_counter() - started) / 5 / 10**7


# --- report -----------------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    rows = sorted(report["populations"].values(), key=lambda r: (-r["dim"], r["users"]))
    lines = ["# lore-fed at scale", "",
             f"Written by `python -m simulations.bench_scale` ({report['machine']}). Synthetic populations (seed 0): N "
             "seen users with 10-20 training pairs, N/10 new users with 10 few-shot pairs, 10 test pairs per user. "
             f"`simulate`: {ROUNDS} rounds, {USERS_PER_ROUND} users per round, rank {RANK}, user-level DP (z 1, "
             "delta by the population); `train`: defaults (rank auto). Memory = peak summed RSS of the command's "
             "whole process tree (Ray included). Times are wall seconds on a shared 2-core machine (other jobs ran "
             "beside it: compare within one invocation).", "",
             "| seen users (+ new) | D | pair file | generation s / GiB | `train` s / GiB | train seen / unseen acc "
             "| `simulate` to round 1 s | s per round (median) | final evaluation s | simulate GiB | nodes "
             "| federated seen / unseen acc | epsilon (delta) | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g, t, s = r["generation"], r.get("train"), r.get("simulate")
        train_cells = (f"{t['seconds']:.0f} / {t['peak_tree_rss_gib']:.2f} | {t['seen_test_acc']:.4f} / "
                       f"{t['unseen_test_acc']:.4f}" if t else "– | –")
        sim_cells = (f"{s['time_to_round_1_seconds']:.1f} | {s['median_round_seconds']:.3f} | "
                     f"{s['final_evaluation_seconds']:.1f} | {s['peak_tree_rss_gib']:.2f} | {s['nodes']} | "
                     f"{s['seen_test_acc']:.4f} / {s['unseen_test_acc']:.4f} | {s['epsilon']:.3f} ({s['delta']:g})"
                     if s else "– | – | – | – | – | – | –")
        reused = "*" if g.get("reused") else ""
        lines.append(f"| {r['seen_users']:,} (+{r['users'] - r['seen_users']:,}) | {r['dim']} | {g['file_mib']:,.0f} "
                     f"MiB | {g['seconds']:.0f} / {g['peak_tree_rss_gib']:.2f}{reused} | {train_cells} | {sim_cells} "
                     f"| {r['run']} |")
    lines += ["", "## Side by side (one invocation)", ""]
    for run, ratio in report["side_by_side"].items():
        small = " and ".join(f"{s:.3f}" for s in ratio["smallest_seconds"])
        lines.append(f"- run {run}: median round at {ratio['largest']:,} users {ratio['largest_seconds']:.3f} s vs "
                     f"{ratio['smallest']:,} users {small} s (before and after it): **ratio {ratio['ratio']:.2f}** "
                     "(target <= 1.5)")
    lines += ["", "## Cost law y = a + b N (N = all users; D = 384 populations)", "",
              "| figure | a | b per user | b x 10^6 | max relative residual |", "|---|---|---|---|---|"]
    for name, fit in report["law"].items():
        if isinstance(fit, dict):
            lines.append(f"| {name} | {fit['a']:.4g} | {fit['b_per_user']:.3g} | {fit['b_per_user'] * 1e6:.4g} | "
                         f"{fit['max_relative_residual']:.2f} |")
    per_user = report["law"]["sampling_seconds_per_user"]
    lines += ["", "b x 10^6: seconds, MiB or GiB per million users. Generation figures marked * are those of the run "
              "that wrote the file (a later run reuses it).", "",
              f"The DP sampler draws one uniform per user per round: {per_user:.2e} s per user, the only O(N) step of "
              f"a training round ({per_user * 1e7:.2f} s at 10^7 users).", "",
              "## Projection: 10^6 and 10^7 users on Flower's Deployment Engine", "",
              "K machines, one SuperNode each hosting N/K users as a virtual node does here (its users' pair shard, "
              "their w, the row offsets); the SuperLink's state store holds one round's messages at a time (Flower "
              "deletes a message once its reply is pulled): a basis (B x D float64) to each node with sampled "
              "users and one update (B x D) per sampled user back; evaluation sends the basis to every node and gets "
              "a few sums back. The server keeps per node a user count (Population), never per user.", "",
              "| users | SuperNodes | users per SuperNode | pairs per SuperNode GiB | w + offsets MiB | final "
              "evaluation per SuperNode (16 cores) s | train round: messages / MiB in the store | evaluation round "
              "MiB | server population state KiB | DP sampling per round s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in report["projection"]:
        lines.append(f"| {p['users']:,} | {p['supernodes']} | {p['users_per_supernode']:,} | {p['supernode_pairs_gib']} "
                     f"| {p['supernode_user_state_mib'] + p['supernode_index_mib']:.1f} | "
                     f"{p['supernode_final_evaluation_seconds_16_cores']} | {p['superlink_train_round_messages']} / "
                     f"{p['superlink_train_round_mib']} | {p['superlink_evaluation_round_mib']} | "
                     f"{p['server_population_state_kib']} | {p['server_poisson_sampling_seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", default="1400,10000,100000", help="seen users per population, comma-separated")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--data", default="runs/bench_scale/data", help="where the pair files go (large)")
    parser.add_argument("--work", default="runs/bench_scale", help="run directories")
    parser.add_argument("--skip-train", action="store_true", help="simulate only (e.g. 10^6 users)")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--report-only", action="store_true", help="rewrite scale.md from scale.json, run nothing")
    args = parser.parse_args(argv)
    data, work, out = Path(args.data), Path(args.work), Path(args.out)
    data.mkdir(parents=True, exist_ok=True)
    report_file = out / "scale.json"
    if args.report_only and not report_file.exists():
        print(f"bench_scale: error: --report-only rewrites scale.md from {report_file}, which does not exist",
              file=sys.stderr)
        return 2
    report = json.loads(report_file.read_text()) if report_file.exists() else {"populations": {}}
    run = time.strftime("%Y-%m-%dT%H:%M")
    populations = [] if args.report_only else sorted(int(n) for n in args.populations.split(","))
    for seen in populations:
        path, generation = generate(seen, args.dim, data)
        row = {"seen_users": seen, "users": seen + seen // 10, "dim": args.dim, "run": run,
               "cpus": os.cpu_count() or 1, "generation": generation}
        print(f"== {seen} seen users, D = {args.dim}: {generation}", flush=True)
        row["simulate"] = simulate(path, work / f"simulate_{seen}_d{args.dim}")
        print(f"simulate: {row['simulate']}", flush=True)
        if not args.skip_train:
            row["train"] = train(path, work / f"train_{seen}_d{args.dim}")
            print(f"train: {row['train']}", flush=True)
        report["populations"][f"{seen}@{args.dim}"] = row
    if len(populations) > 1:  # the smallest again, after the largest: load drifts on a shared machine
        smallest = report["populations"][f"{populations[0]}@{args.dim}"]
        path, _ = generate(populations[0], args.dim, data)
        smallest["simulate_again"] = simulate(path, work / f"simulate_{populations[0]}_d{args.dim}")
        print(f"simulate again: {smallest['simulate_again']}", flush=True)
    runs: dict[str, list[dict]] = {}
    for row in report["populations"].values():
        runs.setdefault(row["run"], []).append(row)
    report["side_by_side"] = {}
    for name, rows in runs.items():
        rows = sorted(rows, key=lambda r: r["users"])
        if len(rows) > 1:
            small = [rows[0][key]["median_round_seconds"] for key in ("simulate", "simulate_again") if key in rows[0]]
            large = rows[-1]["simulate"]["median_round_seconds"]
            report["side_by_side"][name] = {
                "smallest": rows[0]["seen_users"], "largest": rows[-1]["seen_users"], "smallest_seconds": small,
                "largest_seconds": large, "ratio": round(large / float(np.mean(small)), 3)}
    full_d = [r for r in report["populations"].values() if r["dim"] == 384]
    report["law"] = {**cost_law(full_d), "sampling_seconds_per_user": report.get("law", {}).get(
        "sampling_seconds_per_user") if args.report_only else sampling_cost()}
    # The projection extrapolates the D = 384 runs; a folder with only other widths has none (not a stale one).
    report["projection"] = projection(max(full_d, key=lambda r: r["users"]), report["law"]) if full_d else []
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    out.mkdir(parents=True, exist_ok=True)
    report_file.write_text(json.dumps(report, indent=2) + "\n")
    (out / "scale.md").write_text(markdown(report))
    print(f"wrote {report_file} and {out / 'scale.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
