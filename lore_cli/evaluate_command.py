"""`lore-fed evaluate PAIRS.npz|DATASET --basis FILE|RUN_DIR`: score a saved basis (centralized or federated).

Seen users' weights are refit on their training pairs with the basis frozen (the same fit federated clients run),
unseen users adapt on their few-shot pairs; metrics have the names of `lore-fed train`.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from lore_core.atomic_io import (atomic_write_json, check_output_path, is_run_directory, remove_stale_temps_of,
                                 run_folder_of)
from lore_core.pairs import PAIRS_FILENAME
from lore_core.prism_pairs import DATASET_FILES, PAIRS_JSONL
from lore_core.prism_schema import GROUND_TRUTH_FILE


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", help="pair file (.npz) or dataset directory holding pairs.npz")
    parser.add_argument("--basis", required=True, help="basis file, or a run directory holding basis.npz")
    parser.add_argument("--prior-pairs", type=float, default=None,
                        help="personal prior of every user's w fit, in pairs (default: the basis file's)")
    parser.add_argument("--out", default=None, help="write the metrics to this JSON file")


def run(args: argparse.Namespace) -> int:
    from lore_core.basis_file import basis_file_path, load_basis, warn_if_other_embedder
    from lore_core.evaluation import evaluate_model
    from lore_core.pairs import load_pairs
    from lore_cli.train_command import benchmark_ceiling, benchmark_truth, format_metrics, personal_prior

    basis_path = basis_file_path(args.basis)
    if args.out:
        pair_file = Path(args.pairs) / PAIRS_FILENAME if Path(args.pairs).is_dir() else Path(args.pairs)
        check_metrics_out(Path(args.out), (pair_file, basis_path, pair_file.parent / GROUND_TRUTH_FILE))
    basis_file = load_basis(basis_path)
    basis = basis_file.basis
    pairs = load_pairs(args.pairs)
    if not len(pairs.user):
        raise ValueError(f"{pairs.source}: no pairs, so there is nothing to evaluate; expected a pair file with test "
                         "pairs (split 'test')")
    if not (pairs.split == "test").any():
        warnings.warn(f"{pairs.source} has no test pairs (split 'test'): only training-pair figures are reported",
                      UserWarning, stacklevel=2)
    if basis.shape[1] != pairs.dim:
        raise ValueError(f"basis {basis_path} has dimension {basis.shape[1]}, the pair file {pairs.source} {pairs.dim}")
    warn_if_other_embedder(basis_file, pairs)
    prior = personal_prior(args.prior_pairs, default=basis_file.prior_pairs)
    true_basis = benchmark_truth(pairs)
    metrics = evaluate_model(pairs, basis, prior_pairs=prior)
    if metrics.get("seen_users_without_training_pairs"):  # a tester: an all-test file printed no seen figure at all
        warnings.warn(f"{pairs.source}: {metrics['seen_users_without_training_pairs']} seen user(s) have test pairs "
                      "but no training pairs: their w cannot be refit, so they are scored with the population reward "
                      "(seen_users_without_training_pairs)", UserWarning, stacklevel=2)
    metrics.update(benchmark_ceiling(pairs, true_basis))
    print(format_metrics(metrics))
    if args.out:
        remove_stale_temps_of(args.out)
        atomic_write_json(args.out, metrics)
        print(f"wrote {args.out}")
    return 0


RUN_FILES = ("metrics.json", "ledger.json", "checkpoint.npz", "data.json", "rounds.jsonl", "report.md", "basis.npz",
             "user_weights.npz", "selection_heldout.npz")


def check_metrics_out(out: Path, inputs: tuple[Path, ...]) -> None:
    """--out may be written (`check_output_path`) and would overwrite neither an input, nor a dataset's file, existing
    or not (in a directory holding pairs.jsonl or pairs.npz: its files are inputs of the commands, users.jsonl of the
    audits), nor a run's file, existing or not (a run's reserved names in a run directory, or anything in its
    releases/, client-accountants/ or audits/: a tester's metrics in place of a checkpoint
    or ledger made the run's rerun and audits refuse it)."""
    check_output_path(out, "--out", directory=False)
    if out.exists() and any(out.resolve() == given.resolve() for given in inputs):
        raise ValueError(f"--out {out} is an input of this command; give a new file name for the metrics JSON")
    if out.name in DATASET_FILES and any((out.parent / name).exists() for name in (PAIRS_JSONL, PAIRS_FILENAME)):
        raise ValueError(f"--out {out} is one of a dataset's own files ({out.name}; {', '.join(DATASET_FILES)} are "
                         "inputs of lore-fed's commands); give a new file name for the metrics JSON")
    if out.name in RUN_FILES and is_run_directory(out.parent):  # existing or not: a run may write it later
        raise ValueError(f"--out {out} is one of a run's own files ({out.name}; {', '.join(RUN_FILES)} in a run "
                         "directory); give a new file name for the metrics JSON")
    if (folder := run_folder_of(out)) is not None:
        raise ValueError(f"--out {out} is inside the run folder {folder}, which only the run writes; give a file "
                         "outside it")
    if out.exists() and not _is_evaluate_output(out):  # a tester's pair file and .py were replaced by metrics
        raise ValueError(f"--out {out} exists and is not a metrics JSON that `lore-fed evaluate` wrote: it would be "
                         "replaced; give a new file name (or delete it first)")


def _is_evaluate_output(path: Path) -> bool:
    """A file `evaluate --out` may replace: a JSON object of its metrics (a small file; read only if it is one)."""
    from lore_core.text_file import json_loads

    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        record = json_loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # written with or without test pairs; nothing beside its figures (a tester's copy of a `train` run's metrics.json,
    # its selection table included, was replaced by 0.4 KB of figures)
    return isinstance(record, dict) and {"rank", "prior_pairs"} <= set(record) and all(
        key in EVALUATE_COUNTS or key.endswith("_acc") for key in set(record) - {"rank", "prior_pairs"})


EVALUATE_COUNTS = ("seen_users_without_training_pairs", "unseen_users_without_few_shot")  # its keys but the figures
