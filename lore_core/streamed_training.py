"""Centralized LoRe on a pair file too large for the full-batch trainer: what `lore-fed train` runs above
`LARGE_POPULATION` users.

1. Model selection (rank, l2, personal prior) with `joint_trainer.train_joint` on a seeded sample of
   `SELECTION_USERS` seen users (its held-out protocol, split by the file's `group` when it has one); its basis is
   the starting point of step 2.
2. All seen users' training pairs (float32, grouped by user, and their groups if any: the large arrays held) are fit by
   `minibatch_trainer.fit_minibatch` at the selected rank and l2.
3. Evaluation as `lore_core.evaluation.evaluate_model`, run on blocks of whole users read from the file and
   combined (every metric is a mean over users, so a block's value is weighed by its users).
Memory: the training pairs plus one block; time: linear in pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from lore_core.evaluation import evaluate_model, true_basis_metrics
from lore_core.joint_trainer import FitScale, JointFit, TrainConfig, train_joint
from lore_core.minibatch_trainer import MinibatchConfig, fit_minibatch
from lore_core.pair_columns import PairColumns, PairIndex, rows_of_users, user_blocks
from lore_core.pairs import PairSet

# Users in the file above which `train` takes this path: the full-batch trainer fits 1,400 users well but stops after
# ~10 L-BFGS iterations and underfits at 10,000 (issue 15); 5,000 leaves it every population it was shown to fit.
LARGE_POPULATION = 5000
SELECTION_USERS = 2000  # seen users of the model-selection sample: the population size the full-batch trainer fits
EVAL_BLOCK_ROWS = 1 << 17  # rows per evaluation block (~200 MB of diff at D = 384)
# Keys of evaluate_model and PairSet.summary that count users or pairs: summed over blocks.
_COUNTS = ("unseen_users_without_few_shot", "pairs", "seen_users", "unseen_users", "train_pairs", "test_pairs")


def seen_training_pairs(columns: PairColumns,
                        index: PairIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Every seen user's training pairs: (diff (n, D) float32 grouped by user, starts (S + 1,), user ids (S,),
    their `group` (n,) or None when the file has none). Two passes: the seen and split columns to size the array,
    then the diffs block by block into it."""
    keep = np.zeros(columns.n, bool)
    for start in range(0, columns.n, 1 << 20):
        stop = min(start + (1 << 20), columns.n)
        keep[start:stop] = columns.read("seen", start, stop) & (columns.read("split", start, stop) == "train")
    ordered = keep if index.order is None else keep[index.order]
    per_user = np.add.reduceat(ordered.astype(np.int64), index.starts[:-1]) if ordered.size else np.zeros(0, int)
    users = np.flatnonzero(per_user > 0)
    diff = np.empty((int(ordered.sum()), columns.dim), np.float32)
    groups = [] if columns.has("group") else None
    filled = 0
    for first, stop in index.user_chunks(EVAL_BLOCK_ROWS):
        rows = index.rows(first, stop)
        rows = rows[keep[rows]]
        diff[filled:filled + rows.size] = columns.take("diff", rows)
        if groups is not None:
            groups.append(columns.take("group", rows))
        filled += rows.size
    group = None if groups is None else np.concatenate(groups) if groups else np.zeros(0, str)
    return diff, np.r_[0, np.cumsum(per_user[users])].astype(np.int64), index.user_ids[users], group


def train_streamed(path: str | Path, config: TrainConfig, *, epochs: int = MinibatchConfig.epochs) -> JointFit:
    """Steps 1 and 2 of the module docstring on the pair file at `path` (validated by the caller)."""
    started = time.perf_counter()
    columns = PairColumns.open(path)
    diff, starts, user_ids, group = seen_training_pairs(columns, PairIndex.build(columns))
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.choice(user_ids.size, size=min(SELECTION_USERS, user_ids.size), replace=False))
    rows, owner = rows_of_users(starts, sample)
    selected = train_joint(diff[rows], user_ids[sample][owner], config, group=None if group is None else group[rows])
    # In the units the selection fitted in (FitScale of its sample's pairs): Adam's steps are absolute, and beside one
    # coordinate 1000 times the others the minibatch fit took the selection's basis from 0.90 to 0.71 (a reviewer)
    scale = FitScale.of(diff[rows])
    fit = fit_minibatch(scale.divide(diff), starts, scale.to_fit(selected.basis),
                        MinibatchConfig(rank=selected.rank, l2=scale.l2(selected.l2),
                                        prior_pairs=config.train_prior_pairs, epochs=epochs, seed=config.seed,
                                        device=config.device, weight_by=config.weight_by))
    basis = scale.from_fit(fit.basis)
    return replace(selected, basis=basis, user_weights=fit.user_weights, user_ids=user_ids,
                   train_seconds=time.perf_counter() - started)


def evaluate_streamed(path: str | Path, basis: np.ndarray, *, prior_pairs: float,
                      joint_weights: tuple[np.ndarray, np.ndarray] | None = None,
                      true_basis: np.ndarray | None = None) -> tuple[dict, dict]:
    """`evaluate_model` (+ the true-basis ceiling, with a benchmark's `true_basis`) over blocks of whole users,
    combined. Returns (metrics, the file's `PairSet.summary()`)."""
    def block_metrics(block: PairSet) -> dict:
        block_weights = None
        if joint_weights is not None:
            known = np.isin(joint_weights[0], block.user)
            block_weights = (joint_weights[0][known], joint_weights[1][known])
        metrics = evaluate_model(block, basis, prior_pairs=prior_pairs, joint_weights=block_weights)
        if true_basis is not None:
            metrics.update(true_basis_metrics(block, true_basis))  # the ceiling's own prior, not the run's
        return metrics

    return combine_user_blocks(path, block_metrics)


def true_basis_streamed(path: str | Path, true_basis: np.ndarray) -> dict:
    """A benchmark's true-basis ceiling (`evaluation.true_basis_metrics`) over blocks of whole users, combined:
    for a run that never holds the file (`lore-fed simulate`)."""
    return combine_user_blocks(path, lambda block: true_basis_metrics(block, true_basis))[0]


def combine_user_blocks(path: str | Path, block_metrics: Callable[[PairSet], dict]) -> tuple[dict, dict]:
    """`block_metrics` (keys as `evaluate_model`'s) of each block of whole users of the pair file, combined into the
    whole file's values: means over users weighed by each block's users, counts added. Returns (metrics, the file's
    `PairSet.summary()`)."""
    columns = PairColumns.open(path)
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    summary: dict = {}
    for _, _, block in user_blocks(columns, PairIndex.build(columns), EVAL_BLOCK_ROWS):
        metrics = block_metrics(block)
        users = _users_behind(block)
        for key, value in metrics.items():
            weight = _weight_of(key, users)
            if weight is None:  # a count to add up, or the same in every block (rank, prior_pairs)
                totals[key] = totals.get(key, 0) + value if key in _COUNTS else value
            elif weight:
                totals[key] = totals.get(key, 0.0) + value * weight
                weights[key] = weights.get(key, 0.0) + weight
        for key, value in block.summary().items():
            summary[key] = summary.get(key, 0) + value if key in _COUNTS else value
    for key, weight in weights.items():
        totals[key] /= weight
    return totals, summary


def _users_behind(block: PairSet) -> dict[tuple[bool, str], int]:
    """Users with rows per (seen, split) in a block: the denominators of its per-user means."""
    return {(seen, split): int(np.unique(block.user[(block.seen == seen) & (block.split == split)]).size)
            for seen in (True, False) for split in ("train", "test")}


def _weight_of(key: str, users: dict[tuple[bool, str], int]) -> int | None:
    """How many users a metric of `evaluate_model` averages over: `*_acc*` keys are means over the users of one kind
    (seen/unseen) with rows of one split ('train' or few-shot: train; else test); other keys have no weight."""
    if "_acc" not in key:
        return None
    seen = "unseen" not in key
    split = "train" if ("train" in key or "few_shot" in key) else "test"
    return users[seen, split]
