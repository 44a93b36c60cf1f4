"""Privacy mode `user+secagg`: user-level DP-FedAvg where the server learns only SUMS of clipped user updates
(docs/privacy.md §2, §6, §7), on Flower 1.42's SecAgg+, which exists only for the legacy API (docs/flower-1.42.md §4).

The round is `server.training_round.TrainingRun`'s, as in the Message-API path; this module supplies only what
differs: the legacy strategy hooks SecAgg+ needs and the secure sum.
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
4. Every `eval-every` rounds all nodes evaluate through the Message-API `evaluate` handler of `client.client_app` (same
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
from dataclasses import dataclass

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
from lore_core.privacy.privacy_settings import PrivacyConfigError, PrivacySettings
from server.training_round import TrainingRun

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
    """Legacy strategy driven by `DefaultWorkflow` + `SecAggPlusWorkflow`: the SecAgg+ face of a `TrainingRun`. It
    holds only the basis and secure sums; sampling, noise, ledger, step and checkpoint are the run's."""

    def __init__(self, run: TrainingRun, privacy: PrivacySettings, quantisation: Quantisation) -> None:
        self.run = run
        self.user_clip_norm = privacy.clip_norm - quantisation.rounding_slack(run.state.basis.size)
        if self.user_clip_norm < (1 - MAX_CLIP_SLACK) * privacy.clip_norm:
            raise SecAggConfigError(f"SecAgg+ rounding ({quantisation}) would need the per-user clip lowered from "
                                    f"{privacy.clip_norm} to {self.user_clip_norm:.4g}; use fewer nodes per run "
                                    "or a smaller secagg_clipping_range")
        self.min_round_nodes = max(2, int(privacy.reconstruction_threshold))

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return ndarrays_to_parameters([self.run.state.basis])

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        run = self.run
        if len(run.plan) < self.min_round_nodes:
            log.info("round %d: sampled users on %d node(s) < %d: no secure sum, pure-noise step", run.round,
                     len(run.plan), self.min_round_nodes)
            return []
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        missing = sorted(set(run.plan) - set(proxies))
        if missing:
            log.warning("round %d: nodes %s are not connected; their users drop out", run.round, missing)
        basis = ndarrays_to_parameters([run.state.basis])  # the run's basis is the one source of truth
        return [(proxies[node], FitIns(basis, {p.USER_INDICES: p.encode_user_indices(idx), **run.node_config(node),
                                               p.CLIP_NORM: self.user_clip_norm}))
                for node, idx in run.plan.items() if node in proxies]

    def secure_sum(self, results: list[tuple[ClientProxy, FitRes]]) -> np.ndarray:
        """SecAgg+ gives every result the same unmasked aggregate sum_i w_i x_i / sum_i w_i; with w_i = 1 that is
        the mean over the contributing nodes, so the sum is the mean times their number. (B, D) float64."""
        (mean,) = parameters_to_ndarrays(results[0][1].parameters)
        return np.asarray(mean, dtype=np.float64) * len(results)

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
        """The round's one noisy step from the secure sum (None = pure noise: nobody's sum arrived)."""
        run = self.run
        total = np.zeros_like(run.state.basis) if total is None else total
        run.release(run.aggregator.noisy_mean(total, run.population.size),
                    sum(run.plan[node].size for node in nodes), secagg_nodes=len(nodes),
                    missing_replies=len(run.plan) - len(nodes))

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
        self.strategy.run.begin_round()
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
    quantisation = plan_quantisation(privacy.clip_norm, privacy.secagg_clipping_range, int(population.counts.max()),
                                     len(population.node_ids))
    strategy = SecAggLoReStrategy(run, privacy, quantisation)
    log.info("user+secagg: %d users on %d nodes, q=%.4g, z=%g, C=%g (per user %.6g), %s, shares %d threshold %d, "
             "%d rounds", population.size, len(population.node_ids), privacy.sample_rate, privacy.noise_multiplier,
             privacy.clip_norm, strategy.user_clip_norm, quantisation, privacy.num_shares,
             privacy.reconstruction_threshold, rounds)
    if not rounds:
        return
    secagg = SecAggPlusWorkflow(num_shares=privacy.num_shares, reconstruction_threshold=privacy.reconstruction_threshold,
                                max_weight=1.0,  # w = num_examples = 1: no down-scaling before quantisation
                                clipping_range=quantisation.clipping_range,
                                quantization_range=quantisation.quantization_range,
                                modulus_range=quantisation.modulus_range, timeout=run.settings.round_timeout)
    # The legacy workflow keeps its records in a Context of its own (the ServerApp's is not needed).
    legacy = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                           config=ServerConfig(num_rounds=rounds), strategy=strategy,
                           client_manager=SimpleClientManager())
    DefaultWorkflow(fit_workflow=SecAggRound(strategy, secagg), evaluate_workflow=FederatedEvaluation(run))(grid, legacy)
