"""LoReStrategy: our own Flower `Strategy` (not a FedAvg subclass), driven by Flower's `Strategy.start` loop.

Per round t: the aggregator samples users; each node with sampled users gets the basis and their local indices;
valid replies (finite (k, B, D) updates for exactly the users asked) are aggregated, invalid ones are logged and
dropped (the round goes on, the basis is never touched by them); the server optimizer steps A. Every
`eval-every` rounds and after the last one, all nodes evaluate. `aggregate_evaluate` is the last hook of a round
in `Strategy.start`, so the round's checkpoint is written there.
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


class LoReStrategy(Strategy):
    def __init__(self, settings: ServerSettings, population: Population, aggregator: Aggregator,
                 optimizer: ServerSGD | ServerAdam, state: RunState,
                 on_round: Callable[[dict], None] | None = None) -> None:
        self.settings = settings
        self.population = population
        self.aggregator = aggregator
        self.optimizer = optimizer
        self.state = state
        self.first_round = state.round + 1
        self.on_round = on_round
        self._asked: dict[int, int] = {}  # node id -> number of users asked this round
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
        sampled = self.aggregator.sample(self.population.size)
        plan = self.population.assign(sampled)
        self._asked = {node: idx.size for node, idx in plan.items()}
        self._record = {"round": t, "sampled_users": int(sampled.size)}
        return [
            Message(RecordDict({p.ARRAYS: arrays, p.CONFIG: ConfigRecord({p.USER_INDICES: idx.tolist(), p.ROUND: t})}),
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
        if set(content.keys()) != {p.ARRAYS, p.METRICS} or set(content[p.ARRAYS].keys()) != {p.UPDATES}:
            return f"unexpected content {sorted(content.keys())}"
        if content[p.METRICS].get(p.NUM_USERS) != expected[0]:
            return f"num-users {content[p.METRICS].get(p.NUM_USERS)} != {expected[0]} users asked"
        updates = content[p.ARRAYS][p.UPDATES].numpy()
        if updates.shape != expected:
            return f"updates have shape {updates.shape}, expected {expected}"
        if not np.isfinite(updates).all():
            return "updates contain NaN or Inf"
        return None

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, rejected, seen_nodes = [], [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            problem = "duplicate reply" if node in seen_nodes else self.reply_problem(reply)
            seen_nodes.add(node)
            if problem:
                log.warning("round %d: rejected the reply of node %d: %s", self.run_round(server_round), node, problem)
                rejected.append({"node": int(node), "reason": problem})
                continue
            accepted.append(reply.content[p.ARRAYS][p.UPDATES].numpy().astype(np.float64))
        missing = len(set(self._asked) - seen_nodes)
        updates = np.concatenate(accepted) if accepted else np.zeros((0,) + self.state.basis.shape)
        mean_update = self.aggregator.aggregate(updates, self.population.size)
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
        return t % self.settings.eval_every == 0 or t == self.settings.rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        t = self.run_round(server_round)
        if not self.is_eval_round(t):
            return []
        return [Message(RecordDict({p.ARRAYS: arrays, p.CONFIG: ConfigRecord({p.ROUND: t})}),
                        dst_node_id=int(node), message_type=MessageType.EVALUATE)
                for node in self.population.node_ids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        t = self.run_round(server_round)
        sums: dict[str, float] = {}
        failed = 0
        for reply in replies:
            if reply.has_error() or not self._valid_eval(reply.content[p.METRICS]):
                failed += 1
                log.warning("round %d: rejected the evaluation reply of node %d", t, reply.metadata.src_node_id)
                continue
            for key, value in reply.content[p.METRICS].items():
                sums[key] = sums.get(key, 0.0) + float(value)
        result = None
        if self.is_eval_round(t):
            metrics = eval_metrics(sums) if sums else {}
            self._record.update(metrics, eval_failed_nodes=failed)
            result = MetricRecord(metrics) if metrics else None
        self._finish_round(t)
        return result

    @staticmethod
    def _valid_eval(metrics: MetricRecord) -> bool:
        values = [metrics.get(key) for key in p.EVAL_SUM_KEYS]
        return all(isinstance(v, (int, float)) and np.isfinite(v) and v >= 0 for v in values) and \
            metrics["seen-acc-sum"] <= metrics["seen-users"] and metrics["unseen-acc-sum"] <= metrics["unseen-users"]

    def _finish_round(self, t: int) -> None:
        self._record["seconds"] = round(time.monotonic() - self._started, 4)
        self.state.round = t
        self.state.history.append(self._record)
        self.state.optimizer = self.optimizer.state_dict()
        self.state.aggregator = self.aggregator.state_dict()
        save_checkpoint(self.settings.run_dir, self.state)
        if self.on_round is not None:
            self.on_round(self._record)
