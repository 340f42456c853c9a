"""Processes this command starts and stops: each in its own session, found again by pid and command line,
stopped as a family; tool calls that always end (a deadline) and fail with their output quoted."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import FederationError

log = logging.getLogger(__name__)

TOOL_TIMEOUT_SECONDS = 60.0


@dataclass
class Process:
    """One process this module started (the leader of its own process group)."""

    name: str  # "superlink", "supernode-<k>"
    pid: int
    program: str  # what its command line must contain, so a recycled pid is never signalled
    log: str


def call(cmd: list[str], *, what: str, env: dict[str, str] | None = None, timeout: float = TOOL_TIMEOUT_SECONDS,
         cwd: Path | None = None) -> str:
    """Run a command to completion (bounded); its stdout, or an error that quotes its output."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise FederationError(f"{what} did not finish within {timeout:.0f}s: {' '.join(cmd)}") from None
    if done.returncode != 0:
        output = (done.stderr.strip() + "\n" + done.stdout.strip()).strip()
        raise FederationError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{tail(output)}")
    return done.stdout


def spawn(name: str, cmd: list[str], log_file: Path, env: dict[str, str]) -> Process:
    """Start a long-lived process in its own session (so it and its children can be stopped as a group)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    _CHILDREN[proc.pid] = proc
    return Process(name=name, pid=proc.pid, program=Path(cmd[0]).name, log=str(log_file))


# The processes this interpreter started: their exit status is read from here (an earlier command's processes,
# found through federation.json, are not our children and are only looked up by pid and command line).
_CHILDREN: dict[int, subprocess.Popen] = {}


def _process_table() -> list[tuple[int, int, int, str]]:
    """(pid, parent pid, process group, command line) of every live process, zombies left out: from /proc on
    Linux (no dependency on procps), else from `ps`."""
    proc = Path("/proc")
    if (proc / "self" / "stat").is_file():
        table = []
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:  # it exited meanwhile
                continue
            fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
            if fields[0] != "Z":
                table.append((int(entry.name), int(fields[1]), int(fields[2]), command))
        return table
    try:
        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,pgid=,stat=,command="], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    table = []
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) == 5 and not parts[3].startswith("Z"):
            table.append((int(parts[0]), int(parts[1]), int(parts[2]), parts[4]))
    return table


def command_line(pid: int) -> str | None:
    return next((command for p, _, _, command in _process_table() if p == pid), None)


def is_running(process: Process) -> bool:
    if process.pid in _CHILDREN and _CHILDREN[process.pid].poll() is not None:
        return False
    line = command_line(process.pid)
    return line is not None and process.program in line


def exit_code(process: Process) -> int | None:
    """The exit status of a process this interpreter started, once it has exited; None while it runs."""
    if process.pid in _CHILDREN:
        return _CHILDREN[process.pid].poll()
    return None if is_running(process) else -1  # started by an earlier command: its status is not ours to read


def family(process: Process) -> list[int]:
    """The live processes that belong to one we started: its process group (a SuperNode's SuperExec and ClientApps
    stay in it, even after the SuperNode itself has exited) and all their descendants (the SuperLink starts its
    SuperExec in a session of its own). Group members are only counted while they run a Flower program, so a
    recycled process-group id never drags in a stranger."""
    table = _process_table()
    members = {pid for pid, _, group, command in table
               if group == process.pid and (process.program in command or "flwr" in command or "flower" in command)}
    children: dict[int, list[int]] = {}
    for pid, parent, _, _ in table:
        children.setdefault(parent, []).append(pid)
    found, todo = set(members), list(members)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def stop(*processes: Process, grace_seconds: float = 10.0) -> list[str]:
    """SIGTERM the families (see `family`) of all `processes` at once, wait, SIGKILL what is left; the names of those
    that were still running."""
    targets = [(process, family(process)) for process in processes]
    targets = [(process, pids) for process, pids in targets if pids]
    everyone = {pid for _, pids in targets for pid in pids}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in everyone:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            for process, _ in targets:
                if process.pid in _CHILDREN:
                    _CHILDREN[process.pid].poll()  # reap it, else it lingers as a zombie
            everyone &= {pid for pid, _, _, _ in _process_table()}
            if not everyone:
                return [process.name for process, _ in targets]
            time.sleep(0.2)
        if sig == signal.SIGTERM:
            log.info("%d processes did not stop within %.0fs of SIGTERM; killing them", len(everyone), grace_seconds)
    log.warning("processes %s did not stop even after SIGKILL", sorted(everyone))
    return [process.name for process, _ in targets]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def log_tail(path: str | Path, lines: int = 25) -> str:
    path = Path(path)
    return tail(path.read_text(errors="replace"), lines) if path.is_file() else f"({path} does not exist)"


def wait_until(condition, *, timeout: float, what: str, hint: str = "", poll_seconds: float = 0.5):
    """Poll `condition` (returns a truthy value when done) until the deadline, then fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise FederationError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"; {hint}" if hint else ""))
        time.sleep(poll_seconds)
