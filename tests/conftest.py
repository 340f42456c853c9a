"""Shared fixtures: tiny random models (built offline) and the local data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from aflora.lora.host import AdapterHost
from aflora.models import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("AFLORA_TEST_DATA_DIR") or REPO.parent / "shared" / "data")

needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"local datasets not found at {DATA_DIR}")


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"local datasets not found at {DATA_DIR} (set AFLORA_TEST_DATA_DIR)")
    return DATA_DIR


@pytest.fixture
def tiny_llama():
    return build_tiny_model("tiny-llama", seed=0)


@pytest.fixture
def tiny_host(tiny_llama) -> AdapterHost:
    model, _ = tiny_llama
    return AdapterHost(model, ["q_proj", "v_proj"])


@pytest.fixture
def token_batch() -> torch.Tensor:
    return torch.randint(0, 250, (3, 11), generator=torch.Generator().manual_seed(0))
