"""Privacy mode `user+secagg`: user-level DP-FedAvg where the server learns only SUMS of clipped user updates
(notes/privacy.md §2, §6, §7), on Flower 1.42's SecAgg+, which exists only for the legacy API (flower-1.42.md §4).

Per round t (`LegacyContext` + `DefaultWorkflow(fit_workflow=SecAggRound, evaluate_workflow=FederatedEvaluation)`):
1. Poisson-sample users with the secret RNG (rate q = m/N); each node hosting sampled users gets the basis, their
   local indices and the per-user clip norm. In simulation a virtual node stands for several devices: it clips
   each of its users' updates and sums them before masking, so SecAgg+ hides node sums from each other (with one
   user per node, as on real devices, it hides each user).
2. `SecAggPlusWorkflow` collects masked, quantised node sums and unmasks only their total. Clients upload
   [w, w * x] with w = num_examples = 1, so Flower hands the strategy the MEAN over the n contributing nodes;
   `secure_sum` multiplies it back by n: the exact sum up to quantisation.
3. N(0, (zC)^2) noise on the sum, division by the fixed q*N, the ledger entry is written, and only then the server
   optimizer steps the basis (the release). Every round releases exactly one noisy step: a round whose users lie
   on fewer than max(2, reconstruction threshold) nodes, or whose secure aggregation fails, releases pure noise
   (its sampled users count as drop-outs: utility, not privacy). No node is ever asked alone.
4. Every `eval-every` rounds all nodes evaluate through the Message-API `evaluate` handler of `client.app` (same
   metric names as the Message-API path); then the checkpoint is written.

Quantisation (see `plan_quantisation`): entries are clamped to +-clipping_range and stochastically rounded to
steps of 2 * clipping_range / quantization_range. The range is raised to C * (most users on one node), so no entry
of a node sum is ever clamped, and users are clipped to C - sqrt(B*D) * step, so one user changes the dequantised
sum by at most C in L2 even through rounding: the accounted sensitivity stays C.

What SecAgg+ protects: the server runs the protocol as written (honest but curious) and sees masked integers only.
Flower 1.42 seeds every mask with 32 bits (`pseudo_rand_gen` folds the 256-bit key into `RandomState(seed32)`), so
it is not a cryptographic guarantee against a server willing to brute-force seeds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from client import protocol as p
from client.secagg_client import encode_user_indices
from lore_core.privacy.mechanism import add_noise_to_sum, make_private_rng, poisson_sample
from lore_core.privacy.settings import PrivacyConfigError, PrivacySettings
from server.checkpoint import RunState, save_checkpoint, start_or_resume
from server.optimizer import ServerAdam, ServerSGD, make_optimizer, pseudo_gradient
from server.population import Population
from server.privacy import FederatedLedger, rounds_that_fit, stop_for_budget
from server.settings import ServerSettings
from server.strategy import basis_record, eval_metrics, valid_eval_metrics

log = logging.getLogger("lore_fed.server")

MODULUS_RANGE = 2**32  # Flower's default; masks and sums live in Z_M
MAX_QUANTIZATION_RANGE = 2**30  # Flower rounds into int32
MAX_CLIP_SLACK = 0.01  # refuse a quantisation that would take more than 1% off the per-user clip norm


class SecAggConfigError(PrivacyConfigError):
    """Settings under which SecAgg+ cannot deliver the accounted sum."""


@dataclass(frozen=True)
class Quantisation:
    """SecAgg+ fixed-point encoding: entries in [-clipping_range, clipping_range] -> integers in [0, Q]."""

    clipping_range: float
    quantization_range: int
    modulus_range: int = MODULUS_RANGE

    @property
    def step(self) -> float:
        return 2.0 * self.clipping_range / self.quantization_range

    def rounding_slack(self, size: int) -> float:
        """Largest L2 change that rounding can add to a change of one node's sum of `size` entries."""
        return math.sqrt(size) * self.step

    def error_std_bound(self, nodes: int) -> float:
        """Bound on the per-entry std of the aggregate's rounding error (unbiased, variance <= step^2 / 4)."""
        return math.sqrt(nodes) * self.step / 2.0


def plan_quantisation(clip_norm: float, clipping_range_floor: float, max_users_per_node: int,
                      num_nodes: int) -> Quantisation:
    """Clamping range that no node sum can reach (|entry| <= ||dA||_F <= C per user) and the finest grid whose sum
    over all `num_nodes` nodes still fits the modulus (n * Q < M, also for the weight entry)."""
    clipping_range = max(float(clipping_range_floor), clip_norm * max_users_per_node)
    bits = math.ceil(math.log2(num_nodes + 1))
    return Quantisation(clipping_range, min(MAX_QUANTIZATION_RANGE, MODULUS_RANGE >> bits))


class SecAggLoReStrategy(Strategy):
    """Legacy strategy driven by `DefaultWorkflow` + `SecAggPlusWorkflow`; holds only the basis and sums."""

    def __init__(self, settings: ServerSettings, privacy: PrivacySettings, population: Population,
                 quantisation: Quantisation, optimizer: ServerSGD | ServerAdam, state: RunState,
                 ledger: FederatedLedger, rng: np.random.Generator,
                 on_round: Callable[[dict], None] | None = None) -> None:
        self.settings, self.privacy, self.population = settings, privacy, population
        self.optimizer, self.state, self.ledger, self.rng = optimizer, state, ledger, rng
        self.on_round = on_round
        size = state.basis.size
        self.user_clip_norm = privacy.clip_norm - quantisation.rounding_slack(size)
        if self.user_clip_norm < (1 - MAX_CLIP_SLACK) * privacy.clip_norm:
            raise SecAggConfigError(f"SecAgg+ rounding ({quantisation}) would need the per-user clip lowered from "
                                    f"{privacy.clip_norm} to {self.user_clip_norm:.4g}; use fewer nodes per run "
                                    "or a smaller secagg_clipping_range")
        self.min_round_nodes = max(2, int(privacy.reconstruction_threshold))
        self.round = state.round
        self.released = False
        self._plan: dict[int, np.ndarray] = {}
        self._record: dict = {}
        self._started = 0.0

    # --- one round: sample, (secure sum), release ---------------------------------------------------------------
    def begin_round(self) -> None:
        """Sample this round's users (before any message: the plan exists even if SecAgg+ never runs)."""
        self._started = time.monotonic()
        self.round += 1
        self.released = False
        self.ledger.check_next_round()
        sampled = poisson_sample(self.population.size, self.privacy.sample_rate, self.rng)
        self._plan = self.population.assign(sampled)
        self._record = {"round": self.round, "sampled_users": int(sampled.size), "rejected_replies": []}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return ndarrays_to_parameters([self.state.basis])

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        if len(self._plan) < self.min_round_nodes:
            log.info("round %d: sampled users on %d node(s) < %d: no secure sum, pure-noise step", self.round,
                     len(self._plan), self.min_round_nodes)
            return []
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        missing = sorted(set(self._plan) - set(proxies))
        if missing:
            log.warning("round %d: nodes %s are not connected; their users drop out", self.round, missing)
        basis = ndarrays_to_parameters([self.state.basis])  # the strategy's basis is the one source of truth
        config = {p.ROUND: self.round, p.PRIVACY_MODE: self.privacy.mode, p.CLIP_NORM: self.user_clip_norm}
        return [(proxies[node], FitIns(basis, {p.USER_INDICES: encode_user_indices(idx), **config}))
                for node, idx in self._plan.items() if node in proxies]

    def secure_sum(self, results: list[tuple[ClientProxy, FitRes]]) -> np.ndarray:
        """SecAgg+ gives every result the same unmasked aggregate sum_i w_i x_i / sum_i w_i; with w_i = 1 that is
        the mean over the contributing nodes, so the sum is the mean times their number. (B, D) float64."""
        (mean,) = parameters_to_ndarrays(results[0][1].parameters)
        return np.asarray(mean, dtype=np.float64) * len(results)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        self._record["rejected_replies"] = [{"reason": str(f)} for f in failures]
        nodes = [proxy.node_id for proxy, _ in results]
        weights = [fitres.num_examples for _, fitres in results]
        if not results or not set(nodes) <= set(self._plan) or any(w != 1 for w in weights):
            # A weight other than 1 would scale a node's users beyond C (and the mean could not be undone).
            log.warning("round %d: no usable secure sum (nodes %s, weights %s); pure-noise step", self.round, nodes,
                        weights)
            return None, {}
        total = self.secure_sum(results)
        if total.shape != self.state.basis.shape or not np.isfinite(total).all():
            log.error("round %d: secure sum of shape %s is unusable; pure-noise step", self.round, total.shape)
            return None, {}
        self.release(total, nodes)
        return ndarrays_to_parameters([self.state.basis]), {}

    def release(self, total: np.ndarray | None, nodes: list[int]) -> None:
        """Noise the sum, divide by q*N, write the ledger, then step the basis. total None = pure noise."""
        q, n = self.privacy.sample_rate, self.population.size
        total = np.zeros_like(self.state.basis) if total is None else total
        mean_update = add_noise_to_sum(total, self.privacy.noise_multiplier, self.privacy.clip_norm, self.rng) / (q * n)
        entry = self.ledger.record_round(self.ledger.rounds_released + 1, int(self._record["sampled_users"]))
        grad = pseudo_gradient(self.state.basis, mean_update, client_lr=self.settings.client_lr,
                               local_steps=self.settings.local_steps, l2=self.settings.l2)
        new_basis = self.optimizer.step(self.state.basis, grad)
        if np.isfinite(new_basis).all():
            self.state.basis = new_basis
        self.released = True
        self._record.update(accepted_users=int(sum(self._plan[node].size for node in nodes)), secagg_nodes=len(nodes),
                            missing_replies=len(self._plan) - len(nodes), epsilon=self.ledger.epsilon().prv,
                            ledger_round=entry["round"])

    def finish_round(self, metrics: dict) -> None:
        self._record.update(metrics)
        self._record["seconds"] = round(time.monotonic() - self._started, 4)
        self.state.round = self.round
        self.state.history.append(self._record)
        self.state.optimizer = self.optimizer.state_dict()
        save_checkpoint(self.settings.run_dir, self.state)
        if self.on_round is not None:
            self.on_round(self._record)

    def is_eval_round(self, t: int) -> bool:
        every = self.settings.eval_every  # 0 = last round only (as LoReStrategy)
        return t == self.settings.rounds or bool(every) and t % every == 0

    def stop_for_budget(self, grid: Grid, timeout: float) -> None:
        """max_epsilon allows no further round (server.privacy.stop_for_budget): evaluate the last released basis."""
        stop_for_budget(self.ledger, self.state, self.settings.run_dir,
                        lambda t: federated_evaluation(grid, self.population, self.optimizer.reported(self.state.basis), t,
                                                        timeout))

    # Evaluation runs in FederatedEvaluation (Message API), not through the legacy hooks.
    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class SecAggRound:
    """DefaultWorkflow's fit workflow: sample, run SecAgg+, and release a pure-noise step if it produced no sum."""

    def __init__(self, strategy: SecAggLoReStrategy, secagg: SecAggPlusWorkflow) -> None:
        self.strategy, self.secagg = strategy, secagg

    def __call__(self, grid: Grid, context: Context) -> None:
        self.strategy.begin_round()
        self.secagg(grid, context)
        if not self.strategy.released:
            self.strategy.release(None, [])


class FederatedEvaluation:
    """DefaultWorkflow's evaluate workflow: Message-API evaluation on all nodes every `eval-every` rounds, then
    the round's checkpoint (the last step of a round)."""

    def __init__(self, strategy: SecAggLoReStrategy, timeout: float) -> None:
        self.strategy, self.timeout = strategy, timeout

    def __call__(self, grid: Grid, context: Context) -> None:
        strategy = self.strategy
        t = strategy.round
        metrics: dict = {}
        if strategy.is_eval_round(t):
            metrics = federated_evaluation(grid, strategy.population, strategy.optimizer.reported(strategy.state.basis),
                                           t, self.timeout)
        strategy.finish_round(metrics)


def federated_evaluation(grid: Grid, population: Population, basis: np.ndarray, t: int, timeout: float) -> dict:
    """All nodes evaluate `basis` with the Message-API handler -> metrics of `lore-fed train` + eval_failed_nodes.
    Invalid replies (LoReStrategy's rule) are logged and left out."""
    messages = [Message(RecordDict({p.ARRAYS: basis_record(basis), p.CONFIG: ConfigRecord({p.ROUND: t})}),
                        dst_node_id=int(node), message_type=MessageType.EVALUATE) for node in population.node_ids]
    sums: dict[str, float] = {}
    failed = 0
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error() or not valid_eval_metrics(reply.content[p.METRICS]):
            failed += 1
            log.warning("rejected the evaluation reply of node %d", reply.metadata.src_node_id)
            continue
        for key, value in reply.content[p.METRICS].items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return {**(eval_metrics(sums) if sums else {}), "eval_failed_nodes": failed}


def run_secagg(grid: Grid, settings: ServerSettings, privacy: PrivacySettings, population: Population,
               ledger: FederatedLedger, *, on_round: Callable[[dict], None] | None = None,
               rng: np.random.Generator | None = None) -> RunState:
    """Train A in mode `user+secagg` to `settings.rounds` (fewer when max_epsilon stops the run), resuming from
    `settings.run_dir`. `privacy` is validated for `population`; `ledger` is open (server.app.run_federated)."""

    if privacy.mode != "user+secagg":
        raise PrivacyConfigError(f"run_secagg serves privacy mode 'user+secagg', got {privacy.mode!r}")
    quantisation = plan_quantisation(privacy.clip_norm, privacy.secagg_clipping_range, int(population.counts.max()),
                                     len(population.node_ids))
    if rng is None:
        rng = make_private_rng(privacy.noise_seed if privacy.reproducible_noise else None)
    optimizer = make_optimizer(settings.server_optimizer, settings.server_lr, settings.rounds)
    state, resumed = start_or_resume(settings, population)
    if resumed:
        optimizer.load_state_dict(state.optimizer)
        log.info("resuming %s after round %d (%d rounds in the ledger)", settings.run_dir, state.round,
                 ledger.rounds_released)
    strategy = SecAggLoReStrategy(settings, privacy, population, quantisation, optimizer, state, ledger, rng,
                                  on_round=on_round)
    remaining = max(settings.rounds - state.round, 0)
    rounds = rounds_that_fit(ledger, remaining)
    log.info("user+secagg: %d users on %d nodes, q=%.4g, z=%g, C=%g (per user %.6g), %s, shares %d threshold %d, "
             "%d rounds", population.size, len(population.node_ids), privacy.sample_rate, privacy.noise_multiplier,
             privacy.clip_norm, strategy.user_clip_norm, quantisation, privacy.num_shares,
             privacy.reconstruction_threshold, rounds)
    if rounds:
        secagg = SecAggPlusWorkflow(num_shares=privacy.num_shares,
                                    reconstruction_threshold=privacy.reconstruction_threshold,
                                    max_weight=1.0,  # w = num_examples = 1: no down-scaling before quantisation
                                    clipping_range=quantisation.clipping_range,
                                    quantization_range=quantisation.quantization_range,
                                    modulus_range=quantisation.modulus_range, timeout=settings.round_timeout)
        # The legacy workflow keeps its records in a Context of its own (the ServerApp's is not needed).
        legacy = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                               config=ServerConfig(num_rounds=rounds), strategy=strategy,
                               client_manager=SimpleClientManager())
        DefaultWorkflow(fit_workflow=SecAggRound(strategy, secagg),
                        evaluate_workflow=FederatedEvaluation(strategy, settings.round_timeout))(grid, legacy)
    if rounds < remaining:
        strategy.stop_for_budget(grid, settings.round_timeout)
    return state
