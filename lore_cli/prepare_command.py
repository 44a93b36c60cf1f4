"""`lore-fed prepare PRISM_DIR|HUB_NAME --out DATASET_DIR`: validate PRISM, build pairs and the LoRe split."""

from __future__ import annotations

import argparse
import sys

from lore_core.prism_pairs import DEFAULTS, prepare_dataset


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="PRISM_DIR|HUB_NAME",
        help="directory with survey.jsonl and conversations.jsonl, or a hub name like HannahRoseKirk/prism-alignment",
    )
    parser.add_argument(
        "--out", required=True, metavar="DATASET_DIR", help="gets pairs.jsonl, users.jsonl and summary.json"
    )
    parser.add_argument(
        "--min-conversations",
        type=int,
        default=DEFAULTS.min_conversations,
        help="keep users with at least this many conversations that have pairs (default %(default)s)",
    )
    parser.add_argument("--split-seed", type=int, default=DEFAULTS.split_seed, help="default %(default)s")
    parser.add_argument(
        "--seen-fraction", type=float, default=DEFAULTS.seen_fraction, help="share of seen users (default %(default)s)"
    )
    parser.add_argument(
        "--train-fraction",
        type=float,
        default=DEFAULTS.train_fraction,
        help="share of each user's conversations in train, the few-shot set of unseen users (default %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    summary = prepare_dataset(
        args.source,
        args.out,
        min_conversations=args.min_conversations,
        split_seed=args.split_seed,
        seen_fraction=args.seen_fraction,
        train_fraction=args.train_fraction,
    )
    per_split = summary["pairs_per_split"]
    drops = ", ".join(f"{reason} {count}" for reason, count in summary["dropped"].items() if count)
    print(
        f"users: {summary['seen_users']} seen, {summary['unseen_users']} unseen "
        f"({summary['users_dropped_min_conversations']} below {args.min_conversations} conversations with pairs, "
        f"{summary['survey_only_users']} marked survey-only, "
        f"{summary['users_without_conversations'] - summary['survey_only_users']} more without conversations)"
    )
    for warning in summary["population_warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"pairs: {summary['pairs_kept']} kept of {summary['pairs_built']} "
        f"(seen train {per_split['seen_train']}, seen test {per_split['seen_test']}, "
        f"unseen few-shot {per_split['unseen_train']}, unseen test {per_split['unseen_test']})"
    )
    print(f"dropped: {drops or 'nothing'}")
    print(f"wrote {args.out}")
    return 0
