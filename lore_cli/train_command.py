"""`lore-fed train PAIRS.npz|DATASET --rank B|auto --out DIR`: centralized LoRe, the reference for federated runs."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lore_core.atomic_io import atomic_save_npz, atomic_write_json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", help="pair file (.npz) or dataset directory holding pairs.npz")
    parser.add_argument("--rank", default="auto", help="basis size B, or 'auto' (validation likelihood; grid incl. 1)")
    parser.add_argument("--rank-grid", default=None, help="comma-separated ranks for --rank auto (must include 1)")
    parser.add_argument("--l2", default="auto", help="L2 penalty on the basis, or 'auto'")
    parser.add_argument("--prior-strength", type=float, default=None,
                        help="KL(w || uniform) weight in joint training (default 0.02)")
    parser.add_argument("--prior-pairs", type=float, default=None,
                        help="personal prior of the evaluation's w fits, in pairs (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", required=True, help="run directory for metrics.json and basis.npz")


def parse_rank(value: str) -> int | str:
    if value == "auto":
        return "auto"
    try:
        rank = int(value)
    except ValueError:
        raise ValueError(f"--rank must be a positive integer or 'auto', got {value!r}") from None
    if rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    return rank


def run(args: argparse.Namespace) -> int:
    from lore_core.basis_file import save_basis
    from lore_core.joint_trainer import TrainConfig
    from lore_core.pair_columns import PairColumns, PairIndex
    from lore_core.streamed_training import LARGE_POPULATION

    options = {"rank": parse_rank(args.rank), "seed": args.seed, "device": args.device}
    if args.rank_grid:
        options["rank_grid"] = tuple(int(r) for r in args.rank_grid.split(","))
    if args.l2 != "auto":
        options["l2"] = float(args.l2)
    if args.prior_strength is not None:
        options["prior_strength"] = args.prior_strength
    config = TrainConfig(**options)
    prior_pairs = personal_prior(args.prior_pairs)
    large = PairIndex.build(PairColumns.open(args.pairs)).n_users > LARGE_POPULATION
    fit, metrics, summary, evaluate_seconds = (_train_streamed if large else _train_in_memory)(
        args.pairs, config, prior_pairs)
    metrics.update(
        train_seconds=fit.train_seconds,
        evaluate_seconds=evaluate_seconds,
        l2=fit.l2,
        prior_strength=config.prior_strength,
        iterations=fit.iterations,
        seconds_per_rank=_seconds_per_rank(fit.selection),
        rank_selection=fit.selection,
        pairs=summary,
        device=config.device,
        seed=config.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_basis(out / "basis.npz", fit.basis, version=0, embedder="unknown")
    # Centralized training holds every user's data anyway; the weights are saved for analysis.
    atomic_save_npz(out / "user_weights.npz", user_id=fit.user_ids.astype(str), user_weights=fit.user_weights)
    atomic_write_json(out / "metrics.json", metrics)
    print(format_metrics(metrics))
    print(f"wrote {out / 'metrics.json'} and {out / 'basis.npz'}")
    return 0


def _train_in_memory(path, config, prior_pairs: float):
    """The full-batch trainer on the whole file in memory -> (fit, metrics, summary, evaluation seconds)."""
    from lore_core.evaluation import evaluate_model
    from lore_core.joint_trainer import train_joint
    from lore_core.pairs import load_pairs

    pairs = load_pairs(path)
    train = pairs.select(seen=True, split="train")
    if train.n == 0:
        raise ValueError(f"{pairs.source}: no training pairs of seen users")
    print(f"training on {train.n} pairs of {np.unique(train.user).size} seen users (D={pairs.dim}, rank {config.rank})")
    fit = train_joint(train.diff, train.user, config)
    started = time.perf_counter()
    metrics = evaluate_model(pairs, fit.basis, prior_pairs=prior_pairs, joint_weights=(fit.user_ids, fit.user_weights))
    metrics.update(benchmark_ceiling(pairs, prior_pairs))
    return fit, metrics, pairs.summary(), time.perf_counter() - started


def _train_streamed(path, config, prior_pairs: float):
    """A population above LARGE_POPULATION users (lore_core.streamed_training): the file is validated block by
    block, model selection runs on a sample of users, the minibatch trainer fits all of them, evaluation reads the
    file in blocks -> (fit, metrics, summary, evaluation seconds)."""
    from lore_core.pair_columns import check_pair_file
    from lore_core.streamed_training import SELECTION_USERS, evaluate_streamed, train_streamed

    columns, _, counts = check_pair_file(path)
    if counts.train_users == 0:
        raise ValueError(f"{columns.source}: no training pairs of seen users")
    print(f"training on {counts.train_users} seen users (D={counts.dim}, rank {config.rank}; model selection on "
          f"{min(SELECTION_USERS, counts.train_users)} of them, then minibatches of users)", flush=True)
    fit = train_streamed(columns.source, config)
    started = time.perf_counter()
    metrics, summary = evaluate_streamed(columns.source, fit.basis, prior_pairs=prior_pairs,
                                         joint_weights=(fit.user_ids, fit.user_weights))
    metrics["trainer"] = "minibatch"
    return fit, metrics, summary, time.perf_counter() - started


def personal_prior(value: float | None) -> float:
    """--prior-pairs, checked, or the default."""
    from lore_core.simplex_fit import DEFAULT_PRIOR_PAIRS

    if value is None:
        return DEFAULT_PRIOR_PAIRS
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"--prior-pairs must be a finite number > 0, got {value}")
    return float(value)


def benchmark_ceiling(pairs, prior_pairs: float) -> dict:
    """On a benchmark (ground_truth.npz beside the pair file, same embedding size): the true-basis few-shot
    ceiling, reported beside the oracle."""
    from lore_core.evaluation import load_true_basis, true_basis_metrics

    true_basis = load_true_basis(pairs.source)
    if true_basis is None or true_basis.shape[1] != pairs.dim:
        return {}
    return true_basis_metrics(pairs, true_basis, prior_pairs)


def _seconds_per_rank(selection: list[dict]) -> dict[str, float]:
    per_rank: dict[str, float] = {}
    for row in selection:
        per_rank[str(row["rank"])] = per_rank.get(str(row["rank"]), 0.0) + row["seconds"]
    return per_rank


def format_metrics(metrics: dict) -> str:
    keys = [k for k in metrics if k.endswith("_acc")]
    parts = [f"rank {metrics['rank']}"] + [f"{k} {metrics[k]:.4f}" for k in keys]
    if "train_seconds" in metrics:
        parts.append(f"train {metrics['train_seconds']:.1f}s")
    return " | ".join(parts)


def dumps(metrics: dict) -> str:
    return json.dumps(metrics, indent=2)
