"""LoReStrategy: our own Flower `Strategy` (not a FedAvg subclass), driven by Flower's `Strategy.start` loop.

Per round t: the aggregator samples users; each node with sampled users gets the basis and their local indices;
valid replies (finite (k, B, D) updates for exactly the users asked) are aggregated, invalid ones are logged and
dropped (the round goes on, the basis is never touched by them); the privacy ledger records the round (before the
new basis leaves `aggregate_train`: evaluation messages and the checkpoint come after); the server optimizer
steps A. All nodes evaluate after the last round, and every `eval-every` rounds when that is on (under DP only
with allow-uncovered-eval: evaluation sums are not covered by the accountant). `aggregate_evaluate` is the last
hook of a round in `Strategy.start`, so the round's checkpoint is written there.
Flower numbers the rounds of one `start` call from 1; `first_round` shifts them to the run's rounds on resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from client import protocol as p
from server.aggregation import Aggregator
from server.checkpoint import RunState, save_checkpoint
from server.optimizer import ServerAdam, ServerSGD, pseudo_gradient
from server.population import Population
from server.privacy import FederatedLedger, stop_for_budget
from server.settings import ServerSettings

log = logging.getLogger("lore_fed.server")


def basis_record(basis: np.ndarray) -> ArrayRecord:
    return ArrayRecord({p.BASIS: Array(np.ascontiguousarray(basis, dtype=np.float64))})


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Per-node sums -> the metric names of `lore-fed train` (unweighted mean over users)."""
    out = {}
    for prefix in ("seen", "unseen"):
        users = sums.get(f"{prefix}-users", 0)
        out[f"{prefix}_test_acc"] = sums[f"{prefix}-acc-sum"] / users if users else float("nan")
        if f"oracle-{prefix}-acc-sum" in sums:
            out[f"oracle_{prefix}_test_acc"] = sums[f"oracle-{prefix}-acc-sum"] / users if users else float("nan")
    return out


def valid_eval_metrics(metrics: MetricRecord) -> bool:
    """An evaluation reply's sums are finite, non-negative counts with accuracy sums <= user counts."""
    values = [metrics.get(key) for key in p.EVAL_SUM_KEYS]
    return all(isinstance(v, (int, float)) and np.isfinite(v) and v >= 0 for v in values) and \
        metrics["seen-acc-sum"] <= metrics["seen-users"] and metrics["unseen-acc-sum"] <= metrics["unseen-users"]


class LoReStrategy(Strategy):
    def __init__(self, settings: ServerSettings, population: Population, aggregator: Aggregator,
                 optimizer: ServerSGD | ServerAdam, state: RunState, ledger: FederatedLedger,
                 train_config: dict | None = None, on_round: Callable[[dict], None] | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.train_config = dict(train_config or {})  # privacy settings the clients need (server/privacy.py)
        self.population = population
        self.aggregator = aggregator
        self.optimizer = optimizer
        self.state = state
        self.first_round = state.round + 1
        self.on_round = on_round
        self._asked: dict[int, int] = {}  # node id -> number of users asked this round
        self._users: dict[int, np.ndarray] = {}  # node id -> global indices of the users asked this round
        self._record: dict = {}
        self._started = 0.0

    def run_round(self, server_round: int) -> int:
        return self.first_round - 1 + server_round

    def summary(self) -> None:
        log.info("LoReStrategy: %d users on %d nodes, %d per round, privacy %s, server %s lr %g, start at round %d",
                 self.population.size, len(self.population.node_ids), self.settings.clients_per_round,
                 self.aggregator.mode, self.optimizer.name, self.settings.server_lr, self.first_round)

    # --- training -----------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._started = time.monotonic()
        t = self.run_round(server_round)
        self.ledger.check_next_round()  # raises PrivacyBudgetExhausted before sampling: nothing of round t happens
        sampled = self.aggregator.sample(self.population.size)
        plan = self.population.assign(sampled)
        self._asked = {node: idx.size for node, idx in plan.items()}
        self._users = {node: self.population.global_indices(node, idx) for node, idx in plan.items()}
        self._record = {"round": t, "sampled_users": int(sampled.size)}
        return [
            Message(RecordDict({p.ARRAYS: arrays, p.CONFIG: ConfigRecord(
                {p.USER_INDICES: idx.tolist(), p.ROUND: t, **self.train_config})}),
                dst_node_id=node, message_type=MessageType.TRAIN)
            for node, idx in plan.items()
        ]

    def reply_problem(self, reply: Message) -> str | None:
        """Why a train reply cannot be used, or None when it is valid."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            return f"client error: {reply.error.reason}"
        if node not in self._asked:
            return "reply from a node that was not asked"
        expected = (self._asked[node], self.state.basis.shape[0], self.state.basis.shape[1])
        content = reply.content
        arrays = {p.UPDATES, p.DP_HISTORY} if self.aggregator.mode == "record" else {p.UPDATES}
        if set(content.keys()) != {p.ARRAYS, p.METRICS} or set(content[p.ARRAYS].keys()) != arrays:
            return f"unexpected content {sorted(content.keys())}"
        if content[p.METRICS].get(p.NUM_USERS) != expected[0]:
            return f"num-users {content[p.METRICS].get(p.NUM_USERS)} != {expected[0]} users asked"
        updates = content[p.ARRAYS][p.UPDATES].numpy()
        if updates.shape != expected:
            return f"updates have shape {updates.shape}, expected {expected}"
        if not np.isfinite(updates).all():
            return "updates contain NaN or Inf"
        if self.aggregator.mode == "record":
            history = content[p.ARRAYS][p.DP_HISTORY].numpy()
            if history.ndim != 2 or history.shape[1] != 4 or not np.isfinite(history).all() or \
                    not set(history[:, 0].astype(int)) <= set(range(expected[0])):
                return f"dp-history must be (s, 4) rows (position < {expected[0]}, z, q, steps); got {history.shape}"
        return None

    def _client_histories(self, reply: Message, global_users: np.ndarray) -> dict[str, list]:
        """Record mode: global user index -> its accountant history [(z, q, steps), ...] from one reply."""
        rows = reply.content[p.ARRAYS][p.DP_HISTORY].numpy()
        histories: dict[str, list] = {}
        for position, z, q, steps in rows:
            histories.setdefault(str(int(global_users[int(position)])), []).append((z, q, int(steps)))
        return histories

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, rejected, seen_nodes, histories = [], [], set(), {}
        for reply in replies:
            node = reply.metadata.src_node_id
            problem = "duplicate reply" if node in seen_nodes else self.reply_problem(reply)
            seen_nodes.add(node)
            if problem:
                log.warning("round %d: rejected the reply of node %d: %s", self.run_round(server_round), node, problem)
                rejected.append({"node": int(node), "reason": problem})
                continue
            accepted.append(reply.content[p.ARRAYS][p.UPDATES].numpy().astype(np.float64))
            if self.aggregator.mode == "record":
                histories.update(self._client_histories(reply, self._users[node]))
        missing = len(set(self._asked) - seen_nodes)
        updates = np.concatenate(accepted) if accepted else np.zeros((0,) + self.state.basis.shape)
        mean_update = self.aggregator.aggregate(updates, self.population.size)
        # Spent budget is on disk before the new basis exists outside this method (raises: nothing is released).
        entry = self.ledger.record_round(self.ledger.rounds_released + 1, self._record["sampled_users"],
                                         client_histories=histories or None)
        eps = self.ledger.epsilon()
        if eps is not None:
            # record mode: per pair, max over clients; never under the user-level key
            key = "record_epsilon_max" if self.aggregator.mode == "record" else "epsilon"
            self._record.update({key: eps.prv, "ledger_round": entry["round"]})
        if mean_update is not None:
            grad = pseudo_gradient(self.state.basis, mean_update, client_lr=self.settings.client_lr,
                                   local_steps=self.settings.local_steps, l2=self.settings.l2)
            new_basis = self.optimizer.step(self.state.basis, grad)
            if np.isfinite(new_basis).all():
                self.state.basis = new_basis
            else:  # cannot happen with validated finite updates; the guard keeps the basis intact regardless
                log.error("round %d: server step produced a non-finite basis; step skipped",
                          self.run_round(server_round))
        self._record.update(accepted_users=int(updates.shape[0]), rejected_replies=rejected,
                            missing_replies=missing)
        metrics = MetricRecord({"accepted-users": int(updates.shape[0]), "rejected-replies": len(rejected)})
        return basis_record(self.state.basis), metrics

    # --- evaluation ---------------------------------------------------------------------------------------------
    def is_eval_round(self, t: int) -> bool:
        every = self.settings.eval_every  # 0 = last round only; validated: > 0 under DP only when opted in
        return t == self.settings.rounds or bool(every) and t % every == 0

    def _evaluate_messages(self, arrays: ArrayRecord, t: int) -> list[Message]:
        return [Message(RecordDict({p.ARRAYS: arrays, p.CONFIG: ConfigRecord({p.ROUND: t})}),
                        dst_node_id=int(node), message_type=MessageType.EVALUATE)
                for node in self.population.node_ids]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        t = self.run_round(server_round)
        reported = basis_record(self.optimizer.reported(self.state.basis))  # the tail average (server/optimizer.py)
        return self._evaluate_messages(reported, t) if self.is_eval_round(t) else []

    def _evaluation(self, t: int, replies: Iterable[Message]) -> dict:
        """Per-node sums -> metrics (+ eval_failed_nodes, eval_missing_nodes: asked but never answered, e.g. a
        SuperNode that died); invalid replies are logged and left out."""
        sums: dict[str, float] = {}
        failed = 0
        replies = list(replies)
        answered = {reply.metadata.src_node_id for reply in replies if not reply.has_error()}
        missing = len(set(int(n) for n in self.population.node_ids) - answered) - sum(r.has_error() for r in replies)
        for reply in replies:
            if reply.has_error() or not valid_eval_metrics(reply.content[p.METRICS]):
                failed += 1
                log.warning("round %d: rejected the evaluation reply of node %d", t, reply.metadata.src_node_id)
                continue
            for key, value in reply.content[p.METRICS].items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return {**(eval_metrics(sums) if sums else {}), "eval_failed_nodes": failed,
                "eval_missing_nodes": max(missing, 0)}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        t = self.run_round(server_round)
        replies = list(replies)
        result = None
        if self.is_eval_round(t):
            metrics = self._evaluation(t, replies)
            self._record.update(metrics)
            scores = {k: v for k, v in metrics.items() if k not in ("eval_failed_nodes", "eval_missing_nodes")}
            result = MetricRecord(scores) if scores else None
        self._finish_round(t)
        return result

    def stop_for_budget(self, grid: Grid, timeout: float) -> None:
        """max_epsilon allows no further round (server.privacy.stop_for_budget): evaluate the last released basis."""
        def evaluate(t: int) -> dict:
            messages = self._evaluate_messages(basis_record(self.optimizer.reported(self.state.basis)), t)
            return self._evaluation(t, grid.send_and_receive(messages, timeout=timeout))

        stop_for_budget(self.ledger, self.state, self.settings.run_dir, evaluate)

    def _finish_round(self, t: int) -> None:
        self._record["seconds"] = round(time.monotonic() - self._started, 4)
        self.state.round = t
        self.state.history.append(self._record)
        self.state.optimizer = self.optimizer.state_dict()
        self.state.aggregator = self.aggregator.state_dict()
        save_checkpoint(self.settings.run_dir, self.state)
        if self.on_round is not None:
            self.on_round(self._record)
