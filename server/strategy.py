"""LoReStrategy: our own Flower `Strategy` (not a FedAvg subclass), driven by Flower's `Strategy.start` loop; a thin
adapter from Flower's four hooks to the round of `server.training_round.TrainingRun`.

What this path adds: one reply per node carrying its users' updates (k, B, D), each checked before use (updates of
the right shape for exactly the users asked; record mode also their accountant histories); an invalid reply is
logged and dropped, a user's non-finite update is logged and left out (the node's other users are kept), the round
goes on and the basis is never touched by either. `aggregate_evaluate` is the last hook of a round in
`Strategy.start`, so the round finishes (checkpoint) there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation import protocol as p
from server.training_round import RoundFailed, TrainingRun, basis_record

log = logging.getLogger("lore_fed.server")


class LoReStrategy(Strategy):
    def __init__(self, run: TrainingRun) -> None:
        self.run = run

    def summary(self) -> None:
        run = self.run
        log.info("LoReStrategy: %d users on %d nodes, %d per round, privacy %s, server %s lr %g, start after round %d",
                 run.population.size, len(run.population.node_ids), run.settings.clients_per_round,
                 run.aggregator.mode, run.optimizer.name, run.settings.server_lr, run.state.round)

    # --- training -----------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        plan = self.run.begin_round()
        return [Message(RecordDict({p.ARRAYS: self._train_arrays(arrays, node), p.CONFIG: ConfigRecord(
                    {p.USER_INDICES: idx.tolist(), **self.run.node_config(node)})}),
                        dst_node_id=node, message_type=MessageType.TRAIN)
                for node, idx in plan.items()]

    def _train_arrays(self, arrays: ArrayRecord, node: int) -> ArrayRecord:
        """The basis; in record mode also what the node's sampled users spent so far, as the ledger holds it."""
        if self.run.aggregator.mode != "record":
            return arrays
        return ArrayRecord({p.BASIS: arrays[p.BASIS], p.DP_HISTORY: Array(self.run.spent_by(node))})

    def reply_problem(self, reply: Message) -> str | None:
        """Why a train reply cannot be used, or None when it is valid. Non-finite updates are checked per user, in
        `aggregate_train`: one user's NaN leaves out that user, not every user of the node."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            return f"client error: {reply.error.reason}"
        if node not in self.run.plan:
            return "reply from a node that was not asked"
        basis = self.run.state.basis
        expected = (self.run.plan[node].size, basis.shape[0], basis.shape[1])
        content = reply.content
        record = self.run.aggregator.mode == "record"
        arrays = {p.UPDATES, p.DP_HISTORY} if record else {p.UPDATES}
        if set(content.keys()) != {p.ARRAYS, p.METRICS} or set(content[p.ARRAYS].keys()) != arrays:
            return f"unexpected content {sorted(content.keys())}"
        if content[p.METRICS].get(p.NUM_USERS) != expected[0]:
            return f"num-users {content[p.METRICS].get(p.NUM_USERS)} != {expected[0]} users asked"
        updates = content[p.ARRAYS][p.UPDATES].numpy()
        if updates.shape != expected:
            return f"updates have shape {updates.shape}, expected {expected}"
        return self._history_problem(reply) if record else None

    def _history_problem(self, reply: Message) -> str | None:
        """Record mode: why a reply's dp-history (what its users spent this round) cannot go into the ledger."""
        from lore_core.privacy.accounting import AccountingError, check_history

        asked = self.run.plan[reply.metadata.src_node_id].size
        arrays = reply.content[p.ARRAYS] if p.ARRAYS in reply.content else {}
        if p.DP_HISTORY not in arrays:
            return "no dp-history"
        history = arrays[p.DP_HISTORY].numpy()
        if history.ndim != 2 or history.shape[1] != 4 or not np.isfinite(history).all() or \
                not set(history[:, 0].astype(int)) <= set(range(asked)):
            return f"dp-history must be (s, 4) rows (position < {asked}, z, q, steps); got {history.shape}"
        try:
            check_history(history[:, 1:].tolist())
        except AccountingError as exc:
            return f"dp-history: {exc}"
        return None

    def _client_histories(self, reply: Message) -> dict[str, list]:
        """Record mode: global user index -> what it spent this round [(z, q, steps), ...] from one reply."""
        global_users = self.run.global_users(reply.metadata.src_node_id)
        histories: dict[str, list] = {}
        for position, z, q, steps in reply.content[p.ARRAYS][p.DP_HISTORY].numpy():
            histories.setdefault(str(int(global_users[int(position)])), []).append((z, q, int(steps)))
        return histories

    def _user_ids(self, nodes: Iterable[int]) -> list[str]:
        """Record mode: the ledger's ids of the users sampled this round on `nodes`."""
        return [str(int(user)) for node in nodes for user in self.run.global_users(node)]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        run = self.run
        record = run.aggregator.mode == "record"
        accepted, seen_nodes, histories, rejected, dropped_users, reported = [], set(), {}, 0, 0, set()
        replies = list(replies)
        errors = [reply.error.reason for reply in replies if reply.has_error()]
        # No good reply from a node asked. (Counting errors plus absent nodes missed Flower's "Node Unavailable"
        # replies, whose source is not the node: a tester's Ctrl-C'd deployment released 3 rounds of noise alone.)
        answered = {r.metadata.src_node_id for r in replies if not r.has_error()} & set(run.plan)
        if run.plan and not answered:
            if record:  # they may have spent on their devices: the ledger keeps them unreported (its LOWER BOUND)
                run.ledger.record_lost_replies(self._user_ids(run.plan))
            raise RoundFailed(f"round {run.round}: every node asked failed or did not answer "
                              f"({errors[0] if errors else 'no reply'}); nothing of the round was released")
        for reply in replies:
            node = reply.metadata.src_node_id
            problem = "duplicate reply" if node in seen_nodes else self.reply_problem(reply)
            seen_nodes.add(node)
            if problem:
                run.reject(node, problem)
                rejected += 1
                if record and problem != "duplicate reply" and node in run.plan and not reply.has_error() \
                        and self._history_problem(reply) is None:
                    histories.update(self._client_histories(reply))  # its users did spend: the server got it
                    reported.add(node)
                continue
            updates = reply.content[p.ARRAYS][p.UPDATES].numpy().astype(np.float64)
            finite = np.isfinite(updates).all(axis=(1, 2))
            if not finite.all():  # one user's failure must not drop the other users of a many-user node
                dropped_users += int((~finite).sum())
                log.warning("round %d: node %s sent %d non-finite user updates (of %d); those users are left out",
                            run.round, node, int((~finite).sum()), finite.size)
            accepted.append(updates[finite])
            if record:
                histories.update(self._client_histories(reply))
                reported.add(node)
        updates = np.concatenate(accepted) if accepted else np.zeros((0,) + run.state.basis.shape)
        facts = {"missing_replies": len(set(run.plan) - seen_nodes)}
        if dropped_users:
            facts["non_finite_users"] = dropped_users
        if record:  # a DP-SGD output is never exactly zero: zero = the user's record-level budget is spent
            facts["record_budget_exhausted_users"] = int((~updates.any(axis=(1, 2))).sum())
            # Sampled users whose spending did not reach the server (a late or failed reply): the ledger marks them
            # until they report again, and its epsilon is a lower bound meanwhile.
            facts["unreported"], facts["replied"] = self._user_ids(set(run.plan) - reported), self._user_ids(reported)
        mean_update = run.aggregator.aggregate(updates, run.population.size)
        run.release(mean_update, updates.shape[0], client_histories=histories or None, **facts)
        metrics = MetricRecord({"accepted-users": int(updates.shape[0]), "rejected-replies": rejected})
        return basis_record(run.state.basis), metrics

    # --- evaluation ---------------------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.run.evaluation_messages() if self.run.is_eval_round() else []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        result, metrics = None, {}
        if self.run.is_eval_round():
            metrics = self.run.evaluation_metrics(replies)
            scores = {k: v for k, v in metrics.items()
                      if k not in ("eval_failed_nodes", "eval_missing_nodes", "prior_pairs")}
            result = MetricRecord(scores) if scores else None
        self.run.finish_round(metrics)
        return result
