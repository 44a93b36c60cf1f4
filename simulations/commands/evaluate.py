"""`lore-fed evaluate PAIRS.npz|DATASET --basis FILE|RUN_DIR`: score a saved basis (centralized or federated).

Seen users' weights are refit on their training pairs with the basis frozen (the same fit federated clients run),
unseen users adapt on their few-shot pairs; metrics have the names of `lore-fed train`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lore_core.atomic_io import atomic_write_json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", help="pair file (.npz) or dataset directory holding pairs.npz")
    parser.add_argument("--basis", required=True, help="basis file, or a run directory holding basis.npz")
    parser.add_argument("--prior-strength", type=float, default=None)
    parser.add_argument("--out", default=None, help="write the metrics to this JSON file")


def run(args: argparse.Namespace) -> int:
    from lore_core.basis_file import load_basis
    from lore_core.evaluation import evaluate_model, few_shot_weights
    from lore_core.pairs import load_pairs
    from lore_core.simplex_fit import DEFAULT_PRIOR_STRENGTH
    from simulations.commands.train import benchmark_ceiling, format_metrics

    basis_path = Path(args.basis)
    if basis_path.is_dir():
        basis_path = basis_path / "basis.npz"
    basis = load_basis(basis_path).basis
    pairs = load_pairs(args.pairs)
    if basis.shape[1] != pairs.dim:
        raise ValueError(f"basis {basis_path} has dimension {basis.shape[1]}, the pair file {pairs.dim}")
    prior = DEFAULT_PRIOR_STRENGTH if args.prior_strength is None else args.prior_strength
    seen_ids, seen_w = few_shot_weights(pairs.select(seen=True, split="train"), basis, prior)
    metrics = evaluate_model(pairs, basis, seen_ids, seen_w, prior_strength=prior)
    metrics.update(benchmark_ceiling(pairs, prior))
    print(format_metrics(metrics))
    if args.out:
        atomic_write_json(args.out, metrics)
        print(f"wrote {args.out}")
    return 0
