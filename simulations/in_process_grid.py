"""An in-process Flower Grid: the real ServerApp strategy and the real ClientApp handlers, run sequentially.

Each virtual node has its own `Context` for the whole run (as in Flower's simulation engine); message content is
deep-copied both ways (the strategy shares one RecordDict across messages); a handler exception becomes an error
reply, as in the engine. Every message sent and every reply is kept in `sent` / `replies` for a test to inspect;
a benchmark passes `keep_messages=False`, as a run otherwise holds every user's update of every round
(`simulations.bench_rounds_memory`: 0.19 GiB at 20 rounds of 300 users, 0.66 GiB at 150; a matrix run of 1,000
users a round was killed for memory).
`reply_hook(reply) -> reply` lets a test tamper with replies on their way to the server.
Uses Flower internals (TaskIdentity, Run): pinned to flwr 1.42.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1
SERVER_NODE_ID = 0


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: list[dict], run_config: dict,
                 reply_hook: Callable[[Message], Message] | None = None, keep_messages: bool = True) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = RUN_ID, 1, SERVER_NODE_ID
        self.client_app = client_app
        # Node ids deliberately not in partition order: the server must not rely on it.
        self.contexts = {
            1000 + 7 * (len(node_configs) - i): Context(run_id=RUN_ID, node_id=1000 + 7 * (len(node_configs) - i),
                                                        node_config=dict(cfg), state=RecordDict(),
                                                        run_config=dict(run_config))
            for i, cfg in enumerate(node_configs)
        }
        self.reply_hook, self.keep_messages = reply_hook, keep_messages
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    @property
    def run(self) -> Run:
        return Run.create_empty(RUN_ID)

    def set_run(self, run_id: int) -> None:
        pass

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid delivers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for msg in messages:
            delivered = Message(copy.deepcopy(msg.content), dst_node_id=msg.metadata.dst_node_id,
                                message_type=msg.metadata.message_type)
            delivered.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            if self.keep_messages:
                self.sent.append(delivered)
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.client_app(delivered, context)
            except Exception as exc:  # the engine turns a ClientApp exception into an error reply
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered)
            if not reply.has_error():
                reply = Message(copy.deepcopy(reply.content), reply_to=delivered)
            if self.keep_messages:
                self.replies.append(reply)
            out.append(self.reply_hook(reply) if self.reply_hook else reply)
        return out
