"""Learning which SuperNode is which client cannot starve on a busy machine: each node is asked once, and a
late answer still counts (docs/deployment.md). Checked on a fake Grid with a virtual clock, where every
question makes a node start a ClientApp process that answers only after `start_seconds`."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
from flwr.supercore.task_identity import TaskIdentity

from aflora.flower import transport
from aflora.flower.transport import identify_clients


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class SlowNodes:
    """Nodes 100+k are client k; each question starts a process on the node that answers `start_seconds`
    later (or with an error, for the nodes in `errors_first`, the first time)."""

    def __init__(self, clock: Clock, clients: int, start_seconds: float, *, silent=(), errors_first=()) -> None:
        self.clock, self.start_seconds = clock, start_seconds
        self.client_of = {100 + k: k for k in range(clients)}
        self.silent, self.errors_left = set(silent), set(errors_first)
        self.processes_started = dict.fromkeys(self.client_of, 0)
        self.pending: dict[str, tuple[float, int]] = {}  # message id -> (answer time, node)

    def get_node_ids(self):
        return list(self.client_of)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = message.metadata.dst_node_id
            self.processes_started[node] += 1
            if node not in self.silent:
                self.pending[message.metadata.message_id] = (self.clock.now + self.start_seconds, node)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for message_id in list(message_ids):
            due, node = self.pending.get(message_id, (float("inf"), None))
            if due <= self.clock.now:
                del self.pending[message_id]
                error = node in self.errors_left
                self.errors_left.discard(node)
                replies.append(SimpleNamespace(
                    metadata=SimpleNamespace(reply_to_message_id=message_id, src_node_id=node),
                    has_error=lambda error=error: error, error=SimpleNamespace(reason="node went away"),
                    content=SimpleNamespace(config_records={"identity": {"client_id": self.client_of[node]}})))
        return replies

    def send_and_receive(self, messages, timeout):  # what a Grid offers besides; waits up to `timeout`
        ids = self.push_messages(messages)
        deadline = self.clock.now + timeout
        replies = []
        while len(replies) < len(ids) and self.clock.now < deadline:
            self.clock.sleep(1.0)
            replies += self.pull_messages(set(ids) - {r.metadata.reply_to_message_id for r in replies})
        return replies


@pytest.fixture
def clock(monkeypatch):
    for attribute in ("_task_id", "_run_id", "_node_id"):  # what a Flower runtime sets before messages exist
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    clock = Clock()
    monkeypatch.setattr(transport, "time", clock)
    return clock


def test_slow_nodes_are_asked_once_and_their_late_answers_count(clock):
    """Ten nodes whose ClientApp takes 90 s to start (more than a minute: ten at once on two cores)."""
    grid = SlowNodes(clock, clients=10, start_seconds=90.0)
    assert identify_clients(grid, 10, timeout_seconds=300) == {k: 100 + k for k in range(10)}
    assert grid.processes_started == {100 + k: 1 for k in range(10)}  # no second process on any node
    assert clock.now < 100


def test_a_node_that_answered_with_an_error_is_asked_again(clock):
    grid = SlowNodes(clock, clients=3, start_seconds=5.0, errors_first={101})
    assert identify_clients(grid, 3, timeout_seconds=60) == {0: 100, 1: 101, 2: 102}
    assert grid.processes_started == {100: 1, 101: 2, 102: 1}


def test_the_timeout_names_the_nodes_that_never_answered(clock):
    grid = SlowNodes(clock, clients=3, start_seconds=5.0, silent={102})
    with pytest.raises(TimeoutError, match=r"clients \[2\] never connected within 60s \(2 of 3 did; nodes \[102\] were asked"):
        identify_clients(grid, 3, timeout_seconds=60)
    assert grid.processes_started[102] == 1
