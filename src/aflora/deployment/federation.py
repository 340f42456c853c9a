"""A federation's lifecycle: `up` brings SuperLink and SuperNodes up, `submit` runs one experiment on them, `down`
stops them, `describe` says what is running; federation.json remembers what `up` started."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ExperimentConfig
from ..errors import FederationError
from ..run_folder import prepare_run_folder, run_folder
from .flower_cli import (
    CONNECTION,
    STARTUP_TIMEOUT_SECONDS,
    executable,
    flower_env,
    flwr,
    flwr_json,
    list_nodes,
    port_is_free,
    register_node,
    start_client_worker,
    start_superlink,
    start_supernode,
    write_app,
    write_experiment,
    write_flower_home,
)
from .layout import Layout
from .pki import make_certificates, make_node_key
from .processes import Process, exit_code, free_port, is_running, log_tail, spawn, stop, wait_until

log = logging.getLogger(__name__)

RUN_TIMEOUT_SECONDS = 4 * 3600.0


@dataclass
class Federation:
    """What `up` started, saved as federation.json so `run`, `status` and `down` find it."""

    root: str
    address: str  # the SuperLink's address, host:port (Fleet, Control and Runtime API share it)
    partitions: int
    superlink: Process
    supernodes: list[Process] = field(default_factory=list)
    workers: list[Process] = field(default_factory=list)  # client k's worker keeps its model loaded for the run
    restarts: dict[str, int] = field(default_factory=dict)  # process name -> times it was started again
    node_ids: list[int] = field(default_factory=list)  # client k's node id, as the SuperLink registered its key

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.root))

    def processes(self) -> list[Process]:
        return [*self.supernodes, *self.workers, self.superlink]

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
            workers=[Process(**p) for p in raw.get("workers", [])], restarts=raw.get("restarts", {}),
            node_ids=raw.get("node_ids", []),
        )

    def alive(self) -> bool:
        return all(is_running(p) for p in self.processes())


def wait_nodes_online(layout: Layout, federation: Federation, *, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
    expected = federation.partitions

    def online() -> bool:
        for node in federation.supernodes:
            if not is_running(node):
                raise FederationError(f"{node.name} exited while connecting; its log ({node.log}):\n{log_tail(node.log)}")
        return sum(n.get("status") == "online" for n in list_nodes(layout)) >= expected

    wait_until(online, timeout=timeout, poll_seconds=2.0, what=f"{expected} SuperNodes to come online",
               hint=f"see the logs in {layout.logs}")


def wait_workers_ready(layout: Layout, federation: Federation, *, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
    from ..flower.client_worker import ready

    def all_ready() -> bool:
        for worker in federation.workers:
            if not is_running(worker):
                raise FederationError(f"{worker.name} exited while starting; its log ({worker.log}):\n{log_tail(worker.log)}")
        return all(ready(layout.worker_socket(k)) for k in range(len(federation.workers)))

    wait_until(all_ready, timeout=timeout, poll_seconds=1.0, what=f"{len(federation.workers)} client workers to start",
               hint=f"see the logs in {layout.logs}")


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
    layout.superlink_database.unlink(missing_ok=True)  # a new federation: keys and node ids of an old one are void
    log.info("starting the SuperLink on %s (TLS, SuperNode authentication)", address)
    federation = Federation(root=str(layout.root), address=address, partitions=partitions,
                            superlink=start_superlink(layout, port, timeout=timeout))
    federation.save()
    try:
        for key in public_keys:
            federation.node_ids.append(register_node(layout, key))
        log.info("registered %d SuperNode keys; starting the SuperNodes and their client workers", partitions)
        for k in range(partitions):
            federation.workers.append(start_client_worker(layout, k))
            federation.supernodes.append(start_supernode(layout, address, layout.node_key(k), k, partitions))
            federation.save()
        wait_nodes_online(layout, federation, timeout=timeout)
        wait_workers_ready(layout, federation, timeout=timeout)
    except BaseException:
        down(layout.root)
        raise
    log.info("federation up: SuperLink %s, %d SuperNodes online (state in %s)", address, partitions, layout.root)
    return federation


def sharing_one_machine(config: ExperimentConfig) -> ExperimentConfig:
    """Every SuperNode of this federation trains on this machine's cores: send only as many train messages at
    once as clients fit on them side by side (cores / engine.client_cpus, what a simulation here runs in
    parallel). engine.max_in_flight = 0 means all at once, right for nodes on their own devices; here more at
    once only adds memory and thread contention: ten SmolLM2 clients training together filled 24 GiB, and two
    on two cores took 3.7x a simulation's round. Waves do not change the results (tests/test_flower_simulation.py)."""
    if config.engine.max_in_flight:
        return config
    from ..flower.simulation import simulated_workers

    in_flight = simulated_workers(config)
    log.info("all SuperNodes share this machine: train messages go out %d at a time (engine.max_in_flight)", in_flight)
    return dataclasses.replace(config, engine=dataclasses.replace(config.engine, max_in_flight=in_flight))


def write_shards(config: ExperimentConfig, layout: Layout) -> None:
    """Every client's data file (`aflora partition`), rewritten for each run's config: the SuperNodes read their
    file anew for every message, so a run always trains on its own config's partition."""
    from .shards import write_shards as write_client_files  # loads torch and the data layer

    write_client_files(config, layout.shards)


def submit(config: ExperimentConfig, out: Path, state: Path, *, timeout: float = RUN_TIMEOUT_SECONDS,
           echo: bool = True, overwrite: bool = False) -> dict:
    """`flwr run` one experiment on the federation that is up in `state`; wait for it; its results.json."""
    layout = Layout(state.resolve())
    federation = Federation.load(layout.root)
    if federation is None:
        raise FederationError(f"no federation is up in {layout.root}; start one with `aflora federation up --state {state}`")
    if not is_running(federation.superlink):
        if not any(is_running(node) for node in federation.supernodes):
            raise FederationError(f"the federation in {layout.root} has stopped (its SuperLink and SuperNodes have exited); "
                                  f"start a new one with `aflora federation up --state {state}`")
        restart_superlink(layout, federation)
    restart_exited_clients(layout, federation, during="the submission")
    if config.federation.num_clients != federation.partitions:
        raise FederationError(f"the experiment has federation.num_clients={config.federation.num_clients}, but the federation "
                              f"in {layout.root} has {federation.partitions} SuperNodes; bring up one with that many clients")
    out = out.resolve()
    with run_folder(out, overwrite=overwrite) as write_to:  # with --overwrite, `<out>.replacing`: the old run stays whole
        return _run_on_federation(config, write_to, layout, federation, timeout=timeout, echo=echo)


def _run_on_federation(config: ExperimentConfig, out: Path, layout: Layout, federation: Federation, *,
                       timeout: float, echo: bool) -> dict:
    config = sharing_one_machine(config)
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
        if not is_running(federation.superlink):
            raise FederationError(f"the SuperLink exited during run {run_id}; its log ({federation.superlink.log}):\n"
                                  f"{log_tail(federation.superlink.log)}")
        restart_exited_clients(layout, federation, during=f"run {run_id}")
        if time.monotonic() > deadline:
            try:
                flwr(layout, "stop", str(run_id), CONNECTION, what=f"stopping run {run_id}")
            except FederationError as error:
                log.warning("%s", error)
            raise FederationError(f"run {run_id} did not finish within {timeout:.0f}s (status {status}); it was stopped. "
                                  f"Its log so far ({run_log}):\n{log_tail(run_log)}")
        time.sleep(3.0)


def restart_superlink(layout: Layout, federation: Federation) -> None:
    """Start an exited SuperLink again on its port, from its database, while its SuperNodes wait: they keep
    retrying and reconnect under their registered keys. A run it was serving is lost (its ServerApp ran inside it)."""
    log.warning("the SuperLink (%s) has exited; starting it again from %s. The end of its log (%s):\n%s",
                federation.address, layout.superlink_database, federation.superlink.log,
                log_tail(federation.superlink.log, 8))
    Path(federation.superlink.log).replace(f"{federation.superlink.log}.{federation.restarts.get('superlink', 0) + 1}")
    port = int(federation.address.rsplit(":", 1)[1])
    wait_until(lambda: port_is_free(port), timeout=60.0, poll_seconds=1.0, what=f"port {port} to be released",
               hint="the SuperNodes know the SuperLink by this port; stop whatever holds it")
    federation.superlink = start_superlink(layout, port)
    federation.restarts["superlink"] = federation.restarts.get("superlink", 0) + 1
    federation.save()
    wait_nodes_online(layout, federation)


MAX_RESTARTS = 3  # per client process of a federation: a node that keeps dying is a fault to report, not to hide


def restart_exited_clients(layout: Layout, federation: Federation, *, during: str) -> None:
    """Start again a SuperNode or client worker that exited (a crash, an OOM kill, a person's kill), as a node's
    owner would: the SuperNode rejoins under its registered key, and the ServerApp counts the rounds it missed as
    that client's failures. Its log is kept (the old one renamed); after MAX_RESTARTS the run is given up."""
    online: set[int] | None = None
    for kind, processes, start in (("supernode", federation.supernodes, _restart_supernode),
                                   ("worker", federation.workers, _restart_worker)):
        for k, process in enumerate(processes):
            if is_running(process):
                continue
            if kind == "supernode" and k < len(federation.node_ids):
                # The SuperLink refuses to activate a node it still counts as online; a killed node's status
                # turns offline only once its heartbeats are overdue (about a minute in Flower 1.42).
                if online is None:
                    online = {int(n["node-id"]) for n in list_nodes(layout) if n.get("status") == "online"}
                if federation.node_ids[k] in online:
                    continue
            restarts = federation.restarts.get(process.name, 0)
            if restarts >= MAX_RESTARTS:
                raise FederationError(f"{process.name} exited {restarts + 1} times during {during}; its log ({process.log}):\n"
                                      f"{log_tail(process.log)}")
            log.warning("%s exited during %s (exit status %s); starting it again. The end of its log (%s):\n%s",
                        process.name, during, exit_code(process), process.log, log_tail(process.log, 8))
            Path(process.log).replace(f"{process.log}.{restarts + 1}")
            processes[k] = start(layout, federation, k)
            federation.restarts[process.name] = restarts + 1
            federation.save()


def _restart_supernode(layout: Layout, federation: Federation, partition: int) -> Process:
    return start_supernode(layout, federation.address, layout.node_key(partition), partition, federation.partitions)


def _restart_worker(layout: Layout, federation: Federation, partition: int) -> Process:
    return start_client_worker(layout, partition)


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
    stopped = stop(*federation.supernodes) + stop(*federation.workers) + stop(federation.superlink)
    layout.state_file.unlink(missing_ok=True)
    if stopped:
        log.info("stopped %s", ", ".join(stopped))
    return stopped


def run_once(config: ExperimentConfig, out: Path, state: Path, *, timeout: float = RUN_TIMEOUT_SECONDS,
             echo: bool = True, overwrite: bool = False) -> dict:
    """`submit` to the federation that is up in `state`, or to a new one that is stopped afterwards."""
    if not overwrite:
        prepare_run_folder(out, overwrite=False)  # refuses a folder that holds anything, before a federation starts
    federation = Federation.load(state.resolve())
    if federation is not None and any(is_running(p) for p in [federation.superlink, *federation.supernodes]):
        return submit(config, out, state, timeout=timeout, echo=echo, overwrite=overwrite)
    up(config, state)
    try:
        return submit(config, out, state, timeout=timeout, echo=echo, overwrite=overwrite)
    finally:
        down(state)


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
