"""A ServerApp's grid that stops waiting once the simulation engine running in the same process has stopped.

Flower's simulation engine (`_run_simulation`) runs in the caller's thread and starts the ServerApp in a thread that
is not a daemon. When the engine stops first (Ctrl-C reaches only the main thread; or the engine fails), no node will
answer again, yet the ServerApp keeps waiting for replies, up to `round-timeout` per request, and the interpreter
waits for that thread before it exits: the process hangs and keeps the run directory's lock. So the command that
runs the engine does it inside `engine_in_this_process()`, and the ServerApp waits through `stopping_with_engine(grid)`:
once the block is left, however it is left, the ServerApp's next poll raises ServerAppStopped, and the block waits for
its thread to end (its lock released, its progress bar closed). The round in progress is abandoned as in a crash (the
checkpoint keeps the last finished round, and a rerun resumes after it).
A ServerApp that no engine of its process started (a deployment's; one that tests run on an in-process grid) keeps
its grid unchanged."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

POLL_SECONDS = 0.1  # between pulls of replies, as Flower's InMemoryGrid
STOP_WAIT_SECONDS = 60.0  # for a stopped ServerApp to finish what it computes between two requests


class ServerAppStopped(RuntimeError):
    """The simulation engine hosting this ServerApp has stopped: no node will answer."""


class _Engine:
    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.server_apps: list[threading.Thread] = []  # the threads of the ServerApps it started
        self.started_threads: set[threading.Thread] = set()  # threads started while it ran, known once it stopped


_engine: _Engine | None = None  # the engine running in this process, or the last one; None: never one here


@contextmanager
def engine_in_this_process() -> Iterator[None]:
    """Run Flower's simulation engine inside this block: on leaving it, the ServerApps the engine started stop
    waiting and are waited for (one still loading when the engine stopped stops at its first request)."""
    global _engine
    engine = _engine = _Engine()
    before = set(threading.enumerate())
    try:
        yield
    finally:
        engine.started_threads = set(threading.enumerate()) - before
        engine.stopped.set()
        for thread in engine.server_apps:
            if thread is not threading.current_thread():
                thread.join(STOP_WAIT_SECONDS)


def stopping_with_engine(grid: Grid) -> Grid:
    """`grid`, whose requests raise ServerAppStopped once this process's engine has stopped; `grid` itself for a
    ServerApp that no engine of this process started."""
    engine, thread = _engine, threading.current_thread()
    if engine is None or (engine.stopped.is_set() and thread not in engine.started_threads):
        return grid
    engine.server_apps.append(thread)
    return StoppableGrid(grid, engine.stopped)


class StoppableGrid(Grid):
    """Delegates to `grid`; every request first checks `stopped`, and send_and_receive polls for replies as Flower's
    InMemoryGrid does, waking at once when `stopped` is set."""

    def __init__(self, grid: Grid, stopped: threading.Event) -> None:
        self._grid, self._stopped = grid, stopped

    def _check(self) -> None:
        if self._stopped.is_set():
            raise ServerAppStopped("the simulation engine stopped, so no node will answer; the round in progress is "
                                   "abandoned (the checkpoint keeps the last finished round)")

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self._grid.get_node_ids()

    def get_nodes(self):
        self._check()
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull replies until every message has one or `timeout` seconds have passed."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            received = list(self.pull_messages(pending))
            replies += received
            pending -= {reply.metadata.reply_to_message_id for reply in received}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            self._stopped.wait(POLL_SECONDS)
        return replies
