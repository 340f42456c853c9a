"""A real Flower federation on this machine: a TLS SuperLink, one authenticated SuperNode per client, `flwr run`.

What the simulation engine hides is all here, as a person would do it by hand (docs/deployment.md): a CA and a
server certificate made with openssl, one EC key pair per SuperNode (ssh-keygen), `flower-superlink` with TLS and
`--enable-supernode-auth`, every node's public key registered with `flwr supernode register`, one data file per
client (`aflora partition`), one `flower-supernode` per client that reads only its own file, and `flwr run`
against that SuperLink. Everything lives in one state folder (default `runs/federation/`):

    certs/       ca.crt, ca.key, server.pem, server.key (SAN 127.0.0.1, localhost)
    keys/        node_<k>, node_<k>.pub: SuperNode k's authentication key pair
    flwr-home/   FLWR_HOME: config.toml with the SuperLink connection `aflora-local`, Flower's app cache
    app/         pyproject.toml: aflora's ServerApp/ClientApp, run config `config-file` + `out-dir`
    shards/      client_<k>.jsonl, task.json: what SuperNode k trains on
    logs/        superlink.log, supernode-<k>.log, run_<id>.log (the ServerApp's log)
    experiment.toml, federation.json (what is running: pids, ports, address)

The app in `app/` differs from the repository's `flwr run .` only in its run config: Flower accepts overrides only
for keys its pyproject declares, and scalars only, so an arbitrary experiment (a local dataset's label_words, say)
cannot travel as `--run-config`; the ServerApp reads it from `config-file` instead (config_from_flat).

Every process runs in its own session (process group) and is stopped by `down` (or by `run` when it brought the
federation up itself); every wait has a deadline and says what it waited for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ExperimentConfig, flatten
from .errors import FederationError

log = logging.getLogger(__name__)

CONNECTION = "aflora-local"  # the SuperLink connection's name in flwr-home/config.toml
LOCAL_HOSTS = ("127.0.0.1", "localhost")  # the server certificate's SANs
STATE_FILE = "federation.json"
EXPERIMENT_FILE = "experiment.toml"
STARTUP_TIMEOUT_SECONDS = 120.0
RUN_TIMEOUT_SECONDS = 4 * 3600.0
TOOL_TIMEOUT_SECONDS = 60.0

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

# openssl's own config, so the certificates do not depend on the system's openssl.cnf. Python 3.13's default
# TLS context is strict (X509_STRICT): CA flag critical, key identifiers present.
OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no

[dn]
O = aflora
CN = {common_name}

[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


# --------------------------------------------------------------------------------------------------------------
# Where things live
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def app(self) -> Path:
        return self.root / "app"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def experiment(self) -> Path:
        return self.root / EXPERIMENT_FILE

    def node_key(self, partition: int) -> Path:
        return self.keys / f"node_{partition}"

    def shard(self, partition: int) -> Path:
        from .shards import shard_path

        return shard_path(self.shards, partition)


@dataclass
class Process:
    """One process this module started (the leader of its own process group)."""

    name: str  # "superlink", "supernode-<k>"
    pid: int
    program: str  # what its command line must contain, so a recycled pid is never signalled
    log: str


@dataclass
class Federation:
    """What `up` started, saved as federation.json so `run`, `status` and `down` find it."""

    root: str
    address: str  # the SuperLink's address, host:port (Fleet, Control and Runtime API share it)
    partitions: int
    superlink: Process
    supernodes: list[Process] = field(default_factory=list)

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.root))

    def processes(self) -> list[Process]:
        return [*self.supernodes, self.superlink]

    def save(self) -> None:
        self.layout.state_file.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, root: Path) -> Federation | None:
        path = Layout(root).state_file
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(
            root=raw["root"], address=raw["address"], partitions=raw["partitions"],
            superlink=Process(**raw["superlink"]), supernodes=[Process(**p) for p in raw["supernodes"]],
        )

    def alive(self) -> bool:
        return all(is_running(p) for p in self.processes())


# --------------------------------------------------------------------------------------------------------------
# Tools and processes
# --------------------------------------------------------------------------------------------------------------


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


def system_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise FederationError(f"`{name}` is needed to create the federation's keys; install it (e.g. `apt-get install {package}`)")
    return found


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


def _command_line(pid: int) -> str | None:
    return next((command for p, _, _, command in _process_table() if p == pid), None)


def is_running(process: Process) -> bool:
    if process.pid in _CHILDREN and _CHILDREN[process.pid].poll() is not None:
        return False
    line = _command_line(process.pid)
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
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
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


# --------------------------------------------------------------------------------------------------------------
# Certificates, keys, Flower configuration
# --------------------------------------------------------------------------------------------------------------


def make_certificates(folder: Path, hosts: tuple[str, ...] = LOCAL_HOSTS) -> dict[str, Path]:
    """A private CA and a server certificate for `hosts` (IPs and DNS names), EC P-256; kept if present."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("ca.crt", "ca.key", "server.pem", "server.key")}
    if all(p.is_file() for p in paths.values()):
        return paths
    openssl = system_tool("openssl", "openssl")
    san = ", ".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    (folder / "ca.cnf").write_text(OPENSSL_CNF.format(common_name="aflora federation CA", san=san))
    (folder / "server.cnf").write_text(OPENSSL_CNF.format(common_name=hosts[-1], san=san))
    for key in ("ca.key", "server.key"):
        call([openssl, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key], what="openssl (key)", cwd=folder)
        os.chmod(folder / key, 0o600)
    call([openssl, "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "3650", "-config", "ca.cnf",
          "-extensions", "ca_ext", "-out", "ca.crt"], what="openssl (CA certificate)", cwd=folder)
    call([openssl, "req", "-new", "-key", "server.key", "-config", "server.cnf", "-out", "server.csr"],
         what="openssl (server request)", cwd=folder)
    call([openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
          "-days", "825", "-sha256", "-extfile", "server.cnf", "-extensions", "server_ext", "-out", "server.pem"],
         what="openssl (server certificate)", cwd=folder)
    return paths


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def make_node_key(private_key: Path) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format (what `flower-supernode` and `flwr supernode register` read);
    kept if present. Returns the public key's path."""
    public_key = private_key.with_name(private_key.name + ".pub")
    if private_key.is_file() and public_key.is_file():
        return public_key
    private_key.parent.mkdir(parents=True, exist_ok=True)
    call([system_tool("ssh-keygen", "openssh-client"), "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C",
          f"aflora-{private_key.name}", "-f", str(private_key)], what="ssh-keygen")
    return public_key


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
    from .compare import toml_literal

    flat = flatten(config.to_dict())
    for key, value in flat.items():
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            if key in FOLDER_KEYS or (key in FILE_OR_NAME_KEYS and Path(value).expanduser().exists()):
                flat[key] = str(Path(value).expanduser().resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key} = {toml_literal(value)}\n" for key, value in flat.items()))
    return path


# --------------------------------------------------------------------------------------------------------------
# SuperLink and SuperNodes
# --------------------------------------------------------------------------------------------------------------


def start_superlink(layout: Layout, port: int, *, timeout: float = STARTUP_TIMEOUT_SECONDS) -> Process:
    """`flower-superlink` with TLS and SuperNode authentication on 127.0.0.1:<port>; returns once it accepts
    connections."""
    certs = layout.certs.resolve()
    cmd = [
        executable("flower-superlink"),
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
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


def register_node(layout: Layout, public_key: Path) -> int:
    """`flwr supernode register <key>`: the SuperLink will accept the SuperNode holding the private key."""
    answer = flwr_json(layout, "supernode", "register", str(public_key.resolve()), CONNECTION,
                       what=f"registering {public_key.name} with the SuperLink")
    return int(answer["node-id"])


def list_nodes(layout: Layout) -> list[dict]:
    """`flwr supernode ls`: the registered SuperNodes with their status (registered, online, offline...)."""
    return flwr_json(layout, "supernode", "ls", CONNECTION, what="listing the SuperNodes").get("nodes", [])


def start_supernode(layout: Layout, address: str, private_key: Path, partition: int, partitions: int,
                    name: str | None = None) -> Process:
    """`flower-supernode` for one client: TLS to the SuperLink, its authentication key, and its node config
    (partition-id, num-partitions, data-file: the only rows it reads; state-dir: where it keeps the global
    updates it received, since a SuperNode may start a fresh ClientApp process for every message)."""
    from .compare import toml_literal

    state_dir = (layout.root / "nodes" / f"node_{partition}").resolve()
    node_config = (f"partition-id={partition} num-partitions={partitions} "
                   f"data-file={toml_literal(str(layout.shard(partition).resolve()))} state-dir={toml_literal(str(state_dir))}")
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


def wait_nodes_online(layout: Layout, federation: Federation, *, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
    expected = federation.partitions

    def online() -> bool:
        for node in federation.supernodes:
            if not is_running(node):
                raise FederationError(f"{node.name} exited while connecting; its log ({node.log}):\n{log_tail(node.log)}")
        return sum(n.get("status") == "online" for n in list_nodes(layout)) >= expected

    wait_until(online, timeout=timeout, poll_seconds=2.0, what=f"{expected} SuperNodes to come online",
               hint=f"see the logs in {layout.logs}")


# --------------------------------------------------------------------------------------------------------------
# up / run / down
# --------------------------------------------------------------------------------------------------------------


def up(config: ExperimentConfig, state: Path, *, timeout: float = STARTUP_TIMEOUT_SECONDS) -> Federation:
    """Bring a federation for `config` up on 127.0.0.1 and leave it running: one SuperNode per client."""
    layout = Layout(state.resolve())
    existing = Federation.load(layout.root)
    if existing is not None:
        if existing.alive():
            raise FederationError(f"a federation is already up in {layout.root} (SuperLink {existing.address}); "
                                  f"stop it first with `aflora federation down --state {state}`")
        down(layout.root)  # a stale one (a process died): clear what is left
    partitions = config.federation.num_clients
    layout.logs.mkdir(parents=True, exist_ok=True)
    make_certificates(layout.certs)
    public_keys = [make_node_key(layout.node_key(k)) for k in range(partitions)]
    write_shards(config, layout)
    write_app(layout)
    port = free_port()
    address = f"127.0.0.1:{port}"
    write_flower_home(layout, address)
    log.info("starting the SuperLink on %s (TLS, SuperNode authentication)", address)
    federation = Federation(root=str(layout.root), address=address, partitions=partitions,
                            superlink=start_superlink(layout, port, timeout=timeout))
    federation.save()
    try:
        for key in public_keys:
            register_node(layout, key)
        log.info("registered %d SuperNode keys; starting the SuperNodes", partitions)
        for k in range(partitions):
            federation.supernodes.append(start_supernode(layout, address, layout.node_key(k), k, partitions))
            federation.save()
        wait_nodes_online(layout, federation, timeout=timeout)
    except BaseException:
        down(layout.root)
        raise
    log.info("federation up: SuperLink %s, %d SuperNodes online (state in %s)", address, partitions, layout.root)
    return federation


def write_shards(config: ExperimentConfig, layout: Layout) -> None:
    """Every client's data file (`aflora partition`), rewritten for each run's config: the SuperNodes read their
    file anew for every message, so a run always trains on its own config's partition."""
    from .shards import write_shards as write_client_files

    write_client_files(config, layout.shards)


def submit(config: ExperimentConfig, out: Path, state: Path, *, timeout: float = RUN_TIMEOUT_SECONDS,
           echo: bool = True, overwrite: bool = False) -> dict:
    """`flwr run` one experiment on the federation that is up in `state`; wait for it; its results.json."""
    layout = Layout(state.resolve())
    federation = Federation.load(layout.root)
    if federation is None or not federation.alive():
        raise FederationError(f"no federation is up in {layout.root}; start one with `aflora federation up --state {state}`"
                              + (" (a process of the last one has exited: `aflora federation down` clears it)" if federation else ""))
    if config.federation.num_clients != federation.partitions:
        raise FederationError(f"the experiment has federation.num_clients={config.federation.num_clients}, but the federation "
                              f"in {layout.root} has {federation.partitions} SuperNodes; bring up one with that many clients")
    out = out.resolve()
    refuse_finished_run(out, overwrite)
    write_shards(config, layout)
    write_experiment(config, layout.experiment)
    run_config = f"config-file={json.dumps(str(layout.experiment))} out-dir={json.dumps(str(out))}"
    started = flwr_json(layout, "run", str(layout.app), CONNECTION, "--run-config", run_config,
                        what="submitting the run (flwr run)")
    if not started.get("success"):
        raise FederationError(f"the SuperLink did not start the run: {started}")
    run_id = int(started["run-id"])
    log.info("run %d submitted to %s; results will be in %s", run_id, federation.address, out)
    run_log = layout.logs / f"run_{run_id}.log"
    streamer = spawn(f"log-{run_id}", [executable("flwr"), "log", str(run_id), CONNECTION, "--stream"], run_log, flower_env(layout))
    echoed = LogEcho(run_log, enabled=echo)
    status = "unknown"
    try:
        status = _wait_for_run(layout, federation, run_id, echoed, timeout=timeout)
    finally:
        _finish_streamer(streamer, run_finished=status.startswith("finished"))
        echoed.show_new_lines()
    if status != "finished:completed" or not (out / "results.json").is_file():
        raise FederationError(f"run {run_id} ended as {status!r} without {out / 'results.json'}; the ServerApp's log "
                              f"({run_log}):\n{log_tail(run_log, 40)}")
    log.info("run %d finished: %s", run_id, out / "results.json")
    return json.loads((out / "results.json").read_text())


@dataclass
class LogEcho:
    """Shows a growing log file's new lines on stderr (the run's `ServerApp` log, as `flwr log --stream` writes it)."""

    path: Path
    enabled: bool = True
    shown: int = 0

    def show_new_lines(self) -> None:
        if self.enabled and self.path.is_file():
            lines = self.path.read_text(errors="replace").splitlines()
            for line in lines[self.shown:]:
                print(line, file=sys.stderr)
            self.shown = len(lines)


def _wait_for_run(layout: Layout, federation: Federation, run_id: int, echoed: LogEcho, *, timeout: float) -> str:
    run_log = echoed.path
    deadline = time.monotonic() + timeout
    while True:
        echoed.show_new_lines()
        runs = flwr_json(layout, "ls", CONNECTION, "--run-id", str(run_id), what=f"asking for run {run_id}'s status").get("runs", [])
        status = runs[0]["status"] if runs else "unknown"
        if status.startswith("finished"):
            return status
        for process in federation.processes():
            if not is_running(process):
                raise FederationError(f"{process.name} exited during run {run_id}; its log ({process.log}):\n{log_tail(process.log)}")
        if time.monotonic() > deadline:
            try:
                flwr(layout, "stop", str(run_id), CONNECTION, what=f"stopping run {run_id}")
            except FederationError as error:
                log.warning("%s", error)
            raise FederationError(f"run {run_id} did not finish within {timeout:.0f}s (status {status}); it was stopped. "
                                  f"Its log so far ({run_log}):\n{log_tail(run_log)}")
        time.sleep(3.0)


def _finish_streamer(streamer: Process, *, run_finished: bool) -> None:
    """`flwr log --stream` ends by itself once a finished run's logs are complete; give it a moment, then stop it."""
    deadline = time.monotonic() + (15.0 if run_finished else 0.0)
    while time.monotonic() < deadline and exit_code(streamer) is None:
        time.sleep(0.3)
    stop(streamer, grace_seconds=3.0)


def down(state: Path) -> list[str]:
    """Stop every process of the federation in `state` (SuperNodes first, so they sign off); names of those stopped."""
    layout = Layout(state.resolve())
    federation = Federation.load(layout.root)
    if federation is None:
        return []
    stopped = stop(*federation.supernodes) + stop(federation.superlink)
    layout.state_file.unlink(missing_ok=True)
    if stopped:
        log.info("stopped %s", ", ".join(stopped))
    return stopped


def run_once(config: ExperimentConfig, out: Path, state: Path, *, timeout: float = RUN_TIMEOUT_SECONDS,
             echo: bool = True, overwrite: bool = False) -> dict:
    """`submit` to the federation that is up in `state`, or to a new one that is stopped afterwards."""
    refuse_finished_run(out, overwrite)
    federation = Federation.load(state.resolve())
    if federation is not None and federation.alive():
        return submit(config, out, state, timeout=timeout, echo=echo, overwrite=overwrite)
    up(config, state)
    try:
        return submit(config, out, state, timeout=timeout, echo=echo, overwrite=overwrite)
    finally:
        down(state)


def refuse_finished_run(out: Path, overwrite: bool) -> None:
    if (out / "results.json").exists() and not overwrite:
        raise FederationError(f"{out} already holds a finished run (results.json); choose another --out or pass --overwrite")
    if overwrite:
        (out / "results.json").unlink(missing_ok=True)  # so a failed run cannot pass for a finished one


def describe(state: Path) -> str:
    """What `status` prints: the processes, and the SuperNodes as the SuperLink sees them."""
    layout = Layout(state.resolve())
    federation = Federation.load(layout.root)
    if federation is None:
        return f"no federation in {layout.root}"
    lines = [f"SuperLink {federation.address}, {federation.partitions} SuperNodes; FLWR_HOME={layout.flwr_home}"]
    for process in federation.processes():
        lines.append(f"  {process.name:<14} pid {process.pid:<8} {'running' if is_running(process) else 'EXITED'}  log {process.log}")
    if is_running(federation.superlink):
        for node in list_nodes(layout):
            lines.append(f"  node {node.get('node-id')}: {node.get('status')}")
    return "\n".join(lines)
