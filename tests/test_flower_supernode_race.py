"""Flower 1.42's SuperNode race that can stall a node after a SuperLink restart, and how the local deployment copes.

A run that stops between a node receiving one of its messages and pulling the message's content makes Flower's
`_pull_and_store_message` raise `RunNotRunningException` (a BaseException) past its cleanup: the task it created
stays pending and the content-less message stays stored. The first two tests run Flower's own function with its own
in-memory node state and read what it logs, so they fail (and say so) when a Flower release fixes it or rewords the
lines that `LocalDeployment.orphaned_task_nodes` reads. The last test drives that detection and the restart on a real
SuperNode.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run, RunNotRunningException
from flwr.supernode import start_client_internal
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

from lore_cli.local_deployment import ORPHANED_TASK_LOG_LINE, LocalDeployment, orphaned_task_runs

RUN_ID = 11
NODE_ID = 7


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def train_message(round_: int):
    metadata = Metadata(run_id=RUN_ID, message_id="", src_node_id=1, dst_node_id=NODE_ID, reply_to_message_id="",
                        group_id=str(round_), created_at=time.time(), ttl=600.0, message_type="train")
    message = make_message(metadata, RecordDict({"config": ConfigRecord({"round": round_})}))
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def deliver(failure: BaseException) -> tuple[InMemoryNodeState, list[str]]:
    """Two train messages of a run the node serves: round 1's arrives whole, round 2's content pull fails with
    `failure`. Returns the node's state and what Flower logged."""
    store = ObjectStoreFactory().store()
    state = InMemoryNodeState(store)
    state.set_node_id(NODE_ID)
    state.store_run(Run.create_empty(run_id=RUN_ID))
    first, second = train_message(1), train_message(2)
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(first).items()}

    def pull_object(run_id: int, object_id: str) -> bytes:
        if object_id in contents:
            return contents[object_id]
        raise failure

    handler = LogLines()
    flower_logger = logging.getLogger("flwr")
    level, disabled = flower_logger.level, flower_logger.disabled  # (other tests quiet Flower's logger)
    flower_logger.setLevel(logging.INFO)
    flower_logger.disabled = False
    flower_logger.addHandler(handler)
    try:
        results = [start_client_internal._pull_and_store_message(
            state=state, object_store=store, node_config={}, receive=lambda m=message: (m, get_object_tree(m)),
            get_run=None, get_fab=None, pull_object=pull_object, confirm_message_received=lambda *_: None,
            trusted_entities=None) for message in (first, second)]
    finally:
        flower_logger.removeHandler(handler)
        flower_logger.setLevel(level)
        flower_logger.disabled = disabled
    assert results == [RUN_ID, None]
    return state, handler.lines


def pending_tasks(state: InMemoryNodeState) -> list:
    return [task for task in state.get_tasks(run_ids=[RUN_ID]) if task.status.status == "pending"]


def test_a_run_stopping_mid_delivery_leaves_a_pending_task_and_logs_the_lines_we_detect():
    state, lines = deliver(RunNotRunningException())
    # Round 1's task waits for its ClientApp, as it should; round 2's is the orphan.
    assert len(pending_tasks(state)) == 2, "Flower no longer orphans the task: drop the restarts"
    assert len(state.msg_store) == 2
    assert sum(bool(ORPHANED_TASK_LOG_LINE.search(line)) for line in lines) == 1, lines
    assert orphaned_task_runs("\n".join(lines)) == {RUN_ID}, lines


def test_any_other_failure_mid_delivery_is_cleaned_up_and_not_flagged():
    state, lines = deliver(ConnectionError("link lost"))
    assert len(pending_tasks(state)) == 1 and len(state.msg_store) == 1  # round 1's only
    assert orphaned_task_runs("\n".join(lines)) == set(), lines


def node_log_lines(run_id: int, received: bool) -> str:
    """A SuperNode's log for one message of `run_id` taken (as Flower 1.42 writes it), then one the stop met."""
    served = f"INFO :      [RUN {run_id}, ROUND 1]\nINFO :      Receiving: train message (ID: {'a' * 64})\n" \
             "INFO :      Received successfully\nINFO :      Start `flwr-clientapp` process\n" if received else ""
    return served + (f"INFO :      [RUN {run_id}, ROUND 2]\nINFO :      Receiving: train message (ID: {'b' * 64})\n"
                     "INFO :      Start `flwr-clientapp` process\n"
                     f"INFO :      Run ID {run_id} is not in `RUNNING` status. Ignoring message {'b' * 64}.\n")


def test_only_a_run_the_node_had_served_counts_as_an_orphaned_task():
    assert orphaned_task_runs(node_log_lines(4, received=True)) == {4}
    # A run never served: Flower fails fetching the run, before any task exists.
    assert orphaned_task_runs(node_log_lines(5, received=False)) == set()
    assert orphaned_task_runs(node_log_lines(5, received=False) + node_log_lines(4, received=True)) == {4}


def test_a_supernode_with_an_orphaned_task_is_found_from_its_log_since_its_last_start_and_restarted(tmp_path):
    deployment = LocalDeployment(tmp_path, nodes=1, insecure=True)  # no SuperLink: the node keeps retrying
    log = deployment.node_log(0)
    log.parent.mkdir(parents=True)
    log.write_text(node_log_lines(3, received=True))  # a past life
    try:
        deployment.start_supernode(0)
        assert deployment.orphaned_task_nodes() == []
        with open(log, "a") as handle:
            handle.write(node_log_lines(4, received=True))
        assert deployment.orphaned_task_nodes() == [0]
        first = deployment.supernodes[0]
        deployment.restart_supernode(0)
        assert first.poll() is not None and deployment.supernodes[0].poll() is None
        assert deployment.orphaned_task_nodes() == []
    finally:
        deployment.close()
    assert deployment.alive_groups() == []
