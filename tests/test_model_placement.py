"""model.device and model.random_init: where the base model runs, and a model built from its config alone.

The GPU path is checked here without a GPU: which device and attention the choices give (torch.cuda mocked),
and that a random-init model has the architecture its config names. bench/device/run.sh runs it on a GPU."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from aflora.config import ConfigError
from aflora.errors import ModelError
from aflora.models import attention_implementation, build_tiny_model, load_model, model_device, model_skeleton
from aflora.runtime import ModelSide, prepare_workload

from helpers import tiny_config


@pytest.fixture
def config_only_folder(tmp_path):
    """A model folder as bench/device/prepare.sh writes one: config.json and the tokenizer, no weights."""
    model, tokenizer = build_tiny_model("tiny-llama")
    folder = tmp_path / "config-only"
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    return folder


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_random_init_builds_the_configured_architecture_without_weights(config_only_folder):
    model, tokenizer = load_model(str(config_only_folder), random_init=True, seed=3)
    assert shapes(model) == shapes(model_skeleton(str(config_only_folder)))
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert len(tokenizer) == model.config.vocab_size and tokenizer.pad_token is not None
    again, _ = load_model(str(config_only_folder), random_init=True, seed=3)
    other, _ = load_model(str(config_only_folder), random_init=True, seed=4)
    first = next(model.parameters())
    assert torch.equal(first, next(again.parameters())) and not torch.equal(first, next(other.parameters()))


def test_a_folder_without_weights_needs_random_init(config_only_folder):
    with pytest.raises(ModelError, match="could not load model"):
        load_model(str(config_only_folder))


def test_model_device_auto_follows_torch_and_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_device("auto").type == "cpu" and attention_implementation("auto") == "eager"
    with pytest.raises(ModelError, match="torch sees no GPU"):
        model_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model_device("auto").type == "cuda" and model_device("cuda").type == "cuda"
    assert model_device("cpu").type == "cpu"
    assert attention_implementation("auto") == "sdpa"
    assert attention_implementation("auto", model_device("cpu")) == "eager"  # a CPU run on a GPU machine
    with pytest.raises(ModelError, match="model.device must be"):
        model_device("tpu")


def test_model_device_is_validated_with_the_config(tmp_path):
    with pytest.raises(ConfigError, match="model.device must be auto, cpu or cuda, got 'gpu'"):
        tiny_config(tmp_path, 'model.device="gpu"')


@pytest.mark.parametrize("device, moved_to", [("cpu", "cpu"), ("auto", "cuda")])
def test_the_model_side_puts_the_base_model_on_model_device(monkeypatch, tmp_path, config_only_folder, device, moved_to):
    """On a machine with a GPU (mocked), 'auto' moves the base model there and 'cpu' keeps it on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    moves: list[str] = []
    real_to = torch.nn.Module.to

    def record_to(module, *args, **kwargs):
        if isinstance(module, PreTrainedModel) and args and isinstance(args[0], torch.device):
            moves.append(args[0].type)
            if args[0].type == "cuda":
                return module  # no GPU here: the placement is what is checked
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", record_to)
    config = tiny_config(tmp_path, f'model.name="{config_only_folder}"', "model.random_init=true", f'model.device="{device}"',
                         'model.target_modules=["q_proj","v_proj"]')
    side = ModelSide(prepare_workload(config))
    assert moves[:1] == [moved_to]
    assert side.host.model.config._attn_implementation == ("eager" if device == "cpu" else "sdpa")
