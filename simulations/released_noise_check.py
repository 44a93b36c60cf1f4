"""How often the released-noise check (lore_core/audits/released_noise.py) fails honest releases, and how often it
catches under-noised ones, on synthetic releases: R rounds of d entries, k strong drift directions (time courses and
directions Gaussian, `--drift` times the noise std per entry and direction), noise of std 1 claimed 1.

    python -m simulations.released_noise_check [--draws 20] [--seed 0]

Cases: honest; every round's noise at 0.85 of the claim; a tenth of the rounds (and the first) with no noise; noise of
the claimed std per round but correlated across rounds: AR(1) at rho = -0.2 and -0.3 (rounds t and t + 1 cancel
part of it), rounds paired at random, the second's noise the first's negated, blocks of 5 rounds whose noise
sums to zero (each round's rescaled to the claimed std; a tester's server), one round's noise copying the one
before at +0.95 (a reviewer's), and three servers of an adversarial tester's: noise whose covariance across rounds
is I - a a^T (one secret combination of rounds carries none), none in a fixed half of the entries (the rest
doubled in variance), and entries of exactly +-1; last, noise that is mostly exact zeros (a random tenth of the
entries carry it, at ten times the variance). Writes
bench_results/released_noise_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lore_core.audits.released_noise import released_noise_check

OUT = Path(__file__).resolve().parents[1] / "bench_results"
SHAPES = ((200, 1920, 5), (200, 3840, 20), (1500, 32, 3), (60, 512, 4), (25, 512, 8), (25, 312, 8), (10, 96, 2),
          (5, 72, 1), (3, 100, 1), (2, 100, 1))
CASES = {"honest": (1.0, 0.0, None), "noise x 0.85": (0.85, 0.0, None),
         "10 % of rounds without noise": (1.0, 0.1, None),
         "AR(1) rho -0.2": (1.0, 0.0, -0.2), "AR(1) rho -0.3": (1.0, 0.0, -0.3), "pairs cancel": (1.0, 0.0, "pairs"),
         "5-round blocks sum to 0": (1.0, 0.0, "blocks"), "one round copies another (+0.95)": (1.0, 0.0, "copy"),
         "a combination of rounds without noise": (1.0, 0.0, "null"),
         "half the entries without noise": (1.0, 0.0, "half"), "entries exactly +-1": (1.0, 0.0, "signs"),
         "noise in a tenth of the entries": (1.0, 0.0, "sparse")}


def correlated_noise(rng: np.random.Generator, rounds: int, dim: int, correlation) -> np.ndarray:
    """Noise of std 1 per entry in every round, independent across rounds (None), AR(1) at rho (a number), rounds
    paired at random with the second's noise the first's negated ("pairs"), or 5-round blocks summing to 0."""
    noise = rng.standard_normal((rounds, dim))
    if correlation == "null":  # an adversary's server: covariance across rounds I - a a^T, each round rescaled
        a = rng.choice([-1.0, 1.0], rounds) / np.sqrt(rounds)
        noise = (noise - np.outer(a, a @ noise)) * np.sqrt(rounds / (rounds - 1))
    elif correlation == "half":  # no noise in a fixed half of the entries, the other half's doubled in variance
        noise[:, : dim // 2] = 0.0
        noise[:, dim // 2:] *= np.sqrt(dim / (dim - dim // 2))
    elif correlation == "sparse":  # the right variance, mostly exact zeros
        noise *= (rng.random((rounds, dim)) < 0.1) * np.sqrt(10.0)
    elif correlation == "signs":  # the right variance, the wrong shape: an attacker tests for the lattice
        noise = np.sign(noise)
    elif correlation == "copy":  # a reviewer's server: S_t - 0.95 S_(t-1) carries a third of the claimed noise
        middle = rounds // 2
        noise[middle] = 0.95 * noise[middle - 1] + np.sqrt(1 - 0.95 ** 2) * noise[middle]
    elif correlation == "blocks":  # a tester's server: each block of 5 rounds centred, rescaled to the claimed std
        whole = rounds - rounds % 5
        blocks = noise[:whole].reshape(-1, 5, dim)
        noise[:whole] = ((blocks - blocks.mean(axis=1, keepdims=True)) * np.sqrt(5 / 4)).reshape(whole, dim)
    elif correlation == "pairs":
        order = rng.permutation(rounds)
        half = rounds // 2
        noise[order[half:2 * half]] = -noise[order[:half]]
    elif correlation is not None:
        for t in range(1, rounds):
            noise[t] = correlation * noise[t - 1] + np.sqrt(1 - correlation ** 2) * noise[t]
    return noise


def failures(rng: np.random.Generator, shape: tuple[int, int, int], scale: float, zero_share: float, correlation,
             drift: float, draws: int) -> dict:
    rounds, dim, spikes = shape
    verdicts, pooled, lowest, across, alone = [], [], [], 0, 0
    for _ in range(draws):
        release = rng.standard_normal((rounds, spikes)) @ rng.standard_normal((spikes, dim)) * drift
        noise = correlated_noise(rng, rounds, dim, correlation) * scale
        if zero_share:
            quiet = rng.random(rounds) < zero_share
            quiet[0] = True
            noise[quiet] = 0.0
        result = released_noise_check(release + noise, np.ones(rounds))
        verdicts.append(result["verdict"])
        failed = set(result["failed_checks"])
        by_across = bool(failed - {"pooled", "per-round"})  # the across-rounds and shape checks
        by_others = bool(failed & {"pooled", "per-round"})
        across, alone = across + int(bool(by_across)), alone + int(bool(by_across) and not by_others)
        pooled.append(result["noise_ratio"])
        lowest.append(result["lowest_round_ratio"])
    return {"failed": verdicts.count("fail"), "draws": draws, "failed_across": across, "failed_across_alone": alone,
            "pooled_mean": float(np.mean(pooled)),
            "lowest_round_min": float(np.min(lowest))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drift", type=float, default=3.0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = [{"rounds": r, "entries": d, "drift_directions": k, "case": case,
             **failures(rng, (r, d, k), scale, share, correlation, args.drift, args.draws)}
            for r, d, k in SHAPES for case, (scale, share, correlation) in CASES.items()]
    OUT.mkdir(exist_ok=True)
    (OUT / "released_noise_check.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2) + "\n")
    lines = ["# Released-noise check on synthetic releases (`python -m simulations.released_noise_check`)", "",
             f"Noise std 1 claimed 1; drift {args.drift} x the noise per entry and direction; {args.draws} draws per "
             "cell, seed " f"{args.seed}. Failures of {args.draws} (honest: false alarms; the others: detections), "
             "then the mean pooled ratio and the lowest single round's ratio over the draws; after the semicolon, "
             "the draws the across-rounds or shape checks failed (correlations, the least noisy combination of "
             "rounds, kurtosis, the characteristic function), and of those the ones the pooled and per-round checks "
             "passed.", "",
             "| rounds | entries | drift directions | " + " | ".join(CASES) + " |", "|---" * (3 + len(CASES)) + "|"]
    for r, d, k in SHAPES:
        cells = [next(x for x in rows if (x["rounds"], x["entries"], x["case"]) == (r, d, case)) for case in CASES]
        lines.append(f"| {r} | {d} | {k} | " + " | ".join(
            f"{c['failed']} ({c['pooled_mean']:.2f}, {c['lowest_round_min']:.2f}; {c['failed_across']}, "
            f"{c['failed_across_alone']})" for c in cells) + " |")
    (OUT / "released_noise_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
