"""read_table on every supported format, and resolve_data_dir's precedence and errors."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from aflora.data import DATA_DIR_ENV, DataError, read_table, resolve_data_dir

ROWS = [{"text": 'a, quoted "one"', "label": "0"}, {"text": "line\nbreak", "label": "2"}]


def write_csv(path, delimiter=","):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=["text", "label"], delimiter=delimiter)
        writer.writeheader()
        writer.writerows(ROWS)
    return path


def test_csv_with_header_keeps_quoted_commas_and_newlines(tmp_path):
    assert read_table(write_csv(tmp_path / "rows.csv")) == ROWS


def test_tsv_with_header(tmp_path):
    assert read_table(write_csv(tmp_path / "rows.tsv", delimiter="\t")) == ROWS


def test_headerless_csv_takes_column_names(tmp_path):
    path = tmp_path / "official.csv"
    path.write_text('"3","Title one","Body, with comma"\n"1","Title two","Body two"\n', encoding="utf-8")
    rows = read_table(path, columns=["class", "title", "description"])
    assert rows == [
        {"class": "3", "title": "Title one", "description": "Body, with comma"},
        {"class": "1", "title": "Title two", "description": "Body two"},
    ]


def test_headerless_csv_with_wrong_column_count_names_the_line(tmp_path):
    path = tmp_path / "official.csv"
    path.write_text("1,a,b\n2,c\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2 has 2 fields but columns= names 3"):
        read_table(path, columns=["class", "title", "description"])


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert read_table(path) == ROWS


def test_gzipped_jsonl_json_and_csv(tmp_path):
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt", encoding="utf-8") as stream:
        stream.write("\n".join(json.dumps(row) for row in ROWS))
    with gzip.open(tmp_path / "rows.json.gz", "wt", encoding="utf-8") as stream:
        json.dump(ROWS, stream)
    plain_csv = write_csv(tmp_path / "plain.csv")
    with gzip.open(tmp_path / "rows.csv.gz", "wb") as stream:
        stream.write(plain_csv.read_bytes())
    for name in ("rows.jsonl.gz", "rows.json.gz", "rows.csv.gz"):
        assert read_table(tmp_path / name) == ROWS, name


def test_json_list_of_objects(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert read_table(path) == ROWS


def test_json_that_is_not_a_list_of_objects_is_refused(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": ROWS}), encoding="utf-8")
    with pytest.raises(DataError, match="JSON list of objects"):
        read_table(path)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_parquet(tmp_path):
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.Table.from_pylist([{"text": "x", "label": 1}, {"text": "y", "label": 0}])
    pyarrow.parquet.write_table(table, tmp_path / "rows.parquet")
    assert read_table(tmp_path / "rows.parquet") == [{"text": "x", "label": 1}, {"text": "y", "label": 0}]


def test_latin1_file_needs_its_encoding(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nSepp\xe4l\xe4,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid utf-8 text .*: save it as UTF-8"):
        read_table(path)
    assert read_table(path, encoding="latin-1") == [{"text": "Seppälä", "label": "1"}]


def test_missing_file_names_the_path_and_the_formats(tmp_path):
    with pytest.raises(DataError) as error:
        read_table(tmp_path / "absent.csv")
    assert "absent.csv" in str(error.value) and ".jsonl" in str(error.value) and ".parquet" in str(error.value)


@pytest.mark.parametrize("name", ["rows.xlsx", "rows", "rows.parquet.gz", "rows.tar.gz"])
def test_unknown_extension_lists_the_supported_ones(tmp_path, name):
    (tmp_path / name).write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"Supported extensions: \.csv, \.tsv, \.jsonl, \.json"):
        read_table(tmp_path / name)


def test_columns_argument_only_for_delimited_files(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]), encoding="utf-8")
    with pytest.raises(DataError, match="headerless csv/tsv"):
        read_table(path, columns=["text", "label"])


# ---------------------------------------------------------------------------------------------------
# resolve_data_dir


def test_explicit_directory_beats_environment(tmp_path, monkeypatch):
    explicit, from_env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    from_env.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(from_env))
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir(str(explicit)) == explicit
    assert resolve_data_dir(None) == from_env


def test_no_directory_anywhere_means_hub(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) is None


@pytest.mark.parametrize("origin", ["argument", "environment"])
def test_missing_directory_is_an_error_that_says_how_to_fix_it(tmp_path, monkeypatch, origin):
    missing = tmp_path / "nowhere"
    if origin == "environment":
        monkeypatch.setenv(DATA_DIR_ENV, str(missing))
        call = lambda: resolve_data_dir(None)  # noqa: E731
    else:
        monkeypatch.delenv(DATA_DIR_ENV, raising=False)
        call = lambda: resolve_data_dir(missing)  # noqa: E731
    with pytest.raises(DataError) as error:
        call()
    message = str(error.value)
    assert str(missing) in message and "--data-dir" in message and DATA_DIR_ENV in message
