"""Every kind of bad input a new user was seen to try, through the `aflora` command itself: each must end with exit
code 2 and one message that names what was wrong, where, and the fix; print no traceback; and leave every file as it
was (an earlier run stays byte-identical, no --out folder appears), all before a model, Ray or Flower starts.

The command runs in this process (`aflora.cli.main(argv)`), with the engines replaced by stubs that fail the test if
they are reached: a kind that passes validation fails here instead of starting a run. `{...}` in an argv is filled
in from the workspace below; one subprocess test checks that the installed entry point behaves the same.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
import traceback
import types
from pathlib import Path

import pytest

import aflora.cli as cli
from aflora.hub import OFFLINE_VARIABLES

from helpers import LABEL_WORDS, tiny_config, write_tiny_config_toml

TINY = ["--config", "{tiny}"]
NEW = ["--out", "{new}"]

# (id, argv, regex the message must match). Grouped by where the input goes wrong.
KINDS = [
    # ---- keys and --set syntax
    ("unknown-section-key", ["run", *TINY, "--set", "train.lrr=0.1", *NEW],
     r"\[train\] has unknown keys \['lrr'\]; known keys are \[.*'lr'"),
    ("unknown-top-level-key", ["run", *TINY, "--set", "nonsense.key=1", *NEW],
     r"unknown config key 'nonsense'; top-level keys .*aflora config --explain"),
    ("set-without-equals", ["run", *TINY, "--set", "rounds", *NEW], r"override 'rounds' is not of the form key=value \(e\.g\. rounds=5"),
    ("set-empty-key", ["run", *TINY, "--set", "=3", *NEW], r"override '=3' has an empty key"),
    ("set-empty-key-part", ["run", *TINY, "--set", "train..lr=1", *NEW], r"override 'train\.\.lr=1' has an empty key or key part"),
    ("set-table-under-a-value", ["run", *TINY, "--set", "train.lr.x=1", *NEW],
     r"train\.lr is a single value, not a table: set it as train\.lr=<value>"),
    ("section-given-a-value", ["run", *TINY, "--set", "model=3", *NEW], r"\[model\] must be a table, got 3"),
    ("method-table-given-a-value", ["run", *TINY, "--set", "aflora=3", *NEW],
     r"\[aflora\] must be a table of aflora's options .*aflora config --explain aflora"),
    ("unknown-method-option", ["run", *TINY, "--set", "aflora.bogus=1", *NEW],
     r"\[aflora\] has unknown keys \['bogus'\]; known keys are \[.*'beta'"),
    ("other-methods-unknown-option", ["run", *TINY, "--set", "fedit.bogus=1", *NEW], r"\[fedit\] has unknown keys \['bogus'\]"),
    ("unknown-method", ["run", *TINY, "--set", "method=fedsgd", *NEW], r"unknown method 'fedsgd'; available methods are \[.*'aflora'"),
    # ---- types and ranges
    ("word-for-an-int", ["run", *TINY, "--set", "rounds=abc", *NEW], r"rounds must be of type int, got 'abc'"),
    ("fraction-for-an-int", ["run", *TINY, "--set", "rounds=2.5", *NEW], r"rounds must be of type int, got 2\.5"),
    ("word-for-a-bool", ["run", *TINY, "--set", "aflora.ddr=yes", *NEW], r"aflora\.ddr must be of type bool, got 'yes'"),
    ("zero-rounds", ["run", *TINY, "--set", "rounds=0", *NEW], r"rounds must be ≥ 1, got 0"),
    ("negative-seed", ["run", *TINY, "--set", "seed=-1", *NEW], r"seed must be ≥ 0 .*got -1"),
    ("infinite-learning-rate", ["run", *TINY, "--set", "train.lr=inf", *NEW], r"train\.lr must be a finite number, got inf"),
    ("nan-learning-rate", ["run", *TINY, "--set", "train.lr=nan", *NEW], r"train\.lr must be a finite number, got nan"),
    ("negative-server-lr", ["run", *TINY, "--set", "server.lr=-1", *NEW], r"server\.lr must be > 0, got -1"),
    ("infinite-method-option", ["run", *TINY, "--set", "aflora.beta=inf", *NEW], r"aflora\.beta must be a finite number, got inf"),
    ("zero-eval-batch-size", ["run", *TINY, "--set", "train.eval_batch_size=0", *NEW], r"train\.eval_batch_size must be ≥ 1, got 0"),
    ("zero-server-batch-size", ["run", *TINY, "--set", "server.batch_size=0", *NEW], r"server\.batch_size must be ≥ 1, got 0"),
    ("negative-weight-decay", ["run", *TINY, "--set", "train.weight_decay=-0.1", *NEW], r"train\.weight_decay must be ≥ 0, got -0\.1"),
    ("negative-grad-norm", ["run", *TINY, "--set", "train.max_grad_norm=-1", *NEW],
     r"train\.max_grad_norm must be ≥ 0 \(0 = no clipping\)"),
    ("method-option-out-of-range", ["run", *TINY, "--set", "aflora.alpha=1.5", *NEW],
     r"aflora\.alpha is a fusion ratio and must lie in \[0, 1\], got 1\.5"),
    ("other-method-option-out-of-range", ["run", *TINY, "--set", "hetlora.keep_ratio=1.5", *NEW],
     r"hetlora\.keep_ratio must lie in \(0, 1\)"),
    ("bad-option-beside-dp", ["run", *TINY, "--set", "privacy.clip_norm=0.5", "--set", "aflora.alpha=3", *NEW],
     r"aflora\.alpha is a fusion ratio"),
    # ---- federation
    ("zero-clients", ["run", *TINY, "--set", "federation.num_clients=0", *NEW], r"federation\.num_clients must be ≥ 1, got 0"),
    ("ranks-per-client-mismatch", ["run", *TINY, "--set", "federation.client_ranks=[8,4]", *NEW],
     r"federation\.client_ranks has 2 entries but federation\.num_clients is 3; give one maximum rank per client"),
    ("zero-rank", ["run", *TINY, "--set", "federation.client_ranks=8,0,2", *NEW],
     r"federation\.client_ranks must all be ≥ 1, got \[8, 0, 2\]"),
    ("sample-fraction-above-one", ["run", *TINY, "--set", "federation.sample_fraction=1.5", *NEW],
     r"federation\.sample_fraction must lie in \(0, 1\]"),
    ("min-replies-unreachable", ["run", *TINY, "--set", "federation.sample_fraction=0.3", "--set", "federation.min_replies=2", *NEW],
     r"federation\.min_replies = 2 can never be reached: each round samples 1 of 3 clients .*lower federation\.min_replies to at most 1"),
    ("budgets-half-given", ["run", *TINY, "--set", "federation.memory_mb=[100,100,100]", *NEW],
     r"memory_mb and federation\.uplink_mb go together"),
    ("dp-with-unsupported-method", ["run", *TINY, "--set", "method=hetlora", "--set", "privacy.clip_norm=0.5", *NEW],
     r"privacy\.clip_norm > 0 needs a method .*\(supported: \['aflora'\]\); hetlora is not"),
    ("privacy-delta-one", ["run", *TINY, "--set", "privacy.delta=1", *NEW], r"privacy\.delta must lie in \(0, 1\), got 1\.0"),
    ("secagg-two-shares", ["run", *TINY, "--set", "secagg.enabled=true", "--set", "secagg.num_shares=2", *NEW],
     r"secagg\.num_shares must be a fraction in \(0, 1\] or a count ≥ 3, got 2\.0"),
    ("fault-injection-client-out-of-range", ["run", *TINY, "--set", "engine.fail_clients=[7]", *NEW],
     r"engine\.fail_clients must name clients 0 to 2 \(federation\.num_clients = 3\), got \[7\]"),
    ("fault-injection-round-zero", ["run", *TINY, "--set", "engine.fail_from_round=0", *NEW], r"engine\.fail_from_round must be ≥ 1"),
    ("negative-threads", ["run", *TINY, "--set", "engine.threads=-1", *NEW], r"engine\.threads must be ≥ 0 \(0 = engine\.client_cpus\)"),
    ("fault-probabilities-over-one", ["run", *TINY, "--set", "engine.crash_probability=0.7", "--set",
                                      "engine.timeout_probability=0.5", *NEW], r"add up to at most 1, got 0\.7 and 0\.5"),
    ("zero-client-cpus", ["run", *TINY, "--set", "engine.client_cpus=0", *NEW], r"engine\.client_cpus must be ≥ 1"),
    ("zero-round-timeout", ["run", *TINY, "--set", "engine.round_timeout=0", *NEW], r"engine timeouts must be > 0 seconds"),
    # ---- data settings
    ("unknown-partition-scheme", ["run", *TINY, "--set", "data.partition=foo", *NEW],
     r"data\.partition must be one of iid, dirichlet, k_labels, fedit_epsilon, presplit, got 'foo' \(`aflora list`"),
    ("zero-labels-per-client", ["run", *TINY, "--set", "data.labels_per_client=0", *NEW], r"data\.labels_per_client must be ≥ 1"),
    ("zero-dirichlet-alpha", ["run", *TINY, "--set", "data.dirichlet_alpha=0", *NEW], r"data\.dirichlet_alpha must be > 0"),
    ("negative-epsilon", ["run", *TINY, "--set", "data.epsilon=-1", *NEW], r"data\.epsilon must be > 0"),
    ("public-fraction-one", ["run", *TINY, "--set", "data.public_fraction=1.0", *NEW], r"data\.public_fraction must lie in \[0, 1\)"),
    ("public-set-larger-than-data", ["run", *TINY, "--set", "data.public_size=100000", *NEW],
     r"data\.public_size / data\.public_fraction: a public set of 100000 rows would take all \d+ training rows"),
    ("negative-eval-size", ["run", *TINY, "--set", "data.eval_size=-1", *NEW], r"data sizes must be ≥ 0"),
    ("max-length-too-short", ["run", *TINY, "--set", "data.max_length=4", *NEW], r"data\.max_length must be at least 16 tokens, got 4"),
    ("unknown-objective", ["run", *TINY, "--set", "data.objective=foo", *NEW], r"data\.objective must be auto, class_ce or lm, got 'foo'"),
    ("more-clients-than-rows",
     ["run", *TINY, "--set", "federation.num_clients=400", "--set", f"federation.client_ranks={','.join(['2'] * 400)}", *NEW],
     r"cannot partition train with data\.partition='iid': .*400"),
    ("k-labels-beyond-the-labels", ["run", *TINY, "--set", "data.partition=k_labels", "--set", "data.labels_per_client=9", *NEW],
     r"cannot partition train with data\.partition='k_labels': labels_per_client=9 but the data has 4 distinct labels; use 1 to 4"),
    # ---- datasets and files
    ("unknown-dataset", ["run", *TINY, "--set", "data.dataset=no_such", *NEW],
     r"unknown dataset 'no_such'\. Registered datasets: ag_news.*aliases: .*fpb"),
    ("missing-data-file", ["run", *TINY, "--set", "data.dataset=/nowhere/x.csv", *NEW], r"There is no file at '/nowhere/x\.csv'"),
    ("missing-data-dir", ["run", *TINY, "--data-dir", "{files}/nowhere", *NEW],
     r"data directory '.*nowhere' \(from --data-dir or data\.data_dir\) does not exist"),
    ("unknown-test-dataset", ["run", *TINY, "--set", "data.test_dataset=nosuch", *NEW], r"unknown dataset 'nosuch'"),
    ("unknown-extra-eval", ["run", *TINY, "--set", "data.extra_eval=nosuch", *NEW], r"unknown dataset 'nosuch'"),
    ("file-as-public-set", ["run", *TINY, "--set", "data.public_dataset={train}", *NEW],
     r"data\.public_dataset = '.*train\.csv' is not a registered dataset; an out-of-domain public set must be registered "
     r"instruction data \(e\.g\. \"dolly\"; `aflora list`\)"),
    ("unknown-dataset-option", ["run", *TINY, "--set", "data.options.bogus=1", *NEW],
     r"option\(s\) bogus are not understood by dataset .*Accepted options: encoding, instruction, label_column, label_words"),
    ("mistyped-dataset-option",
     ["run", "--set", "data.dataset=dolly", "--set", "data.options.holdout_per_category=abc", "--set", "model.name=tiny-llama", *NEW],
     r"data\.options\.holdout_per_category must be of type int, got 'abc'"),
    ("header-only-file", ["run", *TINY, "--set", "data.dataset={files}/header_only.csv", *NEW],
     r"header_only\.csv' has a header line but no rows"),
    ("empty-file", ["run", *TINY, "--set", "data.dataset={files}/empty.csv", *NEW], r"empty\.csv' is empty; expected a header line"),
    ("non-utf8-data-file", ["run", *TINY, "--set", "data.dataset={files}/latin1.csv", *NEW],
     r"latin1\.csv' is not valid utf-8 text .*set data\.options\.encoding = \"latin-1\""),
    ("unknown-encoding", ["run", *TINY, "--set", "data.options.encoding=klingon", *NEW], r"'klingon' is not a text encoding Python knows"),
    ("missing-text-column", ["run", *TINY, "--set", "data.dataset={files}/body.csv", *NEW],
     r"body\.csv has no column\(s\) 'text'; columns found: body, label.*--set data\.options\.text_column=\"\.\.\.\""),
    ("every-text-empty", ["run", *TINY, "--set", "data.dataset={files}/no_text.csv", *NEW], r"every row's 'text' is empty"),
    ("label-out-of-range", ["run", *TINY, "--set", "data.dataset={files}/label7.csv", *NEW], r"label7\.csv row 1: label 7 is outside 0-3"),
    ("unsupported-file-type", ["run", *TINY, "--set", "data.dataset={files}/data.txt", *NEW],
     r"unknown file type '\.txt'\. Supported extensions: \.csv"),
    ("malformed-json", ["run", *TINY, "--set", "data.dataset={files}/bad.json", *NEW], r"bad\.json' is not valid JSON .*name it \.jsonl"),
    ("damaged-parquet", ["run", *TINY, "--set", "data.dataset={files}/bad.parquet", *NEW], r"bad\.parquet' is not a readable parquet file"),
    ("one-label-word", ["run", *TINY, "--set", 'data.options.label_words=["World"]', *NEW],
     r"needs data\.options\.label_words: at least two words"),
    ("label-words-repeated-up-to-case", ["run", *TINY, "--set", "data.options.label_words=World,world,Business,Technology", *NEW],
     r"repeated words \('World', 'world'\): labels are matched ignoring case"),
    ("missing-test-file", ["run", *TINY, "--set", "data.options.test_path=/nowhere/test.csv", *NEW], r"no file at '/nowhere/test\.csv'"),
    ("local-file-without-test-rows",
     ["run", "--set", "data.dataset={train}", "--set", "data.options.label_words=World,Sports,Business,Technology",
      "--set", "model.name=tiny-llama", *NEW],
     r"has no test rows: set data\.options\.test_path = .* or data\.test_dataset = "),
    # ---- models
    ("unknown-model-name", ["run", *TINY, "--set", "model.name=no-such-model", *NEW], r"unknown model 'no-such-model': expected 'smollm2'"),
    ("missing-gguf-file", ["run", *TINY, "--set", "model.name={files}/model.gguf", *NEW], r"GGUF file .*model\.gguf does not exist"),
    ("folder-that-is-no-model", ["run", *TINY, "--set", "model.name={files}/empty_folder", *NEW],
     r"has neither a config\.json nor a \.gguf file"),
    ("hub-id-offline", ["run", *TINY, "--set", "model.name=noorg/nomodel", *NEW],
     r"model\.name 'noorg/nomodel' is a hub id, but the hub at .*cannot be reached .*no copy of it; use a local model folder"),
    ("target-module-matches-no-layer", ["run", *TINY, "--set", "model.target_modules=nope", *NEW],
     r"model\.target_modules names \['nope'\], which match no Linear layer of tiny-llama; its Linear layers are named \[.*'q_proj'"),
    ("one-of-the-target-modules-matches-no-layer", ["run", *TINY, "--set", "model.target_modules=q_proj,c_attn", *NEW],
     r"model\.target_modules names \['c_attn'\]"),
    ("no-target-modules", ["run", *TINY, "--set", "model.target_modules=[]", *NEW], r"model\.target_modules must name at least one layer"),
    ("unknown-precision", ["run", *TINY, "--set", "model.precision=fp16", *NEW],
     r"model\.precision must be auto, bf16 or fp32, got 'fp16'"),
    ("unknown-attention-backend", ["run", *TINY, "--set", "model.attention=flash", *NEW],
     r"model\.attention must be auto, eager or sdpa, got 'flash'"),
    # ---- config files
    ("missing-config-file", ["run", "--config", "{files}/missing.toml", *NEW],
     r"config file .*missing\.toml does not exist; pass --config with a TOML file"),
    ("config-is-a-folder", ["run", "--config", "{files}", *NEW], r"--config .* is a folder; pass the TOML file itself"),
    ("invalid-toml", ["run", "--config", "{files}/bad.toml", *NEW], r"bad\.toml is not valid TOML: Invalid value \(at line 1, column 10\)"),
    ("non-utf8-config", ["run", "--config", "{files}/latin1.toml", *NEW], r"latin1\.toml is not UTF-8 text .*save it again as UTF-8"),
    ("misspelled-table", ["run", "--config", "{files}/modell.toml", *NEW], r"unknown config key 'modell'"),
    ("wrong-type-in-file", ["run", "--config", "{files}/three.toml", *NEW], r"rounds must be of type int, got 'three'"),
    ("markup-in-a-missing-path", ["run", "--config", "{files}/runs[/x]/c.toml", *NEW], r"config file .*runs\[/x\]/c\.toml does not exist"),
    # ---- outputs, earlier runs, resuming
    ("out-holds-a-finished-run", ["run", *TINY, "--out", "{earlier}"],
     r"already holds a finished run \(results\.json\); choose another --out or pass --overwrite"),
    ("overwrite-with-a-bad-value", ["run", *TINY, "--out", "{earlier}", "--overwrite", "--set", "aflora.alpha=3"],
     r"aflora\.alpha is a fusion ratio"),
    ("out-is-a-file", ["run", *TINY, "--out", "{files}/afile"], r"--out .*afile: .*afile is a file, not a folder; choose a folder path"),
    ("out-inside-a-file", ["run", *TINY, "--out", "{files}/afile/run"], r"afile is a file, so no folder can be made inside it"),
    ("resume-missing-folder", ["run", "--resume", "{new}"], r"--resume .*: no such folder or file; pass the --out folder of a run"),
    ("resume-without-checkpoint", ["run", "--resume", "{files}/empty_folder"], r"holds no checkpoint; --resume takes the --out folder"),
    ("resume-a-finished-run", ["run", "--resume", "{earlier}"], r"already finished all 2 rounds; pass --set rounds=N to extend it"),
    ("resume-fewer-rounds", ["run", "--resume", "{earlier}", "--set", "rounds=1"],
     r"already holds 2 rounds, more than rounds = 1; pass --set rounds=N with N > 2"),
    ("resume-changes-the-method", ["run", "--resume", "{earlier}", "--set", "method=fedit"],
     r"--resume continues the same experiment: method cannot change"),
    ("resume-with-config", ["run", "--resume", "{earlier}", *TINY], r"so --config would be ignored: drop it"),
    ("resume-with-out-and-overwrite", ["run", "--resume", "{earlier}", *NEW, "--overwrite"],
     r"so --overwrite and --out would be ignored: drop them"),
    ("resume-checkpoint-file-with-another-out", ["run", "--resume", "{earlier}/checkpoint/round_1.pt", *NEW],
     r"--resume .*round_1\.pt continues that run .* so --out would be ignored: drop it"),
    ("resume-a-file-outside-checkpoint", ["run", "--resume", "{earlier}/results.json"],
     r"--resume takes a run folder or a checkpoint file in its checkpoint/ folder"),
    ("resume-with-bad-engine-setting", ["run", "--resume", "{earlier}", "--set", "rounds=3", "--set", "engine.client_cpus=0"],
     r"engine\.client_cpus must be ≥ 1"),
    # ---- compare
    ("compare-unknown-method", ["compare", "--methods", "nosuch", *TINY, *NEW], r"--methods entry 'nosuch': unknown method 'nosuch'"),
    ("compare-empty-entry", ["compare", "--methods", "aflora,,fedit", *TINY, *NEW], r"--methods has an empty entry"),
    ("compare-bad-seeds", ["compare", "--methods", "aflora", "--seeds", "a,b", *TINY, *NEW], r"--seeds must be comma-separated integers"),
    ("compare-nothing-to-run", ["compare", *TINY, *NEW], r"aflora compare needs the entries to run: pass --methods"),
    ("compare-sets-the-method", ["compare", "--methods", "aflora,fedit", *TINY, "--set", "method=fedit", *NEW],
     r"compare sets method per run"),
    ("compare-unknown-option", ["compare", "--methods", "aflora:bogus=1", *TINY, *NEW], r"aflora has no option 'bogus'; its options are"),
    ("compare-bad-grid", ["compare", "--methods", "aflora", "--grid", "train.lr=0.001,fast", *TINY, *NEW], r"'fast' is not a number"),
    ("compare-grid-and-set", ["compare", "--methods", "aflora", "--grid", "train.lr=0.001,0.002", *TINY, "--set", "train.lr=0.1", *NEW],
     r"--set and --grid both set train.lr"),
    ("compare-bad-table", ["compare", "--config", "{files}/compare_table.toml", *NEW], r"\[compare\] methods must be a non-empty list"),
    ("compare-out-is-a-file", ["compare", "--methods", "aflora", *TINY, "--out", "{files}/afile"], r"afile is a file, not a folder"),
    ("compare-bad-target-module", ["compare", "--methods", "aflora", *TINY, "--set", "model.target_modules=nope", *NEW],
     r"match no Linear layer of tiny-llama"),
    # ---- the other commands
    ("export-missing-run", ["export", "--run", "{new}", "--out", "{files}/exported"],
     r"results\.json does not exist; point at the --out folder"),
    ("export-run-without-adapter", ["export", "--run", "{earlier}", "--out", "{new}"], r"holds no PEFT adapter"),
    ("export-out-is-a-file", ["export", "--run", "{earlier}", "--out", "{files}/afile"], r"afile is a file, not a folder"),
    ("partition-out-is-a-file", ["partition", *TINY, "--out", "{files}/afile"], r"afile is a file, not a folder"),
    ("partition-bad-config", ["partition", *TINY, "--set", "data.partition=foo", *NEW], r"data\.partition must be one of"),
    ("config-unknown-key", ["config", *TINY, "--set", "bogus=1"], r"unknown config key 'bogus'"),
    ("config-shows-unknown-key", ["config", "--explain", "traim"], r"no config key is or starts with 'traim'"),
    ("federation-run-bad-config", ["federation", "run", *TINY, "--set", "rounds=0", *NEW, "--state", "{new}-state"], r"rounds must be ≥ 1"),
    ("federation-run-bad-target-module", ["federation", "run", *TINY, "--set", "model.target_modules=nope", *NEW, "--state", "{new}-state"],
     r"match no Linear layer"),
    ("federation-up-state-is-a-file", ["federation", "up", *TINY, "--state", "{files}/afile"], r"--state .*afile is a file, not a folder"),
    # ---- the command line itself (click's own usage errors)
    ("misspelled-option", ["run", "--sett", "rounds=1"], r"No such option '--sett'\. Did you mean '--set'\?"),
    ("option-without-value", ["run", "--set"], r"Option '--set' requires an argument"),
    ("unknown-command", ["trian"], r"No such command 'trian'"),
]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _write_earlier_run(folder: Path, tiny: Path) -> None:
    """A finished 2-round run of the tiny experiment, written as `aflora run` leaves it (checkpoint, results.json),
    trained in this process without an engine."""
    from aflora.checkpoint import save_checkpoint
    from aflora.config import load_config
    from aflora.results import RunRecord
    from aflora.rounds import InProcessTransport, run_rounds
    from aflora.runtime import ClientRuntime, ServerRuntime

    config = load_config(tiny)
    runtime = ServerRuntime(config)
    record = RunRecord(method=config.method, model=config.model.name, dataset=runtime.workload.bundle.name,
                       num_clients=config.federation.num_clients, seed=config.seed, config=config.to_dict(),
                       base_params=runtime.side.host.base_param_count)
    run_rounds(runtime, InProcessTransport(ClientRuntime(config)), record, 1, config.rounds,
               on_round_end=lambda round_: save_checkpoint(folder, round_, runtime, record))
    record.finish(wall_seconds=1.0, final_ranks=runtime.method.client_ranks(), precision=runtime.side.precision)
    record.write(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, str]:
    """The tiny experiment, an earlier finished run, and a folder of broken inputs."""
    root = tmp_path_factory.mktemp("bad-input")
    tiny = write_tiny_config_toml(root / "tiny")
    files = root / "files"
    files.mkdir()
    _write_csv(files / "header_only.csv", ["text", "label"], [])
    (files / "empty.csv").write_text("")
    (files / "latin1.csv").write_bytes("text,label\nSepp\xe4l\xe4 wins the match,Sports\n".encode("latin-1"))
    _write_csv(files / "body.csv", ["body", "label"], [["goal", 1]])
    _write_csv(files / "no_text.csv", ["text", "label"], [["", 1], [" ", 2]])
    _write_csv(files / "label7.csv", ["text", "label"], [["goal", 7]])
    (files / "data.txt").write_text("goal,1\n")
    (files / "bad.json").write_text('[{"text": "goal", "label": 1}')
    (files / "bad.parquet").write_text("not parquet")
    (files / "afile").write_text("a file where a folder is expected\n")
    (files / "empty_folder").mkdir()
    (files / "bad.toml").write_text("rounds = = 3\n")
    (files / "latin1.toml").write_bytes("# Sepp\xe4l\xe4\nrounds = 3\n".encode("latin-1"))
    (files / "modell.toml").write_text('[modell]\nname = "tiny-llama"\n')
    (files / "three.toml").write_text('rounds = "three"\n')
    (files / "compare_table.toml").write_text('[compare]\nmethods = "aflora"\n')
    earlier = root / "earlier"
    _write_earlier_run(earlier, tiny)
    return {"root": str(root), "tiny": str(tiny), "train": str(root / "tiny" / "train.csv"), "files": str(files),
            "earlier": str(earlier)}


def _snapshot(root: Path) -> dict[str, str | None]:
    """Every path under root with the hash of its bytes (None for folders)."""
    return {str(path.relative_to(root)): None if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))}


@pytest.fixture
def cli_without_engines(monkeypatch, workspace):
    """`aflora` in this process, in the workspace, offline, with every engine a stub that fails the test if reached."""
    def reached(*args, **kwargs):
        raise AssertionError("validation passed: the engine would have started")

    monkeypatch.setitem(sys.modules, "aflora.flower.simulation", types.SimpleNamespace(simulate=reached))
    monkeypatch.setattr("aflora.compare.run_comparison", reached)
    monkeypatch.setattr("aflora.deployment.up", reached)
    monkeypatch.setattr("aflora.deployment.run_once", reached)
    monkeypatch.setattr("aflora.hub.hub_unreachable_reason", lambda: "huggingface.co:443 cannot be reached (no network in this test)")
    for name in (*OFFLINE_VARIABLES, "AFLORA_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(workspace["root"])  # default output folders (runs/...) would land in the snapshot
    return workspace


def filled(argv: list[str], workspace: dict[str, str], new: Path) -> list[str]:
    """`argv` with {tiny}, {train}, {files}, {earlier} and {new} replaced by their paths."""
    places = {**workspace, "new": str(new)}
    for name, path in places.items():
        argv = [arg.replace("{" + name + "}", path) for arg in argv]
    return argv


def run_aflora(argv: list[str], capsys) -> tuple[object, str]:
    """(exit code, or the exception that escaped main; everything printed)."""
    try:
        cli.main(argv)
        outcome: object = 0
    except SystemExit as exit_:
        outcome = exit_.code
    except Exception as error:  # a traceback for the user: the test reports it
        outcome = error
        print(traceback.format_exc(), file=sys.stderr)
    printed = capsys.readouterr()
    return outcome, printed.err + printed.out


def assert_refused(outcome: object, printed: str, pattern: str) -> None:
    assert outcome == 2, f"exit code {outcome!r}, expected 2; printed:\n{printed[-3000:]}"
    assert "Traceback" not in printed, printed[-3000:]
    assert re.search(pattern, printed, re.DOTALL), f"message does not match {pattern!r}:\n{printed[-3000:]}"


@pytest.mark.parametrize("argv, pattern", [pytest.param(argv, pattern, id=kind) for kind, argv, pattern in KINDS])
def test_bad_input_is_refused_before_any_work(argv, pattern, cli_without_engines, capsys, request):
    new = Path(cli_without_engines["root"]) / f"new-{request.node.callspec.id}"
    before = _snapshot(Path(cli_without_engines["root"]))
    outcome, printed = run_aflora(filled(argv, cli_without_engines, new), capsys)
    assert_refused(outcome, printed, pattern)
    assert _snapshot(Path(cli_without_engines["root"])) == before, "files were created, changed or removed"
    assert not new.exists()


def test_the_matrix_is_wide():
    """The issue's bar: at least 60 kinds, each with its own id."""
    ids = [kind for kind, _, _ in KINDS]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("degenerate", ["markup", "wrong-exit-code"])
def test_a_degenerate_error_handler_fails_the_matrix(degenerate, cli_without_engines, capsys, monkeypatch):
    """The checks above catch the handler bugs seen before: messages printed as rich markup (so `[train]` vanished
    and a path holding `[/x]` crashed the handler), or an exit code other than 2."""
    if degenerate == "markup":
        monkeypatch.setattr(cli, "escape", lambda text: text)
    else:
        real_exit = sys.exit
        monkeypatch.setattr(cli.sys, "exit", lambda code=0: real_exit(1 if code == 2 else code))
    for kind in ("unknown-section-key", "markup-in-a-missing-path"):
        _, argv, pattern = next(k for k in KINDS if k[0] == kind)
        outcome, printed = run_aflora(filled(argv, cli_without_engines, Path(cli_without_engines["root"]) / "new"), capsys)
        with pytest.raises(AssertionError):
            assert_refused(outcome, printed, pattern)


def test_the_installed_command_prints_the_message_without_a_traceback(tmp_path):
    """The same refusal through the real entry point, in its own process."""
    out = tmp_path / "out"
    cli_args = [sys.executable, "-m", "aflora", "run", "--set", "train.lrr=0.1", "--out", str(out)]
    refused = subprocess.run(cli_args, capture_output=True, text=True, timeout=120)
    assert_refused(refused.returncode, refused.stderr, r"\[train\] has unknown keys \['lrr'\]")
    assert not out.exists()


def test_every_key_is_explained_and_every_choice_listed(capsys, tmp_path):
    """`aflora config --explain` shows every key with its help, every method's options included whether set or not;
    `aflora list` names the methods, datasets with their aliases and options, and partition schemes."""
    from aflora.config import SECTIONS, describe_keys, load_config
    from aflora.data.partition import PARTITION_SCHEMES
    from aflora.data.registry import registered_datasets
    from aflora.methods import METHODS

    explained = describe_keys(load_config(None))
    assert all(row.help for row in explained), [row.key for row in explained if not row.help]
    tables = {row.key.split(".")[0] for row in explained if "." in row.key}
    assert tables == set(SECTIONS) | set(METHODS)
    assert run_aflora(["config", "--explain", "hetlora.keep_ratio", "train.lr"], capsys) == (0, (
        "train.lr = 0.002  (float)\n    Client learning rate (AdamW)\n"
        "hetlora.keep_ratio = 0.9  (float)\n    γ: slices ⌊γ·r⌋..r are regularized and pruned together.\n"))
    outcome, listed = run_aflora(["list"], capsys)
    assert outcome == 0
    for name in [*METHODS, *PARTITION_SCHEMES]:
        assert re.search(rf"^  {name}\s+\S", listed, re.MULTILINE), name
    for dataset in registered_datasets():
        assert f"  {dataset.name} " in listed and all(alias in listed for alias in dataset.aliases)
        assert all(f"option {key}:" in listed for key in dataset.options)


@pytest.mark.parametrize("key, spellings, expected", [
    ("model.target_modules", ['["q_proj","v_proj"]', "q_proj,v_proj", "q_proj, v_proj"], ["q_proj", "v_proj"]),
    ("federation.client_ranks", ["[8,4,2]", "8,4,2", '"8,4,2"'], [8, 4, 2]),
    ("data.extra_eval", ['["mmlu"]', "mmlu"], ["mmlu"]),
    ("data.options.label_words", [json.dumps(LABEL_WORDS), ",".join(LABEL_WORDS)], LABEL_WORDS),
])
def test_list_values_parse_alike_for_every_key(key, spellings, expected, tmp_path):
    """A list-valued --set reads the same way whatever the key: a TOML list, comma-separated words, or one value."""
    from aflora.config import flatten, load_config
    from aflora.data.registry import _accepted_options, _typed_options

    for spelling in spellings:
        if key.startswith("data.options."):  # typed by the dataset that reads them
            config = tiny_config(tmp_path, f"{key}={spelling}")
            typed = _typed_options(config.data.dataset, _accepted_options(config.data.dataset), None, config.data.options)
            assert typed[key.rsplit(".", 1)[1]] == expected, spelling
        else:
            config = load_config(None, ["federation.num_clients=3", "federation.client_ranks=[1,1,1]", f"{key}={spelling}"])
            assert flatten(config.to_dict())[key] == expected, spelling
