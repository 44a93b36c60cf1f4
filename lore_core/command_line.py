"""Command-line parsing shared by `lore-fed` and the device CLI (`python -m client.device`)."""

from __future__ import annotations

import argparse


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, but an unrecognized argument is refused with the usage of the command it was given to (the
    `_command_parser` default its sub-parser sets), not the top level's: a tester's `train ... --rnak 2` was shown
    lore-fed's usage, which lists only the commands."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        (getattr(args, "_command_parser", None) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args
