"""Data layer: read datasets into uniform records, turn records into prompts, split rows over clients.

The way data flows: :func:`load_bundle` (registry, which picks a reader) -> :func:`split_public` and a partitioner
(partition) -> per-client rows -> :class:`Task` prompts and responses (tasks).
"""

from aflora.data.bundle import DatasetBundle
from aflora.data.partition import (
    PARTITION_SCHEMES,
    partition,
    partition_dirichlet,
    partition_fedit_epsilon,
    partition_iid,
    partition_k_labels,
    partition_presplit,
    split_public,
)
from aflora.data.readers.dolly import hold_out_per_category
from aflora.data.registry import is_registered, load_bundle, registered_names
from aflora.data.sources import DATA_DIR_ENV, DataError, read_table, resolve_data_dir
from aflora.data.tasks import (
    AG_NEWS_LABEL_WORDS,
    CLASSIFICATION,
    INSTRUCTION,
    MULTIPLE_CHOICE,
    SENTIMENT_LABEL_WORDS,
    Task,
    classification_task,
    clean_news_text,
    format_multiple_choice,
    instruction_task,
    multiple_choice_task,
    sentiment_task,
    topic_classification_task,
)

__all__ = [
    "AG_NEWS_LABEL_WORDS",
    "CLASSIFICATION",
    "DATA_DIR_ENV",
    "DataError",
    "DatasetBundle",
    "INSTRUCTION",
    "MULTIPLE_CHOICE",
    "PARTITION_SCHEMES",
    "SENTIMENT_LABEL_WORDS",
    "Task",
    "classification_task",
    "clean_news_text",
    "format_multiple_choice",
    "hold_out_per_category",
    "instruction_task",
    "is_registered",
    "load_bundle",
    "multiple_choice_task",
    "partition",
    "partition_dirichlet",
    "partition_fedit_epsilon",
    "partition_iid",
    "partition_k_labels",
    "partition_presplit",
    "read_table",
    "registered_names",
    "resolve_data_dir",
    "sentiment_task",
    "split_public",
    "topic_classification_task",
]
