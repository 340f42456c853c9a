"""Where a federation keeps its things: one state folder, laid out as the package docstring shows."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "federation.json"
EXPERIMENT_FILE = "experiment.toml"


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
    def superlink_database(self) -> Path:
        return self.root / "superlink.db"

    @property
    def experiment(self) -> Path:
        return self.root / EXPERIMENT_FILE

    @property
    def workers(self) -> Path:
        """The client workers' sockets. A Unix socket's path must stay under ~100 bytes, so a deep state folder
        gets its sockets in a private temporary folder named after it."""
        inside = self.root / "workers"
        if len(str(inside.resolve())) < 80:
            return inside
        return Path(tempfile.gettempdir()) / f"aflora-workers-{hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]}"

    def worker_socket(self, partition: int) -> Path:
        return self.workers / f"node_{partition}.sock"

    def node_key(self, partition: int) -> Path:
        return self.keys / f"node_{partition}"

    def shard(self, partition: int) -> Path:
        from ..shards import shard_path

        return shard_path(self.shards, partition)
