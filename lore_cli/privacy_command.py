"""`lore-fed privacy epsilon`: what-if accounting for user-level DP-FedAvg, with the same validation and accountant
as the runs (lore_core.privacy)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND", required=True)
    eps = sub.add_parser("epsilon", help="epsilon of a planned run, the noise for a target epsilon, or max rounds",
                         description="User-level DP-FedAvg with Poisson user sampling q = m/N (add/remove one user).")
    noise = eps.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise-multiplier", type=float, help="z: noise std on the sum = z * clip norm")
    noise.add_argument("--target-epsilon", type=float, help="solve z so that the planned rounds reach this epsilon")
    eps.add_argument("--clients-per-round", type=int, required=True, help="m: expected sampled users per round")
    eps.add_argument("--population", type=int, required=True, help="N: number of distinct users")
    eps.add_argument("--rounds", type=int, help="T: planned rounds (optional with --max-epsilon)")
    eps.add_argument("--delta", type=float, default=None,
                     help="default: the runs' default for N users (1e-5, or below 1/(10 N) above 10,000 users)")
    eps.add_argument("--max-epsilon", type=float, help="also print the most rounds that stay within this epsilon")


def run(args: argparse.Namespace) -> int:
    from lore_core.privacy.accounting import MAX_PRV_EPSILON, MAX_ROUNDS, epsilon_report, rounds_within_budget
    from lore_core.privacy.privacy_settings import PrivacySettings, validate

    if args.rounds is None and (args.max_epsilon is None or args.target_epsilon is not None):
        raise ValueError("give --rounds T (only --noise-multiplier with --max-epsilon can do without it)")
    if args.rounds is not None and args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.max_epsilon is not None and not 0 < args.max_epsilon <= MAX_PRV_EPSILON:
        raise ValueError(f"--max-epsilon must be in (0, {MAX_PRV_EPSILON:g}], got {args.max_epsilon:g}: an epsilon "
                         f"above {MAX_PRV_EPSILON:g} promises no meaningful privacy (user-level DP runs use 1 to 10)")
    settings = validate(PrivacySettings(  # a PrivacyConfigError names fields, which lore_cli.main spells as flags
        mode="user",
        noise_multiplier=args.noise_multiplier,
        target_epsilon=args.target_epsilon,
        clients_per_round=args.clients_per_round,
        population_size=args.population,
        rounds=1 if args.rounds is None else args.rounds,  # only max rounds asked: the run length is solved for
        delta=args.delta,
    ))
    z, q = settings.noise_multiplier, settings.sample_rate
    print(f"user-level DP-FedAvg: Poisson q = m/N = {settings.clients_per_round}/{settings.population_size} = "
          f"{q:.6g}, delta = {settings.delta:g}")
    if settings.noise_from_target:
        print(f"noise multiplier for epsilon <= {settings.target_epsilon:g} after {settings.rounds} rounds: "
              f"z = {z:.4f}")
    if args.rounds is not None:
        report = epsilon_report([(z, q, settings.rounds)], settings.delta)
        print(f"z = {z:.4g}, T = {settings.rounds} rounds")
        print(f"  epsilon PRV (headline) = {_shown(report.prv)}  (estimate {_shown(report.prv_estimate)}, "
              f"error bound {report.prv_error_bound:.3f})")
        print(f"  epsilon RDP (upper bound) = {_shown(report.rdp)}  (optimal order {report.rdp_optimal_order:g})")
    if args.max_epsilon is not None:
        rounds = rounds_within_budget(z, q, settings.delta, args.max_epsilon)
        answer = f"more than {MAX_ROUNDS:,} (the search stops there)" if rounds == MAX_ROUNDS else f"{rounds:,}"
        print(f"max rounds with epsilon (PRV) <= {args.max_epsilon:g} at z = {z:.4g}: {answer}")
    return 0


def _shown(epsilon: float) -> str:
    """Three decimals, or three significant digits below 0.1: a tester read 0.018 for Opacus' 0.0184 (2 % low)."""
    return f"{epsilon:.3f}" if abs(epsilon) >= 0.1 else f"{epsilon:.3g}"
