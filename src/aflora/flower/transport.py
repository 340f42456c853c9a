"""The round's messages through Flower's Grid: aflora.rounds' Transport for simulation and deployment.

Each client gets its own message (rank, mask, A slice: whatever the method's `instruct` returned, plus the
base merges it lacks), addressed to the SuperNode that said it is that client (`identify_clients`). Train
messages go out a few at a time (`send_bounded`); with `secagg.enabled` through Flower's SecAgg+
(aflora.flower.secagg), so the server gets the clear parts of the replies plus the unmasked sum of the rest.
Replies come back as uploads and failures; deciding what to do with them is the round's (aflora.rounds).
No method math lives here.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from ..config import ExperimentConfig
from ..errors import RoundAborted
from ..rounds import TrainReplies
from ..runtime.server import ClientMessage, Outbox
from .records import instruction_content, read_secure_upload, read_upload
from .secagg import secure_train_round

log = logging.getLogger(__name__)

IDENTIFY = "query.identify"


def identify_clients(grid: Grid, num_clients: int, *, timeout_seconds: float) -> dict[int, int]:
    """Ask every connected node which client (data partition) it is: client id -> node id.

    Each node is asked once, and its answer counts whenever it comes: on a busy machine a node's first
    ClientApp process can take long to start, and asking again would only start more of them. A node is
    asked again only after an error reply (Flower sends one when a node goes away). So the timeout means
    "these nodes never answered", not "the machine was slow"."""
    deadline = time.monotonic() + timeout_seconds
    next_notice = time.monotonic() + 10.0
    node_of_client: dict[int, int] = {}
    asked: dict[str, int] = {}  # message id -> node, for every question not yet answered
    while True:
        answered = set(node_of_client.values())
        unasked = [n for n in grid.get_node_ids() if n not in answered and n not in asked.values()]
        if unasked:
            questions = [Message(content=RecordDict(), dst_node_id=n, message_type=IDENTIFY) for n in unasked]
            list(grid.push_messages(questions))  # a pushed message carries its id in its metadata
            asked.update((q.metadata.message_id, n) for q, n in zip(questions, unasked) if q.metadata.message_id)
        for reply in grid.pull_messages(list(asked)) if asked else []:
            node = asked.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error():
                log.info("node %d could not say which client it is (%s); asking it again", node, reply.error.reason)
                continue
            client_id = int(reply.content.config_records["identity"]["client_id"])
            if client_id in node_of_client:
                raise RuntimeError(f"two nodes claim to be client {client_id}; give every SuperNode its own partition-id")
            if not 0 <= client_id < num_clients:
                raise RuntimeError(f"a node says it is client {client_id}, but clients are numbered 0..{num_clients - 1}")
            node_of_client[client_id] = node
        missing = sorted(set(range(num_clients)) - set(node_of_client))
        if not missing:
            return node_of_client
        if time.monotonic() > deadline:
            silent = f"; nodes {sorted(asked.values())} were asked and never answered" if asked else ""
            raise TimeoutError(
                f"clients {missing} never connected within {timeout_seconds:.0f}s ({len(node_of_client)} of {num_clients} did{silent}). "
                "Start one SuperNode per client (partition-id 0..K-1); in simulation set num-supernodes to "
                "federation.num_clients (flwr run . --federation-config \"num-supernodes=K\")."
            )
        if time.monotonic() >= next_notice:
            log.info("waiting for clients %s (%d of %d known, %d questions outstanding)", missing, len(node_of_client),
                     num_clients, len(asked))
            next_notice = time.monotonic() + 10.0
        time.sleep(0.5)


POLL_SECONDS = 0.05  # how often replies are asked for while messages are out


def send_bounded(grid: Grid, messages: Iterable[Message], max_in_flight: int, timeout: float) -> Iterator[tuple[Message, int]]:
    """Every answered message's reply (or error) with the node the message went to (an error Flower sends for a node
    that went away comes from the SuperLink, not from that node), yielded as it arrives: a caller that reads each
    reply and lets it go holds one reply at a time, not the round's.

    At most `max_in_flight` messages are out at once (0 = all at once); the next one is built and sent as soon as a
    reply frees its place, so a client that stalls holds one place, not everyone after it. The round's timeout is
    one deadline for all: what has not been sent by then is not sent, what has not answered is not waited for."""
    deadline = time.monotonic() + timeout
    pending = iter(messages)
    out: dict[str, int] = {}  # message id -> node, for every message sent and not answered yet
    while True:
        expired = time.monotonic() >= deadline
        room = max_in_flight - len(out) if max_in_flight else None
        if not expired and (room is None or room > 0):
            wave = list(itertools.islice(pending, room))
            list(grid.push_messages(wave))  # a pushed message carries its id in its metadata
            out.update((m.metadata.message_id, m.metadata.dst_node_id) for m in wave if m.metadata.message_id)
            del wave
        if not out or expired:
            return
        answers = list(grid.pull_messages(list(out)))
        if not answers:
            time.sleep(POLL_SECONDS)
        while answers:
            reply = answers.pop(0)
            node = out.pop(reply.metadata.reply_to_message_id, None)
            yield reply, node if node is not None else reply.metadata.src_node_id


class FlowerTransport:
    """aflora.rounds.Transport over a Flower Grid. `connect` first: it learns which node is which client."""

    def __init__(self, grid: Grid, config: ExperimentConfig, *, max_in_flight: int) -> None:
        self.grid, self.config = grid, config
        self.experiment = config.to_dict()  # travels with every message: a client process builds its runtime from it
        self.max_in_flight = max_in_flight  # train messages out at once (0 = all)
        self.timeout = config.engine.round_timeout
        self.node_of_client: dict[int, int] = {}
        self.client_of_node: dict[int, int] = {}

    def connect(self) -> None:
        self.node_of_client = identify_clients(self.grid, self.config.federation.num_clients,
                                               timeout_seconds=self.config.engine.connect_timeout)
        self.client_of_node = {node: cid for cid, node in self.node_of_client.items()}

    def message(self, instruction_and_sync: ClientMessage, message_type: str) -> Message:
        instruction, sync = instruction_and_sync
        return Message(content=instruction_content(instruction, sync, self.experiment),
                       dst_node_id=self.node_of_client[instruction.client_id], message_type=message_type)

    def train(self, round_: int, messages: Outbox) -> TrainReplies:
        # Built as they are sent (send_bounded), each reply read as it comes: a message holds copies of its
        # instruction's tensors, a reply those of the upload.
        built: list[int] = []

        def sent() -> Iterator[Message]:
            for message in messages:
                built.append(message[0].client_id)
                yield self.message(message, "train")

        replies = TrainReplies()
        for reply, node in send_bounded(self.grid, sent(), self.max_in_flight, self.timeout):
            client = self.client_of_node.get(node)
            if reply.has_error():
                replies.failures.append({"client": client, "reason": f"client error: {reply.error.reason}"})
                log.warning("round %d: client %s failed: %s", round_, client, reply.error.reason)
                continue
            try:
                replies.uploads.append(read_upload(reply.content))
            except (KeyError, ValueError, TypeError) as err:  # a reply we cannot even read
                replies.failures.append({"client": client, "reason": f"rejected: unreadable reply ({type(err).__name__}: {err})"})
                log.warning("round %d: unreadable reply from client %s: %s", round_, client, err)
        unsent = messages.client_ids[len(built):]
        if unsent:
            reason = (f"not sent: the round's timeout (engine.round_timeout = {self.timeout:g} s) passed while "
                      f"{self.max_in_flight} earlier clients (engine.max_in_flight) were still out")
            replies.failures.extend({"client": cid, "reason": reason} for cid in unsent)
            log.warning("round %d: clients %s %s", round_, unsent, reason)
        return replies

    def train_secure(self, round_: int, messages: Outbox) -> TrainReplies:
        """SecAgg+'s stages need every participant at once (no waves). Clients that dropped out are failures;
        the clear parts of the survivors' replies are the uploads, the unmasked sum is `summed`."""
        result = secure_train_round(self.grid, [self.message(message, "train") for message in messages], round_,
                                    self.config.secagg, self.timeout)
        replies = TrainReplies()
        for node, reason in sorted(result.errors.items()):
            if node not in result.replies:
                failure = {"client": self.client_of_node.get(node), "reason": f"dropped out of SecAgg+ (not in the sum): {reason}"}
                log.warning("round %d: client %s %s", round_, failure["client"], failure["reason"])
                replies.failures.append(failure)
        if result.summed is None:
            reasons = "; ".join(f"client {f['client']}: {f['reason']}" for f in replies.failures) or "see Flower's log"
            raise RoundAborted(f"round {round_}: SecAgg+ stopped before unmasking, too few clients stayed for "
                               f"secagg.reconstruction_threshold ({reasons})")
        for node, fields in sorted(result.replies.items()):
            try:
                replies.uploads.append(read_secure_upload(fields))
            except (KeyError, ValueError, TypeError) as err:  # then the server drops the round: this reply is in the sum
                reason = f"rejected: unreadable reply ({type(err).__name__}: {err})"
                replies.failures.append({"client": self.client_of_node.get(node), "reason": reason})
        replies.summed = result.summed
        replies.summed_clients = [self.client_of_node[node] for node in result.replies]
        return replies

    def evaluate(self, round_: int, messages: Outbox) -> list[tuple[int, dict[str, float]]]:
        """Personalized evaluation, as many messages out at once as in training."""
        sent = (self.message(message, "evaluate") for message in messages)
        return [(self.client_of_node[node], dict(reply.content.metric_records["metrics"]))
                for reply, node in send_bounded(self.grid, sent, self.max_in_flight, self.timeout) if not reply.has_error()]
