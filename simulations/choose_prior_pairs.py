"""Choose the personal prior (`prior-pairs`, lore_core.simplex_fit.DEFAULT_PRIOR_PAIRS) on a public pilot population.

    python -m simulations.choose_prior_pairs PILOT_PAIRS [--grid 0.5,1,2,3,5,8] [--repeats 2]

The prior of every user's final w fit is a hyper-parameter; tuning it on the population a run reports (or protects)
would be selection on private data, which no ledger covers. So it is chosen here, on a pilot population that is
public (for the benchmark: `lore-fed synth --seed 101`, other users, other hidden basis, the benchmark's seed is 1),
with the run's own recipe: a non-private federated run and user-DP runs at z = 1, in-process
(`simulations.bench_privacy.run_in_process`), each final basis evaluated with every prior of the grid. The choice
maximises the mean of seen and unseen accuracy, averaged over the non-private and the DP runs.
Writes bench_results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.pairs import load_pairs, resolve_pair_path
from lore_core.simplex_fit import DEFAULT_PRIOR_STRENGTH
from simulations.bench_privacy import run_in_process
from simulations.flower_run import nodes_for


def _run(job: tuple) -> dict:
    path, overrides, nodes, grid = job
    return run_in_process(Path(path), overrides, nodes, prior_pairs_grid=grid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", help="the public pilot's pair file or dataset directory")
    parser.add_argument("--grid", default="0.5,1,2,3,5,8")
    parser.add_argument("--repeats", type=int, default=2, help="DP runs (fresh noise each)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients-per-round", type=int, default=50)
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--name", default="prior_pairs_pilot")
    parser.add_argument("--work", default="runs/prior_pilot")
    args = parser.parse_args(argv)
    grid = tuple(float(v) for v in args.grid.split(","))
    path = resolve_pair_path(args.pairs)
    nodes = nodes_for(np.unique(load_pairs(path).user).size)
    base = {"num-server-rounds": args.rounds, "clients-per-round": args.clients_per_round, "rank": args.rank,
            "seed": 0, "eval-every": 0, "prior-strength": DEFAULT_PRIOR_STRENGTH, "run-dir": args.work}
    jobs = [(str(path), {**base, "privacy-mode": "none"}, nodes, grid)]
    jobs += [(str(path), {**base, "privacy-mode": "user", "noise-multiplier": args.noise_multiplier,
                          "delta": 1e-5}, nodes, grid)] * args.repeats
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = list(pool.map(_run, jobs))
    table = {c: {"none": runs[0]["by_prior_pairs"][str(c)],
                 "user": np.mean([r["by_prior_pairs"][str(c)] for r in runs[1:]], axis=0).tolist()} for c in grid}
    score = {c: float(np.mean([np.mean(v["none"]), np.mean(v["user"])])) for c, v in table.items()}
    best = max(score, key=score.get)
    lines = [f"# Personal prior on the pilot {path}: {args.rounds} rounds, {args.clients_per_round} users/round, "
             f"rank {args.rank}; user DP z={args.noise_multiplier} (epsilon {runs[1].get('epsilon_prv', 0):.2f}), "
             f"{args.repeats} runs", "",
             "| prior pairs | non-private seen / unseen | user DP seen / unseen (mean) | score |", "|---|---|---|---|"]
    for c in grid:
        mark = " **chosen**" if c == best else ""
        lines.append(f"| {c:g}{mark} | {table[c]['none'][0]:.4f} / {table[c]['none'][1]:.4f} | "
                     f"{table[c]['user'][0]:.4f} / {table[c]['user'][1]:.4f} | {score[c]:.4f} |")
    out = Path(args.out)
    atomic_write_json(out / f"{args.name}.json", {"pairs": str(path), "grid": grid, "table": {str(c): v for c, v
                      in table.items()}, "score": {str(c): v for c, v in score.items()}, "chosen": best,
                      "config": vars(args)})
    atomic_write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
