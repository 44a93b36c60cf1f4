"""Choose the DP run's server lr schedule, initial basis scale and clients' training prior on pilot populations
(never on reported ones).

    python -m simulations.choose_dp_defaults [--seeds 101,102,103] [--population iso-5-15-1400]
                                             [--work runs/bench_matrix] [--out bench_results] [--train-prior]

The matrix's federated defaults (`simulations.choose_federated_defaults`: cosine lr, initial scale 5) were chosen
without privacy. Under user-level DP each step carries noise, so they are checked again here: user-level DP at
epsilon 3 (delta 1e-5), 200 rounds of 100 users (the README's recipe for populations of about 1,400), the default
DP server lr, on pilot seeds of a population of the stress matrix with N >= 1,000 seen users, at the rank, l2 and
personal prior `lore-fed train` chose on the first pilot seed; in-process rounds with the apps' code
(`simulations.bench_privacy.run_in_process`). The tail average of the released bases is reported in every
variant. Writes bench_results/dp_defaults_pilot.{md,json}.

`--train-prior`: the prior of the clients' w fits inside training (`train-prior-pairs`, in pairs) under DP, on two
pilots of 1,400 thin users (the matrix's isotropic iso-5-15-1400 and an anisotropic one shaped like
`simulations.bench_scale`'s populations: true rank 5, 10-20 pairs), each seed 101, in two regimes: the recipe above
(at the rank, l2 and prior `train` chose; for the anisotropic pilot the `simulate` defaults, personal prior 3) and 20 rounds at z = 1
(`bench_scale`'s). Writes bench_results/dp_train_prior_pilot.{md,json}.

`--personal-prior`: the personal prior of every user's final w fit (`prior-pairs`) on a DP basis, on pilots of the
matrix's DP populations (iso-5-15-1400 seeds 101-103, prism-synth seed 101) and a thick one (bench_privacy's
shape: 1,400 users x 30-50 pairs, seed 101, at simulate's rank 5): the recipe above at the rank and l2 `train`
chose on each pilot, the released tail-averaged basis evaluated with each prior of PERSONAL_PRIORS (post-processing:
one DP run per pilot, so the priors are compared on the same basis; one DP draw per pilot). Writes bench_results/dp_personal_prior_pilot.{md,json}.
"""

from __future__ import annotations

import argparse
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


TRAIN_PRIORS = (0.3, 1.0, 3.0)


def _pilot_file(work: Path, name: str, config) -> Path:
    """WORK/data/NAME/seedS/pairs.npz of a pilot outside the matrix, generated once from `config`."""
    from lore_core.pairs import PAIRS_FILENAME, save_pairs
    from simulations.synthetic_pairs import make_synthetic_pairs

    path = work / "data" / name / f"seed{config.seed}" / PAIRS_FILENAME
    if not path.exists():
        save_pairs(make_synthetic_pairs(config)[0], path)
    return path


def train_prior_pilot(work: Path, out: Path) -> None:
    from lore_core.pairs import PAIRS_FILENAME, load_pairs
    from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS
    from simulations.bench_matrix import POPULATIONS, run_cell
    from simulations.bench_privacy import run_in_process
    from simulations.flower_run import nodes_for
    from simulations.synthetic_pairs import SyntheticPairsConfig

    iso = next(p for p in POPULATIONS if p.name == "iso-5-15-1400")
    iso_train = run_cell(iso, 101, ("train",), work, False)["train"]
    aniso_path = _pilot_file(work, "aniso-10-20-1400", SyntheticPairsConfig(
        seen_users=1400, unseen_users=140, train_pairs=(10, 20), few_shot_pairs=10, test_pairs=10, seed=101))
    pilots = {"iso-5-15-1400": (work / "data" / iso.name / "seed101" / PAIRS_FILENAME,
                                {k: iso_train[k] for k in ("rank", "l2")} | {"prior-pairs": iso_train["prior_pairs"]}),
              "aniso-10-20-1400": (aniso_path, {"rank": 5, "prior-pairs": DEFAULT_PRIOR_PAIRS})}
    regimes = {"200 rounds, epsilon 3": {"num-server-rounds": ROUNDS, "target-epsilon": EPSILON},
               "20 rounds, z 1": {"num-server-rounds": 20, "noise-multiplier": 1.0}}
    rows = {}
    for pilot, (path, settings) in pilots.items():
        nodes = nodes_for(int(np.unique(load_pairs(path).user).size))
        for regime, schedule in regimes.items():
            for prior in TRAIN_PRIORS:
                result = run_in_process(path, {"clients-per-round": USERS_PER_ROUND, "seed": 0, "eval-every": 0,
                                               "run-dir": "unused", "privacy-mode": "user", "delta": 1e-5,
                                               "train-prior-pairs": prior, **settings, **schedule}, nodes)
                rows.setdefault(prior, {})[f"{pilot}, {regime}"] = [result["seen_test_acc"],
                                                                    result["unseen_test_acc"]]
                print(f"{pilot}, {regime}, train prior {prior:g}: {rows[prior][f'{pilot}, {regime}']}", flush=True)
    score = {prior: float(np.mean([np.mean(v) for v in cells.values()])) for prior, cells in rows.items()}
    best = max(score, key=score.get)
    atomic_write_json(out / "dp_train_prior_pilot.json", {"rows": {str(k): v for k, v in rows.items()},
                                                          "score": {str(k): v for k, v in score.items()},
                                                          "best": best})
    columns = list(next(iter(rows.values())))
    lines = ["# DP: the clients' training prior chosen on pilot populations", "",
             "`python -m simulations.choose_dp_defaults --train-prior`: user-level DP, 100 users per round, seed 0 of "
             "the sampler; pilots seed 101. Seen / new accuracy; score = mean over the cells.", "",
             "| train prior (pairs) | score | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for prior, cells in rows.items():
        mark = " **chosen**" if prior == best else ""
        lines.append(f"| {prior:g}{mark} | {score[prior]:.4f} | " +
                     " | ".join(f"{cells[c][0]:.4f} / {cells[c][1]:.4f}" for c in columns) + " |")
    atomic_write_text(out / "dp_train_prior_pilot.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


PERSONAL_PRIORS = (1.0, 3.0, 10.0, 30.0, 100.0)
PERSONAL_PRIOR_PILOTS = (("iso-5-15-1400", 101), ("iso-5-15-1400", 102), ("iso-5-15-1400", 103), ("prism-synth", 101),
                         ("thick-1400", 101))  # thick-1400: bench_privacy's shape (1,400 users x 30-50 pairs)


def _personal_prior_population(name: str, seed: int, work: Path) -> tuple[Path, dict]:
    """A pilot's pair file and the rank and l2 of its DP run: what `train` chose (matrix populations) or, for the
    thick pilot (bench_privacy's population shape, anisotropic, true rank 5), simulate's defaults at rank 5."""
    from lore_core.reward_math import DEFAULT_L2
    from simulations.bench_matrix import POPULATIONS, population_file, run_cell
    from simulations.synthetic_pairs import SyntheticPairsConfig

    if name == "thick-1400":
        path = _pilot_file(work, name, SyntheticPairsConfig(seen_users=1400, unseen_users=100, seed=seed))
        return path, {"rank": 5, "l2": DEFAULT_L2, "prior_pairs": None}
    pop = next(p for p in POPULATIONS if p.name == name)
    path, _ = population_file(pop, seed, work, False)
    chosen = run_cell(pop, seed, ("train",), work, False)["train"]
    return path, {k: chosen[k] for k in ("rank", "l2", "prior_pairs")}


def personal_prior_pilot(work: Path, out: Path) -> None:
    from lore_core.pairs import load_pairs
    from simulations.bench_privacy import run_in_process
    from simulations.flower_run import nodes_for

    cells = {}
    for name, seed in PERSONAL_PRIOR_PILOTS:
        path, chosen = _personal_prior_population(name, seed, work)
        nodes = nodes_for(int(np.unique(load_pairs(path).user).size))
        result = run_in_process(path, {"num-server-rounds": ROUNDS, "clients-per-round": USERS_PER_ROUND,
                                       "rank": chosen["rank"], "l2": chosen["l2"], "seed": seed, "eval-every": 0,
                                       "run-dir": "unused", "privacy-mode": "user", "target-epsilon": EPSILON,
                                       "delta": 1e-5}, nodes, prior_pairs_grid=PERSONAL_PRIORS)
        cells[f"{name} seed {seed}"] = {"rank": chosen["rank"], "train_prior_pairs": chosen["prior_pairs"],
                                        "epsilon": result["epsilon"],
                                        **{f"{p:g}": result["by_prior_pairs"][str(p)] for p in PERSONAL_PRIORS}}
        print(name, seed, cells[f"{name} seed {seed}"], flush=True)
    score = {p: float(np.mean([np.mean(c[f"{p:g}"]) for c in cells.values()])) for p in PERSONAL_PRIORS}
    best = max(score, key=score.get)
    atomic_write_json(out / "dp_personal_prior_pilot.json", {"cells": cells, "score": {f"{k:g}": v for k, v in
                                                                                      score.items()}, "best": best})
    lines = ["# DP: the personal prior of users' final w fit on a DP basis, chosen on pilot populations", "",
             f"`python -m simulations.choose_dp_defaults --personal-prior`: user-level DP at epsilon {EPSILON:g}, "
             f"{ROUNDS} rounds of {USERS_PER_ROUND} users, at the rank and l2 `lore-fed train` chose on each pilot; "
             "the released tail-averaged basis evaluated with each personal prior (post-processing). Seen / new "
             "accuracy; score = mean over pilots of the mean of seen and new.", "",
             "| personal prior (pairs) | score | " + " | ".join(cells) + " |", "|---" * (len(cells) + 2) + "|"]
    for p in PERSONAL_PRIORS:
        mark = " **chosen**" if p == best else ""
        lines.append(f"| {p:g}{mark} | {score[p]:.4f} | " + " | ".join(
            f"{c[f'{p:g}'][0]:.4f} / {c[f'{p:g}'][1]:.4f}" for c in cells.values()) + " |")
    lines += ["", "Rank of each DP run and the prior `train` chose without privacy: " + "; ".join(
        f"{k}: rank {c['rank']}, prior " + ("-" if c["train_prior_pairs"] is None else f"{c['train_prior_pairs']:g}")
        for k, c in cells.items()) + " (thick-1400: 1,400 users x 30-50 pairs, bench_privacy's shape, at "
        "simulate's rank 5, l2 default)."]
    atomic_write_text(out / "dp_personal_prior_pilot.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    from simulations.bench_matrix import POPULATIONS, population_file, run_cell

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="101,102,103")
    parser.add_argument("--population", default="iso-5-15-1400")
    parser.add_argument("--work", default="runs/bench_matrix")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--train-prior", action="store_true", help="the clients' training prior under DP instead")
    parser.add_argument("--personal-prior", action="store_true",
                        help="the personal prior of users' final w fit on a DP basis instead")
    args = parser.parse_args(argv)
    if args.personal_prior:
        personal_prior_pilot(Path(args.work), Path(args.out))
        return 0
    if args.train_prior:
        train_prior_pilot(Path(args.work), Path(args.out))
        return 0
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
