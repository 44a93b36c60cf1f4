"""`lore-fed synth`: generate the semi-synthetic PRISM-shaped benchmark (simulations.prism_population)."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from lore_cli.embed_command import add_batch_size
from simulations.prism_population import (DEMOGRAPHICS, BenchmarkConfig,
                                          conversation_distribution, generate_benchmark)

DEFAULTS = BenchmarkConfig()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, required=True, help="number of survey participants")
    parser.add_argument("--out", required=True, help="directory for survey/conversations/utterances.jsonl")
    parser.add_argument("--rank", type=int, default=DEFAULTS.rank, help="true number of basis rewards K")
    parser.add_argument("--noise", type=float, default=DEFAULTS.noise, help="slider noise std (reward units)")
    parser.add_argument("--heterogeneity", type=float, default=DEFAULTS.heterogeneity,
                        help="Dirichlet alpha of the user weights (small = more distinct users)")  # fmt: skip
    parser.add_argument("--conversations", default="prism",
                        help="conversations per user: 'prism' (PRISM's distribution), N, or LO-HI")  # fmt: skip
    parser.add_argument("--max-turns", type=int, default=DEFAULTS.max_turns, help="cap on turns per conversation")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--plant-attribute", choices=sorted(DEMOGRAPHICS), default=None,
                        help="survey field whose first value's group leans to 2 bases (privacy audits)")  # fmt: skip
    parser.add_argument("--plant-strength", type=float, default=DEFAULTS.plant_strength)
    parser.add_argument("--model", default=None, help="embedder model name or path (default: offline MiniLM)")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: $LORE_CACHE_DIR or ~/.cache)")
    add_batch_size(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def refuse_a_release_of_others(out: Path) -> None:
    """An --out holding PRISM files but no ground_truth.npz is not a population of `synth` (a real release, say):
    they would be replaced. A population of synth's, complete or cut short, has its truth (written first)."""
    from lore_core.prism_schema import CONVERSATIONS_FILE, GROUND_TRUTH_FILE, SURVEY_FILE, UTTERANCES_FILE

    if (out / GROUND_TRUTH_FILE).is_file():
        return
    found = [name for name in (SURVEY_FILE, CONVERSATIONS_FILE, UTTERANCES_FILE) if (out / name).exists()]
    if found:
        raise ValueError(f"--out {out} holds {', '.join(found)} without the {GROUND_TRUTH_FILE} of a synth "
                         "population: they are not synth's, and would be replaced; give a new directory")


def refuse_a_dataset(out: Path) -> None:
    """An --out that is a dataset of `lore-fed prepare` (its pairs.jsonl, users.jsonl, summary.json or pairs.npz) is
    refused: synth would replace its ground_truth.npz with another population's, beside pairs made from the old one."""
    from lore_core.prism_pairs import DATASET_FILES
    from lore_core.prism_schema import GROUND_TRUTH_FILE

    found = [name for name in DATASET_FILES if name != GROUND_TRUTH_FILE and (out / name).exists()]
    if found:
        raise ValueError(f"--out {out} holds {', '.join(found)}: it is a dataset of `lore-fed prepare`, not a synth "
                         f"population, and its {GROUND_TRUTH_FILE} would be replaced; give a new directory (synth "
                         "writes a PRISM release, which prepare then reads)")


def run(args: argparse.Namespace) -> int:
    """A BenchmarkConfigError names BenchmarkConfig's knobs, which lore_cli.main spells as synth's flags."""
    from lore_cli.train_command import check_device
    from lore_core.atomic_io import check_output_path
    from lore_core.embeddings import load_embedder

    config = replace(
        DEFAULTS,
        users=args.users,
        rank=args.rank,
        noise=args.noise,
        heterogeneity=args.heterogeneity,
        conversations=conversation_distribution(args.conversations),
        max_turns=args.max_turns,
        seed=args.seed,
        plant_attribute=args.plant_attribute,
        plant_strength=args.plant_strength,
        model=args.model,
    )
    check_output_path(args.out, "--out", directory=True)
    refuse_a_release_of_others(Path(args.out))
    refuse_a_dataset(Path(args.out))
    check_device(args.device)  # by the flag's name, before the model loads
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # per-tensor "Loading weights" bars, as embed hides them
    started = time.perf_counter()
    embedder = load_embedder(args.model, device=args.device, batch_size=args.batch_size, cache_dir=args.cache_dir)
    benchmark = generate_benchmark(config, embedder)  # kill -TERM: what was embedded stays cached (lore_cli.main)
    written = benchmark.write(args.out)
    s = benchmark.stats
    print(
        f"synth: {s['users']} users ({s['survey_only_users']} survey-only), {s['conversations']} conversations, "
        f"{s['interactions']} interactions, {s['utterances']} utterances in {time.perf_counter() - started:.1f} s"
    )
    print(
        f"  turn-0 top-score ties {s['turn0_top_ties']}, identical A/B {s['identical_ab']}, "
        f"EMPTY STRING {s['empty_responses']}, planted group {s['planted_group_users']} users"
    )
    print(f"  embedder {embedder.name}: {embedder.total_computed} texts computed, the rest from cache")
    print(f"  files: {args.out}/{{survey,conversations,utterances}}.jsonl")
    print(f"  ground truth (keep it apart from training): {written['ground_truth.npz']}")
    return 0
