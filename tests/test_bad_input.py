"""Bad input fails early with a message that names the problem and the fix, and loses nothing.

These test the layers one by one; test_bad_input_matrix.py sends every kind of bad input through the `aflora` command
(exit code 2, the message, no traceback, no file changed): a kept earlier run, '[train]' and a '[/x]' path are there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aflora.config import ConfigError, config_from_flat, flatten, load_config
from aflora.data import DataError
from aflora.models import ModelError, resolve_model
from aflora.runtime import preflight
from aflora.values import tomllib

from helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "override, message",
    [
        ("method=fedsgd", "unknown method 'fedsgd'; available methods are"),
        ("federation.client_ranks=[8,4]", "client_ranks has 2 entries but federation.num_clients is 10"),
        ("federation.client_ranks=[8,4,2,0,1,1,1,1,1,1]", "client_ranks must all be ≥ 1"),
        ("aflora.beta=-1", "aflora.beta must be ≥ 0"),
        ("aflora.alpha=1.5", r"aflora.alpha is a fusion ratio and must lie in \[0, 1\]"),
        ("aflora.alpha=-0.5", r"must lie in \[0, 1\]"),
        ("train.lr=fast", "train.lr must be of type float"),
        ("rounds=0", "rounds must be ≥ 1"),
        ("federation.sample_fraction=0", r"sample_fraction must lie in \(0, 1\]"),
        ("nonsense.key=1", "unknown config key 'nonsense'"),
        ("data.bogus=1", r"\[data\] has unknown keys \['bogus'\]"),
        ("aflora.bogus=1", r"\[aflora\] has unknown keys \['bogus'\]"),
        ("aflora.ddr=yes", "aflora.ddr must be of type bool"),
        ("hetlora.keep_ratio=1.5", r"hetlora.keep_ratio must lie in \(0, 1\)"),
        ("rounds", "is not of the form key=value"),
        ("data.final_eval_size=most", r'final_eval_size must be a number of test rows \(e.g. 2000\), "all" or "eval_size", got \'most\''),
        ("data.final_eval_size=0", "data.final_eval_size must be a number of test rows"),
    ],
)
def test_bad_config_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_final_eval_size_takes_a_number_all_or_eval_size():
    rows = {value: load_config(None, ["data.eval_size=300", f"data.final_eval_size={value}"]).data.final_eval_rows()
            for value in ("2000", '"all"', '"ALL"', '"eval_size"')}
    assert rows == {"2000": 2000, '"all"': 0, '"ALL"': 0, '"eval_size"': 300}
    assert load_config(None).data.final_eval_rows() == 200  # the default: the per-round rows again


def test_malformed_and_missing_config_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("name", ["no-such-model", "./not/a/folder"])
def test_unknown_model_is_explained(name):
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model(name)


def test_missing_gguf_file_is_explained(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "model.gguf"))


def test_unknown_dataset_and_missing_data_path(tmp_path):
    with pytest.raises(DataError, match="unknown dataset .no_such_dataset.. Registered datasets"):
        preflight(load_config(None, ["data.dataset=no_such_dataset", "model.name=tiny-llama"]))
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        preflight(load_config(None, [f'data.data_dir="{tmp_path / "nowhere"}"', "model.name=tiny-llama"]))


def test_a_client_left_without_data_fails_before_training(tmp_path):
    config = tiny_config(tmp_path, "federation.num_clients=200", f"federation.client_ranks={[2] * 200}", "data.partition=\"iid\"")
    with pytest.raises(DataError, match="200"):
        preflight(config)


def test_server_tuning_without_a_public_set_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="public set"):
        preflight(tiny_config(tmp_path, "data.public_size=0", "data.public_fraction=0.0"))
    preflight(tiny_config(tmp_path, "data.public_size=0", "data.public_fraction=0.0", "aflora.server_tuning=false"))


def test_flower_defaults_in_pyproject_equal_the_default_config_file():
    """`flwr run .` and `aflora run --config configs/default.toml` must run the same experiment."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    flower_defaults = flatten(pyproject["tool"]["flwr"]["app"]["config"])
    flower_defaults.pop("out-dir")  # where results go: read by the ServerApp, not part of the experiment
    from_flower = config_from_flat(flower_defaults)
    from_file = load_config(REPO / "configs" / "default.toml")
    assert flatten(from_flower.to_dict()) == flatten(from_file.to_dict())


@pytest.mark.parametrize("method", ["aflora", "hetlora"])
@pytest.mark.parametrize("protection", ["privacy.clip_norm=0.5", "secagg.enabled=true"])
def test_rank_partitioned_weights_with_dp_or_secagg_fail_before_any_work(method, protection):
    # (HETLoRA supports neither DP nor SecAgg+ at all: either refusal is right for it)
    message = "column_weights = 'rank_partitioned' needs one weight per column" + ("|needs a method" if method == "hetlora" else "")
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f'method="{method}"', f'{method}.column_weights="rank_partitioned"', protection])
