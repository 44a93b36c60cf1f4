"""lore-fed ClientApp: translates Flower messages to `client.local_training` calls and back (numpy only).

A node hosts a block of users (one on a device). Replies carry the sampled users' basis updates and counts only:
w stays in `client.user_state`, pairs and per-pair values never leave this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import protocol as p
from client.local_training import evaluate_block, train_sampled_users
from client.user_block import UserBlock, load_device_block, load_partition_block
from client.user_state import load_weights, save_weights
from lore_core.pairs import PAIRS_FILENAME

app = ClientApp()


class ClientRequestError(ValueError):
    """A server request this node cannot serve (bad indices, wrong basis width)."""


def _block(context: Context, settings: p.ClientSettings) -> UserBlock:
    data_path = context.node_config.get("data-path")
    if data_path:  # deployment: the device's own file
        return load_device_block(str(Path(str(data_path)) / PAIRS_FILENAME))
    if not settings.pairs_path:
        raise ClientRequestError("run config `pairs-path` is empty and node config has no `data-path`")
    return load_partition_block(settings.pairs_path, int(context.node_config["partition-id"]),
                                int(context.node_config["num-partitions"]))


def _basis(msg: Message, block: UserBlock) -> np.ndarray:
    basis = msg.content[p.ARRAYS][p.BASIS].numpy().astype(np.float64)
    if basis.ndim != 2 or basis.shape[1] != block.dim:
        raise ClientRequestError(f"basis must be (B, {block.dim}), got {basis.shape}")
    return basis


@app.query()
def query(msg: Message, context: Context) -> Message:
    block = _block(context, p.ClientSettings.from_run_config(context.run_config))
    # -1: a device without a partition id (the server then orders it by node id).
    metrics = MetricRecord({p.PARTITION_ID: int(context.node_config.get("partition-id", -1)),
                            p.NUM_TRAIN_USERS: block.n_train_users, p.DIM: block.dim})
    return Message(RecordDict({p.METRICS: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = p.ClientSettings.from_run_config(context.run_config)
    block = _block(context, settings)
    basis = _basis(msg, block)
    sampled = np.asarray(msg.content[p.CONFIG][p.USER_INDICES], dtype=np.int64)
    if sampled.size == 0 or sampled.min() < 0 or sampled.max() >= block.n_train_users or \
            np.unique(sampled).size != sampled.size:
        raise ClientRequestError(f"user-indices must be distinct in [0, {block.n_train_users}), got {sampled}")
    weights = load_weights(context, block.n_train_users, basis.shape[0])
    weights, updates = train_sampled_users(basis, block, weights, sampled, prior_strength=settings.prior_strength,
                                           steps=settings.local_steps, lr=settings.client_lr)
    save_weights(context, weights)
    return Message(RecordDict({p.ARRAYS: ArrayRecord({p.UPDATES: Array(np.ascontiguousarray(updates))}),
                               p.METRICS: MetricRecord({p.NUM_USERS: int(sampled.size)})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings = p.ClientSettings.from_run_config(context.run_config)
    block = _block(context, settings)
    basis = _basis(msg, block)
    weights = load_weights(context, block.n_train_users, basis.shape[0])
    weights, sums = evaluate_block(basis, block, weights, prior_strength=settings.prior_strength)
    save_weights(context, weights)
    return Message(RecordDict({p.METRICS: MetricRecord(sums)}), reply_to=msg)
