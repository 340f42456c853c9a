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

The modules, in the order a federation comes up: ``layout`` (where everything lives in the state folder),
``processes`` (starting, finding and stopping processes; bounded tool calls), ``pki`` (the CA, the server
certificate and the SuperNodes' keys), ``flower_cli`` (Flower's programs: its configuration files, `flwr` calls, the
SuperLink and SuperNode commands) and ``federation`` (up, run, down, status: what `aflora federation` does).
"""

from __future__ import annotations

from .federation import Federation, describe, down, run_once, submit, up

__all__ = ["Federation", "describe", "down", "run_once", "submit", "up"]
