"""Command-line parsing shared by `lore-fed` and the device CLI (`python -m client.device`)."""

from __future__ import annotations

import argparse


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, but an unrecognized argument is refused with the usage of the sub-command it was given to, not
    the top level's: a tester's `train ... --rnak 2` was shown lore-fed's usage, which lists only the commands."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The deepest sub-command parser `args` went through (`lore-fed deploy local`: local's), following each level's
    sub-parsers by the name their `dest` holds."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, sub.dest, None) if sub is not None else None
        if name not in getattr(sub, "choices", {}):
            return parser
        parser = sub.choices[name]
