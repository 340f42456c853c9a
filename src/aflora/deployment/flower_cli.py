"""Flower's programs as this package drives them: their environment, `flwr` calls, the configuration files
they read (FLWR_HOME, the app, the experiment), and the SuperLink and SuperNode commands."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

from ..config import ExperimentConfig, flatten
from ..errors import FederationError
from ..tomlwrite import toml_literal, write_flat_toml
from .layout import Layout
from .processes import TOOL_TIMEOUT_SECONDS, Process, call, free_port, is_running, log_tail, spawn, stop, tail, wait_until

CONNECTION = "aflora-local"  # the SuperLink connection's name in flwr-home/config.toml
STARTUP_TIMEOUT_SECONDS = 120.0

APP_PYPROJECT = """\
# Written by `aflora federation`: aflora's Flower app with the experiment in a TOML file.
# flwr run <this folder> aflora-local --run-config 'config-file="/abs/experiment.toml" out-dir="/abs/out"'
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "aflora-federation"
version = "0.1.0"
description = "aflora's ServerApp and ClientApp; the experiment is read from config-file"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "aflora"

[tool.flwr.app.components]
serverapp = "aflora.flower.server_app:app"
clientapp = "aflora.flower.client_app:app"

[tool.flwr.app.config]
config-file = ""
out-dir = ""
"""


def flower_env(layout: Layout) -> dict[str, str]:
    """The environment of every Flower process and CLI call: this interpreter's scripts first (the SuperLink and
    SuperNodes start `flower-superexec`, `flwr-serverapp`, `flwr-clientapp` by name), FLWR_HOME in the state
    folder (never the user's ~/.flwr), no runtime dependency installation (it would resolve torch from the
    network), no telemetry or update check."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(layout.flwr_home.resolve())
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # logs reach their files as they happen
    return env


def executable(name: str) -> str:
    """A Flower script next to this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise FederationError(f"`{name}` was not found next to {sys.executable} or on PATH; install flwr (`pip install flwr`)")
    return found


def flwr(layout: Layout, *args: str, what: str, timeout: float = TOOL_TIMEOUT_SECONDS) -> str:
    return call([executable("flwr"), *args], what=what, env=flower_env(layout), timeout=timeout)


def flwr_json(layout: Layout, *args: str, what: str, timeout: float = TOOL_TIMEOUT_SECONDS) -> dict:
    """A `flwr ... --format json` call; its JSON object (the CLI may print notices before it)."""
    out = flwr(layout, *args, "--format", "json", what=what, timeout=timeout)
    start = out.find("{")
    try:
        return json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        raise FederationError(f"{what}: `flwr` did not answer in JSON:\n{tail(out)}") from None


def write_flower_home(layout: Layout, address: str) -> Path:
    """FLWR_HOME/config.toml: the SuperLink connection `aflora-local` (TLS with our CA), made the default."""
    layout.flwr_home.mkdir(parents=True, exist_ok=True)
    path = layout.flwr_home / "config.toml"
    ca = (layout.certs / "ca.crt").resolve()
    path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                    f'address = "{address}"\nroot-certificates = {json.dumps(str(ca))}\n')
    return path


def write_app(layout: Layout) -> Path:
    layout.app.mkdir(parents=True, exist_ok=True)
    (layout.app / "pyproject.toml").write_text(APP_PYPROJECT)
    return layout.app


# Config values that name files or folders. The ServerApp runs in another working directory than this command,
# so relative ones are made absolute: folders always, names that may also be a hub id only when the path exists.
FOLDER_KEYS = ("data.data_dir", "model.cache_dir")
FILE_OR_NAME_KEYS = ("data.dataset", "data.test_dataset", "data.options.test_path", "model.name")


def write_experiment(config: ExperimentConfig, path: Path) -> Path:
    """The resolved experiment as a TOML file the ServerApp reads (run config `config-file`)."""
    flat = flatten(config.to_dict())
    for key, value in flat.items():
        relative = isinstance(value, str) and value and not Path(value).expanduser().is_absolute()
        if relative and (key in FOLDER_KEYS or (key in FILE_OR_NAME_KEYS and Path(value).expanduser().exists())):
            flat[key] = str(Path(value).expanduser().resolve())
    return write_flat_toml(flat, path)


def start_superlink(layout: Layout, port: int, *, timeout: float = STARTUP_TIMEOUT_SECONDS) -> Process:
    """`flower-superlink` with TLS and SuperNode authentication on 127.0.0.1:<port>, its state in the state folder's
    database (so a restarted SuperLink still knows the registered nodes); returns once it accepts connections."""
    if not port_is_free(port):  # else a stranger's listener would pass for our SuperLink in `accepting` below
        raise FederationError(f"port {port} on 127.0.0.1 is already taken by another process; stop it, or let "
                              "`aflora federation up` pick a free port again")
    certs = layout.certs.resolve()
    cmd = [
        executable("flower-superlink"),
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(layout.superlink_database.resolve()),  # registered keys and runs outlive a restart
        "--host", "127.0.0.1", "--port", str(port),
    ]
    process = spawn("superlink", cmd, layout.logs / "superlink.log", flower_env(layout))

    def accepting() -> bool:
        if not is_running(process):
            raise FederationError(f"the SuperLink exited while starting; its log ({process.log}):\n{log_tail(process.log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(accepting, timeout=timeout, what=f"the SuperLink to listen on 127.0.0.1:{port}", hint=f"see {process.log}")
    except BaseException:
        stop(process)
        raise
    return process


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:<port> now. Bound, not connected to: a connect to a free port
    on 127.0.0.1 can meet itself (TCP self-connect). A killed server's connections hold its port for a moment
    (FIN-WAIT-2) even with SO_REUSEADDR."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def register_node(layout: Layout, public_key: Path) -> int:
    """`flwr supernode register <key>`: the SuperLink will accept the SuperNode holding the private key."""
    answer = flwr_json(layout, "supernode", "register", str(public_key.resolve()), CONNECTION,
                       what=f"registering {public_key.name} with the SuperLink")
    return int(answer["node-id"])


def list_nodes(layout: Layout) -> list[dict]:
    """`flwr supernode ls`: the registered SuperNodes with their status (registered, online, offline...)."""
    return flwr_json(layout, "supernode", "ls", CONNECTION, what="listing the SuperNodes").get("nodes", [])


def start_client_worker(layout: Layout, partition: int) -> Process:
    """The long-lived process that does client `partition`'s work with the model loaded once
    (aflora.flower.client_worker); its SuperNode's ClientApp processes forward their messages to it."""
    name = f"worker-{partition}"
    cmd = [executable("aflora"), "federation", "worker", "--socket", str(layout.worker_socket(partition))]
    return spawn(name, cmd, layout.logs / f"{name}.log", flower_env(layout))


def start_supernode(layout: Layout, address: str, private_key: Path, partition: int, partitions: int,
                    name: str | None = None, *, client_worker: bool = True) -> Process:
    """`flower-supernode` for one client: TLS to the SuperLink, its authentication key, and its node config
    (partition-id, num-partitions, data-file: the only rows it reads; state-dir: where it keeps the global
    updates it received, since a SuperNode starts a fresh ClientApp process for every message; client-worker:
    the socket of the process that keeps its model loaded)."""
    state_dir = (layout.root / "nodes" / f"node_{partition}").resolve()
    node_config = (f"partition-id={partition} num-partitions={partitions} "
                   f"data-file={toml_literal(str(layout.shard(partition).resolve()))} state-dir={toml_literal(str(state_dir))}")
    if client_worker:
        node_config += f" client-worker={toml_literal(str(layout.worker_socket(partition)))}"
    cmd = [
        executable("flower-supernode"),
        "--superlink", address,
        "--root-certificates", str((layout.certs / "ca.crt").resolve()),
        "--auth-supernode-private-key", str(private_key.resolve()),
        "--node-config", node_config,
        "--port", str(free_port()),  # the SuperNode's own runtime API (its ClientApp processes), on 127.0.0.1
    ]
    name = name or f"supernode-{partition}"
    return spawn(name, cmd, layout.logs / f"{name}.log", flower_env(layout))
