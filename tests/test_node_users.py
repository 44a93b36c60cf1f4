"""A node keeps where its users' rows are, reads a round's sampled users only, and evaluates in blocks."""

import numpy as np
import pytest

from federation.local_training import evaluate_block, evaluate_node
from federation.user_block import (NodeUsers, block_of_partition, load_partition_users, make_block,
                                   partition_bounds)
from lore_core.pairs import save_pairs
from simulations.flower_run import MAX_NODES, SHARD_SIZE, nodes_for
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs


@pytest.fixture(scope="module")
def pairs():
    return make_synthetic_pairs(SyntheticPairsConfig(dim=8, true_rank=2, seen_users=23, unseen_users=7,
                                                     train_pairs=(3, 6), test_pairs=4, seed=3))[0]


def test_partitions_are_the_contiguous_blocks_of_sorted_users(pairs, tmp_path):
    path = str(save_pairs(pairs, tmp_path / "p.npz"))
    ids = np.unique(pairs.user)
    for pid in range(4):
        node = load_partition_users(path, pid, 4)
        expected = block_of_partition(ids, pid, 4)
        assert np.concatenate([node.seen_users, node.unseen_users]).tolist() == expected.tolist()
        assert partition_bounds(30, pid, 4)[1] - partition_bounds(30, pid, 4)[0] == expected.size
    with pytest.raises(ValueError, match="at least one user"):
        partition_bounds(3, 0, 4)


def test_training_block_holds_exactly_the_sampled_users_rows(pairs):
    node = NodeUsers.from_pairs(pairs)
    whole = node.whole_block()
    sampled = np.array([1, 4, 20])
    block = node.training_block(sampled)
    keep = np.isin(whole.seen_train.user_idx, sampled)
    np.testing.assert_array_equal(block.seen_train.diff, whole.seen_train.diff[keep])
    np.testing.assert_array_equal(block.seen_train.user_idx, whole.seen_train.user_idx[keep])
    assert block.n_train_users == 23 and block.seen_test.diff.shape == (0, 8)


def test_whole_block_matches_the_rows_of_each_user(pairs):
    block = make_block(pairs, np.unique(pairs.user)[::3])
    for users, group, seen, split in ((block.seen_users, block.seen_train, True, "train"),
                                      (block.unseen_users, block.unseen_test, False, "test")):
        rows = (pairs.seen == seen) & (pairs.split == split) & np.isin(pairs.user, users)
        np.testing.assert_array_equal(group.diff, pairs.diff[rows].astype(np.float64))
        assert users[group.user_idx].tolist() == pairs.user[rows].tolist()


def test_evaluation_in_blocks_equals_evaluation_of_the_whole_node(pairs):
    node = NodeUsers.from_pairs(pairs)
    basis = np.random.default_rng(0).standard_normal((2, 8))
    start = np.full((node.n_train_users, 2), 0.5)
    w_whole, sums_whole = evaluate_block(basis, node.whole_block(), start, prior_pairs=3.0)
    w_blocks, sums_blocks = evaluate_node(basis, node, start, prior_pairs=3.0, max_users=4)
    np.testing.assert_allclose(w_blocks, w_whole, atol=1e-8)
    assert sums_blocks == pytest.approx(sums_whole, abs=1e-9)


def test_node_count_is_bounded_and_small_populations_keep_their_layout():
    assert nodes_for(40) == 40  # one user per node
    assert nodes_for(1500) == 30  # ~SHARD_SIZE users per node
    assert nodes_for(110_000) == MAX_NODES and nodes_for(10**7) == MAX_NODES
    assert nodes_for(110_000, users_per_node=SHARD_SIZE) == 2200  # explicit blocks are honoured
