"""Choose the DP run's server lr schedule and initial basis scale on pilot populations (never on reported ones).

    python -m simulations.choose_dp_defaults [--seeds 101,102,103] [--population iso-5-15-1400]
                                             [--work runs/bench_matrix] [--out bench_results]

The matrix's federated defaults (`simulations.choose_federated_defaults`: cosine lr, initial scale 5) were chosen
without privacy. Under user-level DP each step carries noise, so they are checked again here: user-level DP at
epsilon 3 (delta 1e-5), 200 rounds of 100 users (the README's recipe for populations of about 1,400), the default
DP server lr, on pilot seeds of a population of the stress matrix with N >= 1,000 seen users, at the rank, l2 and
personal prior `lore-fed train` chose on the first pilot seed; in-process rounds with the apps' code
(`simulations.bench_privacy.run_in_process`). The tail average of the released bases is reported in every
variant. Writes bench_results/dp_defaults_pilot.{md,json}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text

VARIANTS = (("constant", 1.0), ("cosine", 1.0), ("constant", 5.0), ("cosine", 5.0))
EPSILON, ROUNDS, USERS_PER_ROUND = 3.0, 200, 100


def run_variant(path: Path, chosen: dict, schedule: str | None, init: float | None, seed: int) -> dict:
    from lore_core.pairs import load_pairs
    from simulations.bench_privacy import run_in_process
    from simulations.flower_run import nodes_for

    overrides = {"num-server-rounds": ROUNDS, "clients-per-round": USERS_PER_ROUND, "rank": chosen["rank"],
                 "l2": chosen["l2"], "prior-pairs": chosen["prior_pairs"], "seed": seed, "eval-every": 0,
                 "run-dir": "unused", "privacy-mode": "user" if schedule else "none"}
    if schedule:
        overrides.update({"server-lr-schedule": schedule, "init-scale": init, "target-epsilon": EPSILON,
                          "delta": 1e-5})
    result = run_in_process(path, overrides, nodes_for(int(np.unique(load_pairs(path).user).size)))
    return {key: result[key] for key in ("seen_test_acc", "unseen_test_acc") if key in result} | (
        {"epsilon": result.get("epsilon")} if schedule else {})


def main(argv: list[str] | None = None) -> int:
    from simulations.bench_matrix import POPULATIONS, population_file, run_cell

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="101,102,103")
    parser.add_argument("--population", default="iso-5-15-1400")
    parser.add_argument("--work", default="runs/bench_matrix")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if min(seeds) < 100:
        parser.error("pilot seeds are >= 100: defaults are never chosen on a reported population")
    pop = next(p for p in POPULATIONS if p.name == args.population)
    work = Path(args.work)
    chosen = run_cell(pop, seeds[0], ("train",), work, False)["train"]
    results: dict[str, list[dict]] = {}
    for seed in seeds:
        path, _ = population_file(pop, seed, work, False)
        for name, schedule, init in [("non-private", None, None)] + [(f"{s} / {i:g}", s, i) for s, i in VARIANTS]:
            results.setdefault(name, []).append(run_variant(path, chosen, schedule, init, seed))
            print(f"seed {seed} {name}: {results[name][-1]}", flush=True)
    table = {name: {g: float(np.mean([r[f"{g}_test_acc"] for r in runs])) for g in ("seen", "unseen")}
             for name, runs in results.items()}
    best = max((n for n in table if n != "non-private"), key=lambda n: table[n]["seen"] + table[n]["unseen"])
    report = {"population": pop.name, "seeds": seeds, "chosen_by_train": chosen, "epsilon": EPSILON,
              "rounds": ROUNDS, "users_per_round": USERS_PER_ROUND, "runs": results, "means": table, "best": best}
    out = Path(args.out)
    atomic_write_json(out / "dp_defaults_pilot.json", report)
    lines = ["# DP defaults chosen on pilot populations", "",
             f"`python -m simulations.choose_dp_defaults --seeds {args.seeds} --population {pop.name}`: user-level "
             f"DP at epsilon {EPSILON:g}, {ROUNDS} rounds of {USERS_PER_ROUND} users, the default DP server lr, "
             f"rank {chosen['rank']}, l2 {chosen['l2']:.1e}, prior pairs {chosen['prior_pairs']:g} (what `lore-fed "
             f"train` chose on seed {seeds[0]}); tail-averaged basis. Mean seen / new accuracy over the pilot seeds.",
             "", "| server lr schedule / initial scale | seen | new |", "|---|---|---|"]
    for name, means in table.items():
        mark = " **chosen**" if name == best else ""
        lines.append(f"| {name}{mark} | {means['seen']:.4f} | {means['unseen']:.4f} |")
    atomic_write_text(out / "dp_defaults_pilot.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
