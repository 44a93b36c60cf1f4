"""One federated training run, round by round: the single implementation that both the Message-API strategy
(`server.strategy`) and the SecAgg+ workflow (`server.secagg_workflow`) drive. They differ only in how the users'
updates reach the server (one reply per node, or one secure sum); everything else is here.

Order in a round t (docs/privacy.md §2, §8):
  ledger.check_next_round()  -> sample users (the aggregator's sampler) -> nodes train -> the aggregator turns the
  accepted updates (or the secure sum) into one mean update, with the mode's noise -> ledger.record_round(t)
  -> the server optimizer steps the basis -> the release record (`server.release_record`: A_t, the released mean
  update, A_{t+1}) -> federated evaluation when due -> checkpoint.
The ledger entry and the release record are on disk before the new basis exists outside `release`; the checkpoint
comes last, so a round is either wholly in the checkpoint or re-run from the previous one (and then counted again
by the ledger and recorded again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from federation import protocol as p
from server.aggregation import Aggregator
from server.checkpoint import RunState, save_checkpoint
from server.optimizer import ServerAdam, ServerSGD, pseudo_gradient
from server.population import Population
from server.release_record import ReleaseRecord
from server.run_ledger import FederatedLedger, stop_for_budget
from server.run_settings import ServerSettings

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


class RoundFailed(RuntimeError):
    """Every node asked in a round failed: nothing is released, the run stops; the checkpoint of the previous round
    is intact, so running the same command again resumes there."""


def final_evaluation_done(record: dict) -> bool:
    """Whether a round record holds a complete evaluation (every node answered)."""
    return "seen_test_acc" in record and not record.get("eval_failed_nodes") and not record.get("eval_missing_nodes")


class TrainingRun:
    """The server's side of one run: the basis, its optimizer, the sampler/aggregator, the ledger, the history."""

    def __init__(self, settings: ServerSettings, population: Population, aggregator: Aggregator,
                 optimizer: ServerSGD | ServerAdam, state: RunState, ledger: FederatedLedger,
                 releases: ReleaseRecord, train_config: dict | None = None,
                 on_round: Callable[[dict], None] | None = None) -> None:
        self.settings, self.population, self.aggregator = settings, population, aggregator
        self.optimizer, self.state, self.ledger, self.releases = optimizer, state, ledger, releases
        self.train_config = dict(train_config or {})  # what the clients must know of the privacy settings
        self.on_round = on_round
        self.round = state.round  # the round in progress (or the last finished one between rounds)
        self.plan: dict[int, np.ndarray] = {}  # node id -> local indices of the users sampled this round
        self.released = False
        self._ledger_entry: dict | None = None  # this round's ledger entry, once written
        self._record: dict = {}
        self._started = 0.0
        # user+secagg: how many rounds each user was sampled in since this process started, on top of the most any
        # user had before (the ledger's count: a resumed run's sampler is new, and max(a + b) <= max a + max b)
        self._user_rounds = np.zeros(population.size if aggregator.mode == "user+secagg" else 0, dtype=np.int32)
        self._user_rounds_before = ledger.most_user_rounds() if aggregator.mode == "user+secagg" else 0

    # --- training -----------------------------------------------------------------------------------------------
    def begin_round(self) -> dict[int, np.ndarray]:
        """Check the budget, then sample this round's users -> {node id: local user indices}. Raises
        PrivacyBudgetExhausted before sampling when the round would exceed max_epsilon: nothing of it happens."""
        self._started = time.monotonic()
        self.round += 1
        self.released = False
        self._ledger_entry = None
        self.ledger.check_next_round()
        sampled = self.aggregator.sample(self.population.size)
        if self._user_rounds.size:
            self._user_rounds[sampled] += 1
        self.plan = self.population.assign(sampled)
        self._record = {"round": self.round, "sampled_users": int(sampled.size), "rejected_replies": []}
        return self.plan

    def node_config(self, node: int) -> dict:
        """The train config of one node this round (protocol.py), without its user indices."""
        return {p.ROUND: self.round, **self._run_id(), **self.train_config}

    def _run_id(self) -> dict:
        return {p.RUN_ID: self.state.run_id} if self.state.run_id else {}

    def global_users(self, node: int) -> np.ndarray:
        return self.population.global_indices(node, self.plan[node])

    def spent_by(self, node: int) -> np.ndarray:
        """Record mode: the ledger's accountant history of each user sampled on `node` this round, rows (position in
        its user-indices, z, q, steps). Sent with the basis, so that a node that lost its state (a simulated node
        restarted with a resumed run) checks max-epsilon against all its users spent, not what it spent since."""
        rows = [(i, z, q, k) for i, user in enumerate(self.global_users(node))
                for z, q, k in self.ledger.client_history(str(int(user)))]
        return np.array(rows, dtype=np.float64).reshape(-1, 4)

    def record_in_ledger(self, client_histories: dict | None = None, unreported: Iterable[str] = (),
                         replied: Iterable[str] = ()) -> dict:
        """Write this round's ledger entry, once: `release` does, or earlier the SecAgg+ workflow, before the
        server unmasks a sum (a crash between the unmasking and the release would otherwise leave a sum the
        server saw uncounted)."""
        if self._ledger_entry is None:
            most = self._user_rounds_before + int(self._user_rounds.max()) if self._user_rounds.size else None
            self._ledger_entry = self.ledger.record_round(self.ledger.rounds_released + 1,
                                                          self._record["sampled_users"],
                                                          client_histories=client_histories, most_user_rounds=most,
                                                          unreported=unreported, replied=replied)
        return self._ledger_entry

    def release(self, mean_update: np.ndarray | None, accepted_users: int, **facts) -> None:
        """Record the round in the ledger, step the basis with `mean_update` (B, D) (None: nothing accepted in a mode
        without noise, no step) and append the step to the release record. `facts` go to the round's record
        (rounds.jsonl)."""
        entry = self.record_in_ledger(facts.pop("client_histories", None), facts.pop("unreported", ()),
                                      facts.pop("replied", ()))
        eps = self.ledger.epsilon()
        if eps is not None:
            # record mode: per pair, max over clients; never under the user-level key
            key = "record_epsilon_max" if self.aggregator.mode == "record" else "epsilon"
            self._record.update({key: eps.headline, "ledger_round": entry["round"]})
        before = self.state.basis
        if mean_update is not None:
            grad = pseudo_gradient(before, mean_update, client_lr=self.settings.client_lr,
                                   local_steps=self.settings.local_steps, l2=self.settings.l2)
            new_basis = self.optimizer.step(before, grad)
            if np.isfinite(new_basis).all():
                self._record["update_norm"] = float(np.linalg.norm(new_basis - before))
                self.state.basis = new_basis
            else:  # an overflowing step (huge rates or updates): the basis and the optimizer stay as they were
                log.error("round %d: server step produced a non-finite basis; step skipped", self.round)
                self._record["skipped_steps"] = 1  # a run problem (lore_cli.simulate_command.PROBLEMS)
                mean_update = None
        self.releases.append(round=self.round, ledger_round=entry["round"], basis_before=before,
                             mean_update=mean_update, basis_after=self.state.basis)
        self.released = True
        self._record.update(accepted_users=int(accepted_users), **facts)

    def reject(self, node: int | None, reason: str) -> None:
        log.warning("round %d: rejected the reply of node %s: %s", self.round, node, reason)
        self._record["rejected_replies"].append({"node": None if node is None else int(node), "reason": reason})

    def finish_round(self, metrics: dict | None = None) -> None:
        """The last step of a round: its record, the checkpoint, the progress callback."""
        self._record.update(metrics or {})
        self._record["seconds"] = round(time.monotonic() - self._started, 4)
        self.state.round = self.round
        self.state.history.append(self._record)
        self.state.optimizer = self.optimizer.state_dict()
        self.state.aggregator = self.aggregator.state_dict()
        save_checkpoint(self.settings.run_dir, self.state)
        if self.on_round is not None:
            self.on_round(self._record)

    # --- evaluation ---------------------------------------------------------------------------------------------
    def is_eval_round(self, t: int | None = None) -> bool:
        t = self.round if t is None else t
        every = self.settings.eval_every  # 0 = last round only; validated: > 0 under DP only when opted in
        return t == self.settings.rounds or bool(every) and t % every == 0

    def evaluation_messages(self, t: int | None = None) -> list[Message]:
        config = ConfigRecord({p.ROUND: self.round if t is None else t, **self._run_id()})
        reported = basis_record(self.optimizer.reported(self.state.basis))  # the tail average (server/optimizer.py)
        return [Message(RecordDict({p.ARRAYS: reported, p.CONFIG: config}),
                        dst_node_id=int(node), message_type=MessageType.EVALUATE)
                for node in self.population.node_ids]

    def evaluation_metrics(self, replies: Iterable[Message]) -> dict:
        """Per-node sums -> metrics (+ eval_failed_nodes, eval_missing_nodes: asked but never answered, e.g. a
        SuperNode that died; + prior_pairs, the personal prior the figures were fit with, by which a finished run is
        rerun: simulate's check_evaluated_prior); invalid replies are logged and left out."""
        sums: dict[str, float] = {}
        failed = 0
        replies = list(replies)
        answered = {reply.metadata.src_node_id for reply in replies if not reply.has_error()}
        missing = len(set(int(n) for n in self.population.node_ids) - answered) - sum(r.has_error() for r in replies)
        for reply in replies:
            if reply.has_error() or not valid_eval_metrics(reply.content[p.METRICS]):
                failed += 1
                log.warning("round %d: rejected the evaluation reply of node %d", self.round,
                            reply.metadata.src_node_id)
                continue
            for key, value in reply.content[p.METRICS].items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return {**(eval_metrics(sums) if sums else {}), "eval_failed_nodes": failed,
                "eval_missing_nodes": max(missing, 0), "prior_pairs": self.settings.prior_pairs}

    def evaluate(self, grid: Grid, t: int | None = None) -> dict:
        """All nodes evaluate the current basis (Message API, also under SecAgg+)."""
        replies = grid.send_and_receive(self.evaluation_messages(t), timeout=self.settings.round_timeout)
        return self.evaluation_metrics(replies)

    def complete_final_evaluation(self, grid: Grid) -> None:
        """After the last round: if its evaluation failed or missed nodes (a node died, a worker ran out of memory),
        evaluate the final basis again and checkpoint. A rerun of a finished run thus repairs its final metrics; a
        better answer replaces the stored one, a worse one never does."""
        last = self.state.history[-1] if self.state.history else None
        if last is None or self.state.round < self.settings.rounds or final_evaluation_done(last):
            return
        log.warning("round %d: the final evaluation is incomplete; evaluating the final basis again", last["round"])
        fresh = self.evaluate(grid, last["round"])
        if "seen_test_acc" in fresh or "seen_test_acc" not in last:
            for key in [k for k in last if k.endswith("_test_acc")]:
                del last[key]
            last.update(fresh)
            save_checkpoint(self.settings.run_dir, self.state)

    def stop_for_budget(self, grid: Grid) -> None:
        """max_epsilon allows no further round (server.run_ledger.stop_for_budget): evaluate the last released basis."""
        stop_for_budget(self.ledger, self.state, self.settings.run_dir, lambda t: self.evaluate(grid, t))
