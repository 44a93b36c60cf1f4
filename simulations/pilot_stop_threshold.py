"""Pilot: the device's stop threshold, chosen again on more pilot populations.

    python -m simulations.pilot_stop_threshold [--pilots 101,103,104,105,106] [--checks 0,7,8,9]
        [--out bench_results/stop_threshold_pilot.md]

The stop rule (`client/device/questions.py`, STOP_BITS) stops asking when the best question is expected to teach
less than a threshold. `bench_onboarding --pilot` chose it on two pilots (synthetic seed 101, PRISM-shaped seed 102)
as the largest threshold of STOP_GRID whose accuracy where it stops is within 1 point of the accuracy after 30
answers on both: 0.08 bits. On fresh populations (seeds 7-9, `bench_results/onboarding_fresh_seeds.md`) 0.08
stopped 1.2-1.9 points short, so two pilots were too few. This pilot applies the same rule to more synthetic pilots
shaped as the reported population (`--pilots`, seeds of 100 and more; 101 is the earlier pilot) together with the
PRISM-shaped pilot's committed figures (`bench_results/onboarding_pilot.json`, which the rule read before), and
then reads the `--checks` populations at every threshold: the reported synthetic population (seed 0) and the fresh
seeds, which chose nothing. Each population runs `bench_onboarding`'s protocol for lore-fed's questions only (its
basis trained on the seen users and calibrated on them, 30 questions per new user); per-population figures are
cached beside its data (`stop_grid.json`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from client.device import questions
from client.device.user_posterior import DEVICE_PRIOR_PAIRS
from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.basis_file import load_basis
from simulations import bench_onboarding as onboarding
from simulations.onboarding_simulation import MIN_POOL, load_new_users, simulate

PILOT_FIGURES = Path("bench_results/onboarding_pilot.json")  # the PRISM-shaped pilot's stop grid (seed 102)
TOLERANCE = 0.01  # the rule's promise: at most 1 point below 30 answers


def population_dir(seed: int) -> str:
    """Where a synthetic population of `seed` lives: the reported one, the earlier pilot, a fresh seed, or new."""
    known = {0: onboarding.POPULATIONS["synthetic"]["dir"], 101: onboarding.PILOTS["synthetic"]["dir"]}
    return known.get(seed, f"runs/onboarding/fresh_seed{seed}" if seed < 100 else f"runs/onboarding/pilot_seed{seed}")


def stop_grid(seed: int) -> dict[str, dict]:
    """{threshold: the stop rule's figures} along lore-fed's questions on the synthetic population of `seed`."""
    spec = {"dir": population_dir(seed), "synthetic": {**onboarding.POPULATIONS["synthetic"]["synthetic"],
                                                      "seed": seed}}
    directory, basis = onboarding.ensure_population(f"synthetic seed {seed}", spec)
    cache = directory / "stop_grid.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    calibrated = basis.with_name("basis_calibrated.npz")
    if not calibrated.is_file():
        calibrated, _ = onboarding.calibrated_basis(directory, basis, DEVICE_PRIOR_PAIRS)
    users, _ = load_new_users(directory / "pairs.npz", load_basis(calibrated).basis.astype(np.float64), MIN_POOL)
    run = simulate(users, "lore", seed=0, prior_pairs=DEVICE_PRIOR_PAIRS)
    grid = {str(bits): onboarding.stop_rule_figures(run, bits) for bits in onboarding.STOP_GRID}
    atomic_write_json(cache, grid)
    return grid


def short_of_30(figures: dict) -> float:
    return figures["accuracy_at_30"] - figures["accuracy_at_stop"]


def choose(pilots: dict[str, dict]) -> float:
    """The largest threshold whose accuracy at the stop is within TOLERANCE of 30 answers on every pilot."""
    ok = [float(bits) for bits in next(iter(pilots.values()))
          if all(short_of_30(grid[bits]) <= TOLERANCE + 1e-12 for grid in pilots.values())]
    return max(ok) if ok else min(onboarding.STOP_GRID)


def markdown(pilots: dict, checks: dict, chosen: float, command: str) -> str:
    def row(name: str, grid: dict) -> str:
        return f"| {name} | " + " | ".join(
            f"{grid[b]['median_questions']:g} q, {100 * short_of_30(grid[b]):+.1f}".replace("+-", "-")
            for b in map(str, onboarding.STOP_GRID)) + " |"

    head = "| population | " + " | ".join(
        f"{b}{' **chosen**' if b == chosen else ''}" for b in onboarding.STOP_GRID) + " |"
    rule = "|---|" + "---|" * len(onboarding.STOP_GRID)
    lines = [f"# The device's stop threshold on more pilots (`{command}`)", "",
             "Each cell: the median questions asked before the stop rule fires (30 when it does not) and the points "
             "of mean test accuracy lost there against 30 answers, along lore-fed's questions (calibrated basis, the "
             f"device prior of {DEVICE_PRIOR_PAIRS:g} answer). The rule keeps the largest threshold losing at most "
             f"{100 * TOLERANCE:g} point on every pilot; the checks chose nothing.", "", "Pilots:", "", head, rule]
    lines += [row(name, grid) for name, grid in pilots.items()]
    lines += ["", "Checks:", "", head, rule] + [row(name, grid) for name, grid in checks.items()]
    lines += ["", f"Chosen: {chosen:g} bits (the default was {questions.STOP_BITS:g} when this ran)."]
    if checks:
        worst = max(short_of_30(grid[str(chosen)]) for grid in checks.values())
        lines[-1] += f" At it the checks lose at most {100 * worst:.1f} points against 30 answers."
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pilots", default="101,103,104,105,106", help="synthetic pilot seeds (100 and more)")
    parser.add_argument("--checks", default="0,7,8,9", help="synthetic seeds read at every threshold, never chosen on")
    parser.add_argument("--out", default="bench_results/stop_threshold_pilot.md")
    args = parser.parse_args(argv)
    pilot_seeds = [int(s) for s in args.pilots.split(",")]
    if any(s < 100 for s in pilot_seeds):
        parser.error("--pilots: seeds of 100 and more only (the reported and fresh seeds are below 100)")
    pilots = {f"synthetic seed {s}": stop_grid(s) for s in pilot_seeds}
    committed = json.loads(PILOT_FIGURES.read_text())["stop_grid"]
    pilots["PRISM-shaped seed 102 (committed)"] = {bits: by["prism"] for bits, by in committed.items()}
    chosen = choose(pilots)
    checks = {f"synthetic seed {s}": stop_grid(int(s)) for s in args.checks.split(",") if s}
    command = "python -m simulations.pilot_stop_threshold" + (
        f" --pilots {args.pilots}" if args.pilots != "101,103,104,105,106" else "") + (
        f" --checks {args.checks}" if args.checks != "0,7,8,9" else "")
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"tolerance": TOLERANCE, "chosen": chosen, "pilots": pilots,
                                                 "checks": checks})
    text = markdown(pilots, checks, chosen, command)
    atomic_write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
