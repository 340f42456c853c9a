"""A long-lived client process for a deployed SuperNode: it keeps the base model loaded for the whole run.

Flower starts a fresh `flwr-clientapp` process for every message a SuperNode receives. Left to itself, each
of those would import torch and load the model again (tens of seconds on a small CPU, per message). With
`client-worker=<socket>` in the SuperNode's node config, the ClientApp only forwards the message's records to
this process over a local socket and returns its answer; the worker does the work (aflora.flower.client_work)
with one model for every message, as a simulation's worker processes do.

Start one per SuperNode, beside it (`aflora federation up` does): `aflora federation worker --socket PATH`.
The socket's folder should be the node owner's only (0700); requests must present the key in `PATH.key`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import secrets
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAIN, EVALUATE = "train", "evaluate"


def key_file(socket: Path) -> Path:
    return socket.with_name(socket.name + ".key")


def serve(socket: Path) -> None:
    """Answer requests until stopped; one at a time (a node gets one message at a time)."""
    from . import client_work  # torch, transformers, the model: loaded once, here

    handlers = {TRAIN: client_work.train, EVALUATE: client_work.evaluate}
    socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in (socket, key_file(socket)):  # left by a worker that was killed
        stale.unlink(missing_ok=True)
    key = secrets.token_bytes(32)
    with Listener(str(socket), family="AF_UNIX", authkey=key) as listener:
        # The key file appears last: once it exists, the worker is listening (what `ready` checks).
        descriptor = os.open(key_file(socket), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key)
        log.info("client worker ready on %s", socket)
        while True:
            try:
                connection = listener.accept()
            except Exception as err:  # a caller without the key, or one that hung up: not our failure
                log.warning("refused a connection on %s: %s", socket, err)
                continue
            with connection:
                try:
                    kind, *arguments = connection.recv()
                except (OSError, EOFError):
                    continue
                try:
                    answer: tuple[str, Any] = ("ok", handlers[kind](*arguments))
                except Exception as err:  # the ClientApp turns it into Flower's error reply
                    log.exception("client worker: %s failed", kind)
                    answer = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}")
                try:
                    connection.send(answer)
                except OSError as err:  # the ClientApp process is gone (its SuperNode was stopped): serve the next
                    log.warning("client worker: the %s answer could not be delivered (%s)", kind, err)
            del answer, arguments  # the request and reply records: free before trimming
            release_freed_memory()


def release_freed_memory() -> None:
    """Hand the heap that training freed back to the system. Ten idle workers on one machine otherwise each
    keep their training peak (glibc keeps freed arenas): ~2.7 GB apiece with SmolLM2, instead of the model's."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
            ctypes.CDLL(libc).malloc_trim(0)


def ready(socket: Path) -> bool:
    return key_file(socket).is_file()


def ask(socket: Path, kind: str, *arguments: Any) -> Any:
    """What the worker on `socket` answers to one request; its error, raised here, if it failed."""
    try:
        key = key_file(socket).read_bytes()
        with Client(str(socket), family="AF_UNIX", authkey=key) as connection:
            connection.send((kind, *arguments))
            status, answer = connection.recv()
    except (OSError, EOFError) as err:
        raise RuntimeError(f"the client worker on {socket} did not answer ({type(err).__name__}: {err}); "
                           "is it running? Start it with `aflora federation worker --socket "
                           f"{socket}`, or remove client-worker from this SuperNode's node config") from None
    if status != "ok":
        raise RuntimeError(f"the client worker on {socket} failed: {answer}")
    return answer
