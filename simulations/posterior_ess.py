"""How many effective samples the device's posterior keeps, by basis size B and sample count S, and whether its
90 % regions hold where the posterior is hostile.

    python -m simulations.posterior_ess      # -> bench_results/posterior_ess.{md,json}

The device's posterior (client/device/posterior.py) weighs proposed samples by importance; Kish's effective sample
size says how many of them count. Side by side, on the same users: the device's adaptive mixture proposal, and the
Laplace fit alone as a Student-t proposal (the sampler before it). Users: w ~ Dirichlet(0.5), answers' basis scores
~ N(0, 2^2) per coordinate, labels from Bradley-Terry, the device's default prior (DEVICE_PRIOR_PAIRS). Median over
20 users per cell, and the milliseconds one posterior takes.

Hostile posteriors: users drawn exactly from the device's prior, answers whose basis scores are large (nearly hard
constraints) or many at a large B. The 90 % highest-density region must hold the true w of about 90 % of them
(the binomial SE at 400 users is 0.015). Side by side: the adaptive mixture alone, and the device's sampler, which
tempers (client/device/tempering.py) where the mixture keeps fewer than TEMPER_BELOW of its samples. A diagnostic:
it chooses nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from client.device import posterior
from client.device.user_posterior import DEVICE_PRIOR_PAIRS
from lore_core.atomic_io import atomic_write_json, atomic_write_text
from lore_core.reward_math import softmax
from lore_core.simplex_fit import prior_log_mean

ROOT = Path(__file__).resolve().parents[1]


def laplace_only(answers: np.ndarray, samples: int) -> float:
    """Effective samples of the Laplace fit alone as the proposal (Student-t, 5 degrees of freedom)."""
    fit = posterior.laplace(answers, DEVICE_PRIOR_PAIRS)
    proposal = posterior._StudentT(fit.mode, np.linalg.cholesky(fit.cov), samples)
    eta = proposal.draw(np.random.default_rng(posterior.SAMPLE_SEED))
    uniform = prior_log_mean(None, 1, answers.shape[2])
    log_p = posterior._chart_log_density_samples(eta, answers, uniform, DEVICE_PRIOR_PAIRS)
    return float(1.0 / np.square(softmax(log_p - proposal.log_density(eta), axis=1)).sum())


def bt_answers(rng: np.random.Generator, w: np.ndarray, n: int, n_basis: int, scale: float = 2.0) -> np.ndarray:
    """n answered pairs per user (U, n, B): N(0, scale^2) basis scores, oriented by a Bradley-Terry draw under w."""
    scores = rng.standard_normal((w.shape[0], n, n_basis)) * scale
    logits = np.clip(np.einsum("unb,ub->un", scores, w), -700, 700)
    chosen = rng.random((w.shape[0], n)) < 1.0 / (1.0 + np.exp(-logits))
    return np.where(chosen[..., None], scores, -scores)


def prior_draws(rng: np.random.Generator, n_users: int, n_basis: int, prior_pairs: float) -> np.ndarray:
    """Exact draws (n_users, B) from the personal prior exp(-c KL(w || uniform)): uniform on the simplex, accepted
    with probability exp(-c KL) (<= 1)."""
    out = []
    while len(out) < n_users:
        w = rng.dirichlet(np.ones(n_basis), size=4 * n_users)
        kl = (w * np.log(np.clip(w * n_basis, 1e-300, None))).sum(axis=1)
        out.extend(w[rng.random(w.shape[0]) < np.exp(-prior_pairs * kl)])
    return np.asarray(out[:n_users])


HOSTILE = ((8, 5, 2.0), (4, 30, 1e3), (8, 30, 30.0), (16, 200, 5.0), (40, 300, 1.0))  # (B, answers, score scale)


def hostile_cell(rank: int, answers: int, scale: float, users: int, rng: np.random.Generator) -> dict:
    """Coverage of the true w by 90 % regions, median effective samples and seconds per user, without and with
    tempering, on the same users."""
    truth = prior_draws(rng, users, rank, DEVICE_PRIOR_PAIRS)
    oriented = bt_answers(rng, truth, answers, rank, scale)
    row = {"rank": rank, "answers": answers, "scale": scale, "users": users}
    for name, temper_below in (("mixture", 0.0), ("device", posterior.TEMPER_BELOW)):
        start = time.perf_counter()
        drawn = posterior.posterior(oriented, DEVICE_PRIOR_PAIRS, n_samples=posterior.DEFAULT_SAMPLES,
                                    temper_below=temper_below)
        row[name] = {"coverage": float(posterior.in_credible_region(drawn, truth, oriented, DEVICE_PRIOR_PAIRS).mean()),
                     "effective_median": float(np.median(drawn.effective_size)),
                     "ms_per_user": 1e3 * (time.perf_counter() - start) / users}
    return row


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
    parser.add_argument("--hostile-users", type=int, default=400)
    parser.add_argument("--out", default=str(ROOT / "bench_results"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(1)
    rows = [cell(rank, answers, samples, args.users, rng) for rank in (5, 8, 16, 24, 40) for answers in (0, 5, 20)
            for samples in (512, 2048, 8192)]
    hostile = [hostile_cell(*setting, args.hostile_users, np.random.default_rng(2)) for setting in HOSTILE]
    out = Path(args.out)
    atomic_write_json(out / "posterior_ess.json", {"users_per_cell": args.users, "rows": rows, "hostile": hostile})
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
    lines += ["", "## Hostile posteriors: do the 90 % regions hold?", "",
              f"{args.hostile_users} users drawn from the device's prior per row; basis scores N(0, scale^2). Each "
              "cell: the adaptive mixture alone / the device's sampler (tempering where the mixture keeps fewer "
              f"than {posterior.TEMPER_BELOW:.0%} of {posterior.DEFAULT_SAMPLES} samples), on the same users. "
              "Effective samples of tempered users are at most their distinct particles (an upper bound).", "",
              "| B | answers | scale | coverage of the true w (0.90 wanted) | median effective samples | ms per user |",
              "|---|---|---|---|---|---|"]
    for r in hostile:
        mixture, device = r["mixture"], r["device"]
        lines.append(f"| {r['rank']} | {r['answers']} | {r['scale']:g} | {mixture['coverage']:.3f} / "
                     f"{device['coverage']:.3f} | {mixture['effective_median']:.0f} / {device['effective_median']:.0f}"
                     f" | {mixture['ms_per_user']:.0f} / {device['ms_per_user']:.0f} |")
    atomic_write_text(out / "posterior_ess.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
