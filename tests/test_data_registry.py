"""Task prompts, named datasets (real local files when present, a faked hub otherwise) and local files."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from aflora.data import (
    AG_NEWS_LABEL_WORDS,
    DATA_DIR_ENV,
    DataError,
    clean_news_text,
    format_multiple_choice,
    instruction_task,
    load_bundle,
    multiple_choice_task,
    registered_names,
    sentiment_task,
    topic_classification_task,
)
from aflora.hub import OFFLINE_VARIABLES

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("AFLORA_TEST_DATA_DIR") or REPO.parent / "shared" / "data")
needs_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no real data at {REAL_DATA}")


@pytest.fixture(autouse=True)
def no_data_dir_from_environment(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


# ---------------------------------------------------------------------------------------------------
# tasks


def test_ag_news_prompt_is_the_measured_one():
    task = topic_classification_task(AG_NEWS_LABEL_WORDS)
    assert task.prompt({"text": "Stocks rise.", "label": 2}) == (
        "Classify the topic of this news article as World, Sports, Business or Technology.\n\n"
        "Article: Stocks rise.\n\nAnswer with one word."
    )


def test_label_words_map_to_labels_both_ways():
    task = sentiment_task()
    assert task.label_words == ("negative", "neutral", "positive")
    for label, word in enumerate(task.label_words):
        assert task.response({"text": "x", "label": label}) == word
        assert task.label({"text": "x", "label": label}) == label
        assert task.label_for_word(f"  {word.upper()} ") == label
    with pytest.raises(DataError, match="expected one of negative, neutral, positive"):
        task.label_for_word("bullish")


def test_sentiment_prompt_puts_text_before_the_question():
    prompt = sentiment_task().prompt({"text": "Profit fell {sharply}.", "label": 0})
    assert prompt.index("Text: Profit fell {sharply}.") < prompt.index("Answer with one word.")
    assert "financial" in prompt and "negative, neutral or positive" in prompt


def test_instruction_prompt_adds_context_only_when_present():
    task = instruction_task()
    record = {"instruction": "Summarise.", "context": "Long text.", "response": "Short.", "category": "summarization"}
    assert task.prompt(record) == "Summarise.\n\nContext: Long text."
    assert task.prompt({**record, "context": "  "}) == "Summarise."
    assert task.response(record) == "Short." and task.label(record) is None and task.label_words == ()


def test_multiple_choice_prompt_shows_lettered_choices():
    text = format_multiple_choice("2 + 2 = ?", ["3", "4", "5", "22"])
    assert text == "2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 22"
    task = multiple_choice_task()
    assert task.label_words == ("A", "B", "C", "D")
    assert text in task.prompt({"text": text, "label": 1}) and task.response({"text": text, "label": 1}) == "B"


def test_ag_news_escapes_are_cleaned():
    raw = "Wall St.\\band of #39;bears#39; #36;10 quot;wins quot; Johnson  amp; Johnson   up"
    assert clean_news_text(raw) == "Wall St. band of 'bears' $10 \"wins \" Johnson & Johnson up"


# ---------------------------------------------------------------------------------------------------
# real local datasets (counts from each folder's SOURCE.md or recomputed here with the csv module)


def clean_independently(text: str) -> str:
    text = text.replace("#39;", "'").replace("#36;", "$").replace("quot;", '"').replace("\\", " ")
    return " ".join(text.replace(" amp;", " &").split())


@needs_real_data
def test_ag_news_local():
    folder = REAL_DATA / "ag_news"
    with open(folder / "train_first2000.csv", newline="") as stream:
        first = [(clean_independently(f"{r[1]} {r[2]}"), int(r[0]) - 1) for r in csv.reader(stream)]
    with open(folder / "train_sample5000_text_label.csv", newline="") as stream:
        sample = [(clean_independently(r["text"]), int(float(r["label"]))) for r in csv.DictReader(stream)]
    expected_pool = list(dict(reversed(first + sample)).items())

    bundle = load_bundle("fancyzhx/ag_news", data_dir=REAL_DATA)
    assert bundle.name == "ag_news" and bundle.task.label_words == AG_NEWS_LABEL_WORDS
    assert len(bundle.train) == len(expected_pool) < 7000
    assert {(row["text"], row["label"]) for row in bundle.train} == set(expected_pool)
    assert [row["text"] for row in bundle.train[:2]] == [first[0][0], first[1][0]]  # keeps first occurrence order
    assert len(bundle.test) == 7600 and Counter(row["label"] for row in bundle.test) == {
        0: 1900,
        1: 1900,
        2: 1900,
        3: 1900,
    }
    assert not any(re.search(r"#39;|quot;|\\|  ", row["text"]) for row in bundle.train + bundle.test)


@needs_real_data
def test_twitter_financial_news_sentiment_is_remapped_to_shared_order():
    bundle = load_bundle("tfns", data_dir=REAL_DATA)
    assert (len(bundle.train), len(bundle.test)) == (9543, 2388)
    assert Counter(row["label"] for row in bundle.train) == {0: 1442, 1: 6178, 2: 1923}
    assert Counter(row["label"] for row in bundle.test) == {0: 347, 1: 1566, 2: 475}
    assert bundle.task.label_words == ("negative", "neutral", "positive")
    with open(REAL_DATA / "twitter_financial_news_sentiment" / "sent_train.csv", newline="") as stream:
        first = next(csv.DictReader(stream))
    assert bundle.train[0]["text"] == first["text"] and first["label"] == "0" and bundle.train[0]["label"] == 0


@needs_real_data
@pytest.mark.parametrize(
    "agree, counts",
    [("50", (604, 2879, 1363)), ("66", (514, 2535, 1168)), ("75", (420, 2146, 887)), ("All", (303, 1391, 570))],
)
def test_financial_phrasebank_agreement_levels(agree, counts):
    bundle = load_bundle("financial_phrasebank", data_dir=REAL_DATA, fpb_agree=agree)
    assert len(bundle.test) == sum(counts) and bundle.train == bundle.test
    assert Counter(row["label"] for row in bundle.test) == dict(enumerate(counts))
    assert not any(row["text"].endswith(("@neutral", "@positive", "@negative")) for row in bundle.test)


@needs_real_data
def test_fingpt_sentiment_trains_on_tfns_and_tests_on_fpb():
    bundle = load_bundle("fingpt_sentiment", data_dir=REAL_DATA)
    assert bundle.name == "fingpt_sentiment" and (len(bundle.train), len(bundle.test)) == (9543, 4846)
    via_test_name = load_bundle("tfns", data_dir=REAL_DATA, test_name="fpb", fpb_agree="All")
    assert len(via_test_name.test) == 2264 and "Sentences_AllAgree" in via_test_name.source


@needs_real_data
def test_test_name_with_other_labels_is_refused():
    with pytest.raises(DataError, match="tasks differ"):
        load_bundle("ag_news", data_dir=REAL_DATA, test_name="financial_phrasebank")


@needs_real_data
def test_dolly_flora_split():
    bundle = load_bundle("databricks/databricks-dolly-15k", data_dir=REAL_DATA)
    sizes = [len(client) for client in bundle.presplit_clients]
    assert sizes == [1820, 2831, 1773, 1299, 2253, 565, 1518, 896, 1533, 443]
    assert (len(bundle.train), len(bundle.test)) == (14931, 80)
    assert [index for client in bundle.presplit_clients for index in client] == list(range(14931))
    assert Counter(row["category"] for row in bundle.test) == dict.fromkeys(set(bundle.train_categories()), 10)
    assert bundle.extra_eval == {"heldout": bundle.test}
    assert all(set(row) == {"instruction", "context", "response", "category"} for row in bundle.train)
    with open(REAL_DATA / "dolly_15k" / "flora_split_10clients" / "local_training_9.json") as stream:
        last_client = json.load(stream)
    assert [bundle.train[i]["instruction"] for i in bundle.presplit_clients[9]] == [
        r["instruction"] for r in last_client
    ]


@needs_real_data
def test_mmlu_local():
    bundle = load_bundle("cais/mmlu", data_dir=REAL_DATA)
    assert (len(bundle.test), len(bundle.train)) == (14042, 285)
    assert Counter(row["label"] for row in bundle.test) == {0: 3222, 1: 3462, 2: 3582, 3: 3776}
    assert len({row["subject"] for row in bundle.test}) == 57
    with open(REAL_DATA / "mmlu" / "test" / "anatomy_test.csv", newline="") as stream:
        anatomy = list(csv.DictReader(stream))
    only_anatomy = load_bundle("mmlu", data_dir=REAL_DATA, mmlu_subjects=["anatomy"])
    assert len(only_anatomy.test) == len(anatomy) and len(only_anatomy.train) == 5
    first = only_anatomy.test[0]
    assert first["text"].startswith(anatomy[0]["question"]) and f"\nD. {anatomy[0]['choice3']}" in first["text"]
    assert first["label"] == int(anatomy[0]["answer"])
    with pytest.raises(DataError, match="unknown subject.*astrology"):
        load_bundle("mmlu", data_dir=REAL_DATA, mmlu_subjects=["anatomy", "astrology"])


# ---------------------------------------------------------------------------------------------------
# dolly without the FLoRA split, and the hub path (faked: the hub is unreachable in tests)


def dolly_rows(per_category=15):
    return [
        {"instruction": f"q{c}{i}", "context": "", "response": f"a{c}{i}", "category": f"cat{c}"}
        for c in range(3)
        for i in range(per_category)
    ]


def test_dolly_from_the_full_jsonl_holds_out_rows_per_category(tmp_path):
    folder = tmp_path / "dolly_15k"
    folder.mkdir()
    with gzip.open(folder / "databricks-dolly-15k.jsonl.gz", "wt", encoding="utf-8") as stream:
        stream.write("\n".join(json.dumps(row) for row in dolly_rows()))
    bundle = load_bundle("dolly", data_dir=tmp_path, holdout_per_category=2)
    assert bundle.presplit_clients is None and (len(bundle.train), len(bundle.test)) == (39, 6)
    assert Counter(row["category"] for row in bundle.test) == {"cat0": 2, "cat1": 2, "cat2": 2}
    assert not {row["instruction"] for row in bundle.test} & {row["instruction"] for row in bundle.train}


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset with a dict of splits per (hub id, config); record the calls."""
    import datasets

    calls, splits_by_id = [], {}

    def load_dataset(hub_id, config=None, **kwargs):
        calls.append((hub_id, config))
        if hub_id not in splits_by_id:
            raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub (LocalEntryNotFoundError)")
        return splits_by_id[hub_id]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr("aflora.hub.hub_unreachable_reason", lambda: None)  # this hub always answers
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return splits_by_id, calls


def test_an_unreachable_hub_fails_at_once_without_asking(monkeypatch):
    """Offline, `datasets` would retry for ~25 s per dataset: the reachability check answers first."""
    import datasets

    def never(*args, **kwargs):
        raise AssertionError("the hub must not be asked when it cannot be reached")

    monkeypatch.setattr(datasets, "load_dataset", never)
    monkeypatch.setattr("aflora.hub.hub_unreachable_reason", lambda: "huggingface.co:443 cannot be reached (test)")
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DataError, match="cannot be reached .test.*HF_HUB_OFFLINE=1.*--data-dir"):
        load_bundle("ag_news", data_dir=None)


def test_hub_failure_says_what_was_tried_and_how_to_fix(fake_hub, tmp_path):
    with pytest.raises(DataError) as error:
        load_bundle("ag_news", data_dir=tmp_path)
    message = str(error.value)
    assert f"no local folder at {str(tmp_path / 'ag_news')!r}" in message
    assert "'fancyzhx/ag_news' could not be loaded (offline?)" in message
    assert "--data-dir" in message and DATA_DIR_ENV in message
    with pytest.raises(DataError, match="no data directory was given"):
        load_bundle("mmlu", data_dir=None)


def test_hub_rows_are_mapped_to_the_same_schema(fake_hub):
    splits, calls = fake_hub
    splits["fancyzhx/ag_news"] = {"train": [{"text": "a #39;b", "label": 3}], "test": [{"text": "c", "label": 0}]}
    splits["zeroshot/twitter-financial-news-sentiment"] = {
        "train": [{"text": "bear", "label": 0}, {"text": "bull", "label": 1}, {"text": "flat", "label": 2}],
        "validation": [{"text": "bull", "label": 1}],
    }
    splits["takala/financial_phrasebank"] = {"train": [{"sentence": "up", "label": 2}]}
    splits["cais/mmlu"] = {
        split: [
            {"question": "q1", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 3},
            {"question": "q2", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 0},
        ]
        for split in ("dev", "test")
    }
    splits["databricks/databricks-dolly-15k"] = {"train": dolly_rows()}

    assert load_bundle("ag_news", data_dir=None).train == [{"text": "a 'b", "label": 3}]
    assert [row["label"] for row in load_bundle("tfns", data_dir=None).train] == [0, 2, 1]
    assert load_bundle("fpb", data_dir=None, fpb_agree="75").test == [{"text": "up", "label": 2}]
    assert ("takala/financial_phrasebank", "sentences_75agree") in calls
    mmlu = load_bundle("mmlu", data_dir=None, mmlu_subjects="virology")
    assert mmlu.test == [{"text": "q2\nA. a\nB. b\nC. c\nD. d", "label": 0, "subject": "virology"}]
    dolly = load_bundle("dolly", data_dir=None)
    assert (len(dolly.train), len(dolly.test)) == (15, 30) and dolly.extra_eval == {"heldout": dolly.test}


# ---------------------------------------------------------------------------------------------------
# a local file as a dataset, and name / option errors


def write_labelled_csv(path, rows):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["sentence", "sentiment"])
        writer.writerows(rows)
    return path


def test_local_file_bundle_accepts_words_and_indices(tmp_path):
    train = write_labelled_csv(tmp_path / "train.csv", [("good", "Positive"), ("bad", "0"), ("meh", "neutral")])
    test = write_labelled_csv(tmp_path / "test.csv", [("fine", "2.0")])
    bundle = load_bundle(
        str(train),
        data_dir=None,
        text_column="sentence",
        label_column="sentiment",
        label_words=["negative", "neutral", "positive"],
        test_path=str(test),
    )
    assert bundle.task.kind == "classification"
    assert [row["label"] for row in bundle.train] == [2, 0, 1] and bundle.test == [{"text": "fine", "label": 2}]
    assert bundle.task.prompt(bundle.test[0]).index("fine") < bundle.task.prompt(bundle.test[0]).index("Answer")


def test_local_file_bundle_errors(tmp_path):
    train = write_labelled_csv(tmp_path / "train.csv", [("good", "great")])
    words = ["negative", "positive"]
    with pytest.raises(DataError, match="columns found: sentence, sentiment"):
        load_bundle(str(train), data_dir=None, label_words=words, test_path=str(train))
    with pytest.raises(DataError, match="label 'great' is neither a class index 0-1 nor one of the label words"):
        load_bundle(
            str(train),
            data_dir=None,
            text_column="sentence",
            label_column="sentiment",
            label_words=words,
            test_path=str(train),
        )
    with pytest.raises(DataError, match="needs data.options.label_words"):
        load_bundle(str(train), data_dir=None, test_path=str(train))
    with pytest.raises(DataError, match="set data.options.test_path"):
        load_bundle(str(train), data_dir=None, label_words=words)


def test_local_file_advice_works_when_followed(tmp_path):
    """What the errors of a local file advise (data.options.encoding, data.test_dataset) is accepted and works."""
    train = tmp_path / "latin.csv"
    train.write_bytes("text,label\nSepp\xe4l\xe4 up,positive\nfalls,negative\n".encode("latin-1"))
    words = ["negative", "neutral", "positive"]
    with pytest.raises(DataError, match='set data.options.encoding = "latin-1"'):
        load_bundle(str(train), data_dir=None, label_words=words, test_path=str(train))
    bundle = load_bundle(str(train), data_dir=None, label_words=words, test_path=str(train), encoding="latin-1")
    assert bundle.train[0] == {"text": "Seppälä up", "label": 2}
    if REAL_DATA.is_dir():  # no test_path: the test rows come from data.test_dataset
        on_fpb = load_bundle(str(train), data_dir=REAL_DATA, test_name="fpb", label_words=words, encoding="latin-1",
                             fpb_agree="All")
        assert len(on_fpb.test) == 2264 and on_fpb.train == bundle.train


def test_list_options_read_alike_and_text_rows_must_hold_text(tmp_path, caplog):
    """data.options.label_words=a,b reads as model.target_modules=a,b does; empty texts are skipped with a warning;
    label words that only differ in case are refused (labels match ignoring case)."""
    train = write_labelled_csv(tmp_path / "train.csv", [("good", "positive"), ("", "negative"), ("  ", "0"), ("bad", "0")])
    bundle = load_bundle(str(train), data_dir=None, text_column="sentence", label_column="sentiment",
                         label_words="negative,positive", test_path=str(train))
    assert bundle.task.label_words == ("negative", "positive") and [r["text"] for r in bundle.train] == ["good", "bad"]
    assert "skipped 2 of 4 rows with an empty 'sentence' (rows 2, 3)" in caplog.text
    with pytest.raises(DataError, match="repeated words .'Positive', 'positive'"):
        load_bundle(str(train), data_dir=None, text_column="sentence", label_column="sentiment",
                    label_words=["negative", "positive", "Positive"], test_path=str(train))


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(DataError) as error:
        load_bundle("imdb", data_dir=None)
    assert all(name in str(error.value) for name in registered_names())
    assert set(registered_names()) == {
        "ag_news",
        "financial_phrasebank",
        "twitter_financial_news_sentiment",
        "fingpt_sentiment",
        "dolly",
        "mmlu",
    }


def test_unknown_option_lists_the_accepted_ones(fake_hub):
    with pytest.raises(DataError, match="fpb_agreement are not understood.*Accepted options: fpb_agree"):
        load_bundle("fpb", data_dir=None, fpb_agreement="75")
    with pytest.raises(DataError, match="fpb_agree=.*expected one of 50, 66, 75, All"):
        load_bundle("fpb", data_dir=None, fpb_agree="90")
