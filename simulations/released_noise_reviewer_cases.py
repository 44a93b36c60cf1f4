"""The released-noise check (lore_core/audits/released_noise.py) on a reviewer's cases for its characteristic
function: a false alarm it had, two things it cannot see, and a false alarm of an older check.

    python -m simulations.released_noise_reviewer_cases [--draws 10] [--seed 0]

Cases (noise std 1 claimed 1):
- honest, 55 drift directions just above the pure-noise edge (210 x 210, each of energy 4.4-6.4 x sqrt(R d)): the
  directions the data chose absorb more noise than their leverage says (the check takes it off);
- users pulling back against the noise accumulated so far (S_t = n_t - h e_t, e <- e + S_t, in every direction):
  honest, but the sum of the releases is then the model's error and carries little noise;
- noise part Gaussian, part random signs (sqrt(0.55) N(0, 1) +- sqrt(0.45); std 1 per entry) under 4 or 8 drift
  directions three times the noise: its privacy is a Gaussian's of about 0.75 of the claim;
- noise in a random share of the entries (the variance kept) with canary directions given, which take most of the
  noise (the canary audit's path).
Writes bench_results/released_noise_reviewer_cases.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lore_core.audits.released_noise import released_noise_check
from simulations.bench_output import write_outputs

OUT = Path(__file__).resolve().parents[1] / "bench_results" / "released_noise_reviewer_cases.md"


def near_edge(rng: np.random.Generator) -> tuple[np.ndarray, None]:
    energy = np.linspace(4.4, 6.4, 55) * 210
    u, v = (np.linalg.qr(rng.standard_normal((210, 55)))[0] for _ in range(2))
    return (u * np.sqrt(energy)) @ v.T + rng.standard_normal((210, 210)), None


def pull_back(rounds: int, dim: int, h: float):
    def make(rng: np.random.Generator) -> tuple[np.ndarray, None]:
        error, sums, noise = np.zeros(dim), np.empty((rounds, dim)), rng.standard_normal((rounds, dim))
        for t in range(rounds):
            sums[t] = noise[t] - h * error
            error = error + sums[t]
        return sums, None  # linear in Gaussian noise, so Gaussian in any basis: no rotation needed
    return make


def signs(rounds: int, dim: int, spikes: int):
    def make(rng: np.random.Generator) -> tuple[np.ndarray, None]:
        drift = rng.standard_normal((rounds, spikes)) @ rng.standard_normal((spikes, dim)) * 3
        noise = np.sqrt(0.55) * rng.standard_normal((rounds, dim)) + np.sqrt(0.45) * rng.choice([-1.0, 1.0],
                                                                                                (rounds, dim))
        return drift + noise, None
    return make


def partial(rounds: int, dim: int, canaries: int, share: float):
    def make(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        drift = rng.standard_normal((rounds, 4)) @ rng.standard_normal((4, dim)) * 0.5
        noise = rng.standard_normal((rounds, dim)) * (rng.random((rounds, dim)) < share) / np.sqrt(share)
        return drift + noise, rng.standard_normal((canaries, dim))
    return make


CASES = {
    "honest: 55 directions just above the edge, 210 x 210": near_edge,
    "honest: pull-back h 0.02, 200 x 1920": pull_back(200, 1920, 0.02),
    "honest: pull-back h 0.05, 60 x 512": pull_back(60, 512, 0.05),
    "cheat: Gaussian plus signs, 60 x 512, 4 drift directions": signs(60, 512, 4),
    "cheat: Gaussian plus signs, 200 x 1920, 8 drift directions": signs(200, 1920, 8),
    "cheat: noise in a quarter of the entries, 60 x 512, 400 canaries": partial(60, 512, 400, 0.25),
    "cheat: noise in a quarter of the entries, 200 x 1536, 1000 canaries": partial(200, 1536, 1000, 0.25),
    "cheat: noise in 45 % of the entries, 200 x 1536, 1000 canaries": partial(200, 1536, 1000, 0.45),
}


def run_case(make, rng: np.random.Generator, draws: int) -> dict:
    results = []
    for _ in range(draws):
        sums, directions = make(rng)
        results.append(released_noise_check(sums, np.ones(len(sums)), directions))

    ratios = [r["characteristic_excess"] / r["characteristic_threshold"] for r in results
              if "characteristic_excess" in r]

    def worst(key: str, pick) -> float | None:
        values = [r[key] for r in results if r.get(key) is not None]
        return float(pick(values)) if values else None

    return {"draws": draws, "failed": sum(r["verdict"] == "fail" for r in results),
            "failed_by_characteristic_function": sum("characteristic-function" in r["failed_checks"] for r in results),
            "characteristic_excess_over_threshold_max": max(ratios) if ratios else None,
            "least_noisy_combination_min": worst("least_noisy_combination_ratio", min),
            "least_noisy_threshold": worst("least_noisy_threshold", min),
            "kurtosis_min": worst("kurtosis", min), "kurtosis_floor": worst("kurtosis_floor", max),
            "noise_ratio_min": worst("noise_ratio", min)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = {name: run_case(make, rng, args.draws) for name, make in CASES.items()}

    def fmt(value, digits=2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["# The released-noise check on a reviewer's cases (`python -m simulations.released_noise_reviewer_cases`)",
             "", f"{args.draws} draws a case, seed {args.seed}; noise std 1 claimed 1. Failed: draws the check failed "
             "(honest: false alarms); by CF: of those, failed by the characteristic function; the largest "
             "characteristic-function excess over its threshold; the lowest least-noisy combination (its floor) and "
             "kurtosis (its floor); the lowest pooled ratio.", "",
             "| case | failed | by CF | CF excess / threshold, max | least noisy (floor) | kurtosis (floor) | pooled |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['failed']} of {row['draws']} | {row['failed_by_characteristic_function']} | "
                     f"{fmt(row['characteristic_excess_over_threshold_max'])} | "
                     f"{fmt(row['least_noisy_combination_min'])} ({fmt(row['least_noisy_threshold'])}) | "
                     f"{fmt(row['kurtosis_min'])} ({fmt(row['kurtosis_floor'])}) | {fmt(row['noise_ratio_min'], 3)} |")
    write_outputs(OUT, "\n".join(lines) + "\n", {"draws": args.draws, "seed": args.seed, "rows": rows})


if __name__ == "__main__":
    main()
