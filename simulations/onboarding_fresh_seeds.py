"""The onboarding benchmark on fresh synthetic populations: do its reported figures hold beyond seed 0?

    python -m simulations.onboarding_fresh_seeds [--seeds 7,8,9] [--out bench_results/onboarding_fresh_seeds.md]

A tester ran `bench_onboarding`'s protocol on a population of its own (seed 7) and found lore-fed's question choice
level with the PReF-style one (3 questions to 95 % each), where the reported populations read 2 against 3 and 3
against 4, and the stop rule 1.4 points short of 30 answers. This script runs the same protocol
(`bench_onboarding.bench_population`: the basis trained by `lore-fed train` on the seen users and calibrated on
them, 30 questions per method) on synthetic populations shaped as the reported one (300 seen and 250 new users, 60
pool and 40 test pairs each) at other seeds, and tabulates what the README reports per population. It chooses
nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from client.device.user_posterior import DEVICE_PRIOR_PAIRS
from simulations import bench_onboarding as onboarding

METHODS = {"random": "random", "uncertainty": "PReF-style", "lore": "lore-fed"}


def run_seed(seed: int) -> dict:
    spec = {"dir": f"runs/onboarding/fresh_seed{seed}", "synthetic": {
        **onboarding.POPULATIONS["synthetic"]["synthetic"], "seed": seed}}
    directory, basis = onboarding.ensure_population(f"synthetic seed {seed}", spec)
    calibrated, _ = onboarding.calibrated_basis(directory, basis, DEVICE_PRIOR_PAIRS)
    figures, _, _ = onboarding.bench_population(directory, calibrated, seed=0)
    figures.pop("pairs", None)
    return figures


def markdown(results: dict[int, dict], command: str) -> str:
    lines = [f"# Onboarding on fresh synthetic populations (`{command}`)", "",
             "`bench_onboarding`'s protocol on populations shaped as its reported synthetic one (300 seen and 250 new "
             "users; 60 pool and 40 test pairs) at other seeds. Questions to 95 %: the median over bootstrap "
             "resamples of the users (90 % interval); ECE pooled over 0-30 answers; coverage of the 90 % region of "
             "`w` after answers; the stop rule's median questions and accuracy against 30 answers.", "",
             "| seed | " + " | ".join(f"questions to 95 %: {label}" for label in METHODS.values())
             + " | ECE | coverage | stop rule |", "|---|---|---|---|---|---|---|"]
    for seed, res in results.items():
        q, interval = res["questions_to_95"], res.get("questions_to_95_interval_90", {})
        cells = [f"{q[m]:g}" + (f" ({interval[m][0]:g}-{interval[m][1]:g})" if m in interval else "")
                 for m in METHODS]
        stop = res["stop_rule"]
        lines.append(f"| {seed} | " + " | ".join(cells) + f" | {res['ece']:.3f} | "
                     f"{res['coverage_90']['after_answers']:.3f} | {stop['median_questions']:g} questions, "
                     f"{stop['accuracy_at_stop']:.3f} against {stop['accuracy_at_30']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="7,8,9")
    parser.add_argument("--out", default="bench_results/onboarding_fresh_seeds.md")
    args = parser.parse_args(argv)
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        results[seed] = run_seed(seed)
        print(seed, results[seed]["questions_to_95"], flush=True)
    command = "python -m simulations.onboarding_fresh_seeds" + (
        "" if args.seeds == "7,8,9" else f" --seeds {args.seeds}")
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {str(k): v for k, v in results.items()})
    text = markdown(results, command)
    atomic_write_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
