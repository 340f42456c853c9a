"""Whether the Hugging Face hub can answer, asked once and quickly.

Unreachable, `datasets` and `transformers` retry every request for about 25 s before they give up, and a run
asks several times: a typo in a hub id or a dataset missing from --data-dir cost a minute or more offline.
Asking first (one TCP connection, a few seconds at most) lets those fail at once with the real cause. With
HF_HUB_OFFLINE=1 the libraries read their local cache without retrying; then nothing is asked.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
CONNECT_TIMEOUT_SECONDS = 3.0


def offline_mode() -> bool:
    """The user told the Hugging Face libraries to stay offline (they then read only their cache, and fast)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


@functools.cache
def hub_unreachable_reason() -> str | None:
    """None when a connection to the hub (or to the HTTPS proxy in between) opens; else why it does not."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxy = next((os.environ[name] for name in PROXY_VARIABLES if os.environ.get(name)), "")
    target = urlparse(proxy if "://" in proxy else f"http://{proxy}") if proxy else endpoint
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as error:
        via = f" (the proxy for {endpoint.hostname})" if proxy else ""
        return f"{host}:{port}{via} cannot be reached ({error.strerror or error})"
    return None


def use_cache_only() -> bool:
    """Whether hub reads must come from the local cache: offline mode, or a hub that does not answer."""
    return offline_mode() or hub_unreachable_reason() is not None  # (module lookups: tests replace the check)
