"""The population and run flags the federated benchmarks share (one definition, one set of defaults)."""

from __future__ import annotations

import argparse


def add_population_flags(parser: argparse.ArgumentParser) -> None:
    """--users, --unseen-users, --rounds, --clients-per-round, --rank: the README's 1,400 + 100 users benchmark."""
    parser.add_argument("--users", type=int, default=1400)
    parser.add_argument("--unseen-users", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients-per-round", type=int, default=50)
    parser.add_argument("--rank", type=int, default=5)
