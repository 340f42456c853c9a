"""The unit every dataset reader produces and every later step consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

from aflora.data.tasks import INSTRUCTION, Task
from aflora.errors import DataError


@dataclass
class DatasetBundle:
    """Everything a federated run needs from one dataset."""

    name: str
    task: Task
    train: list[dict]  # pool that clients (and the server's public set) are drawn from
    test: list[dict]  # evaluation rows
    source: str  # human-readable: which files or hub ids were read
    extra_eval: dict[str, list[dict]] = field(default_factory=dict)  # e.g. dolly: {"heldout": [...]}
    presplit_clients: list[list[int]] | None = None  # indices into train per client (dolly FLoRA split)

    def train_labels(self) -> list[int]:
        """Class index of every train row (the input of label-skew partitioners)."""
        if self.task.kind == INSTRUCTION:
            raise DataError(
                f"{self.name!r} is an instruction dataset and has no labels; partition it by category "
                f"(fedit_epsilon), iid or presplit instead."
            )
        return [self.task.label(row) for row in self.train]

    def train_categories(self) -> list[str]:
        """Category of every train row (dolly); the input of the fedit_epsilon partitioner."""
        missing = sum("category" not in row for row in self.train)
        if missing:
            raise DataError(
                f"{missing} of {len(self.train)} train rows of {self.name!r} have no 'category'; "
                f"category partitioning needs an instruction dataset such as dolly."
            )
        return [row["category"] for row in self.train]
