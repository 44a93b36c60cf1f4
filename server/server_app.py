"""lore-fed ServerApp: holds only the basis A. It discovers the population, validates the privacy settings for it,
opens the privacy ledger, resumes from the run directory's checkpoint when there is one, and runs the remaining
rounds (as many as max_epsilon allows) of one `TrainingRun`, through the Message-API strategy or, in mode
`user+secagg`, through the SecAgg+ workflow."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from lore_core.privacy.accounting import PrivacyBudgetExhausted
from lore_core.run_lock import RunDirLock
from server.aggregation import Aggregator, make_aggregator
from server.checkpoint import RunState, initial_basis, load_checkpoint, start_or_resume
from server.engine_stop import stopping_with_engine
from server.population import discover_population
from server.release_record import ReleaseRecord
from server.round_progress import RoundProgress
from server.run_ledger import evaluation_policy, open_ledger, rounds_that_fit, train_config
from server.run_outputs import write_run_outputs
from server.run_settings import ServerSettings
from server.strategy import LoReStrategy
from server.training_round import TrainingRun, basis_record

log = logging.getLogger("lore_fed.server")

app = ServerApp()
# After a SuperLink restart the new ServerApp may start while its predecessor still exits and holds the run dir.
LOCK_WAIT_SECONDS = 120.0


def run_federated(grid: Grid, settings: ServerSettings, on_round: Callable[[dict], None] | None = None,
                  aggregator: Aggregator | None = None) -> RunState:
    """Train A over the grid's nodes to `settings.rounds` (fewer when max_epsilon stops the run: the ledger says
    `stopped_early`), resuming from `settings.run_dir` if a checkpoint is there. Returns the final run state (basis,
    history). `aggregator` replaces the one of the privacy mode (tests). Holds the run directory's lock throughout:
    a second run on the same directory is refused (RunDirBusy) before it writes anything."""
    with RunDirLock(settings.run_dir, wait=min(settings.round_timeout, LOCK_WAIT_SECONDS)):
        return _run_locked(grid, settings, on_round, aggregator)


def _run_locked(grid: Grid, settings: ServerSettings, on_round: Callable[[dict], None] | None,
                aggregator: Aggregator | None) -> RunState:
    population = discover_population(grid, settings.min_nodes, settings.round_timeout)
    # fail closed before any training (PrivacyConfigError)
    privacy = settings.privacy_settings(population.size, population.dim)
    saved = load_checkpoint(settings.run_dir)  # the ledger must cover its rounds (before a new ledger is made)
    ledger = open_ledger(settings.run_dir, privacy, checkpoint_round=saved.round if saved is not None else 0)
    aggregator = aggregator or make_aggregator(settings, privacy)
    optimizer = settings.new_optimizer()
    state, resumed = start_or_resume(settings, population)
    ledger.set_evaluation(evaluation_policy(settings.eval_every, privacy.is_dp))  # once the resume is accepted
    if resumed:
        optimizer.load_state_dict(state.optimizer)
        aggregator.load_state_dict(state.aggregator)
        log.info("resuming %s after round %d (%d rounds in the ledger)", settings.run_dir, state.round,
                 ledger.rounds_released)
    releases = ReleaseRecord.open(settings.run_dir, initial_basis=initial_basis(settings.rank, population.dim,
                                                                                settings.seed, settings.init_scale),
                                  optimizer=settings.release_optimizer(), checkpoint_round=state.round,
                                  fixed=settings.fixed_optimizer_keys())
    run = TrainingRun(settings, population, aggregator, optimizer, state, ledger, releases,
                      train_config=train_config(privacy), on_round=on_round)
    remaining = max(settings.rounds - state.round, 0)
    allowed = rounds_that_fit(ledger, remaining)
    if privacy.mode == "user+secagg":
        from server.secagg_workflow import run_secagg  # the legacy Flower API loads only for this mode

        run_secagg(grid, run, privacy, allowed)
    elif allowed:
        resumed_after = state.round
        try:
            LoReStrategy(run).start(grid=grid, initial_arrays=basis_record(state.basis), num_rounds=allowed,
                                    timeout=settings.round_timeout)
        except PrivacyBudgetExhausted:
            # record mode: the users' own histories, which the prediction above cannot know ahead, reached
            # max-epsilon before a round began (nothing of it happened); the first run failed here (a tester)
            allowed = state.round - resumed_after  # the rounds this call released
    if allowed < remaining:
        run.stop_for_budget(grid)
    else:
        run.complete_final_evaluation(grid)  # a failed final evaluation is retried (on a rerun too)
    return state


def run_and_report(grid: Grid, settings: ServerSettings,
                   on_round: Callable[[dict], None] | None = None) -> RunState:
    """What the ServerApp does: `run_federated`, then, when the run completed, the files a user of the run reads
    (`server/run_outputs.py`: basis.npz, metrics.json, report.md), all under the run directory's lock. So a run
    started by hand with `flwr run` leaves its basis for devices as `simulate` and `deploy local` do."""
    with RunDirLock(settings.run_dir, wait=min(settings.round_timeout, LOCK_WAIT_SECONDS)):
        previous, started = load_checkpoint(settings.run_dir), time.monotonic()
        state = _run_locked(grid, settings, on_round, None)  # run_federated's work, inside this lock
        try:
            report = write_run_outputs(Path(settings.run_dir), state, settings, settings.privacy_mode,
                                       nodes=max(len(state.population) - 1, 0), seconds=time.monotonic() - started,
                                       previous=previous, command="ServerApp (flwr run)")
        except Exception as exc:  # the checkpoint is the run's record; these files only derive from it
            log.warning("the run is checkpointed in %s, but its basis.npz, metrics.json and report.md were not "
                        "written (%s); a rerun of the same run writes them", settings.run_dir, exc)
        else:
            if report is not None:
                log.info("wrote %s, basis.npz and metrics.json beside it", report)
    return state


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = ServerSettings.from_run_config(context.run_config)
    with RoundProgress(settings.rounds, style=settings.progress) as progress:
        run_and_report(stopping_with_engine(grid), settings, on_round=progress.update)
