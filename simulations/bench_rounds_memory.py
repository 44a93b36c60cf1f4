"""Does a federated run's memory follow the work of a round, whatever the number of rounds?

    python -m simulations.bench_rounds_memory [--rounds 20,150] [--users 300] [--out bench_results]

One synthetic population (`simulations.synthetic_pairs`: `--users` seen users with 20-40 training pairs, D = 384,
seed 0) runs `lore-fed simulate --privacy none` with every seen user in every round at each `--rounds` value, three
ways, each in a process of its own whose tree's peak RSS is sampled (`bench_federated.TreeMemory`, Ray's workers
included):
- `engine`: the product's route, Flower's simulation engine (`lore-fed simulate`);
- `in-process`: the benchmarks' route (`bench_matrix.simulate_row`: the real ServerApp and ClientApp on
  `simulations.in_process_grid.LocalGrid`, which keeps no messages since bbd1252);
- `in-process, messages kept`: the same grid keeping every message sent and received, as it did for every
  benchmark before bbd1252 (and still does for tests, which inspect them).
The engine arm takes `simulate`'s defaults at rank 4; the in-process arms set l2 1e-5, a personal prior of 3 pairs,
the joint objective and pair weighting (what a matrix row passes): the same work a round for memory's purpose. A
run whose memory follows its round reads the same peak at every `--rounds` value. Writes
`bench_results/rounds_memory.{md,json}` (with the machine's CPU count: the engine's Ray workers follow it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from simulations.bench_scale import GIB, measure

CHOICE = {"rank": 4, "l2": 1e-5, "prior_pairs": 3.0, "objective": "joint", "weight_by": "pair"}


ARMS = ("engine", "in-process", "in-process, messages kept")


def in_process_child(pairs: str, rounds: int, users: int, run_dir: str, keep: bool) -> None:
    """The child process of an in-process arm: one `bench_matrix.simulate_row` run."""
    from simulations.bench_matrix import simulate_row

    simulate_row(Path(pairs), Path(run_dir), CHOICE, {"rounds": rounds, "clients_per_round": users},
                 ["--privacy", "none"], keep_messages=keep)


def arm_command(arm: str, pairs: Path, rounds: int, users: int, run_dir: Path) -> list[str]:
    if arm == "engine":
        return [sys.executable, "-m", "lore_cli.main", "simulate", str(pairs), "--out", str(run_dir), "--rounds",
                str(rounds), "--clients-per-round", str(users), "--rank", str(CHOICE["rank"]), "--privacy", "none"]
    return [sys.executable, "-m", "simulations.bench_rounds_memory", "--child", str(pairs), str(rounds), str(users),
            str(run_dir), "keep" if arm == ARMS[2] else "drop"]


def markdown(result: dict) -> str:
    rounds = result["rounds"]
    lines = [f"# Peak memory against the number of rounds (`python -m simulations.bench_rounds_memory --rounds "
             f"{','.join(map(str, rounds))} --users {result['users']}`)", "",
             f"`lore-fed simulate --privacy none`, {result['users']} seen users (20-40 training pairs, D = 384), every "
             "seen user in every round; peak RSS of the run's process tree (GiB) and wall seconds. `engine`: "
             f"Flower's simulation engine (the product); `in-process`: the benchmarks' in-process grid, without and "
             f"with every message kept; {result['cpus']} CPUs.", "",
             "| route | " + " | ".join(f"{r} rounds: GiB / s" for r in rounds) + " | peak ratio, last / first |",
             "|---|" + "---|" * (len(rounds) + 1)]
    for arm, runs in result["arms"].items():
        cells = " | ".join(f"{runs[str(r)]['peak_tree_rss_gib']:.3f} / {runs[str(r)]['seconds']:.0f}" for r in rounds)
        ratio = runs[str(rounds[-1])]["peak_tree_rss_gib"] / runs[str(rounds[0])]["peak_tree_rss_gib"]
        lines.append(f"| {arm} | {cells} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        in_process_child(argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5] == "keep")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", default="20,150")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    rounds = [int(r) for r in args.rounds.split(",")]
    result = {"rounds": rounds, "users": args.users, "cpus": os.cpu_count(), "gib": GIB, "arms": {}}
    with tempfile.TemporaryDirectory(prefix="rounds_memory_") as tmp:
        pairs = Path(tmp) / "pairs.npz"
        measure([sys.executable, "-m", "simulations.synthetic_pairs", "--seen-users", str(args.users), "--dim", "384",
                 "--train-pairs", "20-40", "--seed", "0", "--out", str(pairs)])
        for index, arm in enumerate(ARMS):
            result["arms"][arm] = {}
            for r in rounds:
                run_dir = Path(tmp) / f"{index}_{r}"  # a fresh directory in a fresh temporary one
                result["arms"][arm][str(r)] = measure(arm_command(arm, pairs, r, args.users, run_dir))
                print(arm, r, result["arms"][arm][str(r)], flush=True)
    out = Path(args.out)
    atomic_write_json(out / "rounds_memory.json", result)
    atomic_write_text(out / "rounds_memory.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
