"""Choose the non-private federated defaults (server lr, initial basis scale) on pilot populations.

    python -m simulations.choose_federated_defaults [--populations NAME,...] [--seed 101] [--lrs 0.2,0.5,1,2]
                                                     [--inits 1,5,20] [--work runs/bench_matrix]

A federated run should reach what `lore-fed train` reaches on the same pairs. For each pilot population of the stress
matrix (`simulations.bench_matrix`, pilot seed: never a reported one) the centralized run's rank, l2 and personal
prior are taken from the matrix cache (computed there if missing); then the federated round runs in one process
(`simulations.bench_privacy.run_in_process`: the ClientApp's training functions, the ServerApp's aggregator and
optimizer, privacy `none`, the matrix's rounds and users per round: `simulate`'s defaults, every seen user since
lore-fed 0.2.5, a fifth of them before) for every (server lr, init scale) of the grid. Each population's rounds and
users per round are recorded beside its row (`settings`; rows saved before they were recorded ran 600 rounds of a
fifth of the seen users).
The choice maximises the mean over populations of the federated minus centralized accuracy (mean of seen and new),
but the current default is kept unless the best beats it by more than CHANGE_MARGIN; the table shows the worst
population too. `--populations none` only re-renders the table from the saved json (give the --lrs and --inits
it ran). Writes bench_results/federated_pilot.{md,json}.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from server.optimizer import DEFAULT_INIT_SCALE, DEFAULT_SERVER_LR

PILOTS = ("iso-20-40", "aniso-20-40", "iso-150-250", "iso-shared", "iso-5-15-1400", "prism-synth")
CHANGE_MARGIN = 0.001  # score (accuracy) a setting must gain over the current default to replace it
# what a row saved before its settings were recorded ran (the matrix's federated row before lore-fed 0.2.5)
BEFORE_0_2_5 = {"rounds": 600, "clients_per_round": "a fifth of the seen users"}


def federated_gap(path: Path, train: dict, fed: dict, lr: float, init: float) -> dict:
    from lore_core.pairs import load_pairs
    from simulations.bench_privacy import run_in_process
    from lore_cli.simulate_command import configure, run_overrides
    from simulations.bench_matrix import objective_flags
    from simulations.flower_run import nodes_for

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args([str(path), "--rounds", str(fed["rounds"]), "--clients-per-round",
                              str(fed["clients_per_round"]), "--rank", str(train["rank"]), "--l2", str(train["l2"]),
                              "--prior-pairs", str(train["prior_pairs"]), "--out", "unused", "--privacy", "none",
                              "--server-lr", str(lr), *objective_flags(train, ["--privacy", "none"])])
    pairs = load_pairs(path)
    seen = int(np.unique(pairs.user[pairs.seen]).size)
    seen_train = int((pairs.seen & (pairs.split == "train")).sum())
    overrides = {**run_overrides(args, seen, seen_train), "init-scale": init, "eval-every": 0, "run-dir": "unused"}
    result = run_in_process(path, overrides, nodes_for(int(np.unique(pairs.user).size)))
    return {"seen": result["seen_test_acc"] - train["seen_test_acc"],
            "unseen": result["unseen_test_acc"] - train["unseen_test_acc"]}


def plan_text(fed: dict) -> str:
    return f"{fed['rounds']} x {fed['clients_per_round']}"


def main(argv: list[str] | None = None) -> int:
    from lore_core.pairs import load_pairs
    from simulations.bench_matrix import POPULATIONS, federated_settings, population_file, run_cell

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", default=",".join(PILOTS))
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--lrs", default="0.5,1")
    parser.add_argument("--inits", default="1,5,20")
    parser.add_argument("--work", default="runs/bench_matrix")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    if args.seed < 100:
        parser.error("pilot seeds are >= 100: defaults are never chosen on a reported population")
    grid = list(itertools.product([float(v) for v in args.lrs.split(",")], [float(v) for v in args.inits.split(",")]))
    work, table, settings = Path(args.work), {}, {}
    for pop in (p for p in POPULATIONS if p.name in args.populations.split(",")):
        cell = run_cell(pop, args.seed, ("train",), work, quick=False)
        path, _ = population_file(pop, args.seed, work, quick=False)
        n_seen = int(np.unique(load_pairs(path).select(seen=True, split="train").user).size)
        fed = federated_settings(pop, n_seen, quick=False)
        table[pop.name], settings[pop.name] = {}, fed
        for lr, init in grid:
            gap = federated_gap(path, cell["train"], fed, lr, init)
            table[pop.name][f"{lr:g}/{init:g}"] = gap
            print(f"{pop.name} lr {lr:g} init {init:g}: federated - centralized {gap['seen']:+.4f} / "
                  f"{gap['unseen']:+.4f}", flush=True)
    out = Path(args.out)
    previous = out / "federated_pilot.json"
    if previous.exists():  # a run over some populations replaces their rows and keeps the others
        saved = json.loads(previous.read_text())
        table = {**{k: v for k, v in saved["table"].items() if k not in table}, **table}
        settings = {**{k: v for k, v in saved.get("settings", {}).items() if k not in settings}, **settings}
    settings = {k: settings.get(k, BEFORE_0_2_5) for k in table}
    keys = [f"{lr:g}/{init:g}" for lr, init in grid]
    mean = {k: float(np.mean([(t[k]["seen"] + t[k]["unseen"]) / 2 for t in table.values()])) for k in keys}
    worst = {k: float(min(min(t[k]["seen"], t[k]["unseen"]) for t in table.values())) for k in keys}
    incumbent = f"{DEFAULT_SERVER_LR['none']:g}/{DEFAULT_INIT_SCALE['none']:g}"
    best = max(keys, key=mean.get)
    if incumbent in mean and mean[best] - mean[incumbent] <= CHANGE_MARGIN:
        best = incumbent  # a default changes only for a gain beyond noise
    lines = ["# Federated defaults chosen on pilot populations", "",
             f"`python -m simulations.choose_federated_defaults --seed {args.seed} --populations {args.populations} "
             f"--lrs {args.lrs} --inits {args.inits}`: federated (privacy none, "
             "in-process, the matrix's rounds and users per round, the centralized run's rank, l2, personal "
             f"prior and objective) minus centralized accuracy on the pilot populations (seed {args.seed}) of "
             "`simulations.bench_matrix`. Score: mean over populations of the mean of seen and new. The current "
             f"default ({incumbent}) is kept unless another setting scores more than {100 * CHANGE_MARGIN:g} "
             "points better.", "",
             "Rounds x users per round: " + "; ".join(
                 f"{plan} ({', '.join(k for k in settings if plan_text(settings[k]) == plan)})"
                 for plan in dict.fromkeys(map(plan_text, settings.values()))) + ".", "",
             "| server lr / init scale | score | worst | " +
             " | ".join(table) + " |", "|---|---|---|" + "---|" * len(table)]
    for k in keys:
        cells = " | ".join(f"{t[k]['seen']:+.3f} / {t[k]['unseen']:+.3f}" for t in table.values())
        lines.append(f"| {k}{' **chosen**' if k == best else ''} | {mean[k]:+.4f} | {worst[k]:+.3f} | {cells} |")
    atomic_write_json(out / "federated_pilot.json", {"seed": args.seed, "table": table, "score": mean,
                                                     "worst": worst, "chosen": best, "settings": settings})
    atomic_write_text(out / "federated_pilot.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
