"""The few-shot w solver (`lore_core.simplex_fit`) of this checkout beside another commit's: exact, and fast.

    python -m simulations.bench_simplex_fit [--before REV] [--out bench_results/simplex_fit.md]

Three measurements per solver, each in a subprocess that imports that commit's code (a git worktree):
- **order**: a device adds choices one at a time, refitting from its last w (`client.device.user_posterior`
  does); the final w must be the all-at-once fit's. 1,500 random sequences of 2-11 choices, B = 3, scores up to
  1,000, prior worth 1 pair (the tester's protocol). Counted: sequences ending more than 1e-3 away.
- **stress**: 3,000 random single-user problems (B 2-8, 1-29 pairs, scores 0.1-1,000, lam 1e-4-10, a sparse
  Dirichlet start, 30 % with a prior mean), fitted from that start and from the prior mode. Counted: fits that say
  they did not converge, fits that say they did but sit more than 1e-6 above the better of the two objectives (a
  false "converged"), and problems whose two objectives differ by more than 1e-8.
- **batched**: 5,000 users x 5-39 pairs (B 4, scores ~1; B 8, scores ~3) and 2,000 users (B 4, scores ~30):
  median seconds of 3 runs, iterations, mean objective.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from simulations.revisions import checkout_label, code_env, short_revision, worktree

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r'''
import json, time, warnings
import numpy as np
from lore_core.simplex_fit import fit_user_weights, few_shot_objective, prior_from_pairs
warnings.simplefilter("ignore")

def order():
    rng, far = np.random.default_rng(0), 0
    for _ in range(1500):
        n = int(rng.integers(2, 12)); s = rng.normal(size=(n, 3)) * 10 ** rng.uniform(0, 3); w = None
        for j in range(1, n + 1):
            w = fit_user_weights(s[:j], np.zeros(j, int), 1, prior_strength=1.0 / j, init=w).weights
        far += np.abs(w - fit_user_weights(s, np.zeros(n, int), 1, prior_strength=1.0 / n).weights).max() > 1e-3
    return {"sequences": 1500, "ending_elsewhere": int(far)}

def stress():
    rng, unconverged, false_converged, disagree = np.random.default_rng(7), 0, 0, 0
    for _ in range(3000):
        b, n = int(rng.integers(2, 9)), int(rng.integers(1, 30))
        s = rng.normal(size=(n, b)) * 10 ** rng.uniform(-1, 3)
        lam = 10 ** rng.uniform(-4, 1); start = rng.dirichlet(np.ones(b) * 0.2)[None]
        mean = None
        if rng.random() < 0.3:
            mean = np.clip(rng.dirichlet(np.ones(b))[None], 1e-6, None); mean /= mean.sum()
        user = np.zeros(n, int)
        fits = [fit_user_weights(s, user, 1, prior_strength=lam, init=start, prior_mean=mean),
                fit_user_weights(s, user, 1, prior_strength=lam, prior_mean=mean)]
        objectives = [float(few_shot_objective(f.weights, s, user, lam, mean)[0]) for f in fits]
        best = min(objectives)
        unconverged += sum(not f.converged for f in fits)
        false_converged += sum(f.converged and o > best + 1e-6 * (1 + abs(best)) for f, o in zip(fits, objectives))
        disagree += abs(objectives[0] - objectives[1]) > 1e-8 * (1 + abs(best))
    return {"problems": 3000, "fits": 6000, "not_converged": unconverged, "falsely_converged": false_converged,
            "objectives_disagree": int(disagree)}

def batched():
    rng, rows = np.random.default_rng(1), []
    for users, b, scale in [(5000, 4, 1.0), (5000, 8, 3.0), (2000, 4, 30.0)]:
        n = rng.integers(5, 40, users); user = np.repeat(np.arange(users), n)
        s = rng.normal(size=(user.size, b)) * scale
        truth = rng.dirichlet(np.ones(b), users)
        s[rng.random(user.size) > 1 / (1 + np.exp(-(s * truth[user]).sum(1)))] *= -1
        lam, seconds = prior_from_pairs(user, users, 3.0), []
        for _ in range(3):
            start = time.perf_counter(); fit = fit_user_weights(s, user, users, prior_strength=lam)
            seconds.append(time.perf_counter() - start)
        rows.append({"users": users, "B": b, "scale": scale, "seconds": float(np.median(seconds)),
                     "iterations": fit.iterations, "converged": bool(fit.converged),
                     "mean_objective": float(few_shot_objective(fit.weights, s, user, lam).mean())})
    return rows

print(json.dumps({"order": order(), "stress": stress(), "batched": batched()}))
'''


def measure(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE], cwd=root, env=code_env(root), capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(results: dict[str, dict]) -> str:
    lines = ["# The few-shot w solver, exact and fast (`python -m simulations.bench_simplex_fit`)", "",
             "Module docstring of `simulations/bench_simplex_fit.py` for the protocol. Same machine, one after the "
             "other, one thread.", "",
             "| solver | order: sequences ending elsewhere | stress: not converged (of 6,000) | stress: falsely "
             "converged | stress: objectives disagree (of 3,000) |", "|---|---|---|---|---|"]
    for label, r in results.items():
        o, s = r["order"], r["stress"]
        lines.append(f"| {label} | {o['ending_elsewhere']} of {o['sequences']} | {s['not_converged']} | "
                     f"{s['falsely_converged']} | {s['objectives_disagree']} |")
    lines += ["", "| solver | users x B, scale | median s | iterations | converged | mean objective |",
              "|---|---|---|---|---|---|"]
    for label, r in results.items():
        for row in r["batched"]:
            lines.append(f"| {label} | {row['users']} x {row['B']}, {row['scale']:g} | {row['seconds']:.3f} | "
                         f"{row['iterations']} | {row['converged']} | {row['mean_objective']:.10f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, help="a commit whose solver to measure beside this checkout's")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "simplex_fit.md"))
    args = parser.parse_args(argv)
    results = {}
    if args.before:
        with tempfile.TemporaryDirectory() as tmp, worktree(args.before, Path(tmp) / "before") as before:
            results[f"before ({short_revision(args.before)})"] = measure(before)
    results[f"this checkout ({checkout_label()})"] = measure(ROOT)
    out = Path(args.out)
    out.write_text(report(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
