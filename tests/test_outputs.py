"""What a run leaves on disk: TensorBoard events that agree with results.json, output folders that are never
clobbered (--overwrite, export, partition), checkpoints whose damage is detected before a resume uses them."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from aflora.checkpoint import load_checkpoint
from aflora.config import ConfigError, load_config
from aflora.errors import CheckpointError, OutputError
from aflora.flower.simulation import simulate
from aflora.results import load_run
from aflora.run_folder import TARGET_FILE, finish_replacement, prepare_run_folder, run_folder, written_aside
from aflora.runtime import preflight
from aflora.tracking import open_trackers

from helpers import record_differences, tiny_config, write_tiny_config_toml

AFLORA = [sys.executable, "-m", "aflora"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished two-round run (results.json, adapter, plots, checkpoints, TensorBoard events). Read only: copy it to change it."""
    folder = tmp_path_factory.mktemp("finished")
    simulate(tiny_config(folder / "data"), folder / "out")
    return folder / "out"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files of `folder`: tag -> {round: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def event_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("events.out.tfevents.*")}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*AFLORA, *args], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- tracking


@pytest.mark.flower
def test_tensorboard_events_in_the_run_folder_agree_with_results_json(finished_run):
    run, logged = load_run(finished_run), scalars(finished_run)
    assert logged["global_model/accuracy"][0] == pytest.approx(run["initial"]["accuracy"])
    assert logged["global_model/loss"][0] == pytest.approx(run["initial"]["loss"])
    for r in run["rounds"]:
        t = r["round"]
        assert logged["global_model/accuracy"][t] == pytest.approx(r["accuracy"])
        assert logged["global_model/loss"][t] == pytest.approx(r["loss"])
        # by hand: the mean over this round's clients of trained parameters, as % of the base model's
        cost = 100 * sum(r["trained_params"].values()) / len(r["trained_params"]) / run["base_params"]
        assert logged["cost/client_cost_percent"][t] == pytest.approx(cost)
        assert logged["cost/uplink_bytes"][t] == sum(r["uplink_bytes"].values())
        assert logged["ranks/mean"][t] == pytest.approx(sum(r["ranks"].values()) / len(r["ranks"]))
        for cid, rank in r["ranks"].items():
            assert logged[f"ranks/client_{cid}"][t] == pytest.approx(rank)
        assert logged["clients/replied"][t] == len(r["clients"])
        assert logged["time/round_seconds"][t] == pytest.approx(r["round_seconds"])
    summed = sum(logged["cost/uplink_bytes"].values())
    assert summed == run["final"]["uplink_bytes_total"]
    assert sorted(logged["cost/uplink_bytes"]) == [1, 2]  # every round once


def test_unknown_or_missing_tracking_backends_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"tracking.backends has 'neptune'; choose from \['mlflow', 'tensorboard', 'wandb'\]"):
        load_config(None, ['tracking.backends=["neptune"]'])
    for name in ("mlflow", "wandb"):
        if importlib.util.find_spec(name) is None:
            config = tiny_config(tmp_path, f'tracking.backends=["tensorboard", "{name}"]')  # a config may name it (e.g. to export a run)
            with pytest.raises(ConfigError, match=f"'{name}' is not installed: pip install {name}, or leave '{name}' out"):
                preflight(config)  # ... a run needs it
    assert load_config(None, ["tracking.backends=[]"]).tracking.backends == []


class FakeMLflow(types.ModuleType):
    """Records what the MLflow backend calls, as the `mlflow` module would receive it."""

    def __init__(self):
        super().__init__("mlflow")
        self.calls: list[tuple] = []

    def set_experiment(self, name):
        self.calls.append(("set_experiment", name))

    def start_run(self, run_id=None, run_name=None):
        self.calls.append(("start_run", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "run-1"))

    def log_params(self, params):
        self.calls.append(("log_params", params))

    def log_metrics(self, metrics, step):
        self.calls.append(("log_metrics", metrics, step))

    def end_run(self):
        self.calls.append(("end_run",))

    def get_tracking_uri(self):
        return "file:///fake"


def test_mlflow_gets_the_same_metrics_through_the_hook_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    fake = FakeMLflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    trackers = open_trackers(["mlflow"], tmp_path, config={"method": "aflora", "rounds": 2}, project="proj")
    trackers.log_round(1, {"global_model/accuracy": 0.5})
    trackers.close()
    assert fake.calls == [("set_experiment", "proj"), ("start_run", None, tmp_path.name),
                          ("log_params", {"method": "aflora", "rounds": "2"}),
                          ("log_metrics", {"global_model/accuracy": 0.5}, 1), ("end_run",)]
    assert json.loads((tmp_path / "tracking.json").read_text()) == {"mlflow": "run-1"}
    fake.calls.clear()
    open_trackers(["mlflow"], tmp_path, config={}, project="proj", first_round=2).close()
    assert fake.calls[1] == ("start_run", "run-1", None)  # the same MLflow run, its parameters not logged twice
    assert not any(call[0] == "log_params" for call in fake.calls)


def test_mlflow_for_real_when_installed(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store otherwise (a database needs SQLAlchemy)
    trackers = open_trackers(["mlflow"], tmp_path / "run", config={"method": "aflora"}, project="aflora-test")
    trackers.log_round(0, {"global_model/accuracy": 0.25})
    trackers.log_round(1, {"global_model/accuracy": 0.5})
    trackers.close()
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow"]
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "global_model/accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (1, 0.5)]


def test_wandb_for_real_when_installed(tmp_path, monkeypatch):
    """Offline W&B (no account): the run lives in the run folder under the id tracking.json names, and a resume
    continues that W&B run. (wandb 0.31 has no Python reader for its .wandb log, so the metrics themselves are
    checked through the hook with the fake backends above.)"""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    out.mkdir()
    trackers = open_trackers(["wandb"], out, config={"method": "aflora"}, project="aflora-test")
    trackers.log_round(0, {"global_model/accuracy": 0.25})
    trackers.close()
    run_id = json.loads((out / "tracking.json").read_text())["wandb"]
    assert [p.name.rsplit("-", 1)[-1] for p in (out / "wandb").glob("offline-run-*")] == [run_id]
    resumed = open_trackers(["wandb"], out, config={}, project="aflora-test", first_round=1)
    assert resumed.trackers[0].run.id == run_id
    resumed.close()


# ---------------------------------------------------------------------------- --overwrite


@pytest.mark.flower
def test_an_overwrite_that_dies_leaves_the_old_run_whole_and_its_resume_swaps_in_the_new_run(tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "out")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    config = write_tiny_config_toml(tmp_path / "data", "federation.min_replies=3", "engine.fail_clients=[2]", "engine.fail_from_round=2")
    died = cli("run", "--config", str(config), "--out", str(out), "--overwrite")
    assert died.returncode == 3, died.stderr[-2000:]
    staging = tmp_path / "out.replacing"
    assert f"{out} still holds the previous run" in died.stderr and f"aflora run --resume {staging}" in died.stderr
    # --out is exactly the old run: no new checkpoint next to the old results.json, nothing added or changed
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # ... and the new run's round 1 is beside it, alone
    assert load_checkpoint(staging)[0]["round"] == 1 and not (staging / "results.json").exists()
    assert not (staging / "adapter").exists() and event_files(staging)

    resumed = cli("run", "--resume", str(staging), "--set", "engine.fail_clients=[]")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not staging.exists() and not (tmp_path / "out.replaced").exists()
    new = load_run(out)
    assert new["config"]["federation"]["min_replies"] == 3 and [r["round"] for r in new["rounds"]] == [1, 2]
    assert load_checkpoint(out)[0]["round"] == 2 and not (out / TARGET_FILE).exists()
    assert not event_files(out) & event_files(finished_run)  # the old run's events went with it
    assert sorted(scalars(out)["global_model/loss"]) == [0, 1, 2]


def test_a_run_folder_is_swapped_in_only_when_the_run_finishes(tmp_path):
    """What `aflora run` and `aflora federation run` write into: the old run stays whole until the new one ends."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("old")
    with pytest.raises(RuntimeError), run_folder(out, overwrite=True) as write_to:  # dies before a checkpoint
        assert write_to == tmp_path / "out.replacing"
        (write_to / "results.json").write_text("new")
        raise RuntimeError("crash in round 1")
    assert (out / "results.json").read_text() == "old" and not write_to.exists()  # nothing to resume: removed
    with pytest.raises(RuntimeError), run_folder(out, overwrite=True) as write_to:  # dies after a checkpoint
        (write_to / "checkpoint").mkdir()
        raise RuntimeError("crash in round 2")
    assert (out / "results.json").read_text() == "old" and (write_to / "checkpoint").is_dir()  # kept, to resume
    with run_folder(out, overwrite=True) as write_to:
        (write_to / "results.json").write_text("new")
        assert (out / "results.json").read_text() == "old"  # until the block ends
    assert sorted(p.name for p in out.iterdir()) == ["results.json"] and (out / "results.json").read_text() == "new"
    assert not write_to.exists() and not (tmp_path / "out.replaced").exists()
    with pytest.raises(OutputError, match="already holds a finished run"), run_folder(out, overwrite=False):
        pass


def test_run_folders_are_refused_unless_told(tmp_path):
    finished, unfinished, other = tmp_path / "finished", tmp_path / "unfinished", tmp_path / "other"
    (finished / "checkpoint").mkdir(parents=True)
    (finished / "results.json").write_text("{}")
    (unfinished / "checkpoint").mkdir(parents=True)
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="already holds a finished run"):
        prepare_run_folder(finished, overwrite=False)
    with pytest.raises(OutputError, match=f"unfinished run .*aflora run --resume {unfinished}"):
        prepare_run_folder(unfinished, overwrite=False)
    with pytest.raises(OutputError, match=r"is not empty \(it holds notes.txt\).*--overwrite"):
        prepare_run_folder(other, overwrite=False)
    assert prepare_run_folder(tmp_path / "new", overwrite=False) == tmp_path / "new"
    staging = prepare_run_folder(other, overwrite=True)
    assert staging == tmp_path / "other.replacing" and (other / "notes.txt").exists()
    (staging / "results.json").write_text("{}")
    assert finish_replacement(staging) == other
    assert sorted(p.name for p in other.iterdir()) == ["results.json"] and not staging.exists()


def test_written_aside_replaces_only_on_success_and_never_the_folder_it_reads(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.safetensors").write_text("old")
    with pytest.raises(OutputError, match=r"not empty: it holds old.safetensors.*pass --overwrite"), \
            written_aside(out, overwrite=False, what="the merged model"):
        pass
    with pytest.raises(RuntimeError, match="died"), written_aside(out, overwrite=True, what="the merged model") as folder:
        (folder / "new.safetensors").write_text("half")
        raise RuntimeError("died")
    assert sorted(p.name for p in out.iterdir()) == ["old.safetensors"] and not (tmp_path / "merged.replacing").exists()
    with written_aside(out, overwrite=True, what="the merged model") as folder:
        (folder / "new.safetensors").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.safetensors"]
    with pytest.raises(OutputError, match="overlaps"), \
            written_aside(tmp_path / "run" / "merged", overwrite=True, what="the merged model", source=tmp_path / "run"):
        pass


@pytest.mark.flower
def test_export_and_partition_refuse_a_non_empty_folder_with_exit_code_2(tmp_path, finished_run):
    into_run = cli("export", "--run", str(finished_run), "--out", str(finished_run))
    assert into_run.returncode == 2 and "overlaps" in into_run.stderr and "Traceback" not in into_run.stderr
    other_run = copy_run(finished_run, tmp_path / "other_run")
    export = cli("export", "--run", str(finished_run), "--out", str(other_run))
    assert export.returncode == 2 and "Traceback" not in export.stderr
    assert "holds an aflora run (results.json)" in export.stderr and "pass --overwrite" in export.stderr
    assert load_run(other_run) == load_run(finished_run)

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "client_7.jsonl").write_text("stale\n")
    config = write_tiny_config_toml(tmp_path / "data")
    refused = cli("partition", "--config", str(config), "--out", str(shards))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "is not empty: it holds client_7.jsonl" in refused.stderr and "pass --overwrite" in refused.stderr
    replaced = cli("partition", "--config", str(config), "--out", str(shards), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert sorted(p.name for p in shards.iterdir()) == ["client_0.jsonl", "client_1.jsonl", "client_2.jsonl", "manifest.json", "task.json"]


# ---------------------------------------------------------------------------- checkpoints


def damage_file(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one byte flipped in the middle, same size
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])


@pytest.mark.flower
@pytest.mark.parametrize("how, message", [("truncated", r"is truncated: \d+ of the \d+ bytes written"),
                                          ("corrupted", r"is corrupted: its sha256 is")])
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_is_named(tmp_path, finished_run, how, message):
    run = copy_run(finished_run, tmp_path / "run")
    latest, previous = run / "checkpoint" / "round_2.pt", run / "checkpoint" / "round_1.pt"
    damage_file(latest, how)
    damaged = latest.read_bytes()
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(run)
    assert f"The checkpoint of round 1 is intact: continue from it with `aflora run --resume {previous}`" in str(error.value)
    assert latest.read_bytes() == damaged and load_checkpoint(run, "round_1.pt")[0]["round"] == 1  # both kept as they were
    previous.unlink()
    with pytest.raises(CheckpointError, match="No intact checkpoint is left"):
        load_checkpoint(run)


@pytest.mark.flower
def test_resume_stops_at_a_truncated_checkpoint_and_continues_from_the_previous_one_it_names(tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path / "run")
    for name in ("results.json", "rounds.csv"):  # as if killed while writing the outputs after round 2
        (run / name).unlink()
    damage_file(run / "checkpoint" / "round_2.pt", "truncated")
    refused = cli("run", "--resume", str(run))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    previous = run / "checkpoint" / "round_1.pt"
    assert "round_2.pt) is truncated" in refused.stderr and f"aflora run --resume {previous}" in refused.stderr
    resumed = cli("run", "--resume", str(previous))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    compared = lambda folder: {"initial": load_run(folder)["initial"], "rounds": load_run(folder)["rounds"]}  # noqa: E731
    assert not record_differences(compared(finished_run), compared(run))
    assert load_checkpoint(run)[0]["round"] == 2  # a fresh, intact round 2
