"""Named datasets -> :class:`DatasetBundle` (train pool, test rows, task).

A name is looked up in this order: the local folder ``<data_dir>/<folder>`` when a data directory is
given and the folder exists; otherwise the Hugging Face hub through ``datasets.load_dataset``. Both
paths produce the same record schema (see ``tasks.py``), so nothing downstream knows where rows came
from. A path to a local csv/tsv/jsonl/json/parquet file is also accepted as a name (a classification
bundle built from its text and label columns).

Registered datasets (aliases in brackets):

* ``ag_news`` [fancyzhx/ag_news]: 4-way topic classification. Locally the train pool is the official
  ``train_first2000.csv`` plus ``train_sample5000_text_label.csv``, de-duplicated by cleaned text.
* ``financial_phrasebank`` [fpb, takala/financial_phrasebank]: train = test = all sentences; it is meant
  as an evaluation set (``test_name="financial_phrasebank"``). Option ``fpb_agree`` in 50/66/75/All.
* ``twitter_financial_news_sentiment`` [tfns, zeroshot/twitter-financial-news-sentiment]: labels are
  remapped to the shared sentiment order negative=0, neutral=1, positive=2.
* ``fingpt_sentiment`` [fingpt-sentiment]: train on TFNS, test on FPB (the FinGPT-Sentiment -> FPB setting).
* ``dolly`` [databricks/databricks-dolly-15k, dolly_15k]: instruction following; locally the FLoRA
  10-client split (``presplit_clients``) and its 80-row balanced global test. Without that split
  (only ``databricks-dolly-15k.jsonl.gz``, or the hub) ``holdout_per_category`` rows (default 10) of
  each category, drawn with ``holdout_seed`` (default 42), become the test set, as in FedIT/FLoRA;
  these two options are ignored when the split is present.
* ``mmlu`` [cais/mmlu]: 4-choice questions; test = all test rows, train = the 5 dev rows per subject.
  Option ``mmlu_subjects`` restricts the subjects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

from aflora.data.bundle import DatasetBundle
from aflora.data.readers import ag_news, dolly, financial_phrasebank, mmlu, twitter_financial
from aflora.data.readers.common import DatasetOption, HubUnavailable
from aflora.data.readers.local_file import FILE_OPTIONS, load_file
from aflora.data.sources import DATA_DIR_ENV, resolve_data_dir
from aflora.errors import ConfigError, DataError
from aflora.values import coerce

# ---------------------------------------------------------------------------------------------------
# public entry point


def load_bundle(name: str, *, data_dir: Path | None, test_name: str | None = None, **options) -> DatasetBundle:
    """Load a registered dataset (or a local file) into a :class:`DatasetBundle`.

    ``data_dir`` goes through :func:`resolve_data_dir`, so None falls back to ``$AFLORA_DATA_DIR``.
    ``test_name`` takes the test rows *and task* from another registered dataset (train on TFNS, test on
    FPB); both must share the task kind and label words. ``options`` are dataset-specific (see the module
    docstring); each must be accepted by the dataset or by the ``test_name`` dataset.
    """
    data_dir = resolve_data_dir(data_dir)
    test_dataset = _registered(test_name) if test_name is not None else None
    options = _typed_options(name, _accepted_options(name), test_dataset, options)
    bundle = _load_any(name, data_dir, options, test_elsewhere=test_dataset is not None)
    if test_dataset is None:
        return bundle
    return _with_test_from(bundle, test_dataset.load(data_dir, _options_for(test_dataset.options, options)))


def registered_names() -> list[str]:
    """Canonical names of the registered datasets."""
    return list(_REGISTRY)


def registered_datasets() -> list[RegisteredDataset]:
    """The registered datasets with their aliases, summaries and options (what `aflora list` shows)."""
    return list(_DATASETS)


# ---------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class RegisteredDataset:
    name: str
    aliases: tuple[str, ...]
    options: dict[str, DatasetOption]  # the keys of data.options this dataset understands
    load: Callable[[Path | None, dict], DatasetBundle]
    summary: str = ""


def _local_then_hub(folder: str, reader: ModuleType) -> Callable[[Path | None, dict], DatasetBundle]:
    """Loader that prefers ``<data_dir>/<folder>`` (``reader.load_local``) and falls back to the hub (``reader.load_hub``)."""
    hub_id, read_local, read_hub = reader.HUB_ID, reader.load_local, reader.load_hub

    def load(data_dir: Path | None, options: dict) -> DatasetBundle:
        local_folder = data_dir / folder if data_dir is not None else None
        if local_folder is not None and local_folder.is_dir():
            return read_local(local_folder, options)
        try:
            return read_hub(options)
        except HubUnavailable as error:
            where = f"no local folder at {str(local_folder)!r}" if local_folder else "no data directory was given"
            raise DataError(
                f"cannot load {folder!r}: {where}, and hub id {hub_id!r} could not be loaded (offline?): "
                f"{error}. Pass --data-dir or set {DATA_DIR_ENV} to a folder holding {folder}/."
            ) from error.__cause__

    return load


def _registered(name: str) -> RegisteredDataset:
    canonical = _ALIASES.get(name.strip().lower())
    if canonical is None:
        raise _unknown_dataset(name)
    return _REGISTRY[canonical]


def is_registered(name: str) -> bool:
    """Whether `name` is a registered dataset or one of its aliases (not a file path)."""
    return name.strip().lower() in _ALIASES


def _unknown_dataset(name: str) -> DataError:
    aliases = sorted(alias for alias in _ALIASES if alias not in _REGISTRY)
    as_file = f" There is no file at {str(Path(name).expanduser().absolute())!r} either." if Path(name).suffix else ""
    return DataError(
        f"unknown dataset {name!r}. Registered datasets: {', '.join(_REGISTRY)} (aliases: {', '.join(aliases)}); "
        f"a path to a local csv/tsv/jsonl/json/parquet file also works.{as_file}"
    )


def _accepted_options(name: str) -> dict[str, DatasetOption]:
    if is_registered(name):
        return _registered(name).options
    if Path(name).expanduser().is_file():
        return FILE_OPTIONS
    raise _unknown_dataset(name)


def _load_any(name: str, data_dir: Path | None, options: dict, *, test_elsewhere: bool) -> DatasetBundle:
    if is_registered(name):
        dataset = _registered(name)
        return dataset.load(data_dir, _options_for(dataset.options, options))
    return load_file(Path(name).expanduser(), _options_for(FILE_OPTIONS, options), test_elsewhere=test_elsewhere)


def _typed_options(name: str, accepted: dict[str, DatasetOption], test_dataset: RegisteredDataset | None,
                   options: dict) -> dict:
    """`options` checked against what the dataset (and the test dataset) understand, each coerced to its type the
    way every config value is (so `data.options.label_words=a,b` reads as `model.target_modules=a,b` does)."""
    accepted = {**accepted, **(test_dataset.options if test_dataset else {})}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(
            f"option(s) {', '.join(unknown)} are not understood by dataset {name!r}"
            + (f" or test dataset {test_dataset.name!r}" if test_dataset else "")
            + f". Accepted options: {', '.join(sorted(accepted)) or 'none'} (`aflora list` describes them)."
        )
    try:
        return {key: coerce(value, accepted[key].type, f"data.options.{key}") for key, value in options.items()}
    except ConfigError as error:
        raise DataError(str(error)) from None


def _options_for(accepted: Iterable[str], options: dict) -> dict:
    return {key: value for key, value in options.items() if key in accepted}


def _with_test_from(bundle: DatasetBundle, test_bundle: DatasetBundle) -> DatasetBundle:
    """``bundle`` evaluated on ``test_bundle``'s test rows with its task (prompts and label words)."""
    ours, theirs = bundle.task, test_bundle.task
    same_labels = [word.lower() for word in ours.label_words] == [word.lower() for word in theirs.label_words]
    if ours.kind != theirs.kind or not same_labels:
        raise DataError(
            f"cannot test {bundle.name!r} on {test_bundle.name!r}: the tasks differ "
            f"({ours.kind} with labels {ours.label_words} vs {theirs.kind} with labels {theirs.label_words}). "
            f"Pick a test dataset with the same task kind and label words in the same order."
        )
    return replace(
        bundle,
        task=theirs,
        test=test_bundle.test,
        source=f"train: {bundle.source}; test: {test_bundle.source}",
    )


# ---------------------------------------------------------------------------------------------------
# fingpt_sentiment: train on TFNS, test on FPB


def _fingpt_sentiment(data_dir: Path | None, options: dict) -> DatasetBundle:
    train_bundle = _REGISTRY["twitter_financial_news_sentiment"].load(data_dir, {})
    test_bundle = _REGISTRY["financial_phrasebank"].load(data_dir, options)
    return replace(_with_test_from(train_bundle, test_bundle), name="fingpt_sentiment")


# ---------------------------------------------------------------------------------------------------

FPB_AGREE = DatasetOption(str, "Annotator agreement of the sentences kept: 50, 66, 75 or All (default 50)")

_DATASETS = (
    RegisteredDataset("ag_news", ("fancyzhx/ag_news",), {}, _local_then_hub("ag_news", ag_news),
                      "news topics, 4 classes (World, Sports, Business, Technology)"),
    RegisteredDataset(
        "financial_phrasebank",
        ("fpb", financial_phrasebank.HUB_ID),
        {"fpb_agree": FPB_AGREE},
        _local_then_hub("financial_phrasebank", financial_phrasebank),
        "financial sentiment, 3 classes; an evaluation set (train = test)",
    ),
    RegisteredDataset(
        "twitter_financial_news_sentiment",
        ("tfns", twitter_financial.HUB_ID),
        {},
        _local_then_hub("twitter_financial_news_sentiment", twitter_financial),
        "financial tweets' sentiment, 3 classes",
    ),
    RegisteredDataset("fingpt_sentiment", ("fingpt-sentiment",), {"fpb_agree": FPB_AGREE}, _fingpt_sentiment,
                      "train on twitter_financial_news_sentiment, test on financial_phrasebank"),
    RegisteredDataset(
        "dolly",
        (dolly.HUB_ID, "dolly_15k", "databricks-dolly-15k"),
        {"holdout_per_category": DatasetOption(int, "Test rows held out per category when the FLoRA client split is "
                                                    "absent (default 10)"),
         "holdout_seed": DatasetOption(int, "Seed of that hold-out (default 42)")},
        _local_then_hub("dolly_15k", dolly),
        "instruction following (Dolly-15k), 8 categories; the FLoRA 10-client split where present",
    ),
    RegisteredDataset("mmlu", (mmlu.HUB_ID,), {"mmlu_subjects": DatasetOption(list[str], "Subjects kept (default: all)")},
                      _local_then_hub("mmlu", mmlu), "4-choice questions of 57 subjects; a benchmark (data.extra_eval)"),
)
_REGISTRY: dict[str, RegisteredDataset] = {dataset.name: dataset for dataset in _DATASETS}
_ALIASES: dict[str, str] = {
    alias.lower(): dataset.name for dataset in _DATASETS for alias in (dataset.name, *dataset.aliases)
}
