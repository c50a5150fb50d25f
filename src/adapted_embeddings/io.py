"""Reading texts (and optionally stored vectors) from CSV, TSV, JSONL or Parquet files and stdin.

The CLI and the cookbook read their inputs through here, so every bad file gets the same
clear message: which file, which row or line, which column, and what was wrong with it.
Stored vectors are a column holding a list of numbers (a JSON array inside a CSV cell).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from adapted_embeddings.errors import AdaptedEmbeddingsError
from adapted_embeddings.text_checks import check_encodable

FileFormat = Literal["csv", "tsv", "jsonl", "parquet"]

FORMAT_BY_SUFFIX: dict[str, FileFormat] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
"""File extensions recognised by :func:`read_text_records`."""


class InputFileError(AdaptedEmbeddingsError, ValueError):
    """An input file or stream cannot be used: missing, unreadable, wrong column or bad row."""


@dataclass(frozen=True)
class TextRecords:
    """Texts read from a file, with the stored vectors of the same rows when asked for.

    Attributes:
        texts: One text per row, in file order.
        vectors: ``(len(texts), d)`` float32 array from the vector column, or None.
        columns: Every column the file has (to explain a wrong ``--column``).
        source: Where the records came from (a path, or ``<stdin>``).

    """

    texts: list[str]
    vectors: np.ndarray | None
    columns: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def detect_format(path: Path) -> FileFormat:
    """The file format implied by ``path``'s extension.

    Raises:
        InputFileError: If the extension is not one of :data:`FORMAT_BY_SUFFIX`.

    """
    try:
        return FORMAT_BY_SUFFIX[path.suffix.lower()]
    except KeyError:
        known = ", ".join(sorted(FORMAT_BY_SUFFIX))
        raise InputFileError(
            f"cannot tell the format of {path} from its extension {path.suffix!r}; "
            f"use one of {known}"
        ) from None


def read_text_records(
    path: str | Path,
    *,
    text_column: str = "text",
    vector_column: str | None = None,
    file_format: FileFormat | None = None,
    limit: int | None = None,
) -> TextRecords:
    """Read a text column, and optionally a vector column, from a CSV/TSV/JSONL/Parquet file.

    Args:
        path: The file to read.
        text_column: Column holding the texts.
        vector_column: Column holding stored vectors (lists of numbers), or None.
        file_format: Override the format implied by the extension.
        limit: Read at most this many rows.

    Returns:
        The texts and, if ``vector_column`` was given, their vectors as a float32 array.

    Raises:
        InputFileError: If the file is missing or unreadable, a column is absent (the message
            lists the columns that exist), the file has no rows, a text cell is missing or not
            a string, or a vector is not a finite list of numbers of the same width as the rest.
        InvalidInputError: If a text holds a lone surrogate (no UTF-8 form).

    """
    path, fmt = _input_file(path, file_format)
    wanted = [text_column] + ([vector_column] if vector_column else [])
    if fmt == "parquet":
        columns, rows = _read_parquet(path, wanted, limit)
    elif fmt == "jsonl":
        columns, rows = _read_jsonl(path, limit)
    else:
        columns, rows = _read_delimited(path, "," if fmt == "csv" else "\t", limit)
    for column in wanted:
        if column not in columns:
            raise InputFileError(
                f"{path} has no column {column!r}; its columns are: "
                + (", ".join(repr(c) for c in columns) or "(none)")
            )
    if not rows:
        raise InputFileError(f"{path} holds no rows")
    texts = [_text_cell(row.get(text_column), path, number, text_column) for number, row in rows]
    vectors = None
    if vector_column is not None:
        vectors = _vector_matrix(
            [(number, row.get(vector_column)) for number, row in rows],
            where=str(path),
            column=vector_column,
            parse_strings=fmt in ("csv", "tsv"),
        )
    return TextRecords(texts=texts, vectors=vectors, columns=list(columns), source=str(path))


def check_texts(texts: Sequence[str], *, what: str = "texts") -> list[str]:
    r"""Return ``texts`` as a list after checking each is text that can be written as UTF-8.

    Undecodable bytes in arguments, or ``\ud800``-style escapes in JSON, arrive as lone
    surrogates, which no tokenizer or JSON consumer accepts; they are refused here with the
    position of the offending text.

    Raises:
        InvalidInputError: Naming the first bad text (1-based), as the pipeline does.

    """
    checked = list(texts)
    for number, text in enumerate(checked, start=1):
        check_encodable(text, f"{what} #{number}")
    return checked


def read_text_lines(data: bytes, *, source: str = "<stdin>") -> list[str]:
    """Split UTF-8 bytes into texts, one per line, skipping blank lines.

    Blank lines are treated as separators, not as texts, so a trailing newline or an empty
    line between paragraphs does not produce an embedding of nothing.

    Raises:
        InputFileError: If the bytes are not UTF-8 or hold no non-blank line.

    """
    with _read_errors(source):
        decoded = data.decode("utf-8-sig")
    # splitlines() would also split on U+2028 and other separators inside a line of text.
    lines = [line.rstrip("\r") for line in decoded.split("\n")]
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise InputFileError(f"{source} is empty: give texts one per line, or use --text")
    return texts


def _input_file(path: str | Path, file_format: FileFormat | None) -> tuple[Path, FileFormat]:
    """``path`` as a Path, once it is known to be a file, and its format (given or implied)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"input file not found: {path}")
    if path.is_dir():
        raise InputFileError(f"input path is a directory, not a file: {path}")
    return path, file_format or detect_format(path)


@contextlib.contextmanager
def _read_errors(source: str | Path) -> Iterator[None]:
    """Raise a read of ``source`` that fails (bytes not UTF-8, or the OS) as InputFileError."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise InputFileError(
            f"{source} is not valid UTF-8 (bad byte at offset {exc.start})"
        ) from None
    except OSError as exc:
        raise InputFileError(f"cannot read {source}: {exc.strerror or exc}") from None


# -- readers: each returns (columns, [(row number, {column: value})]) ------------------


Rows = list[tuple[int, dict[str, Any]]]


def _read_delimited(path: Path, delimiter: str, limit: int | None) -> tuple[list[str], Rows]:
    with _read_errors(path):
        content = path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter=delimiter)
    try:
        columns = list(reader.fieldnames or [])
        rows: Rows = []
        for number, row in enumerate(reader, start=1):
            if limit is not None and len(rows) >= limit:
                break
            rows.append((number, row))
    except csv.Error as exc:
        raise InputFileError(f"{path} is not valid CSV (line {reader.line_num}): {exc}") from None
    return columns, rows


def _read_jsonl(path: Path, limit: int | None) -> tuple[list[str], Rows]:
    """The first ``limit`` records (all if None) and every column they use, in order seen."""
    columns: dict[str, None] = {}
    rows: Rows = []
    for number, record in _iter_jsonl(path):
        if limit is not None and len(rows) >= limit:
            break
        columns.update(dict.fromkeys(record))
        rows.append((number, record))
    return list(columns), rows


def _read_parquet(path: Path, wanted: list[str], limit: int | None) -> tuple[list[str], Rows]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputFileError(
            "reading Parquet needs pyarrow: pip install 'adapted-embeddings[train]'"
        ) from None
    try:
        columns = list(pq.read_schema(path).names)
        present = [c for c in wanted if c in columns]
        table = pq.read_table(path, columns=present)
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError)
        raise InputFileError(f"{path} is not a readable Parquet file: {exc}") from None
    if limit is not None:
        table = table.slice(0, limit)
    data = table.to_pydict()
    rows = [
        (number, {c: data[c][number - 1] for c in present})
        for number in range(1, table.num_rows + 1)
    ]
    return columns, rows


# -- cell validation --------------------------------------------------------------------


def _text_cell(value: Any, path: Path, number: int, column: str) -> str:
    if isinstance(value, str):
        check_encodable(value, f"{path} row {number}: column {column!r}")
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise InputFileError(f"{path} row {number}: column {column!r} is empty")
    raise InputFileError(
        f"{path} row {number}: column {column!r} holds a value of type "
        f"{type(value).__name__}, expected text"
    )


def _vector_matrix(
    cells: Sequence[tuple[int, Any]], *, where: str, column: str, parse_strings: bool
) -> np.ndarray:
    vectors: list[np.ndarray] = []
    width: int | None = None
    for number, cell in cells:
        vector = _vector_cell(cell, where, number, column, parse_strings)
        if width is None:
            width = len(vector)
        elif len(vector) != width:
            raise InputFileError(
                f"{where} row {number}: column {column!r} has {len(vector)} numbers, but earlier "
                f"rows have {width}"
            )
        vectors.append(vector)
    return np.stack(vectors).astype(np.float32)


def _vector_cell(
    cell: Any, where: str, number: int, column: str, parse_strings: bool
) -> np.ndarray:
    prefix = f"{where} row {number}: column {column!r}"
    if isinstance(cell, str) and parse_strings:
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            raise InputFileError(
                f"{prefix} is not a JSON list of numbers such as [0.1, -0.2]"
            ) from None
    if not isinstance(cell, Iterable) or isinstance(cell, str | bytes | dict):
        raise InputFileError(
            f"{prefix} holds a value of type {type(cell).__name__}, expected a list of numbers"
        )
    items = list(cell)
    if not items:
        raise InputFileError(f"{prefix} is an empty list")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in items):
        raise InputFileError(f"{prefix} holds something that is not a number")
    vector = np.asarray(items, dtype=np.float64)
    if not np.isfinite(vector).all():
        raise InputFileError(f"{prefix} holds NaN or Inf")
    return vector


# -- streaming rows, for corpora too big to hold in memory ------------------------------


def iter_file_rows(
    path: str | Path, *, file_format: FileFormat | None = None
) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    """Stream the rows of a CSV, TSV or JSONL file without reading it whole.

    Row numbers follow :func:`read_text_records`: the data row for CSV/TSV (1 is the row
    after the header), the line for JSONL (blank lines are skipped). Parquet is streamed
    with pyarrow instead (see :mod:`adapted_embeddings.datasets`).

    Returns:
        The columns known before the first row (the CSV header; none for JSONL, whose
        records may each add keys) and an iterator of ``(row number, row)``.

    Raises:
        InputFileError: If the file is missing or unreadable, or (while iterating) a line is
            not valid JSON or a JSON object, or the bytes are not UTF-8.

    """
    path, fmt = _input_file(path, file_format)
    if fmt == "parquet":
        raise InputFileError(f"{path}: stream Parquet files with pyarrow, not iter_file_rows")
    if fmt == "jsonl":
        return [], _iter_jsonl(path)
    delimiter = "," if fmt == "csv" else "\t"
    with _read_errors(path), path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), [])
    return list(header), _iter_delimited(path, delimiter)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with _read_errors(path), path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputFileError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise InputFileError(
                    f"{path} line {number} is a JSON {type(record).__name__}, expected an "
                    'object such as {"text": "..."}'
                )
            yield number, record


def _iter_delimited(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with _read_errors(path), path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            for number, row in enumerate(reader, start=1):
                row.pop(None, None)  # cells beyond the header have no column to go to
                yield number, row
        except csv.Error as exc:
            raise InputFileError(
                f"{path} is not valid CSV (line {reader.line_num}): {exc}"
            ) from None


def check_text_cell(value: Any, *, where: str, number: int, column: str) -> str:
    """Return ``value`` if it is text that can be embedded, else raise naming the row.

    Raises:
        InputFileError: ``"{where} row {number}: column ... is empty"`` (or holds a
            non-string, or invalid Unicode).

    """
    return _text_cell(value, Path(where), number, column)
