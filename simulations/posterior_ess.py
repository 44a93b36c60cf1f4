"""How many effective samples the device's posterior keeps, by basis size B and sample count S.

    python -m simulations.posterior_ess      # -> bench_results/posterior_ess.{md,json}

The device's posterior (client/device/posterior.py) weighs proposed samples by importance; Kish's effective sample
size says how many of them count. Side by side, on the same users: the device's adaptive mixture proposal, and the
Laplace fit alone as a Student-t proposal (the sampler before it). Users: w ~ Dirichlet(0.5), answers' basis scores
~ N(0, 2^2) per coordinate, labels from Bradley-Terry, the device's default prior (DEVICE_PRIOR_PAIRS). Median over
20 users per cell, and the milliseconds one posterior takes. A diagnostic: it chooses nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from client.device import posterior
from client.device.user_posterior import DEVICE_PRIOR_PAIRS
from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.simplex_fit import prior_log_mean

ROOT = Path(__file__).resolve().parents[1]


def laplace_only(answers: np.ndarray, samples: int) -> float:
    """Effective samples of the Laplace fit alone as the proposal (Student-t, 5 degrees of freedom)."""
    fit = posterior.laplace(answers, DEVICE_PRIOR_PAIRS)
    proposal = posterior._StudentT(fit.mode, np.linalg.cholesky(fit.cov), samples)
    eta = proposal.draw(np.random.default_rng(posterior.SAMPLE_SEED))
    uniform = prior_log_mean(None, 1, answers.shape[2])
    log_p = posterior._chart_log_density_samples(eta, answers, uniform, DEVICE_PRIOR_PAIRS)
    return float(1.0 / np.square(posterior._normalised(log_p - proposal.log_density(eta))).sum())


def cell(rank: int, answers: int, samples: int, users: int, rng: np.random.Generator) -> dict:
    sizes, before, seconds = [], [], []
    for _ in range(users):
        w = rng.dirichlet(np.full(rank, 0.5))
        scores = rng.normal(size=(answers, rank)) * 2.0
        chosen_first = rng.random(answers) < 1 / (1 + np.exp(-(scores @ w)))
        oriented = np.where(chosen_first[:, None], scores, -scores)[None]
        start = time.perf_counter()
        drawn = posterior.posterior(oriented, DEVICE_PRIOR_PAIRS, None, n_samples=samples)
        seconds.append(time.perf_counter() - start)
        sizes.append(float(drawn.effective_size[0]))
        before.append(laplace_only(oriented, samples))
    return {"rank": rank, "answers": answers, "samples": samples, "effective_median": float(np.median(sizes)),
            "laplace_only_effective_median": float(np.median(before)), "ms_median": 1e3 * float(np.median(seconds))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench_results"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(1)
    rows = [cell(rank, answers, samples, args.users, rng) for rank in (5, 8, 16, 24, 40) for answers in (0, 5, 20)
            for samples in (512, 2048, 8192)]
    out = Path(args.out)
    atomic_write_json(out / "posterior_ess.json", {"users_per_cell": args.users, "rows": rows})
    lines = ["# Effective samples of the device's posterior (`python -m simulations.posterior_ess`)", "",
             f"Median over {args.users} users per cell (Dirichlet(0.5) users, N(0, 4) scores, prior "
             f"{DEVICE_PRIOR_PAIRS} pairs); the device uses S = {posterior.DEFAULT_SAMPLES}. Each cell: the device's "
             "adaptive mixture (milliseconds per posterior) / the Laplace-t proposal alone, on the same users.", "",
             "| B | answers | S = 512 | S = 2048 | S = 8192 |", "|---|---|---|---|---|"]
    for rank in (5, 8, 16, 24, 40):
        for answers in (0, 5, 20):
            cells = [r for r in rows if r["rank"] == rank and r["answers"] == answers]
            lines.append(f"| {rank} | {answers} | " + " | ".join(
                f"{r['effective_median']:.0f} ({r['ms_median']:.1f} ms) / {r['laplace_only_effective_median']:.0f}"
                for r in cells) + " |")
    atomic_write_text(out / "posterior_ess.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
