"""What a `user+secagg` ledger claims against the server, which draws the sample, beside its headline epsilon.

    python -m simulations.secagg_server_epsilon [--users 1400] [--rounds 200] [--clients-per-round 50]
        [--epsilon 3.37] [--dimension 1920] [--seeds 0,1,2,3,4]

For the settings of `bench_results/distributed_dp_bench.md` (z solved by the ddg-rdp accountant for the target
epsilon at delta 1e-5), each seed draws the run's Poisson samples with the server's own sampler
(`DistributedDpAggregator.sample`) and records them in a real ledger as a run does (`most_user_rounds`, the rounds
of the most-sampled user so far): the headline (amplified by sampling, against everyone but the server) and the
epsilon against the server (no amplification, the discrete Gaussian over the most-sampled user's rounds) are the
ledger's own. No training runs: neither figure depends on the data. Writes
bench_results/secagg_server_epsilon.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from lore_core.privacy.ledger import PrivacyLedger
from lore_core.privacy.privacy_settings import PrivacySettings, validate
from server.aggregation import DistributedDpAggregator

OUT = Path(__file__).resolve().parents[1] / "bench_results"


def ledger_of_one_run(settings: PrivacySettings, seed: int, folder: Path) -> PrivacyLedger:
    """A ledger written round by round from the server's sampler, as `TrainingRun` counts and records it."""
    sampler = DistributedDpAggregator(settings.clients_per_round, settings.noise_multiplier, settings.clip_norm,
                                      settings.dropout_tolerance, rng=np.random.default_rng(seed))
    ledger = PrivacyLedger.create(folder / f"seed{seed}", settings)
    rounds = np.zeros(settings.population_size, dtype=np.int32)
    for t in range(1, settings.rounds + 1):
        sampled = sampler.sample(settings.population_size)
        rounds[sampled] += 1
        ledger.record_round(t, sampled.size, most_user_rounds=int(rounds.max()))
    return ledger


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1400)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients-per-round", type=int, default=50)
    parser.add_argument("--epsilon", type=float, default=3.37)
    parser.add_argument("--dimension", type=int, default=5 * 384, help="B x D of the basis (rank 5, D 384)")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    args = parser.parse_args(argv)
    settings = validate(PrivacySettings(mode="user+secagg", rounds=args.rounds, target_epsilon=args.epsilon,
                                        clip_norm=1.0, clients_per_round=args.clients_per_round,
                                        population_size=args.users, dimension=args.dimension, delta=1e-5))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in [int(s) for s in args.seeds.split(",")]:
            ledger = ledger_of_one_run(settings, seed, Path(folder))
            rows.append({"seed": seed, "epsilon": ledger.epsilon().headline,
                         "epsilon_against_server": ledger.epsilon_against_server(),
                         "most_user_rounds": ledger.most_user_rounds()})
    result = {"users": args.users, "rounds": args.rounds, "clients_per_round": args.clients_per_round,
              "sample_rate": settings.sample_rate, "noise_multiplier": settings.noise_multiplier,
              "dimension": args.dimension, "delta": settings.delta, "expected_rounds_per_user":
              settings.sample_rate * args.rounds, "runs": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "secagg_server_epsilon.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# `user+secagg`: epsilon against the server (`python -m simulations.secagg_server_epsilon`)", "",
             f"{args.users} users, {args.clients_per_round} per round (Poisson, q = {settings.sample_rate:.4f}), "
             f"{args.rounds} rounds, B x D = {args.dimension}, z = {settings.noise_multiplier:.3f} (solved by "
             f"ddg-rdp for epsilon {args.epsilon}), delta 1e-5. Each user is sampled in "
             f"{settings.sample_rate * args.rounds:.1f} rounds on average. The headline holds against everyone "
             "but the server; the server draws the sample, so against it there is no amplification: the discrete "
             "Gaussian over the rounds of the most-sampled user. Both from the ledger of each seed's sampling.", "",
             "| seed | headline epsilon | most-sampled user's rounds | epsilon against the server |",
             "|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['epsilon']:.3f} | {r['most_user_rounds']} | {r['epsilon_against_server']:.2f} |"
              for r in rows]
    (OUT / "secagg_server_epsilon.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
