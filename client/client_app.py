"""lore-fed ClientApp: translates Flower messages to `federation.local_training` calls and back (numpy only).

A node hosts a block of users (one on a device). Replies carry the sampled users' basis updates and counts only:
w stays in `client.user_state`, pairs and per-pair values never leave this module. Under DP (privacy mode in the
train config, set by the server) train replies carry no data-dependent metric: in user modes each user's update is
clipped here to the clip norm (and re-clipped by the server); in record mode each update is an Opacus DP-SGD
output, sent with the users' accountant histories. A device's own limits in its node config (client.node_limits)
are checked before any work, and one message's read-train-write holds the device's lock (user_state.device_lock).
This app serves every privacy mode: a SecAgg+ train message goes to `client.secagg_client_app`, so the one
ClientApp that `pyproject.toml` deploys also serves `user+secagg`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS

from federation import protocol as p
from federation.local_training import (device_fit_weights, evaluate_node, pair_weighted, personal_fit_weights,
                                       record_dp_updates, train_sampled_users)
from federation.canary_users import CanaryBlock, load_canary_block
from federation.user_block import NodeUsers, load_device_users, load_partition_users
from client.node_limits import NodeLimitError, NodeLimits
from client.user_state import (device_lock, load_record_histories, load_record_logits, load_weights,
                               save_record_state, save_weights)
from lore_core.pairs import PAIRS_FILENAME

app = ClientApp()
log = logging.getLogger("lore_fed.client")


class ClientRequestError(ValueError):
    """A server request this node cannot serve (bad indices, wrong basis width)."""


class NodeFailure(RuntimeError):
    """What the server learns of a node's failure other than a refusal of its request: that it failed, no more."""


@contextlib.contextmanager
def data_free_errors(what: str):
    """Flower sends a failed handler's exception text to the server (the error reply's reason), which keeps it in
    rounds.jsonl. A refusal of the server's request (ClientRequestError, NodeLimitError: its text is about the
    request or the device's own limits) goes as it is; any other failure is logged here, on the node, and reaches
    the server as a fixed sentence, since its text may carry the node's data (found by a reviewer: record mode's
    "delta must be < 1/n = ... for this client's 37 pairs" told the server a user's pair count)."""
    try:
        yield
    except (ClientRequestError, NodeLimitError):
        raise
    except Exception:
        log.exception("this node failed while %s (the server is told only that it failed)", what)
        # Not even the exception's class: which one a fit raises (LinAlgError, ...) may depend on the data.
        raise NodeFailure(f"the node failed while {what}; the details stay in the node's own log") from None


def node_users(context: Context, settings: p.ClientSettings) -> NodeUsers | CanaryBlock:
    """This node's users: the device's own file, a block of the shared pair file (simulation) or, on the last
    `canary-nodes` partitions of a simulation with canaries, a block of canary users."""
    data_path = context.node_config.get("data-path")
    if data_path:  # deployment: the device's own file
        file = Path(str(data_path)) / PAIRS_FILENAME
        if not file.is_file():  # the node's configuration, not its data: the operator must be told
            raise ClientRequestError(f"node config data-path {data_path} holds no {PAIRS_FILENAME}")
        return load_device_users(str(file))
    if not settings.pairs_path:
        raise ClientRequestError("run config `pairs-path` is empty and node config has no `data-path`")
    partition, partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    real = partitions - settings.canary_nodes
    if partition >= real:
        return load_canary_block(settings.canary_secrets, partition - real, settings.canary_nodes)
    return load_partition_users(settings.pairs_path, partition, real)


def checked_basis(basis: np.ndarray, node: NodeUsers) -> np.ndarray:
    """The server's basis as float64 (B, D), refused unless its width is this node's embedding width."""
    basis = np.asarray(basis, dtype=np.float64)
    if basis.ndim != 2 or basis.shape[1] != node.dim or not np.isfinite(basis).all():
        raise ClientRequestError(f"basis must be a finite (B, {node.dim}) array, got {basis.shape}")
    return basis


def checked_run_id(config) -> str | None:
    """The run id of a train or evaluate config (protocol.run_id); a malformed one is the request's fault."""
    try:
        return p.run_id(config)
    except ValueError as exc:
        raise ClientRequestError(str(exc)) from exc


def checked_user_indices(sampled: np.ndarray, node: NodeUsers) -> np.ndarray:
    """The sampled local user indices, refused unless distinct and within this node's training users."""
    sampled = np.asarray(sampled, dtype=np.int64)
    if sampled.size == 0 or sampled.min() < 0 or sampled.max() >= node.n_train_users or \
            np.unique(sampled).size != sampled.size:
        raise ClientRequestError(f"user-indices must be distinct in [0, {node.n_train_users}), got {sampled}")
    return sampled


def train_clipped(context: Context, settings: p.ClientSettings, node: NodeUsers, basis: np.ndarray,
                  sampled: np.ndarray, clip_norm: float | None, run_id: str | None) -> np.ndarray:
    """Fit the sampled users' w (kept on the node) and return their basis updates (k, B, D), each clipped to
    `clip_norm` (flat L2, one user = one privacy unit) unless it is None (mode none). Both train paths use it.
    A canary node's users upload their canary (federation/canary_users.py)."""
    if isinstance(node, CanaryBlock):
        if clip_norm is None:
            raise ClientRequestError("canary users take part in user-level DP modes only")
        return node.updates(sampled, clip_norm)
    weights = load_weights(context, node.n_train_users, basis.shape[0], run_id)
    block = node.training_block(sampled)
    weights, updates = train_sampled_users(basis, block, weights, sampled,
                                           prior_pairs=settings.train_prior_pairs, steps=settings.local_steps,
                                           lr=settings.client_lr, objective=settings.objective)
    save_weights(context, weights, run_id)
    if clip_norm is not None:
        return clip_finite_users(updates, clip_norm)
    if settings.weight_by == "pair":  # mode none only (server.run_settings): every pair counted once
        updates = pair_weighted(updates, block, sampled, settings.pairs_per_user)
    return updates


def clip_finite_users(updates: np.ndarray, clip_norm: float) -> np.ndarray:
    """Each user's update clipped to `clip_norm`; one whose norm is not finite comes back as NaN, for the server
    (user) or the node's sum (user+secagg) to leave out that user only. clip_updates refuses it, which failed the
    whole node: every node of a round, and the run stopped, though README promises one user left out."""
    from lore_core.privacy.dp_fedavg import clip_updates

    updates = np.asarray(updates, dtype=np.float64)
    flat = updates.reshape(len(updates), -1)
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(np.einsum("ki,ki->k", flat, flat))
    out = np.full_like(updates, np.nan)
    out[finite] = clip_updates(updates[finite], clip_norm)[0]
    return out


@app.query()
def query(msg: Message, context: Context) -> Message:
    settings = p.ClientSettings.from_run_config(context.run_config)  # the server's own run config: no node data
    with data_free_errors("answering the population query"):
        node = node_users(context, settings)
    # -1: a device without a partition id (the server then orders it by node id).
    metrics = MetricRecord({p.PARTITION_ID: int(context.node_config.get("partition-id", -1)),
                            p.NUM_TRAIN_USERS: node.n_train_users, p.DIM: node.dim})
    return Message(RecordDict({p.METRICS: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if SECAGG_CONFIGS in msg.content.config_records:  # user+secagg: one of SecAgg+'s four stages, all train messages
        from client.secagg_client_app import app as secagg_app  # imports this module

        return secagg_app(msg, context)
    config = msg.content[p.CONFIG]
    mode = str(config.get(p.PRIVACY_MODE, "none"))
    NodeLimits.from_node_config(context.node_config).check_mode(mode)
    with device_lock(context), data_free_errors("training"):
        return _train(msg, context, config, mode)


def _train(msg: Message, context: Context, config, mode: str) -> Message:
    settings = p.ClientSettings.from_run_config(context.run_config)
    node = node_users(context, settings)
    basis = checked_basis(msg.content[p.ARRAYS][p.BASIS].numpy(), node)
    sampled = checked_user_indices(config[p.USER_INDICES], node)
    run_id = checked_run_id(config)
    arrays = {}
    if mode == "record" and isinstance(node, CanaryBlock):
        raise ClientRequestError("canary users take part in user-level DP modes only")
    if mode == "record":
        ledger_rows = msg.content[p.ARRAYS][p.DP_HISTORY].numpy() if p.DP_HISTORY in msg.content[p.ARRAYS] else None
        updates, history = _record_train(context, config, settings, basis, node, sampled, ledger_rows, run_id)
        arrays[p.DP_HISTORY] = Array(np.ascontiguousarray(history))
    else:  # user modes: one flat clip per user here (and re-checked by the server)
        clip_norm = float(config[p.CLIP_NORM]) if mode in ("user", "user+secagg") else None
        updates = train_clipped(context, settings, node, basis, sampled, clip_norm, run_id)
    arrays[p.UPDATES] = Array(np.ascontiguousarray(updates))
    return Message(RecordDict({p.ARRAYS: ArrayRecord(arrays),
                               p.METRICS: MetricRecord({p.NUM_USERS: int(sampled.size)})}), reply_to=msg)


def _record_train(context: Context, config, settings: p.ClientSettings, basis: np.ndarray, node: NodeUsers,
                  sampled: np.ndarray, ledger_rows: np.ndarray | None = None,
                  run_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Record mode: DP-SGD per sampled user over its private logits and the basis, continuing each user's stored
    accountant history, or the server ledger's (`ledger_rows`, (s, 4) rows (position in sampled, z, q, steps))
    where that extends it: a node that lost its state must not check max-epsilon from zero
    (record_dp.starting_history). Returns (updates (k, B, D), what each sampled user spent that the ledger lacks,
    as rows (position, z, q, steps): increments, never whole histories)."""
    from lore_core.privacy.record_dp import check_request, spending_to_report, starting_history

    keys = (p.NOISE_MULTIPLIER, p.MAX_GRAD_NORM, p.RECORD_BATCH_SIZE, p.RECORD_SAMPLE_RATE, p.RECORD_EPOCHS)
    if missing := [key for key in keys if key not in config]:  # a server from before the public rate, say
        raise ClientRequestError(f"record mode: the train message lacks {missing}")
    try:  # the request as a whole, before any user: a refusal must not depend on which users hold pairs; the raw
        check_request(*(config[key] for key in keys))  # values, so that a batch size of 4.7 is not taken as 4
    except (ValueError, TypeError, OverflowError) as exc:
        raise ClientRequestError(f"record mode: {exc}") from None
    stored = load_record_histories(context)
    owner = stored[:, 0].astype(np.int64)
    own = [_history_state(stored[owner == u]) for u in sampled]
    ledger = None if ledger_rows is None else _ledger_states(ledger_rows, sampled.size)
    states = [starting_history(mine, None if ledger is None else ledger[i]) for i, mine in enumerate(own)]
    logits = load_record_logits(context, node.n_train_users, basis.shape[0], run_id)
    limits = NodeLimits.from_node_config(context.node_config)
    max_epsilon = config.get(p.MAX_EPSILON)
    max_epsilon, delta = limits.record_budget(None if max_epsilon is None else float(max_epsilon),
                                              float(config[p.DELTA]))
    seed = limits.noise_seed(config.get(p.NOISE_SEED))
    logits, updates, after = record_dp_updates(
        basis, node.training_block(sampled), logits, sampled, states, lr=settings.client_lr,
        noise_multiplier=float(config[p.NOISE_MULTIPLIER]), max_grad_norm=float(config[p.MAX_GRAD_NORM]),
        batch_size=int(config[p.RECORD_BATCH_SIZE]), sample_rate=float(config[p.RECORD_SAMPLE_RATE]),
        epochs=int(config[p.RECORD_EPOCHS]),
        delta=delta, max_epsilon=max_epsilon,
        noise_seed=None if seed is None else seed + 104729 * int(config[p.ROUND]), device=settings.device)
    rows = [(u, z, q, k) for u, state in zip(sampled, after) for z, q, k in state.history]
    kept = stored[~np.isin(owner, sampled)]
    save_record_state(context, np.concatenate([kept, np.array(rows, dtype=np.float64).reshape(-1, 4)]), logits,
                      run_id)
    increments = [(i, z, q, k) for i, (now, start) in enumerate(zip(after, states))
                  for z, q, k in spending_to_report(now, start, None if ledger is None else ledger[i])]
    return updates, np.array(increments, dtype=np.float64).reshape(-1, 4)


def _history_state(rows: np.ndarray):
    """Rows (owner, z, q, steps) of one user -> its RecordDpState."""
    from lore_core.privacy.record_dp import RecordDpState

    return RecordDpState(history=[(float(z), float(q), int(k)) for _, z, q, k in rows])


def _ledger_states(rows: np.ndarray, n_sampled: int) -> list:
    """The server's dp-history rows (position in sampled, z, q, steps) -> one RecordDpState per sampled user."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != 4 or not np.isfinite(rows).all() or \
            not set(rows[:, 0].astype(np.int64)) <= set(range(n_sampled)):
        raise ClientRequestError(f"dp-history must be (s, 4) rows (position < {n_sampled}, z, q, steps); got "
                                 f"shape {rows.shape}")
    position = rows[:, 0].astype(np.int64)
    return [_history_state(rows[position == i]) for i in range(n_sampled)]


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    NodeLimits.from_node_config(context.node_config).check_evaluate()
    with device_lock(context), data_free_errors("evaluating"):
        return _evaluate(msg, context)


def _evaluate(msg: Message, context: Context) -> Message:
    settings = p.ClientSettings.from_run_config(context.run_config)
    node = node_users(context, settings)
    basis = checked_basis(msg.content[p.ARRAYS][p.BASIS].numpy(), node)
    if isinstance(node, CanaryBlock):  # canaries hold no pairs: they add nothing to the evaluation sums
        sums = {key: 0.0 for key in p.EVAL_SUM_KEYS}
        return Message(RecordDict({p.METRICS: MetricRecord(sums)}), reply_to=msg)
    run_id = checked_run_id(msg.content[p.CONFIG]) if p.CONFIG in msg.content else None
    weights = load_weights(context, node.n_train_users, basis.shape[0], run_id)
    on_device = bool(context.node_config.get("data-path"))  # deployment: evaluate with the device's own code
    weights, sums = evaluate_node(basis, node, weights, prior_pairs=settings.prior_pairs,
                                  fit=device_fit_weights if on_device else personal_fit_weights)
    save_weights(context, weights, run_id)
    return Message(RecordDict({p.METRICS: MetricRecord(sums)}), reply_to=msg)
