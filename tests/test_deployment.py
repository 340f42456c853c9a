"""A real deployment on 127.0.0.1, as docs/deployment.md does it by hand: a SuperLink with TLS and SuperNode
authentication, three SuperNodes whose keys were registered with `flwr supernode register`, each reading only its
own data file, two AFLoRA rounds with ranks [8,4,2] submitted with `flwr run`; and a fourth SuperNode whose key
was never registered, which the SuperLink refuses. Before it, quick checks of the pieces: certificates a strict TLS
client accepts, node keys Flower reads, the experiment file the ServerApp reads.

Everything (FLWR_HOME included) lives in a temporary folder; every wait is bounded; every process is stopped in
`finally`. The deployment takes about a minute and a half on a 2-core machine.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import ssl
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from aflora.config import config_from_flat, load_config
from aflora.deployment import federation as lifecycle
from aflora.deployment import flower_cli, pki, processes
from aflora.deployment.layout import Layout
from aflora.flower.simulation import simulate
from aflora.results import load_run

from helpers import record_differences, tiny_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                                reason="needs openssl and ssh-keygen to create the federation's certificates and keys")


def _deployment_test(seconds: int, *marks):
    """Marks a test on a running local federation: slow, with its own pytest timeout when pytest-timeout is there."""
    timeout = [pytest.mark.timeout(seconds)] if importlib.util.find_spec("pytest_timeout") else []

    def mark(test):
        for each in (pytest.mark.slow, *marks, *timeout):
            test = each(test)
        return test
    return mark


# The three-SuperNode federation: slow, but CI runs it (`make test`): the only check of the real path.
deployed = _deployment_test(1200, pytest.mark.ci)
# The ten-SuperNode federation: `make test-all` only. On the 2-core AMD EPYC without bf16 its fixture (ten nodes
# up, 3 + 5 rounds, a node killed and restarted) outlasted 20 minutes, more than CI affords.
deployed_at_scale = _deployment_test(2400)


def test_certificates_satisfy_a_strict_tls_client_for_every_local_name(tmp_path):
    """What Python >= 3.13 checks by default (X509_STRICT), and the SANs the SuperLink is reached by."""
    certs = pki.make_certificates(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs["server.pem"], certs["server.key"])
    client = ssl.create_default_context(cafile=str(certs["ca.crt"]))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    for name in pki.LOCAL_HOSTS:
        listener = socket.create_server(("127.0.0.1", 0))
        accepted: list[BaseException | None] = []

        def serve(listener: socket.socket, accepted: list[BaseException | None]) -> None:
            connection, _ = listener.accept()
            try:
                with server.wrap_socket(connection, server_side=True):
                    accepted.append(None)
            except (ssl.SSLError, OSError) as error:
                accepted.append(error)

        thread = threading.Thread(target=serve, args=(listener, accepted))
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname=name) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        thread.join(timeout=10)
        listener.close()
        assert accepted == [None]
    assert pki.make_certificates(tmp_path) == certs  # kept, not made again


def test_node_keys_are_what_flower_reads(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    public = pki.make_node_key(tmp_path / "node_0")
    assert try_load_public_key(public)  # what `flwr supernode register` accepts
    assert isinstance(load_ssh_private_key((tmp_path / "node_0").read_bytes(), None), ec.EllipticCurvePrivateKey)


def test_the_experiment_file_gives_the_server_the_same_experiment_with_absolute_paths(tmp_path, monkeypatch):
    """The ServerApp runs in another folder: relative data paths must arrive absolute, everything else unchanged."""
    config = tiny_config(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    relative = tiny_config(Path("data"), 'data.data_dir="data"')
    path = flower_cli.write_experiment(relative, tmp_path / "experiment.toml")
    read_back = config_from_flat({"config-file": str(path)})
    assert read_back.data.dataset == config.data.dataset == str(tmp_path / "data" / "train.csv")
    assert read_back.data.options["test_path"] == str(tmp_path / "data" / "test.csv")
    assert read_back.data.data_dir == str(tmp_path / "data")
    assert read_back.model.name == "tiny-llama"  # a name, not a path: left alone
    assert read_back.to_dict() == {**config.to_dict(), "data": {**config.to_dict()["data"], "data_dir": str(tmp_path / "data")}}


STARTUP_SECONDS = 240.0
RUN_SECONDS = 600.0
REFUSAL_SECONDS = 60.0


def _a_pid_that_is_not_running() -> int:
    pid = 4_000_000
    while processes.command_line(pid) is not None:
        pid += 1
    return pid


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deployment")
    # 3 rounds: from round 3 on a node's message carries only the newest global update, so a fresh
    # ClientApp process must take the older one from its state-dir (a gap would fail the round).
    config = tiny_config(folder / "data", "rounds=3", "engine.connect_timeout=120")
    state, out = folder / "state", folder / "out"
    layout = Layout(state.resolve())
    intruder = None
    # What a crash leaves: federation.json naming processes that are gone, and a dead worker's socket.
    dead = processes.Process(name="superlink", pid=_a_pid_that_is_not_running(), program="flower-superlink", log="gone.log")
    stale = lifecycle.Federation(root=str(layout.root), address="127.0.0.1:9", partitions=3, superlink=dead)
    layout.root.mkdir(parents=True)
    stale.save()
    layout.workers.mkdir(parents=True)
    layout.worker_socket(0).write_text("stale")
    try:
        federation = lifecycle.up(config, state, timeout=STARTUP_SECONDS)
        # A 4th SuperNode with a key pair the SuperLink was never told about; it starts while the run is submitted.
        intruder_key = layout.root / "unregistered" / "node"
        pki.make_node_key(intruder_key)
        intruder = flower_cli.start_supernode(layout, federation.address, intruder_key, partition=3, partitions=4, name="unregistered")
        results = lifecycle.submit(config, out, state, timeout=RUN_SECONDS, echo=False)
        processes.wait_until(lambda: processes.exit_code(intruder) is not None, timeout=REFUSAL_SECONDS,
                          what="the unregistered SuperNode to give up")
        nodes = flower_cli.list_nodes(layout)
        # The SuperLink dies while the SuperNodes wait between runs: the next submission starts it again.
        for pid in processes.family(federation.superlink):
            os.kill(pid, signal.SIGKILL)
        after_restart = lifecycle.submit(tiny_config(folder / "data", "rounds=1", "engine.connect_timeout=120"),
                                         folder / "after-restart", state, timeout=RUN_SECONDS, echo=False)
        federation = lifecycle.Federation.load(layout.root)
        family = [pid for p in [*federation.processes(), intruder] for pid in processes.family(p)]
    finally:
        stopped = lifecycle.down(state)
        if intruder is not None:
            processes.stop(intruder)  # it has exited, but the SuperExec it started may still be retrying
    return SimpleNamespace(config=config, layout=layout, federation=federation, results=results, out=out, nodes=nodes,
                           after_restart=after_restart, intruder=intruder, intruder_exit=processes.exit_code(intruder),
                           family=family, stopped=stopped)


@deployed
def test_two_aflora_rounds_on_three_authenticated_supernodes(deployment):
    run = deployment.results
    assert run["method"] == "aflora" and run["num_clients"] == 3
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3]
    for r in run["rounds"]:
        assert set(r["clients"]) == {0, 1, 2}
        assert not r.get("failures")
    assert run["rounds"][0]["ranks"] == {"0": 8.0, "1": 4.0, "2": 2.0}  # round 1 trains at each client's budget
    for cid in ("0", "1", "2"):
        assert run["rounds"][1]["ranks"][cid] <= run["rounds"][0]["ranks"][cid]
    assert (deployment.out / "adapter" / "adapter_config.json").is_file()


@deployed
def test_each_client_worker_loaded_the_model_once_per_run(deployment):
    """Flower starts a ClientApp process per message (3 rounds, then 1); the model is loaded once per node and
    run, in its client worker, as in simulation."""
    for worker in deployment.federation.workers:
        built = [line for line in Path(worker.log).read_text().splitlines() if "client runtime built" in line]
        assert len(built) == 2, f"{worker.name}: {built}"


@deployed
def test_a_superlink_killed_between_runs_is_started_again_for_the_next(deployment):
    assert deployment.federation.restarts == {"superlink": 1}
    assert Path(f"{deployment.federation.superlink.log}.1").is_file()  # the killed one's log, kept
    run = deployment.after_restart
    assert [r["round"] for r in run["rounds"]] == [1] and set(run["rounds"][0]["clients"]) == {0, 1, 2}


@deployed
def test_the_federation_used_its_own_flower_home(deployment):
    """FLWR_HOME in the state folder: the connection, and the app the SuperLink/SuperNodes installed, are there."""
    home = deployment.layout.flwr_home
    assert flower_cli.CONNECTION in (home / "config.toml").read_text()
    assert any((home / "apps").iterdir())


@deployed
def test_an_unregistered_supernode_is_refused(deployment):
    """Flower 1.41 and 1.42: the SuperLink answers the unknown key's ActivateNode with HTTP 412 (code 2004); the SuperNode
    exits (Flower's exit code 305, process status 1) and never becomes a node of the federation."""
    assert deployment.intruder_exit not in (None, 0)
    refused = processes.log_tail(deployment.intruder.log, 40)
    assert "Failed to activate SuperNode" in refused and "305" in refused
    superlink_logs = Path(deployment.federation.superlink.log).parent.glob("superlink.log*")  # .1: before its restart
    assert any("No SuperNode found with the given public key" in log.read_text() for log in superlink_logs)
    assert len(deployment.nodes) == 3  # only the registered keys
    assert {node["status"] for node in deployment.nodes} == {"online"}


@deployed
def test_down_stops_every_process(deployment):
    assert set(deployment.stopped) == {"superlink", *(f"{kind}-{k}" for kind in ("supernode", "worker") for k in range(3))}
    assert len(deployment.family) >= 8  # SuperLink, SuperNodes and the SuperExecs they started
    assert not any(processes.command_line(pid) for pid in deployment.family)
    assert not deployment.layout.state_file.exists()


@deployed
def test_the_deployed_run_equals_a_simulation_of_the_same_experiment(deployment, tmp_path):
    """Same seeds, same rows (each node read only its own file), same updates: identical rounds. A node
    training on an incomplete base model would make them differ."""
    simulate(deployment.config, tmp_path / "sim")
    simulated, deployed = load_run(tmp_path / "sim"), load_run(deployment.out)
    assert len(simulated["rounds"]) == len(deployed["rounds"]) == deployment.config.rounds
    differences = record_differences(simulated["rounds"], deployed["rounds"])
    assert not differences, "\n".join(differences)


# The default experiment's federation size: 10 SuperNodes (and their client workers) on 2 cores, tiny model.
# Two runs on one federation: a clean one that must equal its simulation, and one during which SuperNode 3 is
# killed (SIGKILL, with its ClientApp) once round 2 has started; `submit` starts it again.
TEN = 10


def _newest_run_log(layout: Layout, after: set[Path]) -> Path | None:
    logs = [p for p in layout.logs.glob("run_*.log") if p not in after]
    return max(logs, key=lambda p: p.stat().st_mtime) if logs else None


@pytest.fixture(scope="module")
def ten_nodes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ten-nodes")
    # All ten train messages at once: tiny clients need little memory, and one at a time (the default on a shared
    # machine) makes every round ten message transits of ~5 s.
    ten = (f"federation.num_clients={TEN}", "federation.client_ranks=[8,8,6,6,4,4,2,2,2,2]", "engine.connect_timeout=180",
           "engine.round_timeout=120", f"engine.max_in_flight={TEN}")
    config = tiny_config(folder / "data", *ten, "rounds=3")
    state = folder / "state"
    layout = Layout(state.resolve())
    killed: dict = {}
    try:
        federation = lifecycle.up(config, state, timeout=STARTUP_SECONDS)
        clean = lifecycle.submit(config, folder / "clean", state, timeout=RUN_SECONDS, echo=False)
        earlier_logs = set(layout.logs.glob("run_*.log"))

        def kill_node_3_in_round_2() -> None:
            def round_2_started():
                run_log = _newest_run_log(layout, earlier_logs)
                return run_log is not None and "round 2: training clients" in run_log.read_text(errors="replace")

            processes.wait_until(round_2_started, timeout=RUN_SECONDS, what="round 2 of the second run")
            node = lifecycle.Federation.load(layout.root).supernodes[3]
            killed["pids"] = processes.family(node)
            for pid in killed["pids"]:
                os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_node_3_in_round_2, daemon=True)
        killer.start()
        # Five rounds: the SuperLink sees the node gone only after its heartbeats are overdue (~1 min), then it
        # is started again and must be back for the last rounds.
        five_rounds = tiny_config(folder / "data", *ten, "rounds=5")
        crashed = lifecycle.submit(five_rounds, folder / "crashed", state, timeout=RUN_SECONDS, echo=False)
        killer.join(timeout=10)
        after = lifecycle.Federation.load(layout.root)
    finally:
        lifecycle.down(state)
    return SimpleNamespace(config=config, layout=layout, federation=federation, after=after, clean=clean,
                           crashed=crashed, killed=killed, out=folder / "clean")


@deployed_at_scale
def test_ten_supernodes_run_the_default_federation_size_and_equal_the_simulation(ten_nodes, tmp_path):
    run = ten_nodes.clean
    assert run["num_clients"] == TEN and [r["round"] for r in run["rounds"]] == [1, 2, 3]
    assert all(set(r["clients"]) == set(range(TEN)) and not r.get("failures") for r in run["rounds"])
    simulate(ten_nodes.config, tmp_path / "sim")
    differences = record_differences(load_run(tmp_path / "sim")["rounds"], load_run(ten_nodes.out)["rounds"])
    assert not differences, "\n".join(differences)
    for worker in ten_nodes.federation.workers:  # one model load per node and run: two runs, two loads
        built = [line for line in Path(worker.log).read_text().splitlines() if "client runtime built" in line]
        assert len(built) == 2, f"{worker.name}: {built}"


@deployed_at_scale
def test_a_supernode_killed_mid_run_is_restarted_and_every_client_is_accounted_for(ten_nodes):
    assert ten_nodes.killed.get("pids"), "SuperNode 3 was never killed: round 2 was not seen in the run log"
    assert ten_nodes.after.restarts == {"supernode-3": 1}
    run = ten_nodes.crashed
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3, 4, 5]
    for r in run["rounds"]:  # every client of every round trained or failed with its reason
        failed = {f["client"] for f in r.get("failures", [])}
        assert set(r["clients"]) | failed == set(range(TEN)) and not set(r["clients"]) & failed, r
    # Whether a round lost it depends on timing: killed while holding its round-2 message, that round records it as
    # failed ("Node Unavailable"); killed between messages, the restarted node (same key, same node id) answers the
    # waiting message and no round fails. Either way only node 3 may ever fail, and with a reason.
    failures = [f for r in run["rounds"] for f in r.get("failures", [])]
    assert all(f["client"] == 3 and f["reason"] for f in failures), failures
    assert 3 in run["rounds"][-1]["clients"]  # back after its restart
    assert Path(f"{ten_nodes.after.supernodes[3].log}.1").is_file()  # the crashed node's log, kept


def test_a_taken_port_is_refused_before_the_superlink_starts(tmp_path):
    layout = Layout(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(lifecycle.FederationError, match=f"port {port} on 127.0.0.1 is already taken"):
            flower_cli.start_superlink(layout, port, timeout=5)
    assert not (layout.logs / "superlink.log").exists()  # nothing was started


# The newer methods on the real path: one federation, one run per method, each equal to its simulation.
# Slow and not in CI (each run starts a ClientApp process per message): `make test-all` runs it.
NEW_METHODS = ("florist", "fedex_lora", "fed_sb")


@pytest.fixture(scope="module")
def new_methods_deployed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("new-methods")
    configs = {m: tiny_config(folder / "data", f'method="{m}"', "engine.connect_timeout=120") for m in NEW_METHODS}
    state = folder / "state"
    try:
        lifecycle.up(configs[NEW_METHODS[0]], state, timeout=STARTUP_SECONDS)
        outs = {m: folder / "out" / m for m in NEW_METHODS}
        for method in NEW_METHODS:
            lifecycle.submit(configs[method], outs[method], state, timeout=RUN_SECONDS, echo=False)
    finally:
        lifecycle.down(state)
    return configs, outs


@pytest.mark.slow
@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_newer_method_deployed_equals_its_simulation(new_methods_deployed, method, tmp_path):
    configs, outs = new_methods_deployed
    simulate(configs[method], tmp_path / "sim")
    simulated, deployed_run = load_run(tmp_path / "sim"), load_run(outs[method])
    assert deployed_run["method"] == method and len(deployed_run["rounds"]) == configs[method].rounds
    differences = record_differences(simulated["rounds"], deployed_run["rounds"])
    assert not differences, "\n".join(differences)


@pytest.mark.slow
def test_the_default_model_deployed_equals_its_simulation(data_dir, tmp_path):
    """SmolLM2 on AG News, as the README's `make federation` runs it, cut to 3 SuperNodes and one short round:
    the real path with the real model (client workers loading it once, the ServerApp tuning A), equal to the
    simulation bit for bit. `make test-all` runs it (minutes on a 2-core CPU)."""
    overrides = ["federation.num_clients=3", "federation.client_ranks=[16,8,4]", "rounds=1", "train.local_steps=1",
                 "data.eval_size=24", "server.steps=1", f'data.data_dir="{data_dir}"', "engine.connect_timeout=300"]
    config = load_config(REPO / "configs" / "default.toml", overrides)
    state = tmp_path / "state"
    try:
        deployed = lifecycle.run_once(config, tmp_path / "deployed", state, echo=False)
    finally:
        lifecycle.down(state)
    simulate(config, tmp_path / "sim")
    assert deployed["final"]["accuracy"] is not None
    differences = record_differences(load_run(tmp_path / "sim")["rounds"], load_run(tmp_path / "deployed")["rounds"])
    assert not differences, "\n".join(differences)
