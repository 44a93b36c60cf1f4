"""lore-fed ServerApp: holds only the basis A; discovers the population, validates the privacy settings for it,
opens the privacy ledger, resumes from the run directory's checkpoint when there is one, and runs the remaining
rounds (as many as max_epsilon allows) through `LoReStrategy.start`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.aggregation import Aggregator, make_aggregator
from server.checkpoint import RunState, start_or_resume
from server.optimizer import make_optimizer
from server.population import discover_population
from server.privacy import evaluation_policy, open_ledger, rounds_that_fit, train_config
from server.settings import ServerSettings
from server.strategy import LoReStrategy, basis_record

log = logging.getLogger("lore_fed.server")

app = ServerApp()


def run_federated(grid: Grid, settings: ServerSettings, on_round: Callable[[dict], None] | None = None,
                  aggregator: Aggregator | None = None) -> RunState:
    """Train A over the grid's nodes to `settings.rounds` (fewer when max_epsilon stops the run: the ledger says
    `stopped_early`), resuming from `settings.run_dir` if a checkpoint is there. Returns the final run state (basis,
    history). `aggregator` replaces the one of the privacy mode (tests)."""
    population = discover_population(grid, settings.min_nodes, settings.round_timeout)
    privacy = settings.privacy_settings(population.size)  # fail closed before any training (PrivacyConfigError)
    ledger = open_ledger(settings.run_dir, privacy, evaluation_policy(settings.eval_every, privacy.is_dp))
    if privacy.mode == "user+secagg":
        # Dispatch point of SecAgg+ (server/secagg.py, the secagg work): it gets the validated settings, the
        # population and the opened ledger, and follows the same round order (check_next_round, record_round
        # before release, evaluation policy of `settings`).
        from server.secagg import run_secagg  # absent until the secagg work lands: the ImportError says so

        return run_secagg(grid, settings, privacy, population, ledger, on_round=on_round)
    aggregator = aggregator or make_aggregator(settings, privacy)
    optimizer = make_optimizer(settings.server_optimizer, settings.server_lr, settings.rounds)
    state, resumed = start_or_resume(settings, population)
    if resumed:
        optimizer.load_state_dict(state.optimizer)
        aggregator.load_state_dict(state.aggregator)
        log.info("resuming %s after round %d", settings.run_dir, state.round)
    strategy = LoReStrategy(settings, population, aggregator, optimizer, state, ledger,
                            train_config=train_config(privacy), on_round=on_round)
    remaining = max(settings.rounds - state.round, 0)
    allowed = rounds_that_fit(ledger, remaining)
    strategy.start(grid=grid, initial_arrays=basis_record(state.basis), num_rounds=allowed,
                   timeout=settings.round_timeout)
    if allowed < remaining:
        strategy.stop_for_budget(grid, settings.round_timeout)
    return state


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = ServerSettings.from_run_config(context.run_config)
    run_federated(grid, settings, on_round=print_progress)


def print_progress(record: dict) -> None:
    line = (f"round {record['round']:>4}  users {record['accepted_users']}/{record['sampled_users']}"
            f"  {record['seconds']:.2f}s")
    if "seen_test_acc" in record:
        line += f"  seen {record['seen_test_acc']:.4f}  unseen {record['unseen_test_acc']:.4f}"
    if "epsilon" in record:
        line += f"  epsilon {record['epsilon']:.3f}"
    if "record_epsilon_max" in record:
        line += f"  per-pair epsilon (max over clients) {record['record_epsilon_max']:.3f}"
    if record["rejected_replies"]:
        line += f"  rejected {len(record['rejected_replies'])}"
    print(line, flush=True)
