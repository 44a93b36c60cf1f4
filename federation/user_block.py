"""The users one node hosts and their pairs (numpy only).

A virtual node in simulation hosts a contiguous block of users (sharding); a device in deployment hosts one user
(its own `pairs.npz`). Seen users train and are evaluated with their private w; unseen users only adapt w on
their few-shot ("train") rows with the basis frozen and are evaluated.

Row groups hold diff (n, D), a local user index (n,) into the group's user list, and logit_true (n,) or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lore_core.pairs import PairSet, load_pairs


@dataclass(frozen=True)
class RowGroup:
    diff: np.ndarray  # (n, D) float64
    user_idx: np.ndarray  # (n,) int64 into the group's users
    logit_true: np.ndarray | None  # (n,)


@dataclass(frozen=True)
class UserBlock:
    seen_users: np.ndarray  # (S,) user ids; the node's training users, local index = position
    unseen_users: np.ndarray  # (V,)
    seen_train: RowGroup
    seen_test: RowGroup
    unseen_train: RowGroup  # few-shot rows
    unseen_test: RowGroup

    @property
    def n_train_users(self) -> int:
        return int(self.seen_users.size)

    @property
    def dim(self) -> int:
        return int(self.seen_train.diff.shape[1])


def block_of_partition(user_ids: np.ndarray, partition_id: int, num_partitions: int) -> np.ndarray:
    """User ids of partition `partition_id` when the sorted ids are cut into `num_partitions` contiguous blocks."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    if num_partitions > user_ids.size:
        raise ValueError(f"{num_partitions} nodes for {user_ids.size} users: every node must host at least one user")
    return np.array_split(np.sort(user_ids), num_partitions)[partition_id]


def make_block(pairs: PairSet, users: np.ndarray) -> UserBlock:
    """Cut the rows of `users` out of `pairs` into the four row groups (vectorized)."""
    mine = np.isin(pairs.user, users)
    seen_users = np.unique(pairs.user[mine & pairs.seen])
    unseen_users = np.unique(pairs.user[mine & ~pairs.seen])

    def group(user_list: np.ndarray, seen: bool, split: str) -> RowGroup:
        rows = mine & (pairs.seen == seen) & (pairs.split == split)
        return RowGroup(
            diff=pairs.diff[rows].astype(np.float64),
            user_idx=np.searchsorted(user_list, pairs.user[rows]).astype(np.int64),
            logit_true=None if pairs.logit_true is None else pairs.logit_true[rows].astype(np.float64),
        )

    return UserBlock(
        seen_users=seen_users,
        unseen_users=unseen_users,
        seen_train=group(seen_users, True, "train"),
        seen_test=group(seen_users, True, "test"),
        unseen_train=group(unseen_users, False, "train"),
        unseen_test=group(unseen_users, False, "test"),
    )


@lru_cache(maxsize=4)
def _cached_pairs(path: str) -> PairSet:
    # One load per worker process: a Ray actor serves many virtual nodes of the same file.
    return load_pairs(path)


@lru_cache(maxsize=256)
def load_partition_block(path: str, partition_id: int, num_partitions: int) -> UserBlock:
    """Simulation: the block of users of virtual node `partition_id` in the shared pair file."""
    pairs = _cached_pairs(path)
    users = block_of_partition(np.unique(pairs.user), partition_id, num_partitions)
    return make_block(pairs, users)


def load_device_block(path: str) -> UserBlock:
    """Deployment: every user in the device's own pair file (normally one)."""
    pairs = load_pairs(path)
    return make_block(pairs, np.unique(pairs.user))
