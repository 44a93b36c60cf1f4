"""Privacy mode `user+secagg`: user-level DP with the distributed discrete Gaussian under secure aggregation
(docs/privacy.md §2b, §6, §7), on Flower 1.42's SecAgg+, which exists only for the legacy API
(docs/flower-1.42.md §4). The server never holds an un-noised sum.

The round is `server.training_round.TrainingRun`'s, as in the Message-API path; this module supplies only what
differs: the legacy strategy hooks SecAgg+ needs, the abort rule and the secure sum.
Per round t (`LegacyContext` + `DefaultWorkflow(fit_workflow=SecAggRound, evaluate_workflow=FederatedEvaluation)`):
1. Poisson-sample users with the secret RNG (rate q = m/N); each node hosting sampled users gets the basis, their
   local indices, the clip norm, z, the dropout tolerance x, the round's sampled count k and the grid
   (`lore_core.privacy.distributed_dp.plan_encoding`). In simulation a virtual node stands for several devices: each
   of its users clips, rounds and adds its own noise share, and the node sums them before masking.
2. `DdgSecAggPlusWorkflow` (Flower's `SecAggPlusWorkflow` plus the abort rule) collects masked integer node sums.
   If the users of the nodes that uploaded are fewer than n_min = ceil((1 - x) k), it stops before unmasking: the
   server never sees a sum with less noise than accounted. Otherwise it unmasks the total. Clients upload
   [w, w * x] with w = num_examples = 1, so Flower hands the strategy the MEAN over the n contributing nodes;
   `secure_sum` multiplies it back by n and puts it back on the grid: the exact integer sum, noise included.
3. The sum / (q N) is the round's release: the ledger entry is written before the unmask stage (so a sum the
   server saw is counted even if it crashes before releasing it), and the server optimizer steps the basis only
   after it. Every round releases exactly one noisy step: a round whose users lie on fewer than max(2,
   reconstruction threshold) nodes, or whose secure aggregation fails or is aborted, releases a data-free noise
   step drawn by the server (its sampled users count as drop-outs: utility, not privacy). A stage where every
   node asked failed or did not answer ends the run instead (RoundFailed, as in the Message-API path). No node is
   ever asked alone.
4. Every `eval-every` rounds all nodes evaluate through the Message-API `evaluate` handler of `client.client_app`
   (same metric names as the Message-API path); then the checkpoint is written.

What SecAgg+ protects: the server runs the protocol as written (honest but curious) and sees masked integers only.
Flower 1.42 seeds every mask with 32 bits (`pseudo_rand_gen` folds the 256-bit key into `RandomState(seed32)`), so
the masking is not a cryptographic guarantee against a server willing to brute-force seeds.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from federation import protocol as p
from lore_core.privacy.distributed_dp import DdgEncoding, decode_sum, min_contributors, plan_encoding
from lore_core.privacy.privacy_settings import PrivacyConfigError, PrivacySettings, min_secagg_nodes
from server.training_round import RoundFailed, TrainingRun

log = logging.getLogger("lore_fed.server")

class SecAggConfigError(PrivacyConfigError):
    """Settings under which SecAgg+ cannot deliver the accounted sum."""


class SecAggLoReStrategy(Strategy):
    """Legacy strategy driven by `DefaultWorkflow` + `DdgSecAggPlusWorkflow`: the SecAgg+ face of a `TrainingRun`.
    It holds only the basis and secure sums; sampling, ledger, step and checkpoint are the run's."""

    def __init__(self, run: TrainingRun, privacy: PrivacySettings, encoding: DdgEncoding) -> None:
        self.run, self.privacy, self.encoding = run, privacy, encoding
        self.min_round_nodes = min_secagg_nodes(privacy)
        self.unasked_nodes = 0  # this round's nodes with sampled users that were not asked (too few for a sum)

    def sampled_users(self) -> int:
        return sum(int(idx.size) for idx in self.run.plan.values())

    def min_contributors(self) -> int:
        """n_min of this round: the fewest users whose noise shares add up to the accounted std z C."""
        return min_contributors(self.sampled_users(), self.privacy.dropout_tolerance)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return ndarrays_to_parameters([self.run.state.basis])

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        run = self.run
        if len(run.plan) < self.min_round_nodes:
            log.info("round %d: sampled users on %d node(s) < %d: no secure sum, pure-noise step", run.round,
                     len(run.plan), self.min_round_nodes)
            self.unasked_nodes = len(run.plan)
            return []
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        missing = sorted(set(run.plan) - set(proxies))
        if missing:
            log.warning("round %d: nodes %s are not connected; their users drop out", run.round, missing)
        basis = ndarrays_to_parameters([run.state.basis])  # the run's basis is the one source of truth
        shared = {p.SAMPLED_USERS: self.sampled_users(), p.GRANULARITY: self.encoding.granularity,
                  p.CLIPPING_RANGE: self.encoding.clipping_range}
        return [(proxies[node], FitIns(basis, {p.USER_INDICES: p.encode_user_indices(idx), **run.node_config(node),
                                               **shared}))
                for node, idx in run.plan.items() if node in proxies]

    def secure_sum(self, results: list[tuple[ClientProxy, FitRes]]) -> np.ndarray:
        """SecAgg+ gives every result the same unmasked aggregate sum_i w_i x_i / sum_i w_i; with w_i = 1 that is
        the mean over the contributing nodes, so the sum is the mean times their number, back on the grid: the
        users' rounded updates plus their noise shares. (B, D) float64."""
        (mean,) = parameters_to_ndarrays(results[0][1].parameters)
        return decode_sum(np.asarray(mean, dtype=np.float64) * len(results), self.encoding)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        run = self.run
        for failure in failures:
            run.reject(None, str(failure))
        nodes = [proxy.node_id for proxy, _ in results]
        weights = [fitres.num_examples for _, fitres in results]
        if not results or not set(nodes) <= set(run.plan) or any(w != 1 for w in weights):
            # A weight other than 1 would scale a node's users beyond C (and the mean could not be undone).
            log.warning("round %d: no usable secure sum (nodes %s, weights %s); pure-noise step", run.round, nodes,
                        weights)
            return None, {}
        total = self.secure_sum(results)
        if total.shape != run.state.basis.shape or not np.isfinite(total).all():
            log.error("round %d: secure sum of shape %s is unusable; pure-noise step", run.round, total.shape)
            return None, {}
        self.release(total, nodes)
        return ndarrays_to_parameters([run.state.basis]), {}

    def release(self, total: np.ndarray | None, nodes: list[int]) -> None:
        """The round's one noisy step: the noised secure sum / (q N), or (None: no sum was unmasked) a data-free
        noise step from the server."""
        run = self.run
        if total is None:
            mean = run.aggregator.pure_noise_mean(run.state.basis.shape, run.population.size)
        else:
            mean = run.aggregator.noisy_mean(total, run.population.size)
        # Nodes never asked (too few for a secure sum) are not missing replies: the summary said they "did not
        # answer a train request", which sent the analyst looking for failed nodes.
        unasked = {"unasked_nodes": self.unasked_nodes} if self.unasked_nodes else {}
        run.release(mean, sum(run.plan[node].size for node in nodes), secagg_nodes=len(nodes),
                    missing_replies=len(run.plan) - len(nodes) - self.unasked_nodes, **unasked)

    # Evaluation runs in FederatedEvaluation (Message API), not through the legacy hooks.
    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class DdgSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ with the distributed-DP abort rule: after the masked vectors are collected, unmask only if
    the contributing nodes' users are at least n_min; otherwise halt (the round then releases server noise)."""

    def __init__(self, strategy: SecAggLoReStrategy, **kwargs) -> None:
        super().__init__(**kwargs)
        self.strategy = strategy

    def setup_stage(self, grid: Grid, context, state) -> bool:
        proceed = super().setup_stage(grid, context, state)
        self._check_some_node_answered(state)
        return proceed

    def share_keys_stage(self, grid: Grid, context, state) -> bool:
        proceed = super().share_keys_stage(grid, context, state)
        self._check_some_node_answered(state)
        return proceed

    def unmask_stage(self, grid: Grid, context, state) -> bool:
        """After the ledger entry (written before this stage): a run stopped here has counted the round, as a crash
        there would; the rerun resumes after the checkpoint's round."""
        proceed = super().unmask_stage(grid, context, state)
        self._check_some_node_answered(state)
        return proceed

    def _check_some_node_answered(self, state) -> None:
        """A stage where every node asked failed or did not answer ends the run as in the Message-API path
        (RoundFailed, exit 1, nothing of the round released). Drop-outs of some nodes stay a noise-only round. Found
        by a privacy reviewer: deployed nodes failed every SecAgg+ message, and the run released server noise for
        every round and finished."""
        if state.sampled_node_ids and not state.active_node_ids:
            reason = state.failures[0] if state.failures else "no reply"
            raise RoundFailed(f"round {self.strategy.run.round}: every node asked failed or did not answer "
                              f"({reason}); nothing of the round was released")

    def collect_masked_vectors_stage(self, grid: Grid, context, state) -> bool:
        if not super().collect_masked_vectors_stage(grid, context, state):
            self._check_some_node_answered(state)
            return False
        plan = self.strategy.run.plan
        contributors = sum(int(plan[node].size) for node in state.active_node_ids if node in plan)
        needed = self.strategy.min_contributors()
        if contributors < needed:
            log.warning("round %d: %d of %d sampled users uploaded, fewer than the %d whose noise shares are "
                        "accounted: aborted before unmasking", self.strategy.run.round, contributors,
                        self.strategy.sampled_users(), needed)
            return False
        self.strategy.run.record_in_ledger()  # before the server can see the sum (the unmask stage follows)
        return True


class SecAggRound:
    """DefaultWorkflow's fit workflow: sample, run SecAgg+, and release a pure-noise step if it produced no sum."""

    def __init__(self, strategy: SecAggLoReStrategy, secagg: SecAggPlusWorkflow) -> None:
        self.strategy, self.secagg = strategy, secagg

    def __call__(self, grid: Grid, context: Context) -> None:
        self.strategy.run.begin_round()
        self.strategy.unasked_nodes = 0
        self.secagg(grid, context)
        if not self.strategy.run.released:
            self.strategy.release(None, [])


class FederatedEvaluation:
    """DefaultWorkflow's evaluate workflow: Message-API evaluation on all nodes when due, then the round's end."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run

    def __call__(self, grid: Grid, context: Context) -> None:
        self.run.finish_round(self.run.evaluate(grid) if self.run.is_eval_round() else {})


def run_secagg(grid: Grid, run: TrainingRun, privacy: PrivacySettings, rounds: int) -> None:
    """Run `rounds` rounds of mode `user+secagg` over `run` (set up and resumed by server.server_app)."""
    if privacy.mode != "user+secagg":
        raise PrivacyConfigError(f"run_secagg serves privacy mode 'user+secagg', got {privacy.mode!r}")
    population = run.population
    try:
        encoding = plan_encoding(privacy.clip_norm, privacy.noise_multiplier, int(population.counts.max()),
                                 len(population.node_ids), population.size)
    except ValueError as exc:
        raise SecAggConfigError(str(exc)) from exc
    run.aggregator.encoding = encoding
    strategy = SecAggLoReStrategy(run, privacy, encoding)
    log.info("user+secagg: %d users on %d nodes, q=%.4g, z=%g, C=%g, dropout tolerance %g, grid %.3g in +-%g, "
             "shares %d threshold %d, %d rounds", population.size, len(population.node_ids), privacy.sample_rate,
             privacy.noise_multiplier, privacy.clip_norm, privacy.dropout_tolerance, encoding.granularity,
             encoding.clipping_range, privacy.num_shares, privacy.reconstruction_threshold, rounds)
    if not rounds:
        return
    secagg = DdgSecAggPlusWorkflow(strategy, num_shares=privacy.num_shares,
                                   reconstruction_threshold=privacy.reconstruction_threshold,
                                   max_weight=1.0,  # w = num_examples = 1: no down-scaling before quantisation
                                   clipping_range=encoding.clipping_range,
                                   quantization_range=encoding.quantization_range,
                                   timeout=run.settings.round_timeout)
    # The legacy workflow keeps its records in a Context of its own (the ServerApp's is not needed).
    legacy = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                           config=ServerConfig(num_rounds=rounds), strategy=strategy,
                           client_manager=SimpleClientManager())
    DefaultWorkflow(fit_workflow=SecAggRound(strategy, secagg), evaluate_workflow=FederatedEvaluation(run))(grid, legacy)
