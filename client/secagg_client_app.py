"""lore-fed ClientApp for privacy mode `user+secagg` (component `client.secagg_client_app:app`).

Flower 1.42's SecAgg+ exists only for the legacy API: `secaggplus_mod` turns a legacy `FitRes` into masked integer
vectors. So `train` is a legacy `NumPyClient` behind that mod, while `query` and `evaluate` are the Message-API
handlers of `client.client_app` (same contract, same metric names).

Train, per node: for the node's sampled users fit w and compute each user's update dA_u (k, B, D); each user then
clips it to C, rounds it to the server's grid and adds its own share of discrete Gaussian noise
(`lore_core.privacy.distributed_dp.encode_shares`: the distributed discrete Gaussian, one share per user, also
when a virtual node hosts many users), and the node hands the SUM of its users' noised integer vectors (B, D, as
exact grid multiples) to the mod, which masks it. num_examples = 1 (uniform weight, nothing private). The server
unmasks only the sum over nodes, which is never without noise. w stays in `client.user_state` as in
`client.client_app`.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client import client_app as message_app
from client.node_limits import NodeLimits
from client.user_state import device_lock
from federation import protocol as p
from lore_core.privacy.distributed_dp import DdgEncoding, encode_shares, node_upload, share_std

log = logging.getLogger("lore_fed.client")


class SecAggTrainer(NumPyClient):
    """The legacy face of one node for SecAgg+: fit -> ([its users' noised integer sum as grid multiples (B, D)], 1, {})."""

    def __init__(self, context: Context) -> None:
        self.node_context = context

    def fit(self, parameters: list, config: dict) -> tuple[list, int, dict]:
        limits = NodeLimits.from_node_config(self.node_context.node_config)
        limits.check_mode("user+secagg")
        with device_lock(self.node_context), message_app.data_free_errors("training"):
            return self._fit(parameters, config, limits)

    def _fit(self, parameters: list, config: dict, limits: NodeLimits) -> tuple[list, int, dict]:
        context = self.node_context
        settings = p.ClientSettings.from_run_config(context.run_config)
        node = message_app.node_users(context, settings)
        basis = message_app.checked_basis(parameters[0], node)
        try:
            sampled = message_app.checked_user_indices(p.decode_user_indices(config[p.USER_INDICES]), node)
        except ValueError as exc:
            raise message_app.ClientRequestError(str(exc)) from exc
        clip_norm = float(config[p.CLIP_NORM])
        updates = message_app.train_clipped(context, settings, node, basis, sampled, clip_norm,
                                            message_app.checked_run_id(config))
        finite = np.isfinite(updates).all(axis=(1, 2))
        if not finite.all():  # the server sees only the sum: one user's NaN must not void the node's other users
            log.warning("%d of %d sampled users' updates are not finite; they send a zero update (and their noise "
                        "share) this round", int((~finite).sum()), finite.size)
            updates = np.where(finite[:, None, None], updates, 0.0)
        encoding = DdgEncoding(clip_norm, float(config[p.CLIPPING_RANGE]),
                               int(round(2 * float(config[p.CLIPPING_RANGE]) / float(config[p.GRANULARITY]))))
        std = share_std(float(config[p.NOISE_MULTIPLIER]), clip_norm, int(config[p.SAMPLED_USERS]),
                        float(config[p.DROPOUT_TOLERANCE]))
        # debug runs only (the ledger says NOT PRIVATE; a deployed node refuses it unless it allows it), else secret
        seed = limits.noise_seed(config.get(p.NOISE_SEED))
        rng = None if seed is None else np.random.default_rng(
            [seed, int(config[p.ROUND]), int(context.node_config.get("partition-id", 0))])
        return [node_upload(encode_shares(updates, encoding, std, rng), encoding)], 1, {}


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
