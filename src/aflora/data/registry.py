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

import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from aflora.data.sources import DATA_DIR_ENV, DataError, read_table, resolve_data_dir
from aflora.data.tasks import (
    AG_NEWS_LABEL_WORDS,
    INSTRUCTION,
    SENTIMENT_LABEL_WORDS,
    Task,
    classification_task,
    clean_news_text,
    format_multiple_choice,
    instruction_task,
    join_choices,
    multiple_choice_task,
    sentiment_task,
    topic_classification_task,
)


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
    _check_options(name, _accepted_options(name), test_dataset, options)
    bundle = _load_any(name, data_dir, options)
    if test_dataset is None:
        return bundle
    return _with_test_from(bundle, test_dataset.load(data_dir, _options_for(test_dataset.options, options)))


def registered_names() -> list[str]:
    """Canonical names of the registered datasets."""
    return list(_REGISTRY)


# ---------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class RegisteredDataset:
    name: str
    aliases: tuple[str, ...]
    options: tuple[str, ...]  # keyword options this dataset understands
    load: Callable[[Path | None, dict], DatasetBundle]


def _local_then_hub(
    folder: str,
    hub_id: str,
    read_local: Callable[[Path, dict], DatasetBundle],
    read_hub: Callable[[dict], DatasetBundle],
) -> Callable[[Path | None, dict], DatasetBundle]:
    """Loader that prefers ``<data_dir>/<folder>`` and falls back to the hub."""

    def load(data_dir: Path | None, options: dict) -> DatasetBundle:
        local_folder = data_dir / folder if data_dir is not None else None
        if local_folder is not None and local_folder.is_dir():
            return read_local(local_folder, options)
        try:
            return read_hub(options)
        except _HubUnavailable as error:
            where = f"no local folder at {str(local_folder)!r}" if local_folder else "no data directory was given"
            raise DataError(
                f"cannot load {folder!r}: {where}, and hub id {hub_id!r} could not be loaded (offline?): "
                f"{error}. Pass --data-dir or set {DATA_DIR_ENV} to a folder holding {folder}/."
            ) from error.__cause__

    return load


class _HubUnavailable(Exception):
    """``datasets.load_dataset`` failed; turned into a DataError that names the local folder too."""


def _hub_splits(hub_id: str, config: str | None = None):
    try:
        import datasets

        return datasets.load_dataset(hub_id, config)
    except Exception as error:  # datasets raises many types (connection, not found, offline mode...)
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise _HubUnavailable(f"{type(error).__name__}: {first_line}") from error


def _registered(name: str) -> RegisteredDataset:
    canonical = _ALIASES.get(name.strip().lower())
    if canonical is None:
        raise _unknown_dataset(name)
    return _REGISTRY[canonical]


def _is_registered(name: str) -> bool:
    return name.strip().lower() in _ALIASES


def _unknown_dataset(name: str) -> DataError:
    aliases = sorted(alias for alias in _ALIASES if alias not in _REGISTRY)
    as_file = f" There is no file at {str(Path(name).expanduser().absolute())!r} either." if Path(name).suffix else ""
    return DataError(
        f"unknown dataset {name!r}. Registered datasets: {', '.join(_REGISTRY)} (aliases: {', '.join(aliases)}); "
        f"a path to a local csv/tsv/jsonl/json/parquet file also works.{as_file}"
    )


def _accepted_options(name: str) -> tuple[str, ...]:
    if _is_registered(name):
        return _registered(name).options
    if Path(name).expanduser().is_file():
        return FILE_OPTIONS
    raise _unknown_dataset(name)


def _load_any(name: str, data_dir: Path | None, options: dict) -> DatasetBundle:
    if _is_registered(name):
        dataset = _registered(name)
        return dataset.load(data_dir, _options_for(dataset.options, options))
    return _file_bundle(Path(name).expanduser(), _options_for(FILE_OPTIONS, options))


def _check_options(name: str, accepted: Iterable[str], test_dataset: RegisteredDataset | None, options: dict) -> None:
    accepted = set(accepted) | set(test_dataset.options if test_dataset else ())
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(
            f"option(s) {', '.join(unknown)} are not understood by dataset {name!r}"
            + (f" or test dataset {test_dataset.name!r}" if test_dataset else "")
            + f". Accepted options: {', '.join(sorted(accepted)) or 'none'}."
        )


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
# shared row helpers


def _as_int(value, where: str) -> int:
    """'2', '2.0', 2.0 and 2 are all class 2 (the AG News sample stores labels as floats)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise DataError(f"{where}: label {value!r} is not a whole number.")
    return int(number)


def _class_index(value, label_words: Sequence[str], where: str) -> int:
    """A label given as a class index or as one of ``label_words`` (any case) -> checked class index."""
    if isinstance(value, str) and value.strip().lower() in [word.lower() for word in label_words]:
        return [word.lower() for word in label_words].index(value.strip().lower())
    try:
        index = _as_int(value, where)
    except DataError:
        raise DataError(
            f"{where}: label {value!r} is neither a class index 0-{len(label_words) - 1} "
            f"nor one of the label words {', '.join(label_words)}."
        ) from None
    if not 0 <= index < len(label_words):
        raise DataError(f"{where}: label {index} is outside 0-{len(label_words) - 1} ({', '.join(label_words)}).")
    return index


def _unique_by_text(rows: Iterable[dict]) -> list[dict]:
    """Keep the first row of each text (the AG News train subsets are overlapping random samples)."""
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row["text"] not in seen:
            seen.add(row["text"])
            unique.append(row)
    return unique


def _require_columns(
    rows: list[dict], columns: Sequence[str], where: str, how_to_fix: str = "see the data folder's SOURCE.md"
) -> None:
    found = list(rows[0]) if rows else []
    missing = [column for column in columns if column not in found]
    if missing:
        raise DataError(
            f"{where} has no column(s) {', '.join(map(repr, missing))}; columns found: {', '.join(found) or 'none'}. "
            f"Expected {', '.join(columns)}: {how_to_fix}."
        )


def _split_rows(splits, name: str, hub_id: str) -> list[dict]:
    if name not in splits:
        raise DataError(
            f"hub dataset {hub_id} has no {name!r} split (found {', '.join(splits)}); its layout may have changed. "
            f"Use a local copy instead (--data-dir or {DATA_DIR_ENV})."
        )
    return list(splits[name])


# ---------------------------------------------------------------------------------------------------
# ag_news

AG_NEWS_HUB_ID = "fancyzhx/ag_news"
AG_NEWS_COLUMNS = ["class", "title", "description"]  # the official files have no header
AG_NEWS_TRAIN_FILES = ("train_first2000.csv", "train_sample5000_text_label.csv")


def _ag_news_task() -> Task:
    return topic_classification_task(AG_NEWS_LABEL_WORDS)


def _ag_news_row(text: str, label: int) -> dict:
    return {"text": clean_news_text(text), "label": label}


def _read_ag_news_official(path: Path) -> list[dict]:
    """Official format: class 1-4, title, description; text = title + ' ' + description."""
    rows = []
    for line, row in enumerate(read_table(path, columns=AG_NEWS_COLUMNS), start=1):
        where = f"{path} row {line}"
        label = _class_index(_as_int(row["class"], where) - 1, AG_NEWS_LABEL_WORDS, where)
        rows.append(_ag_news_row(f"{row['title']} {row['description']}", label))
    return rows


def _read_ag_news_text_label(path: Path) -> list[dict]:
    table = read_table(path)
    _require_columns(table, ["text", "label"], str(path))
    return [
        _ag_news_row(row["text"], _class_index(row["label"], AG_NEWS_LABEL_WORDS, f"{path} row {line_number}"))
        for line_number, row in enumerate(table, start=1)
    ]


def _ag_news_local(folder: Path, options: dict) -> DatasetBundle:
    # the description-only tsv is ignored: without titles its rows are a different input distribution
    first_rows, sample_file = folder / AG_NEWS_TRAIN_FILES[0], folder / AG_NEWS_TRAIN_FILES[1]
    train = _unique_by_text(_read_ag_news_official(first_rows) + _read_ag_news_text_label(sample_file))
    return DatasetBundle(
        name="ag_news",
        task=_ag_news_task(),
        train=train,
        test=_read_ag_news_official(folder / "test.csv"),
        source=f"local {folder}: train = {' + '.join(AG_NEWS_TRAIN_FILES)} (de-duplicated), test = test.csv",
    )


def _ag_news_hub(options: dict) -> DatasetBundle:
    splits = _hub_splits(AG_NEWS_HUB_ID)

    def rows(split: str) -> list[dict]:
        where = f"{AG_NEWS_HUB_ID} {split}"
        return [
            _ag_news_row(row["text"], _class_index(row["label"], AG_NEWS_LABEL_WORDS, where))
            for row in _split_rows(splits, split, AG_NEWS_HUB_ID)
        ]

    return DatasetBundle(
        name="ag_news", task=_ag_news_task(), train=rows("train"), test=rows("test"), source=f"hub {AG_NEWS_HUB_ID}"
    )


# ---------------------------------------------------------------------------------------------------
# financial_phrasebank

FPB_HUB_ID = "takala/financial_phrasebank"
FPB_AGREEMENT_LEVELS = ("50", "66", "75", "All")
FPB_LABELS = {"negative": 0, "neutral": 1, "positive": 2}  # = sentiment_task's label order


def _fpb_agreement(options: dict) -> str:
    agree = str(options.get("fpb_agree", "50")).strip()
    for level in FPB_AGREEMENT_LEVELS:
        if agree.lower() == level.lower():
            return level
    raise DataError(
        f"fpb_agree={agree!r} is not an annotator-agreement level of Financial PhraseBank; "
        f"expected one of {', '.join(FPB_AGREEMENT_LEVELS)} (file Sentences_<level>Agree.txt)."
    )


def _read_fpb_sentences(path: Path) -> list[dict]:
    """``sentence@label`` lines in latin-1; the label follows the *last* '@' (sentences may contain '@')."""
    if not path.is_file():
        raise DataError(
            f"no Financial PhraseBank file at {str(path)!r}; expected Sentences_<50|66|75|All>Agree.txt "
            f"(latin-1, one 'sentence@label' per line). Check --data-dir or the fpb_agree option."
        )
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        sentence, separator, label = line.rpartition("@")
        if not separator or label.strip() not in FPB_LABELS:
            raise DataError(
                f"{path} line {line_number} is not 'sentence@label' with label in {', '.join(FPB_LABELS)}: "
                f"{line[:80]!r}."
            )
        rows.append({"text": sentence.strip(), "label": FPB_LABELS[label.strip()]})
    return rows


def _fpb_bundle(rows: list[dict], source: str) -> DatasetBundle:
    # FPB is an evaluation set in this project; train = test keeps it usable as either side
    return DatasetBundle(name="financial_phrasebank", task=sentiment_task(), train=rows, test=rows, source=source)


def _fpb_local(folder: Path, options: dict) -> DatasetBundle:
    path = folder / f"Sentences_{_fpb_agreement(options)}Agree.txt"
    return _fpb_bundle(_read_fpb_sentences(path), source=f"local {path}")


def _fpb_hub(options: dict) -> DatasetBundle:
    config = f"sentences_{_fpb_agreement(options).lower()}agree"
    splits = _hub_splits(FPB_HUB_ID, config)
    rows = [
        {"text": row["sentence"], "label": _class_index(row["label"], SENTIMENT_LABEL_WORDS, FPB_HUB_ID)}
        for row in _split_rows(splits, "train", FPB_HUB_ID)
    ]
    return _fpb_bundle(rows, source=f"hub {FPB_HUB_ID} ({config})")


# ---------------------------------------------------------------------------------------------------
# twitter_financial_news_sentiment

TFNS_HUB_ID = "zeroshot/twitter-financial-news-sentiment"
TFNS_TO_SENTIMENT = {0: 0, 1: 2, 2: 1}  # Bearish -> negative, Bullish -> positive, Neutral -> neutral


def _tfns_row(text: str, tfns_label, where: str) -> dict:
    label = _as_int(tfns_label, where)
    if label not in TFNS_TO_SENTIMENT:
        raise DataError(f"{where}: TFNS label {tfns_label!r} is not 0 (Bearish), 1 (Bullish) or 2 (Neutral).")
    return {"text": text, "label": TFNS_TO_SENTIMENT[label]}


def _read_tfns(path: Path) -> list[dict]:
    table = read_table(path)
    _require_columns(table, ["text", "label"], str(path))
    return [_tfns_row(row["text"], row["label"], f"{path} row {line}") for line, row in enumerate(table, start=1)]


def _tfns_local(folder: Path, options: dict) -> DatasetBundle:
    return DatasetBundle(
        name="twitter_financial_news_sentiment",
        task=sentiment_task(),
        train=_read_tfns(folder / "sent_train.csv"),
        test=_read_tfns(folder / "sent_valid.csv"),
        source=f"local {folder}: train = sent_train.csv, test = sent_valid.csv",
    )


def _tfns_hub(options: dict) -> DatasetBundle:
    splits = _hub_splits(TFNS_HUB_ID)

    def rows(split: str) -> list[dict]:
        where = f"{TFNS_HUB_ID} {split}"
        return [_tfns_row(row["text"], row["label"], where) for row in _split_rows(splits, split, TFNS_HUB_ID)]

    return DatasetBundle(
        name="twitter_financial_news_sentiment",
        task=sentiment_task(),
        train=rows("train"),
        test=rows("validation"),
        source=f"hub {TFNS_HUB_ID} (train / validation)",
    )


# ---------------------------------------------------------------------------------------------------
# fingpt_sentiment: train on TFNS, test on FPB


def _fingpt_sentiment(data_dir: Path | None, options: dict) -> DatasetBundle:
    train_bundle = _REGISTRY["twitter_financial_news_sentiment"].load(data_dir, {})
    test_bundle = _REGISTRY["financial_phrasebank"].load(data_dir, options)
    return replace(_with_test_from(train_bundle, test_bundle), name="fingpt_sentiment")


# ---------------------------------------------------------------------------------------------------
# dolly

DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
DOLLY_FIELDS = ("instruction", "context", "response", "category")
DOLLY_SPLIT_FOLDER = "flora_split_10clients"
DOLLY_FULL_FILE = "databricks-dolly-15k.jsonl.gz"


def _dolly_row(row: dict, where: str) -> dict:
    missing = [name for name in DOLLY_FIELDS if name not in row]
    if missing:
        raise DataError(
            f"{where}: a Dolly record lacks {', '.join(missing)}; expected fields {', '.join(DOLLY_FIELDS)}."
        )
    return {name: str(row[name] or "") for name in DOLLY_FIELDS}


def _read_dolly(path: Path) -> list[dict]:
    return [_dolly_row(row, f"{path} row {line}") for line, row in enumerate(read_table(path), start=1)]


def _client_files(split_dir: Path) -> list[Path]:
    """local_training_0.json, local_training_1.json, ... in client order (numeric, not lexical)."""
    numbered = ((path.stem.rsplit("_", 1)[1], path) for path in split_dir.glob("local_training_*.json"))
    files = {int(number): path for number, path in numbered if number.isdigit()}
    if not files or sorted(files) != list(range(len(files))):
        raise DataError(
            f"{split_dir} should hold local_training_0.json ... local_training_<n-1>.json; "
            f"found client numbers {sorted(files)}. Restore the missing files."
        )
    return [files[client] for client in range(len(files))]


def _dolly_presplit(split_dir: Path) -> DatasetBundle:
    train: list[dict] = []
    clients: list[list[int]] = []
    for path in _client_files(split_dir):
        rows = _read_dolly(path)
        clients.append(list(range(len(train), len(train) + len(rows))))
        train.extend(rows)
    test = _read_dolly(split_dir / "global_test.json")
    return DatasetBundle(
        name="dolly",
        task=instruction_task(),
        train=train,
        test=test,
        source=f"local {split_dir}: train = local_training_0..{len(clients) - 1}.json (FLoRA split), "
        "test = global_test.json",
        extra_eval={"heldout": test},
        presplit_clients=clients,
    )


def hold_out_per_category(rows: list[dict], *, per_category: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): ``per_category`` random rows of every category go to test, like FedIT/FLoRA's global test."""
    by_category: dict[str, list[int]] = defaultdict(list)
    for position, row in enumerate(rows):
        by_category[row["category"]].append(position)
    rng = random.Random(seed)
    held_out: set[int] = set()
    for category in sorted(by_category):
        positions = by_category[category]
        if len(positions) <= per_category:
            raise DataError(
                f"category {category!r} has only {len(positions)} rows, cannot hold out {per_category} for testing "
                f"and keep some for training. Lower holdout_per_category."
            )
        held_out.update(rng.sample(positions, per_category))
    train = [row for position, row in enumerate(rows) if position not in held_out]
    test = [row for position, row in enumerate(rows) if position in held_out]
    return train, test


def _dolly_unsplit(rows: list[dict], options: dict, source: str) -> DatasetBundle:
    per_category = int(options.get("holdout_per_category", 10))
    train, test = hold_out_per_category(rows, per_category=per_category, seed=int(options.get("holdout_seed", 42)))
    return DatasetBundle(
        name="dolly",
        task=instruction_task(),
        train=train,
        test=test,
        source=f"{source} ({per_category} rows per category held out as test)",
        extra_eval={"heldout": test},
    )


def _dolly_local(folder: Path, options: dict) -> DatasetBundle:
    split_dir = folder / DOLLY_SPLIT_FOLDER
    if split_dir.is_dir():
        return _dolly_presplit(split_dir)
    full_file = folder / DOLLY_FULL_FILE
    if not full_file.is_file():
        raise DataError(
            f"{folder} holds neither {DOLLY_SPLIT_FOLDER}/ (the FLoRA client split) nor {DOLLY_FULL_FILE}; "
            f"put one of them there (see the data folder's SOURCE.md)."
        )
    return _dolly_unsplit(_read_dolly(full_file), options, source=f"local {full_file}")


def _dolly_hub(options: dict) -> DatasetBundle:
    splits = _hub_splits(DOLLY_HUB_ID)
    rows = [_dolly_row(row, DOLLY_HUB_ID) for row in _split_rows(splits, "train", DOLLY_HUB_ID)]
    return _dolly_unsplit(rows, options, source=f"hub {DOLLY_HUB_ID}")


# ---------------------------------------------------------------------------------------------------
# mmlu

MMLU_HUB_ID = "cais/mmlu"
MMLU_CHOICE_COLUMNS = ["choice0", "choice1", "choice2", "choice3"]


def _mmlu_row(question: str, choices: Sequence[str], answer, subject: str, where: str) -> dict:
    return {
        "text": format_multiple_choice(question, choices),
        "label": _class_index(answer, ("A", "B", "C", "D"), where),
        "subject": subject,
    }


def _wanted_subjects(options: dict, available: Iterable[str]) -> list[str]:
    available = sorted(set(available))
    wanted = options.get("mmlu_subjects")
    if wanted is None:
        return available
    if isinstance(wanted, str):
        wanted = [subject.strip() for subject in wanted.split(",") if subject.strip()]
    unknown = sorted(set(wanted) - set(available))
    if unknown or not wanted:
        raise DataError(
            f"mmlu_subjects names unknown subject(s) {', '.join(unknown) or '(none given)'}; "
            f"available: {', '.join(available)}."
        )
    return sorted(set(wanted))


def _read_mmlu_split(split_dir: Path, options: dict) -> list[dict]:
    """All ``<subject>_<split>.csv`` files (header question,choice0..3,answer with answer 0-3)."""
    files = {path.stem.rsplit("_", 1)[0]: path for path in split_dir.glob("*.csv")}
    if not files:
        raise DataError(f"no <subject>_{split_dir.name}.csv files in {split_dir}; see the mmlu folder's SOURCE.md.")
    rows = []
    for subject in _wanted_subjects(options, files):
        table = read_table(files[subject])
        _require_columns(table, ["question", *MMLU_CHOICE_COLUMNS, "answer"], str(files[subject]))
        for line, row in enumerate(table, start=1):
            choices = [row[column] for column in MMLU_CHOICE_COLUMNS]
            rows.append(_mmlu_row(row["question"], choices, row["answer"], subject, f"{files[subject]} row {line}"))
    return rows


def _mmlu_local(folder: Path, options: dict) -> DatasetBundle:
    return DatasetBundle(
        name="mmlu",
        task=multiple_choice_task(),
        train=_read_mmlu_split(folder / "dev", options),
        test=_read_mmlu_split(folder / "test", options),
        source=f"local {folder}: train = dev/*.csv, test = test/*.csv",
    )


def _mmlu_hub(options: dict) -> DatasetBundle:
    splits = _hub_splits(MMLU_HUB_ID, "all")

    def rows(split: str) -> list[dict]:
        hub_rows = _split_rows(splits, split, MMLU_HUB_ID)
        subjects = set(_wanted_subjects(options, (row["subject"] for row in hub_rows)))
        return [
            _mmlu_row(row["question"], row["choices"], row["answer"], row["subject"], f"{MMLU_HUB_ID} {split}")
            for row in hub_rows
            if row["subject"] in subjects
        ]

    return DatasetBundle(
        name="mmlu",
        task=multiple_choice_task(),
        train=rows("dev"),
        test=rows("test"),
        source=f"hub {MMLU_HUB_ID} (all)",
    )


# ---------------------------------------------------------------------------------------------------
# a local file as a classification dataset

FILE_OPTIONS = ("text_column", "label_column", "label_words", "test_path", "instruction")


def _file_bundle(path: Path, options: dict) -> DatasetBundle:
    label_words = options.get("label_words")
    if not label_words or isinstance(label_words, str) or len(label_words) < 2:
        raise DataError(
            f"loading {str(path)!r} as a classification dataset needs label_words=[...] (at least two, "
            f"in class-index order), got {label_words!r}."
        )
    test_path = options.get("test_path")
    if test_path is None:
        raise DataError(
            f"{str(path)!r} has no test rows: pass test_path='...' (a file with the same columns) "
            f"or test_name=<registered dataset with the same labels>."
        )
    text_column, label_column = options.get("text_column", "text"), options.get("label_column", "label")
    instruction = options.get("instruction") or f"Classify this text as {join_choices(label_words)}."
    return DatasetBundle(
        name=path.stem,
        task=classification_task(
            f"{path.stem}_classification", label_words, instruction=instruction, text_heading="Text"
        ),
        train=_read_labelled_file(path, text_column, label_column, label_words),
        test=_read_labelled_file(Path(test_path).expanduser(), text_column, label_column, label_words),
        source=f"local files: train = {path}, test = {test_path}",
    )


def _read_labelled_file(path: Path, text_column: str, label_column: str, label_words: Sequence[str]) -> list[dict]:
    table = read_table(path)
    _require_columns(
        table, [text_column, label_column], str(path), "name the right ones with text_column=, label_column="
    )
    return [
        {"text": str(row[text_column]), "label": _class_index(row[label_column], label_words, f"{path} row {line}")}
        for line, row in enumerate(table, start=1)
    ]


# ---------------------------------------------------------------------------------------------------

_DATASETS = (
    RegisteredDataset(
        "ag_news", ("fancyzhx/ag_news",), (), _local_then_hub("ag_news", AG_NEWS_HUB_ID, _ag_news_local, _ag_news_hub)
    ),
    RegisteredDataset(
        "financial_phrasebank",
        ("fpb", FPB_HUB_ID),
        ("fpb_agree",),
        _local_then_hub("financial_phrasebank", FPB_HUB_ID, _fpb_local, _fpb_hub),
    ),
    RegisteredDataset(
        "twitter_financial_news_sentiment",
        ("tfns", TFNS_HUB_ID),
        (),
        _local_then_hub("twitter_financial_news_sentiment", TFNS_HUB_ID, _tfns_local, _tfns_hub),
    ),
    RegisteredDataset("fingpt_sentiment", ("fingpt-sentiment",), ("fpb_agree",), _fingpt_sentiment),
    RegisteredDataset(
        "dolly",
        (DOLLY_HUB_ID, "dolly_15k", "databricks-dolly-15k"),
        ("holdout_per_category", "holdout_seed"),
        _local_then_hub("dolly_15k", DOLLY_HUB_ID, _dolly_local, _dolly_hub),
    ),
    RegisteredDataset(
        "mmlu", (MMLU_HUB_ID,), ("mmlu_subjects",), _local_then_hub("mmlu", MMLU_HUB_ID, _mmlu_local, _mmlu_hub)
    ),
)
_REGISTRY: dict[str, RegisteredDataset] = {dataset.name: dataset for dataset in _DATASETS}
_ALIASES: dict[str, str] = {
    alias.lower(): dataset.name for dataset in _DATASETS for alias in (dataset.name, *dataset.aliases)
}
