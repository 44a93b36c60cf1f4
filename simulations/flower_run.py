"""Run the lore-fed ServerApp and ClientApp through Flower's simulation engine (Ray), programmatically.

This is the route `flwr-simulation` itself takes (`_run_simulation` with the app directory and a Run whose
override config reaches both apps; private API, flwr pinned to 1.42). Users are sharded onto virtual nodes:
one user per node for small populations, blocks of ~`SHARD_SIZE` users above `SHARD_THRESHOLD` users, and never
more than `MAX_NODES` nodes: larger populations get larger blocks. Flower's simulation dispatch scans its message
store once per node every 0.1 s, so its cost grows with the node count (docs/flower-1.42.md §2); a node's cost
follows only the users sampled from it (`federation.user_block`). Ray is sized for this 2-core machine.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lore_core.pair_columns import PairColumns, PairIndex
from lore_core.pairs import resolve_pair_path

ROOT = Path(__file__).resolve().parents[1]
SHARD_THRESHOLD = 64
SHARD_SIZE = 50
MAX_NODES = 32  # at least ~2 nodes per Ray actor on a 16-core machine; the dispatch scan stays ~0.01 s
# The apps `pyproject.toml` deploys, for every privacy mode: the ClientApp hands SecAgg+ messages to
# client/secagg_client_app.py, and the ServerApp routes mode user+secagg to server/secagg_workflow.py.
SERVER_APP, CLIENT_APP = "server.server_app:app", "client.client_app:app"


class AppShadowedError(RuntimeError):
    """`server` or `client` resolves to a module outside this repository (another package of that name)."""


def nodes_for(n_users: int, users_per_node: int | str = "auto") -> int:
    """Number of virtual nodes: one per user up to SHARD_THRESHOLD users, else blocks of ~SHARD_SIZE users, at most
    MAX_NODES blocks (`auto`); or blocks of `users_per_node`."""
    if users_per_node == "auto":
        users_per_node = 1 if n_users <= SHARD_THRESHOLD else max(SHARD_SIZE, math.ceil(n_users / MAX_NODES))
    if not str(users_per_node).isdigit() or int(users_per_node) < 1:
        raise ValueError(f"--users-per-node must be an integer >= 1 or 'auto', got {users_per_node!r}")
    users_per_node = int(users_per_node)
    return max(1, math.ceil(n_users / users_per_node))


def check_app_modules() -> None:
    """Flower's app loader reuses `sys.modules[name]`: make sure `server`/`client` are this repo's packages."""
    import client
    import server

    for module in (server, client):
        file = Path(module.__file__ or "").resolve()
        if ROOT not in file.parents:
            raise AppShadowedError(f"module {module.__name__!r} is loaded from {file}, not from {ROOT}; "
                                   "remove the other package or run from the repository")


def backend_config(num_cpus: int | None = None) -> dict:
    cpus = num_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},  # one actor per core
        "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": False,
                      "include_dashboard": False},
    }


@contextmanager
def ray_daemons_in_their_own_session() -> Iterator[None]:
    """Start Ray's daemons (GCS, raylet; its workers are the raylet's children) in a session of their own.

    Otherwise they share the command's process group, and a signal sent to the group (`timeout`, `kill -TERM -PGID`)
    kills them too: the driver's core worker then aborts the process (exit 134) before Python's SIGTERM handler can
    stop the run cleanly (exit 143). A signal sent to every process of a job (`scancel`) still reaches them. Outside the group, only the command gets the
    signal and shuts Ray down itself; Ray's kernel fate-sharing still kills the daemons if the command is killed
    outright. Ray offers no flag for this, so the Popen class its process launcher uses is swapped for the block
    (private API, like `_run_simulation`; a Ray without it is left as it is)."""
    try:
        from ray._private import services
        launcher = services.ConsolePopen
    except (ImportError, AttributeError):
        yield
        return

    class OwnSessionPopen(launcher):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = launcher


def run_simulation(overrides: dict, num_nodes: int, *, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Run the apps of this repository with run-config `overrides` on `num_nodes` virtual nodes (blocks)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    check_app_modules()

    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    fused = get_fused_config_from_dir(ROOT, overrides)
    rng = np.random.default_rng()
    run = Run.create_empty(run_id=int(rng.integers(1, 2**62)))
    run.override_config = dict(overrides)
    run.primary_task_id = int(rng.integers(1, 2**62))
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    from server.engine_stop import engine_in_this_process

    # Ctrl-C stops the engine; leaving the block stops the ServerApp's thread too
    with engine_in_this_process(), ray_daemons_in_their_own_session():
        result = _run_simulation(
            num_supernodes=num_nodes,
            exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
            server_app_attr=SERVER_APP,
            client_app_attr=CLIENT_APP,
            backend_config=backend_config(num_cpus),
            app_dir=str(ROOT),
            run=run,
            is_app=True,
            server_app_context=Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                                       run_config=fused),
            verbose_logging=verbose,
        )
    if not getattr(result, "success", True):
        raise RuntimeError("the Flower simulation failed (see the log above)")


def node_counts(n_users: int, users_per_node: int | str = "auto", canaries: int = 0) -> tuple[int, int]:
    """(all virtual nodes, of them canary nodes) of a simulation: the users' nodes, plus canary users on nodes of
    their own."""
    canary_nodes = nodes_for(canaries, users_per_node) if canaries else 0
    return nodes_for(n_users, users_per_node) + canary_nodes, canary_nodes


def simulate_pairs(pairs_path: str | Path, run_dir: str | Path, *, n_users: int | None = None,
                   users_per_node: int | str = "auto", overrides: dict | None = None, num_cpus: int | None = None,
                   verbose: bool = False, canaries: int = 0, canary_secrets: str | Path | None = None) -> int:
    """Federated training on a pair file whose users (seen and unseen) number `n_users` (counted from the file's
    user column alone when not given: the driver never holds the embeddings), plus `canaries` canary users on nodes
    of their own that read `canary_secrets` (federation/canary_users.py). Returns the number of virtual nodes."""
    pairs_path = resolve_pair_path(pairs_path)
    if n_users is None:
        n_users = PairIndex.build(PairColumns.open(pairs_path)).n_users
    num_nodes, canary_nodes = node_counts(n_users, users_per_node, canaries)
    config = {"pairs-path": str(pairs_path.resolve()), "run-dir": str(Path(run_dir).resolve()),
              "min-nodes": num_nodes, **(overrides or {})}
    if canaries:
        config.update({"canary-nodes": canary_nodes, "canary-secrets": str(Path(canary_secrets).resolve())})
    run_simulation(config, num_nodes, num_cpus=num_cpus, verbose=verbose)
    return num_nodes
