"""lore-fed ClientApp for privacy mode `user+secagg` (component `client.secagg_client:app`).

Flower 1.42's SecAgg+ exists only for the legacy API: `secaggplus_mod` turns a legacy `FitRes` into masked integer
vectors. So `train` is a legacy `NumPyClient` behind that mod, while `query` and `evaluate` are the Message-API
handlers of `client.app` (same contract, same metric names).

Train, per node: for the node's sampled users fit w and compute each user's update dA_u (k, B, D), clip each one
to the per-user norm the server sends (flat L2; one user = one privacy unit, also when a virtual node hosts many
users), and hand the node's SUM (B, D) to the mod, which quantises and masks it. num_examples = 1 (uniform weight,
nothing private). The server unmasks only the sum over nodes. w stays in `client.user_state` as in `client.app`.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client import app as message_app
from client import protocol as p
from client.local_training import train_sampled_users
from client.user_state import load_weights, save_weights
from lore_core.privacy.mechanism import clip_updates


class SecAggTrainer(NumPyClient):
    """The legacy face of one node for SecAgg+: fit -> ([sum of its users' clipped updates (B, D)], 1, {})."""

    def __init__(self, context: Context) -> None:
        self.node_context = context

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        context = self.node_context
        settings = p.ClientSettings.from_run_config(context.run_config)
        block = message_app.node_block(context, settings)
        basis = np.asarray(parameters[0], dtype=np.float64)
        if basis.ndim != 2 or basis.shape[1] != block.dim:
            raise message_app.ClientRequestError(f"basis must be (B, {block.dim}), got {basis.shape}")
        sampled = decode_user_indices(config[p.USER_INDICES])
        if sampled.size == 0 or sampled.min() < 0 or sampled.max() >= block.n_train_users or \
                np.unique(sampled).size != sampled.size:
            raise message_app.ClientRequestError(
                f"user-indices must be distinct in [0, {block.n_train_users}), got {sampled}")
        clip_norm = float(config[p.CLIP_NORM])  # per user; the server leaves room for rounding
        weights = load_weights(context, block.n_train_users, basis.shape[0])
        weights, updates = train_sampled_users(basis, block, weights, sampled, prior_pairs=settings.train_prior_pairs,
                                               steps=settings.local_steps, lr=settings.client_lr)
        save_weights(context, weights)
        return [clipped_node_sum(updates, clip_norm)], 1, {}


def encode_user_indices(indices: np.ndarray) -> bytes:
    """Local user indices (k,) -> bytes: a legacy FitIns config holds scalars only, no lists."""
    return np.ascontiguousarray(indices, dtype="<i8").tobytes()


def decode_user_indices(data: bytes) -> np.ndarray:
    if not isinstance(data, bytes) or len(data) % 8:
        raise message_app.ClientRequestError(f"user-indices must be int64 bytes, got {type(data).__name__}")
    return np.frombuffer(data, dtype="<i8").astype(np.int64)


def clipped_node_sum(updates: np.ndarray, clip_norm: float) -> np.ndarray:
    """(k, B, D) per-user updates -> (B, D) sum of the updates each clipped to clip_norm (flat L2)."""
    clipped, _ = clip_updates(updates, clip_norm)
    return clipped.sum(axis=0)


def _client_fn(context: Context):
    return SecAggTrainer(context).to_client()


_legacy_train = ClientApp(client_fn=_client_fn)  # legacy FitIns -> fit -> FitRes, in the record format the mod reads

app = ClientApp()
app.query()(message_app.query)
app.evaluate()(message_app.evaluate)


@app.train(mods=[secaggplus_mod])
def train(msg, context: Context):
    """All four SecAgg+ stages arrive as train messages; the mod calls this only in 'collect masked vectors'."""
    return _legacy_train(msg, context)
