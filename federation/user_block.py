"""The users one node hosts and their pairs (numpy only).

A virtual node in simulation hosts a contiguous block of users (sharding) of the shared pair file; a device in
deployment hosts one user (its own `pairs.npz`). Seen users train and are evaluated with their private w; unseen
users only adapt w on their few-shot ("train") rows with the basis frozen and are evaluated.

A node keeps only where its users' rows are (`NodeUsers`, from the file's `PairIndex`), never the rows: a round
reads the rows of the users it samples, evaluation reads its users in blocks. So a node's memory and a round's
cost follow the users in the round, not the population.

Row groups hold diff (n, D), a local user index (n,) into the group's user list, and logit_true (n,) or None.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lore_core.pair_columns import PairColumns, PairIndex, rows_of_users
from lore_core.pairs import DEVICE_DIFF_RMS, DEVICE_MIN_PAIRS, PairSet, check_federated_scale, load_pairs

EVAL_BLOCK_USERS = 2000  # users evaluated at a time: bounds a node's evaluation memory (~150 MB at D = 384, 25 pairs)


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


@dataclass(frozen=True)
class _RowList:
    """Where one row group's rows are in the file: user u's rows are rows[offsets[u]:offsets[u + 1]]."""

    rows: np.ndarray  # (m,) file rows, grouped by user
    offsets: np.ndarray  # (users + 1,)

    def cut(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file rows, position in `users` per row) of the given users (int array), without scanning the rest."""
        positions, owner = rows_of_users(self.offsets, users)
        return self.rows[positions], owner


class NodeUsers:
    """A node's seen and unseen users, and where their rows are; rows are read per request."""

    def __init__(self, columns: PairColumns, seen_users: np.ndarray, unseen_users: np.ndarray,
                 groups: dict[tuple[bool, str], _RowList]) -> None:
        self.columns, self.seen_users, self.unseen_users, self._groups = columns, seen_users, unseen_users, groups

    @property
    def n_train_users(self) -> int:
        return int(self.seen_users.size)

    @property
    def dim(self) -> int:
        return self.columns.dim

    @classmethod
    def from_index(cls, columns: PairColumns, index: PairIndex, first_user: int, stop_user: int) -> "NodeUsers":
        """Users first_user..stop_user-1 of the index: reads their seen and split values, not their diffs."""
        rows = index.rows(first_user, stop_user)
        user_pos = index.row_users(first_user, stop_user)
        is_seen = columns.take("seen", rows[index.starts[first_user:stop_user] - index.starts[first_user]])
        is_train = columns.take("split", rows) == "train"
        local = np.where(is_seen, np.cumsum(is_seen) - 1, np.cumsum(~is_seen) - 1)  # index among its kind
        groups = {}
        for seen in (True, False):
            n_users = int((is_seen == seen).sum())
            for split in ("train", "test"):
                mine = (is_seen[user_pos] == seen) & (is_train == (split == "train"))
                owners = local[user_pos[mine]]
                groups[seen, split] = _RowList(rows[mine], np.searchsorted(owners, np.arange(n_users + 1)))
        ids = index.user_ids[first_user:stop_user]
        return cls(columns, ids[is_seen], ids[~is_seen], groups)

    @classmethod
    def from_pairs(cls, pairs: PairSet) -> "NodeUsers":
        """Every user of an in-memory pair set (a device's own file)."""
        columns = PairColumns.from_pairs(pairs)
        index = PairIndex.build(columns)
        return cls.from_index(columns, index, 0, index.n_users)

    def _rows(self, seen: bool, split: str, users: np.ndarray, relabel: bool) -> RowGroup:
        rows, position = self._groups[seen, split].cut(users)
        logit_true = self.columns.take("logit_true", rows).astype(np.float64) if self.columns.has("logit_true") \
            else None
        return RowGroup(diff=self.columns.take("diff", rows).astype(np.float64),
                        user_idx=(position if relabel else users[position]).astype(np.int64), logit_true=logit_true)

    def training_block(self, sampled: np.ndarray) -> UserBlock:
        """The node's users with the training rows of the `sampled` local seen users only (user_idx stays local to
        the node): what one training round reads."""
        empty = np.zeros(0, np.int64)
        return UserBlock(seen_users=self.seen_users, unseen_users=self.unseen_users,
                         seen_train=self._rows(True, "train", np.asarray(sampled, np.int64), relabel=False),
                         seen_test=self._rows(True, "test", empty, relabel=True),
                         unseen_train=self._rows(False, "train", empty, relabel=True),
                         unseen_test=self._rows(False, "test", empty, relabel=True))

    def evaluation_blocks(self, max_users: int = EVAL_BLOCK_USERS) -> Iterator[tuple[slice, UserBlock]]:
        """The node's users in blocks of at most `max_users` seen (and as many unseen) users, all four row groups
        each: (slice of the node's seen users, block with user indices local to the block)."""
        parts = max(1, -(-max(self.n_train_users, self.unseen_users.size) // max_users))
        seen_parts = np.array_split(np.arange(self.n_train_users), parts)
        unseen_parts = np.array_split(np.arange(self.unseen_users.size), parts)
        for seen, unseen in zip(seen_parts, unseen_parts):
            block = UserBlock(seen_users=self.seen_users[seen], unseen_users=self.unseen_users[unseen],
                              seen_train=self._rows(True, "train", seen, relabel=True),
                              seen_test=self._rows(True, "test", seen, relabel=True),
                              unseen_train=self._rows(False, "train", unseen, relabel=True),
                              unseen_test=self._rows(False, "test", unseen, relabel=True))
            yield slice(int(seen[0]) if seen.size else 0, int(seen[-1]) + 1 if seen.size else 0), block

    def whole_block(self) -> UserBlock:
        """All the node's rows at once (small nodes: a device, a few users)."""
        (_, block), = self.evaluation_blocks(max(self.n_train_users, self.unseen_users.size, 1))
        return block


def block_of_partition(user_ids: np.ndarray, partition_id: int, num_partitions: int) -> np.ndarray:
    """User ids of partition `partition_id` when the sorted ids are cut into `num_partitions` contiguous blocks."""
    first, stop = partition_bounds(user_ids.size, partition_id, num_partitions)
    return np.sort(user_ids)[first:stop]


def partitions_holding(positions: np.ndarray, n_users: int, num_partitions: int) -> int:
    """How many of the `num_partitions` blocks of n sorted users hold at least one of the users at `positions` (the
    seen users: the only ones a round samples)."""
    stops = np.array([partition_bounds(n_users, k, num_partitions)[1] for k in range(num_partitions)])
    return int(np.unique(np.searchsorted(stops, np.asarray(positions), side="right")).size)


def partition_bounds(n_users: int, partition_id: int, num_partitions: int) -> tuple[int, int]:
    """(first, stop) positions of partition `partition_id` among n sorted users (np.array_split's blocks)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    if num_partitions > n_users:
        raise ValueError(f"{num_partitions} nodes for {n_users} users: every node must host at least one user")
    size, extra = divmod(n_users, num_partitions)
    first = partition_id * size + min(partition_id, extra)
    return first, first + size + (partition_id < extra)


def make_block(pairs: PairSet, users: np.ndarray) -> UserBlock:
    """All rows of `users` in an in-memory pair set, as one block."""
    return NodeUsers.from_pairs(pairs.subset(np.isin(pairs.user, users))).whole_block()


@lru_cache(maxsize=4)
def _file_index(path: str) -> tuple[PairColumns, PairIndex]:
    # Once per worker process and file: a Ray actor serves many virtual nodes of the same file.
    columns = PairColumns.open(path)
    return columns, PairIndex.build(columns)


@lru_cache(maxsize=1024)
def load_partition_users(path: str, partition_id: int, num_partitions: int) -> NodeUsers:
    """Simulation: the users of virtual node `partition_id` in the shared pair file (the file was validated where it
    arrived, `lore-fed simulate`; here only its layout is read)."""
    columns, index = _file_index(path)
    return NodeUsers.from_index(columns, index, *partition_bounds(index.n_users, partition_id, num_partitions))


def load_device_users(path: str) -> NodeUsers:
    """Deployment: every user in the device's own pair file (normally one), validated, and refused when clearly off
    the scale federated training is set for (`simulate` checks a whole population's file; here a node checks its own,
    with the band its few pairs allow, DEVICE_DIFF_RMS). Embeddings at 1e-4 or beside one coordinate 1000 times the
    others would train the shared basis as poorly as `simulate`'s refused runs, with exit 0."""
    pairs = load_pairs(path)
    if pairs.n >= DEVICE_MIN_PAIRS:  # fewer: near-identical responses alone look like a broken embedder
        squares = np.einsum("nd,nd->d", pairs.diff, pairs.diff, dtype=np.float64)
        check_federated_scale(squares, pairs.n, path, band=DEVICE_DIFF_RMS)
    return NodeUsers.from_pairs(pairs)
