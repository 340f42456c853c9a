"""Run the FLoRA reference code (ATP-1010/FederatedLLM, main.py) unchanged, with the run-time adaptations this CPU needs.

Started by bench/peers.py with the peer's own virtual environment's python:

    python federatedllm_run.py --repo PATH --timings FILE -- <main.py's own arguments>

Nothing of the peer's code is copied or edited; before main.py runs, this module changes four things from outside:

1. ``transformers.LlamaTokenizer`` is AutoTokenizer: main.py loads every non-GPT-2, non-Gemma tokenizer as the
   SentencePiece LlamaTokenizer, and SmolLM2 ships only a fast BPE tokenizer (tokenizer.json).
2. ``transformers.TrainingArguments`` gets ``fp16=False`` (fp16 mixed precision needs a GPU; the client's
   TrainingArguments ask for it) and ``max_steps`` = $PEERS_MAX_STEPS, so a client trains that many steps of
   ``local_micro_batch_size`` rows, as every method of the benchmark does, instead of a whole epoch of its rows.
3. ``fed_utils.global_evaluation`` is skipped: it samples answers to MMLU questions on CUDA; the benchmark scores every
   method's final model itself, on the same AG News test rows.
4. Timers around ``client_selection`` (a round starts), client set-up and training, ``FedAvg``, and the bytes of the
   state dict each client saves for the server (its upload), written to --timings as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="a local copy of ATP-1010/FederatedLLM")
    parser.add_argument("--timings", required=True, help="where to write the JSON of timings and upload sizes")
    parser.add_argument("main_args", nargs=argparse.REMAINDER, help="-- then main.py's arguments")
    args = parser.parse_args()
    main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args

    os.chdir(args.repo)  # main.py reads templates/ and writes relative to its folder
    sys.path.insert(0, args.repo)
    record: dict = {"round_starts": [], "clients": [], "aggregation_seconds": [], "upload_bytes": []}

    import torch
    import transformers

    transformers.LlamaTokenizer = transformers.AutoTokenizer  # (1)
    original_arguments = transformers.TrainingArguments
    max_steps = int(os.environ["PEERS_MAX_STEPS"])

    def cpu_training_arguments(*a, **kw):  # (2)
        kw.update(fp16=False, max_steps=max_steps)
        return original_arguments(*a, **kw)

    transformers.TrainingArguments = cpu_training_arguments

    import fed_utils
    import fed_utils.client as client_module

    fed_utils.global_evaluation = lambda *a, **kw: None  # (3)

    selection = fed_utils.client_selection

    def timed_selection(*a, **kw):  # (4) a round starts with its client selection
        record["round_starts"].append(time.perf_counter())
        return selection(*a, **kw)

    fed_utils.client_selection = timed_selection
    fed_avg = fed_utils.FedAvg

    def timed_fed_avg(*a, **kw):
        started = time.perf_counter()
        model = fed_avg(*a, **kw)
        record["aggregation_seconds"].append(time.perf_counter() - started)
        return model

    fed_utils.FedAvg = timed_fed_avg
    client_class = client_module.GeneralClient
    client_module.GeneralClient.__init__ = _timed(client_class.__init__, record, "created")
    client_class.train = _timed(client_class.train, record, "trained")
    terminate = client_class.terminate_local_training

    def terminate_and_count(self, *a, **kw):
        upload = self.model.state_dict()  # the PEFT state dict terminate_local_training saves for the server
        record["upload_bytes"].append(sum(t.numel() * t.element_size() for t in upload.values()))
        return terminate(self, *a, **kw)

    client_class.terminate_local_training = terminate_and_count
    torch.set_num_threads(int(os.environ.get("PEERS_THREADS", torch.get_num_threads())))
    started = time.perf_counter()
    sys.argv = ["main.py", *main_args]
    runpy.run_path(os.path.join(args.repo, "main.py"), run_name="__main__")
    record.update(started=started, finished=time.perf_counter())
    with open(args.timings, "w") as f:
        json.dump(record, f)


def _timed(function, record: dict, event: str):
    def wrapper(self, *a, **kw):
        started = time.perf_counter()
        result = function(self, *a, **kw)
        record["clients"].append({"client": int(self.client_id), "event": event, "start": started, "end": time.perf_counter()})
        return result

    return wrapper


if __name__ == "__main__":
    main()
