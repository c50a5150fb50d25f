"""Reading texts and stored vectors from CSV, TSV, JSONL, Parquet and stdin bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapted_embeddings.errors import InvalidInputError
from adapted_embeddings.io import InputFileError, check_texts, read_text_lines, read_text_records


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_csv_with_json_vectors(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text('text,vec\n"hello, world","[0.5, 1.0]"\nsecond,"[1, -2]"\n', encoding="utf-8")
    records = read_text_records(path, vector_column="vec")
    assert records.texts == ["hello, world", "second"]
    assert records.vectors is not None
    np.testing.assert_allclose(records.vectors, [[0.5, 1.0], [1.0, -2.0]])
    assert records.vectors.dtype == np.float32
    assert records.columns == ["text", "vec"]


def test_tsv_and_custom_text_column(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("id\tbody\n1\tfirst\n2\tsecond\n", encoding="utf-8")
    assert read_text_records(path, text_column="body").texts == ["first", "second"]


def test_jsonl_keeps_unicode_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "日本語 😀"}, {"text": "b\nc"}])
    path.write_text(path.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")
    assert read_text_records(path).texts == ["日本語 😀", "b\nc"]


def test_parquet_with_list_vectors(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "t.parquet"
    table = pa.table({"text": ["a", "b", "c"], "embedding": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]})
    pq.write_table(table, path)
    records = read_text_records(path, vector_column="embedding", limit=2)
    assert records.texts == ["a", "b"]
    assert records.vectors is not None and records.vectors.shape == (2, 2)


def test_limit_reads_only_the_first_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": str(i)} for i in range(10)])
    assert read_text_records(path, limit=3).texts == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "message"),
    [
        ("t.csv", "body\nx\n", {}, "has no column 'text'; its columns are: 'body'"),
        ("t.csv", "text\n", {}, "holds no rows"),
        ("t.txt", "x", {}, "cannot tell the format"),
        ("t.jsonl", '{"text": "a"}\nnot json\n', {}, "line 2 is not valid JSON"),
        ("t.jsonl", '["a"]\n', {}, "line 1 is a JSON list"),
        ("t.jsonl", '{"text": 3}\n', {}, "row 1: column 'text' holds a value of type int"),
        ("t.jsonl", '{"text": null}\n', {}, "row 1: column 'text' is empty"),
        (
            "t.jsonl",
            '{"text": "a", "v": [1, 2]}\n{"text": "b", "v": [1]}\n',
            {"vector_column": "v"},
            "row 2: column 'v' has 1 numbers, but earlier rows have 2",
        ),
        ("t.jsonl", '{"text": "a", "v": [1, "x"]}\n', {"vector_column": "v"}, "not a number"),
        (
            "t.jsonl",
            '{"text": "a", "v": "oops"}\n',
            {"vector_column": "v"},
            "holds a value of type str",
        ),
        ("t.jsonl", '{"text": "a", "v": []}\n', {"vector_column": "v"}, "empty list"),
        ("t.csv", 'text,v\na,"[1, NaN]"\n', {"vector_column": "v"}, "NaN or Inf"),
        ("t.csv", "text,v\na,[1 2]\n", {"vector_column": "v"}, "not a JSON list of numbers"),
    ],
)
def test_bad_files_name_file_row_and_column(
    tmp_path: Path, name: str, content: str, kwargs: dict[str, str], message: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputFileError) as caught:
        read_text_records(path, **kwargs)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="input file not found"):
        read_text_records(tmp_path / "nope.csv")
    with pytest.raises(InputFileError, match="is a directory"):
        read_text_records(tmp_path)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(InputFileError, match="not valid UTF-8"):
        read_text_records(path)


def test_corrupt_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(InputFileError, match="not a readable Parquet file"):
        read_text_records(path)


def test_text_lines_skip_blank_and_strip_crlf() -> None:
    assert read_text_lines(b"a\r\n\n  \nb\xe2\x80\xa8c\n") == ["a", "b\u2028c"]


def test_text_lines_refuse_empty_and_non_utf8() -> None:
    with pytest.raises(InputFileError, match="stdin is empty"):
        read_text_lines(b"\n \n", source="stdin")
    with pytest.raises(InputFileError, match="not valid UTF-8"):
        read_text_lines(b"\xff\xfe\x00", source="stdin")


def test_check_texts_names_the_bad_one() -> None:
    assert check_texts(["a", "é"]) == ["a", "é"]
    with pytest.raises(InvalidInputError, match="--text #2 is not valid Unicode"):
        check_texts(["a", "b\udcff"], what="--text")


def test_a_lone_surrogate_is_the_same_error_in_a_file_and_in_the_pipeline(
    tmp_path: Path,
) -> None:
    from adapted_embeddings.pipeline import _deduplicate

    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "\\ud800"}\n', encoding="utf-8")
    with pytest.raises(InvalidInputError) as from_file:
        read_text_records(path)
    assert f"{path} row 2: column 'text' is not valid Unicode" in str(from_file.value)
    assert "lone surrogate '\\ud800' at character 0" in str(from_file.value)
    with pytest.raises(InvalidInputError) as from_pipeline:
        _deduplicate(["ok", "\ud800"])
    assert "texts[1] is not valid Unicode" in str(from_pipeline.value)
