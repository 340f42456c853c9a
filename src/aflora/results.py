"""The record of a run: results.json, rounds.csv, and the terminal table."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .costs import client_cost_pct, payload_bytes, payload_params
from .intervals import compress_indices, pack_bits, wilson_interval
from .machine import environment
from .methods import Upload
from .run_folder import RESULTS_FILE


@dataclass
class RoundRecord:
    round: int
    accuracy: float | None
    loss: float
    clients: list[int]
    ranks: dict[str, float]  # client -> mean rank over modules trained this round
    trained_params: dict[str, int]
    uplink_params: dict[str, int]
    uplink_bytes: dict[str, int]
    train_loss: dict[str, float]
    round_seconds: float  # instructions out -> global update merged (excludes evaluation)
    eval_seconds: float
    failures: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)  # other benchmarks, e.g. {"mmlu/accuracy": 0.31}
    aggregation_seconds: float | None = None
    server_seconds: float | None = None  # server-side work after aggregating (AFLoRA's A tuning), incl. the merge
    # Aggregation exactness: ‖ΔW_aggregate − Σ p_k B_k A_k‖ / ‖Σ p_k B_k A_k‖ before truncation or A tuning, where defined
    aggregation_error: float | None = None
    # What the method's own server step measured (FederatedMethod.round_diagnostics), by the method's names:
    # truncation_loss (FlexLoRA, FLoRIST), a_tuning_change / a_fused_change (AFLoRA), global_rank (FLoRIST),
    # residual_norm (FedEx-LoRA), ... A new method adds its own without touching this file.
    method_diagnostics: dict[str, float] = field(default_factory=dict)
    eval_uplink_bytes: int = 0  # sent only so the server can evaluate a global model (FedSA-LoRA's B)
    personalized: dict[str, float] = field(default_factory=dict)  # clients' own models on their local test rows
    dp_noise_std: float | None = None  # client-level DP: the noise added to the aggregate this round
    dp_epsilon: float | None = None  # ... and the cumulative ε at privacy.delta after it
    train_seconds: dict[str, float] = field(default_factory=dict)  # client -> its local training time (engine overhead = the rest)
    update_norm: dict[str, float] = field(default_factory=dict)  # client-level DP: client -> its upload's L2 norm before clipping
    accuracy_ci95: list[float] | None = None  # Wilson 95 % interval of `accuracy` over the round's test rows
    # What the fleet clock (aflora.fleet) needs to time each client's round as a device would see it:
    train_tokens: dict[str, int] = field(default_factory=dict)  # client -> tokens it trained on (padding excluded)
    backward_fraction: dict[str, float] = field(default_factory=dict)  # client -> share of the base's blocks its backward crossed
    instruction_bytes: dict[str, int] = field(default_factory=dict)  # client -> bytes of its instruction (server -> client)
    merge_bytes: int = 0  # the update merged into the base this round: each client downloads it before it next trains


def round_record(round_: int, uploads: list[Upload], metrics: dict[str, float], *, round_seconds: float, eval_seconds: float,
                 failures: list[dict[str, Any]] | None = None, server: dict[str, float] | None = None,
                 personalized: dict[str, float] | None = None, instruction_bytes: dict[int, int] | None = None) -> RoundRecord:
    uploads = sorted(uploads, key=lambda u: u.client_id)
    sent = instruction_bytes or {}
    key = lambda u: str(u.client_id)  # noqa: E731 - JSON object keys are strings
    return RoundRecord(
        round=round_,
        accuracy=metrics.get("accuracy"),
        accuracy_ci95=accuracy_interval(metrics),
        loss=metrics["loss"],
        clients=[u.client_id for u in uploads],
        ranks={key(u): round(sum(u.ranks.values()) / max(len(u.ranks), 1), 3) for u in uploads},
        trained_params={key(u): u.trained_params for u in uploads},
        # under SecAgg+ the summed tensors travel masked, beside the clear ones (aflora.secure_aggregation)
        uplink_params={key(u): payload_params(u.tensors) + int(u.metrics.get("secagg_uplink_params", 0)) for u in uploads},
        uplink_bytes={key(u): payload_bytes(u.tensors) + int(u.metrics.get("secagg_uplink_bytes", 0)) for u in uploads},
        train_loss={key(u): u.metrics.get("train_loss", float("nan")) for u in uploads},
        train_seconds={key(u): u.metrics.get("train_seconds", float("nan")) for u in uploads},
        update_norm={key(u): u.metrics["update_norm"] for u in uploads if "update_norm" in u.metrics},
        train_tokens={key(u): int(u.metrics["train_tokens"]) for u in uploads if "train_tokens" in u.metrics},
        backward_fraction={key(u): u.metrics["backward_fraction"] for u in uploads if "backward_fraction" in u.metrics},
        instruction_bytes={key(u): sent[u.client_id] for u in uploads if u.client_id in sent},
        round_seconds=round_seconds,
        eval_seconds=eval_seconds,
        failures=failures or [],
        extra={k: v for k, v in metrics.items() if "/" in k},
        eval_uplink_bytes=sum(payload_bytes(u.tensors, evaluation_only=True) for u in uploads),
        personalized=dict(personalized or {}),
        **{k: v for k, v in (server or {}).items() if k in RECORD_FIELDS},
        method_diagnostics={k: v for k, v in (server or {}).items() if k not in RECORD_FIELDS},
    )


RECORD_FIELDS = {f.name for f in dataclasses.fields(RoundRecord)}


def accuracy_interval(metrics: dict[str, Any]) -> list[float] | None:
    """The Wilson 95 % interval of metrics' accuracy over its num_examples rows; None where there is no accuracy."""
    n = int(metrics.get("num_examples") or 0)
    if metrics.get("accuracy") is None or not n:
        return None
    return wilson_interval(round(metrics["accuracy"] * n), n).as_list()


def final_eval_record(indices: list[int], rows: list[dict], available: int, metrics: dict[str, Any],
                      correct: list[bool] | None) -> dict[str, Any]:
    """results.json's final_eval for one test set: what was scored, the scores, and (for classification) each row
    right or wrong, so `aflora compare` can pair two methods row by row (rows_sha256 says the rows were the same)."""
    record = {
        "rows": len(rows),
        "test_rows": available,
        "row_indices": compress_indices(indices),
        "rows_sha256": hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest(),
        "accuracy": metrics.get("accuracy"),
        "accuracy_ci95": accuracy_interval(metrics),
        "loss": metrics["loss"],
    }
    if correct is not None:
        record["correct"] = pack_bits(correct)
        if rows and all("label" in row for row in rows):
            record |= label_scores([row["label"] for row in rows], correct)
    return record


def label_scores(labels: list[int], correct: list[bool]) -> dict[str, Any]:
    """What the accuracy alone hides on imbalanced rows: each label's share of the rows and its recall, their mean
    (balanced accuracy: 1/K for a model that gives one answer to every row, whatever that answer), and the
    accuracy of always answering the most common label. K counts the labels the rows hold (a label no row has has
    no recall); labels are JSON keys, so strings."""
    rows_of: dict[int, list[bool]] = {}
    for label, hit in zip(labels, correct, strict=True):
        rows_of.setdefault(label, []).append(hit)
    recall = {str(label): sum(hits) / len(hits) for label, hits in sorted(rows_of.items())}
    return {
        "label_shares": {str(label): len(hits) / len(labels) for label, hits in sorted(rows_of.items())},
        "recall_by_label": recall,
        "balanced_accuracy": sum(recall.values()) / len(recall),
        "majority_label_accuracy": max(len(hits) for hits in rows_of.values()) / len(labels),
    }


@dataclass
class RunRecord:
    method: str
    model: str
    dataset: str
    num_clients: int
    seed: int
    config: dict[str, Any]
    base_params: int
    initial: dict[str, float] = field(default_factory=dict)  # the base model before any round (zero-shot)
    rounds: list[RoundRecord] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    # The global model after the last round on data.final_eval_size rows (final_eval_record), extra benchmarks under "extra"
    final_eval: dict[str, Any] = field(default_factory=dict)

    def finish(self, *, wall_seconds: float, final_ranks: dict[int, dict[str, int]], precision: str) -> None:
        trained = [n for r in self.rounds for n in r.trained_params.values()]
        uplink = [n for r in self.rounds for n in r.uplink_params.values()]
        last = self.rounds[-1] if self.rounds else None
        scored = self.final_eval or (asdict(last) if last else self.initial)  # a record without final evaluation: its last round
        best = max((r for r in self.rounds if r.accuracy is not None), key=lambda r: r.accuracy, default=None)
        self.final = {
            "accuracy": scored.get("accuracy"),
            "accuracy_ci95": scored.get("accuracy_ci95"),
            "eval_rows": scored.get("rows"),
            "loss": scored.get("loss"),
            "best_accuracy": best.accuracy if best else None,
            "best_accuracy_ci95": best.accuracy_ci95 if best else None,
            "personalized_accuracy": last.personalized.get("accuracy") if last else None,
            "dp_epsilon": last.dp_epsilon if last else None,
            "client_cost_pct": client_cost_pct(trained, self.base_params),
            "client_uplink_pct": client_cost_pct(uplink, self.base_params),
            "uplink_bytes_total": sum(n for r in self.rounds for n in r.uplink_bytes.values()),
            "wall_seconds": wall_seconds,
            "ranks": {str(cid): round(sum(m.values()) / max(len(m), 1), 3) for cid, m in sorted(final_ranks.items())},
        }
        self.environment = {**environment(), "precision": precision}  # precision: what the server's model side ran

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """Rebuild a record written by `to_json` (a checkpoint's, to continue a run)."""
        fields = dict(data)
        fields["rounds"] = [RoundRecord(**r) for r in fields["rounds"]]
        return cls(**fields)

    def write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RESULTS_FILE).write_text(json.dumps(self.to_json(), indent=2))
        write_rounds_csv(self.rounds, out_dir / "rounds.csv")


def write_rounds_csv(rounds: list[RoundRecord], path: Path) -> None:
    """One row per (round, client) with the round's global metrics repeated: easy to load in any tool."""
    columns = ["round", "accuracy", "loss", "round_seconds", "eval_seconds", "client", "rank", "trained_params",
               "uplink_params", "uplink_bytes", "train_loss", "train_seconds"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for r in rounds:
            for cid in r.ranks:
                writer.writerow([r.round, r.accuracy, r.loss, f"{r.round_seconds:.3f}", f"{r.eval_seconds:.3f}", cid, r.ranks[cid],
                                 r.trained_params[cid], r.uplink_params[cid], r.uplink_bytes[cid], r.train_loss[cid],
                                 r.train_seconds.get(cid, float("nan"))])


def load_run(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; point at the --out folder of a finished `aflora run`")
    return json.loads(path.read_text())
