"""lore-fed ClientApp for privacy mode `user+secagg` (component `client.secagg_client_app:app`).

Flower 1.42's SecAgg+ exists only for the legacy API: `secaggplus_mod` turns a legacy `FitRes` into masked integer
vectors. So `train` is a legacy `NumPyClient` behind that mod, while `query` and `evaluate` are the Message-API
handlers of `client.client_app` (same contract, same metric names).

Train, per node: for the node's sampled users fit w and compute each user's update dA_u (k, B, D), clip each one
to the per-user norm the server sends (flat L2; one user = one privacy unit, also when a virtual node hosts many
users), and hand the node's SUM (B, D) to the mod, which quantises and masks it. num_examples = 1 (uniform weight,
nothing private). The server unmasks only the sum over nodes. w stays in `client.user_state` as in `client.client_app`.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client import client_app as message_app
from federation import protocol as p

log = logging.getLogger("lore_fed.client")


class SecAggTrainer(NumPyClient):
    """The legacy face of one node for SecAgg+: fit -> ([sum of its users' clipped updates (B, D)], 1, {})."""

    def __init__(self, context: Context) -> None:
        self.node_context = context

    def fit(self, parameters: list, config: dict) -> tuple[list, int, dict]:
        context = self.node_context
        settings = p.ClientSettings.from_run_config(context.run_config)
        node = message_app.node_users(context, settings)
        basis = message_app.checked_basis(parameters[0], node)
        try:
            sampled = message_app.checked_user_indices(p.decode_user_indices(config[p.USER_INDICES]), node)
        except ValueError as exc:
            raise message_app.ClientRequestError(str(exc)) from exc
        # per user; the server leaves room for quantisation in this clip norm
        updates = message_app.train_clipped(context, settings, node, basis, sampled, float(config[p.CLIP_NORM]))
        finite = np.isfinite(updates).all(axis=(1, 2))
        if not finite.all():  # the server sees only the sum: one user's NaN must not void the node's other users
            log.warning("%d of %d sampled users' updates are not finite; they send nothing this round",
                        int((~finite).sum()), finite.size)
        return [updates[finite].sum(axis=0)], 1, {}


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
