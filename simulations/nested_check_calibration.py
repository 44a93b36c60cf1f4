"""Is the nested check's SE the real spread of its gain? A calibration on simulated held-out accuracies.

    python -m simulations.nested_check_calibration [--users 20,40,100] [--gains 0,2] [--datasets 40]
                                                   [--bootstrap 200] [--out bench_results]

`model_selection.nested_gain` scores each fifth of the users with the choice the one-SE rule makes on the others,
over five random splits. Its SE over users of the split-averaged gains (`split_se`) reuses the same users in every
split; the SE it now uses (`se`) is the spread of the whole procedure over bootstrap resamples of the users. Here
many populations are drawn from one model of per-user held-out accuracies, so the real spread of the nested gain is
known: its SD over the populations. Each population has one rank-1 candidate and 40 higher-rank ones, as a small
population's selection table has tens to a hundred; a user's accuracy under a higher-rank candidate is the rank-1
accuracy plus the true gain (`--gains`, points) plus noise of SD 8 points per user and side, half of it shared by
the user's seen and new figures (the two sides are largely scored on the same pairs). Reports, per population size
and true gain: the SD of the nested gain, the median of each SE, and how often the check passes at 1, 1.5 and 2 of
each SE (with no true gain, a false pass). A model of the held-out figures, not of the world: the pilot
(`simulations/pilot_nested_check.py`) trains on real pair files. (`nested_check_calibration_a8bd608.md` is its
output at a8bd608, before the one-SE rule counted a user's seen and new gains as correlated;
`nested_check_calibration_dedupe.md` at 85dcd0b, whose bootstrap chose on one copy of each drawn user, reverted.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.model_selection import Candidate, nested_gain

HIGHER = 40
NOISE = 0.08
THRESHOLDS = (1.0, 1.5, 2.0)


def draw_candidates(rng: np.random.Generator, users: int, gain: float) -> list[Candidate]:
    """One rank-1 candidate and `HIGHER` higher-rank ones whose per-user accuracies are the rank-1 ones plus `gain`
    plus noise (SD `NOISE` per side, half its variance shared by a user's two sides)."""
    seen0, new0 = rng.uniform(0.5, 0.9, users), rng.uniform(0.5, 0.9, users)
    out = [Candidate(1, 1e-3, 3.0, seen0, new0)]
    shared = rng.normal(0, NOISE / np.sqrt(2), (HIGHER, users))
    own = rng.normal(0, NOISE / np.sqrt(2), (2, HIGHER, users))
    for k in range(HIGHER):
        out.append(Candidate(2 + k % 7, 1e-3, 3.0, seen0 + gain + shared[k] + own[0, k],
                             new0 + gain + shared[k] + own[1, k]))
    return out


def calibrate(users: int, gain: float, datasets: int, bootstrap: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, users, int(round(gain * 1000))])
    records = [nested_gain(draw_candidates(rng, users, gain), seed=i, bootstrap=bootstrap) for i in range(datasets)]
    values = np.array([r["gain"] for r in records])
    out = {"users": users, "true_gain": gain, "datasets": datasets, "nested_gain_mean": float(values.mean()),
           "nested_gain_sd": float(values.std(ddof=1))}
    for key in ("split_se", "se"):
        se = np.array([r[key] for r in records])
        out[f"median_{key}"] = float(np.median(se))
        out[f"passes_{key}"] = {f"{z:g}": float(np.mean(values > z * se)) for z in THRESHOLDS}
    return out


def markdown(rows: list[dict], argv: str) -> str:
    lines = [f"# Nested-check SE calibration (`python -m simulations.nested_check_calibration {argv}`)", "",
             "Simulated held-out accuracies (see the script's docstring): per population size and true gain of "
             "every higher-rank candidate, the nested gain's mean and its real spread (SD over the populations), "
             "the median split SE and bootstrap SE, and how often the check passes at 1 / 1.5 / 2 of each SE. Points.",
             "", "| users | true gain | nested gain mean | real SD | median split SE | median bootstrap SE "
             "| passes, split SE (1 / 1.5 / 2) | passes, bootstrap SE (1 / 1.5 / 2) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rates = {key: " / ".join(f"{100 * r[f'passes_{key}'][f'{z:g}']:.0f} %" for z in THRESHOLDS)
                 for key in ("split_se", "se")}
        lines.append(f"| {r['users']} | {100 * r['true_gain']:+.0f} | {100 * r['nested_gain_mean']:+.2f} | "
                     f"{100 * r['nested_gain_sd']:.2f} | {100 * r['median_split_se']:.2f} | {100 * r['median_se']:.2f} "
                     f"| {rates['split_se']} | {rates['se']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", default="20,40,100")
    parser.add_argument("--gains", default="0,2", help="true gain of every higher-rank candidate, points")
    parser.add_argument("--datasets", type=int, default=40)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args(argv)
    rows = []
    for users in (int(u) for u in args.users.split(",")):
        for gain in (float(g) / 100 for g in args.gains.split(",")):
            rows.append(calibrate(users, gain, args.datasets, args.bootstrap, args.seed))
            print(rows[-1], flush=True)
    flags = (f"--users {args.users} --gains {args.gains} --datasets {args.datasets} --bootstrap {args.bootstrap} "
             f"--seed {args.seed}")
    out = Path(args.out)
    atomic_write_json(out / "nested_check_calibration.json", {"flags": flags, "rows": rows})
    text = markdown(rows, flags)
    atomic_write_text(out / "nested_check_calibration.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
