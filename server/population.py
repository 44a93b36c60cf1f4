"""The training population as the server knows it: how many training users each node hosts, nothing else.

Nodes are ordered by partition id (stable across restarts, unlike node ids; nodes without one come first, by
node id), so global user index g maps to
(node, local index) the same way in every run: the sampler, and a resumed run, stay reproducible.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from federation import protocol as p

log = logging.getLogger("lore_fed.server")


class PopulationError(RuntimeError):
    """The nodes did not come up or did not describe themselves."""


@dataclass(frozen=True)
class Population:
    node_ids: np.ndarray  # (P,) uint64 (Flower node ids), ordered by partition id
    partition_ids: np.ndarray  # (P,)
    counts: np.ndarray  # (P,) training users per node
    dim: int  # embedding width D, the same on every node

    @property
    def size(self) -> int:
        return int(self.counts.sum())

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    def assign(self, global_idx: np.ndarray) -> dict[int, np.ndarray]:
        """Sorted global user indices -> {node id: local user indices}, nodes without sampled users left out."""
        node_pos = np.searchsorted(np.cumsum(self.counts), global_idx, side="right")
        local = global_idx - self.offsets[node_pos]
        return {int(self.node_ids[pos]): local[node_pos == pos] for pos in np.unique(node_pos)}

    def global_indices(self, node_id: int, local_idx: np.ndarray) -> np.ndarray:
        """The inverse of `assign` for one node: local user indices -> global ones."""
        pos = int(np.flatnonzero(self.node_ids == np.uint64(node_id))[0])
        return self.offsets[pos] + np.asarray(local_idx, dtype=np.int64)

    def fingerprint(self) -> list[int]:
        return self.counts.astype(int).tolist() + [self.dim]


# The query waits up to this many round timeouts: after a SuperLink restart a node may still be running ClientApps
# for the crashed run's messages and take the query only after them (found in CI). One message per node, one long
# wait: asking again (as before) queued duplicate queries on a node already behind, and its late answer to the
# first one was dropped; CI saw a node answer every query, each after its wait had ended.
QUERY_WAIT_TIMEOUTS = 3


def discover_population(grid: Grid, min_nodes: int, timeout: float) -> Population:
    """Wait for `min_nodes` nodes, ask each how many training users it hosts (one `query` round)."""
    deadline = time.monotonic() + timeout
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < min_nodes:
        if time.monotonic() > deadline:
            raise PopulationError(f"only {len(node_ids)} of min-nodes={min_nodes} nodes connected in {timeout} s")
        time.sleep(0.5)
        node_ids = sorted(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY) for nid in node_ids]
    wait = QUERY_WAIT_TIMEOUTS * timeout  # returns as soon as every node answered
    rows = []
    for reply in grid.send_and_receive(messages, timeout=wait):
        if reply.has_error():
            raise PopulationError(f"node {reply.metadata.src_node_id} failed the query: {reply.error.reason}")
        metrics = reply.content[p.METRICS]
        rows.append((int(metrics[p.PARTITION_ID]), reply.metadata.src_node_id, int(metrics[p.NUM_TRAIN_USERS]),
                     int(metrics[p.DIM])))
    if len(rows) != len(node_ids):
        raise PopulationError(f"{len(rows)} of {len(node_ids)} nodes answered the query within {wait:g} s "
                              f"({QUERY_WAIT_TIMEOUTS} x round-timeout)")
    rows.sort()
    dims = {r[3] for r in rows}
    if len(dims) != 1:
        raise PopulationError(f"nodes report different embedding widths {sorted(dims)}")
    partitions = np.array([r[0] for r in rows])
    given = partitions[partitions >= 0]
    if np.unique(given).size != given.size:
        raise PopulationError(f"nodes report duplicate partition ids: {partitions.tolist()}")
    population = Population(node_ids=np.array([r[1] for r in rows], dtype=np.uint64), partition_ids=partitions,
                            counts=np.array([r[2] for r in rows], dtype=np.int64), dim=dims.pop())
    if population.size == 0:
        raise PopulationError("no node hosts a training (seen) user")
    log.info("population: %d training users on %d nodes", population.size, len(rows))
    return population
