"""Embedding whole files into Parquet: the space travels with the data, runs resume.

Output is Parquet with every input column plus ``embedding`` (fixed-width float32),
``confidence`` and ``route``. The space id is written into each file's schema metadata
(key ``embedding_space``), and so is the pipeline that made the vectors (key
``adapted_embeddings_pipeline``: the adapter's id with its weights hash, the mode and the
thresholds); :func:`read_embeddings` refuses files of another space, or of mixed adapters.

:func:`embed_files` is the in-process streaming runner behind
``adapted-embeddings embed-dataset --engine local``. It cuts each input into chunks of
``rows_per_file`` rows and writes one output file per chunk, atomically (temporary file,
then rename), so memory stays bounded by one chunk and a killed run leaves only whole
files. Restarted with the same arguments it skips the files already written: no
duplicates, no gaps. A restart that would embed with another adapter or routing (say
``adapt()`` ran in between, or another ``--adapter`` is given) is refused with
:class:`RunMismatchError` naming what differs, so one run never mixes adapters;
``restart=True`` (``--restart``) starts it over instead. ``--engine ray`` (see
:mod:`adapted_embeddings.ray`) processes the same chunks into the same files, with the
adapter the driver resolved pinned in every actor, so either engine can resume the other's
run.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adapted_embeddings import onnx_encoder
from adapted_embeddings.errors import (
    AdaptedEmbeddingsError,
    ConfigurationError,
    SpaceMismatchError,
)
from adapted_embeddings.extras import require
from adapted_embeddings.io import (
    FileFormat,
    InputFileError,
    check_text_cell,
    detect_format,
    iter_file_rows,
)
from adapted_embeddings.spaces import EmbeddingSpace

if TYPE_CHECKING:
    import pyarrow as pa

    from adapted_embeddings.pipeline import EmbeddingPipeline, Role

SPACE_METADATA_KEY = "embedding_space"
"""Parquet schema metadata key holding the space id of the ``embedding`` column."""

CHUNK_METADATA_KEY = "adapted_embeddings_chunk"
"""Schema metadata key with where a chunk came from (input file, first row, rows), as JSON."""

PIPELINE_METADATA_KEY = "adapted_embeddings_pipeline"
"""Schema metadata key with the :class:`PipelineIdentity` that made the vectors, as JSON."""

OUTPUT_COLUMNS = ("embedding", "confidence", "route")
"""Columns added to every row; an input may not already have them."""

RUN_MANIFEST = "_embedding_run.json"
"""File in the output directory recording what the run embeds, so a restart can resume it."""

DEFAULT_ROWS_PER_FILE = 10_000
"""Rows per output file: the unit of work, of resumption and of memory."""

ROUTES = ("local", "provider", "cache", "local_degraded")

DUPLICATE = "duplicate"
"""Summary count of rows whose text already occurred earlier in the run (in input order).

Each text of a run is counted once, under its route; its later copies are counted here
instead, whatever route the pipeline gave them (``cache`` when an earlier batch cached it),
so ``cache`` counts only what earlier runs had cached.
"""

SUMMARY_COUNTS = (*ROUTES, DUPLICATE)
"""The counts of a run's summary: rows per route, then the duplicates."""

_TEMPORARY_PREFIX = ".incomplete-"


def require_pyarrow() -> Any:
    """Import pyarrow, or raise :class:`MissingExtraError` naming the extra that installs it."""
    return require("pyarrow", "ray", needed_for="embedding datasets")


class RunMismatchError(ConfigurationError):
    """An output directory holds a run that differs from the one asked for (not resumed).

    Attributes:
        differences: One line per difference, ``"<what>: <there>, <now>"``.

    """

    def __init__(self, message: str, differences: Sequence[str]) -> None:
        super().__init__(message)
        self.differences = list(differences)


class MixedAdaptersError(AdaptedEmbeddingsError, ValueError):
    """Embedded files to be read together were made by different adapters."""


# -- which pipeline made the vectors ---------------------------------------------------------


class PipelineIdentity(BaseModel):
    """The adapter and routing that made a run's vectors: recorded per run and per file.

    Two pipelines with the same identity give the same vector and route for the same text
    (the provider's vectors aside); ``adapter_path`` is where the adapter was loaded from and
    is not part of that (the id already names the weights).
    """

    model_config = ConfigDict(frozen=True)

    adapter: str | None = Field(
        description="The adapter's id, name:weights-sha256; None: no adapter yet (cold "
        "start: every text goes to the provider)."
    )
    adapter_path: str | None = Field(
        default=None, description="The adapter's directory, to pin it again (--adapter)."
    )
    mode: str = Field(description="'hybrid', 'local' or 'provider'.")
    query_threshold: float | None = Field(
        description="Confidence a query needs to stay local (configured, else the adapter's "
        "calibrated one); None without an adapter."
    )
    document_threshold: float | None = Field(description="The same for documents.")

    @classmethod
    def of(cls, pipeline: EmbeddingPipeline) -> PipelineIdentity:
        """The identity of ``pipeline`` as it is now."""
        adapter = pipeline.adapter
        gate = pipeline.gate

        def threshold(configured: float | None) -> float | None:
            if adapter is None:
                return None
            return adapter.recommended_threshold if configured is None else configured

        return cls(
            adapter=adapter.id if adapter is not None else None,
            adapter_path=str(adapter.path) if adapter is not None and adapter.path else None,
            mode=gate.mode,
            query_threshold=threshold(gate.query_threshold),
            document_threshold=threshold(gate.document_threshold),
        )

    def differences(self, now: PipelineIdentity) -> list[str]:
        """What differs from ``now``, one ``"<what>: <here> there, <now> now"`` line each."""
        return [
            f"{name}: {getattr(self, name)!r} there, {getattr(now, name)!r} now"
            for name in ("adapter", "mode", "query_threshold", "document_threshold")
            if getattr(self, name) != getattr(now, name)
        ]

    def metadata(self) -> dict[str, str]:
        """The identity as Parquet schema metadata."""
        return {PIPELINE_METADATA_KEY: self.model_dump_json()}


def bulk_pipeline(keywords: dict[str, Any]) -> tuple[EmbeddingPipeline, dict[str, Any]]:
    """Build the pipeline of a bulk run, and keywords that build exactly it elsewhere.

    The adapter is resolved once, here (``adapter=``, the registry, or the newest one
    ``adapt()`` saved), and pinned in the returned keywords as the :class:`Adapter` object,
    so Ray actors load that adapter instead of resolving "the newest" again. Automatic
    ``adapt()`` is off for the run (``auto_adapt_every``), so the adapter cannot change
    halfway through; provider pairs are still stored for a later ``adapt()``.

    Args:
        keywords: The keywords of :class:`~adapted_embeddings.factory.PipelineOptions`.

    Returns:
        The pipeline (its model not loaded yet) and the pinned keywords.

    """
    from adapted_embeddings.factory import PipelineOptions

    given = {k: v for k, v in keywords.items() if k != "auto_adapt_every"}
    settings = PipelineOptions(**given).resolved_settings()
    learning = settings.learning.model_copy(update={"auto_adapt_every": None})
    pinned = {**given, "settings": settings.model_copy(update={"learning": learning})}
    pipeline = PipelineOptions(**pinned).build_pipeline()
    if pipeline.adapter is not None:
        pinned["adapter"] = pipeline.adapter
    return pipeline, pinned


# -- texts in, embedded table out --------------------------------------------------------


def text_values(
    table: pa.Table, column: str, *, where: str, row_numbers: Sequence[int] | None = None
) -> list[str]:
    """The ``column`` of ``table`` as a list of texts, after checking every cell.

    Args:
        table: The rows.
        column: Column holding the texts.
        where: The file (or dataset) the rows came from, for messages.
        row_numbers: Each row's number in ``where``; default 1, 2, ...

    Raises:
        InputFileError: If the column is missing (listing the ones there are), or a cell is
            null, not a string or not valid Unicode (naming its row).

    """
    if column not in table.column_names:
        raise InputFileError(
            f"{where} has no column {column!r}; its columns are: "
            + (", ".join(repr(c) for c in table.column_names) or "(none)")
        )
    values = table.column(column).to_pylist()
    numbers = row_numbers if row_numbers is not None else range(1, len(values) + 1)
    for value, number in zip(values, numbers, strict=True):
        if not isinstance(value, str):
            check_text_cell(value, where=where, number=number, column=column)
    return values


def check_output_columns(columns: Sequence[str], *, where: str) -> None:
    """Refuse input that already has a column the embedding would overwrite.

    Raises:
        InputFileError: Naming the column.

    """
    taken = [c for c in OUTPUT_COLUMNS if c in columns]
    if taken:
        raise InputFileError(
            f"{where} already has a column {taken[0]!r}, which embedding adds "
            f"({', '.join(OUTPUT_COLUMNS)}); rename or drop it first"
        )


def embed_table(
    pipeline: EmbeddingPipeline,
    table: pa.Table,
    texts: list[str],
    *,
    role: Role,
    metadata: dict[str, str] | None = None,
) -> pa.Table:
    """``table`` with ``embedding``, ``confidence`` and ``route`` appended.

    The schema metadata holds the space and the :class:`PipelineIdentity` of ``pipeline``.

    Args:
        pipeline: The pipeline that embeds.
        table: The input rows, every column kept.
        texts: The texts of those rows, checked (see :func:`text_values`).
        role: ``document`` or ``query``.
        metadata: Extra schema metadata (on top of the space and the pipeline).

    """
    results = pipeline.embed(texts, role) if texts else []
    release_freed_memory()
    return with_embeddings(
        table,
        np.stack([r.vector for r in results]) if results else None,
        [r.confidence for r in results],
        [r.route for r in results],
        pipeline.space,
        metadata={**PipelineIdentity.of(pipeline).metadata(), **(metadata or {})},
    )


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def set_model_threads(threads: int) -> None:
    """Run the local model on ``threads`` intra-op threads in this process.

    Both runtimes otherwise take a thread per physical core, whatever else runs: with
    several processes on the same cores (Ray actors, or other work on a shared machine) the
    threads of each wait on one another, and the bulk engines set the count deliberately
    instead. It applies to ONNX Runtime sessions created from now on
    (:func:`~adapted_embeddings.onnx_encoder.set_threads`) and to torch: now if torch is
    already loaded, else when a torch model loads (an ONNX run never imports torch).

    Raises:
        ConfigurationError: If ``threads`` is below 1.

    """
    if threads < 1:
        raise ConfigurationError(f"model threads must be at least 1, got {threads}")
    onnx_encoder.set_threads(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc; elsewhere a no-op).

    The local model frees each batch's activations into glibc's ``malloc``, which keeps
    most of the freed memory mapped for reuse, and batches of other shapes do not fit the
    holes. Over a bulk run the resident memory therefore climbed although nothing leaked:
    the local engine's peak was 1,341 / 1,570 / 1,672 MB at 5,000 / 20,000 / 40,000 texts.
    Trimming after every batch, it is 1,173 / 1,204 / 1,242 MB, and the memory held stays
    at 894-944 MB (``benchmarks/bulk_embedding.py``), with no loss of throughput.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None


def with_embeddings(
    table: pa.Table,
    vectors: np.ndarray | None,
    confidence: Sequence[float | None],
    routes: Sequence[str],
    space: EmbeddingSpace,
    *,
    metadata: dict[str, str] | None = None,
) -> pa.Table:
    """Append the three embedding columns to ``table`` and record ``space`` in its schema."""
    pa = require_pyarrow()
    width = space.dimensions
    flat = (
        np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)
        if vectors is not None
        else np.zeros(0, dtype=np.float32)
    )
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), width)
    table = table.append_column("embedding", embedding)
    table = table.append_column("confidence", pa.array(list(confidence), type=pa.float32()))
    table = table.append_column("route", pa.array(list(routes), type=pa.string()))
    return table.replace_schema_metadata({SPACE_METADATA_KEY: space.id, **(metadata or {})})


def route_counts(table: pa.Table, duplicates: Sequence[int] = ()) -> dict[str, int]:
    """How many rows of an embedded table took each route, and how many are ``duplicates``.

    Args:
        table: The embedded rows.
        duplicates: Positions of rows whose text occurred earlier in the run; they are
            counted as :data:`DUPLICATE`, not under their route.

    """
    repeated = set(duplicates)
    routes = table.column("route").to_pylist()
    counts = Counter(r for i, r in enumerate(routes) if i not in repeated)
    return {**{route: counts.get(route, 0) for route in ROUTES}, DUPLICATE: len(repeated)}


# -- writing and reading -----------------------------------------------------------------


def write_embeddings(table: pa.Table, path: str | Path) -> Path:
    """Write an embedded table to ``path`` atomically: whole, or not at all.

    The table is written to a hidden temporary file in the same directory, flushed to disk,
    then renamed over ``path``, so a reader (or a resumed run) never sees half a file.

    Raises:
        ConfigurationError: If the table has no ``embedding_space`` metadata.

    """
    import pyarrow.parquet as pq

    path = Path(path)
    if SPACE_METADATA_KEY.encode() not in (table.schema.metadata or {}):
        raise ConfigurationError(
            f"refusing to write {path}: the table has no {SPACE_METADATA_KEY!r} metadata, so "
            "nobody could tell which space its vectors are in"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{_TEMPORARY_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        with temporary.open("wb") as handle:
            pq.write_table(table, handle, compression="zstd")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)
    return path


def file_space(path: Path) -> str | None:
    """The ``embedding_space`` recorded in a Parquet file's schema, or None."""
    value = _file_metadata(path).get(SPACE_METADATA_KEY.encode())
    return value.decode() if value is not None else None


def file_pipeline(path: Path) -> PipelineIdentity | None:
    """The :class:`PipelineIdentity` recorded in a Parquet file's schema, or None.

    Raises:
        InputFileError: If the file is not readable Parquet, or the record is corrupt.

    """
    value = _file_metadata(path).get(PIPELINE_METADATA_KEY.encode())
    if value is None:
        return None
    try:
        return PipelineIdentity.model_validate_json(value)
    except ValueError as exc:
        raise InputFileError(f"{path}: its {PIPELINE_METADATA_KEY!r} is corrupt: {exc}") from None


def _file_metadata(path: Path) -> dict[bytes, bytes]:
    import pyarrow.parquet as pq

    try:
        return dict(pq.read_schema(path).metadata or {})
    except (OSError, ValueError) as exc:
        raise InputFileError(f"{path} is not a readable Parquet file: {exc}") from None


def output_files(directory: Path) -> list[Path]:
    """The finished Parquet files of a directory, in name order (temporary files excluded)."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix == ".parquet" and not p.name.startswith((".", "_"))
    )


def read_embeddings(
    path: str | Path,
    *,
    expected_space: EmbeddingSpace | str | None = None,
    allow_mixed_adapters: bool = False,
) -> pa.Table:
    """Read embedded Parquet (one file, or every file of a directory in name order).

    Args:
        path: A ``.parquet`` file or a directory of them (e.g. ``embed-dataset --output``).
        expected_space: The space the vectors must be in (an :class:`EmbeddingSpace` or its
            id); None accepts any single space, but still refuses a mix.
        allow_mixed_adapters: Accept files made by different adapters of the space (or
            some with no adapter recorded). By default they are refused: the same text
            then has different vectors depending on its file.

    Returns:
        One table; its schema metadata holds ``embedding_space``, and the pipeline record
        (``adapted_embeddings_pipeline``) when every file has the same one.

    Raises:
        SpaceMismatchError: If a file has no ``embedding_space`` metadata, or is of another
            space than ``expected_space`` (or than the other files).
        MixedAdaptersError: If files were made by different adapters (naming two of them
            and their adapters), unless ``allow_mixed_adapters``.
        InputFileError: If the path does not exist, holds no Parquet files, or a file is
            not readable.

    """
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise InputFileError(f"not found: {path}")
    files = output_files(path) if path.is_dir() else [path]
    if not files:
        raise InputFileError(f"{path} holds no .parquet files")
    expected = EmbeddingSpace.parse(expected_space).id if expected_space is not None else None
    tables = []
    pipelines = {file: file_pipeline(file) for file in files}
    if not allow_mixed_adapters:
        _check_one_adapter(pipelines)
    for file in files:
        space = file_space(file)
        if space is None:
            raise SpaceMismatchError(
                f"{file} has no {SPACE_METADATA_KEY!r} metadata, so the space of its vectors "
                "is unknown; it was not written by adapted-embeddings"
            )
        if expected is None:
            expected = space
        if space != expected:
            raise SpaceMismatchError(
                f"{file} holds vectors in space {space}, expected {expected}. Vectors from "
                "different spaces cannot be compared."
            )
        try:
            tables.append(pq.read_table(file))
        except (OSError, ValueError) as exc:
            raise InputFileError(f"{file} is not a readable Parquet file: {exc}") from None
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    metadata = {SPACE_METADATA_KEY: expected}
    identities = set(pipelines.values())
    if len(identities) == 1 and (identity := identities.pop()) is not None:
        metadata.update(identity.metadata())
    return table.replace_schema_metadata(metadata)


def _check_one_adapter(pipelines: dict[Path, PipelineIdentity | None]) -> None:
    first: dict[str, Path] = {}
    for file, identity in pipelines.items():
        first.setdefault(_adapter_name(identity), file)
    if len(first) > 1:
        (one, one_file), (other, other_file) = list(first.items())[:2]
        raise MixedAdaptersError(
            f"{one_file} was embedded with adapter {one} but {other_file} with {other}: the "
            "same text has different vectors in them. Re-embed one part (embed-dataset "
            "--restart), or pass allow_mixed_adapters=True to read them anyway"
        )


def _adapter_name(identity: PipelineIdentity | None) -> str:
    if identity is None:
        return "(none recorded)"
    return identity.adapter or "(none: cold start)"


# -- inputs: scanned once up front, then streamed in chunks --------------------------------


class InputFile(BaseModel):
    """One input file of a run, as recorded in the run manifest."""

    path: str = Field(description="Absolute path of the file.")
    format: FileFormat = Field(description="csv, tsv, jsonl or parquet.")
    rows: int = Field(description="Number of rows (records).")
    size: int = Field(description="Size in bytes when the run started.")
    mtime_ns: int = Field(description="Modification time when the run started.")


@dataclass(frozen=True)
class Chunk:
    """Up to ``rows_per_file`` consecutive rows of one input, and their texts."""

    number: int
    table: pa.Table
    texts: list[str]
    first_row: int


def scan_input(path: str | Path, *, text_column: str) -> InputFile:
    """Check one input file completely before any work: column, every text cell, row count.

    Raises:
        InputFileError: If the file is missing, unreadable, has no ``text_column``, holds no
            rows, already has an output column, or has a bad text cell (naming the row).

    """
    return _scan_input(path, text_column=text_column)[0]


def _scan_input(path: str | Path, *, text_column: str) -> tuple[InputFile, np.ndarray]:
    """:func:`scan_input`, and a 64-bit hash of each row's text (8 bytes a row)."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise InputFileError(f"input file not found: {path}")
    if path.is_dir():
        raise InputFileError(f"input path is a directory, not a file: {path}")
    fmt = detect_format(path)
    hashes = [
        np.fromiter(map(hash, chunk.texts), dtype=np.int64, count=len(chunk.texts))
        for chunk in iter_chunks(path, fmt, text_column=text_column, rows_per_file=50_000)
    ]
    rows = sum(len(h) for h in hashes)
    if rows == 0:
        raise InputFileError(f"{path} holds no rows")
    stat = path.stat()
    scanned = InputFile(
        path=str(path), format=fmt, rows=rows, size=stat.st_size, mtime_ns=stat.st_mtime_ns
    )
    return scanned, np.concatenate(hashes)


def _repeated_rows(hashes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per input, whether each row's text occurred earlier in the run (inputs in order).

    Texts are compared by their 64-bit hash (this process's ``hash``): two different texts
    share one with a chance of about 1 in 10^10 in a run of 10 million, and the only effect
    would be one row counted as a duplicate in the summary.
    """
    every = np.concatenate(hashes)
    repeated = np.ones(len(every), dtype=bool)
    repeated[np.unique(every, return_index=True)[1]] = False
    return np.split(repeated, np.cumsum([len(h) for h in hashes])[:-1])


def iter_chunks(
    path: Path, fmt: FileFormat, *, text_column: str, rows_per_file: int
) -> Iterator[Chunk]:
    """Stream a file as chunks of ``rows_per_file`` rows (the last may be shorter).

    Every chunk's texts are checked, and its columns: a bad cell raises naming its row.
    """
    if fmt == "parquet":
        yield from _parquet_chunks(path, text_column, rows_per_file)
        return
    pa = require_pyarrow()
    header, rows = iter_file_rows(path, file_format=fmt)
    where = str(path)
    if header:
        _check_columns(header, text_column, where)
    number = 0
    while True:
        batch = list(islice(rows, rows_per_file))
        if not batch:
            return
        columns: dict[str, None] = dict.fromkeys(header)
        for _, row in batch:
            columns.update(dict.fromkeys(row))
        _check_columns(list(columns), text_column, where)
        numbers = [n for n, _ in batch]
        texts = [
            check_text_cell(row.get(text_column), where=where, number=n, column=text_column)
            for n, row in batch
        ]
        try:
            table = pa.table({c: [row.get(c) for _, row in batch] for c in columns})
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputFileError(
                f"{where} rows {numbers[0]}-{numbers[-1]}: a column mixes kinds of values "
                f"that one Parquet column cannot hold ({exc}); make each column one type"
            ) from None
        yield Chunk(number, table, texts, numbers[0])
        number += 1


def _parquet_chunks(path: Path, text_column: str, rows_per_file: int) -> Iterator[Chunk]:
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    where = str(path)
    try:
        source = pq.ParquetFile(path)
        _check_columns(source.schema_arrow.names, text_column, where)
        pending: list[Any] = []
        held = 0
        number = 0
        first = 1
        for batch in source.iter_batches(batch_size=min(rows_per_file, 65_536)):
            pending.append(batch)
            held += batch.num_rows
            while held >= rows_per_file:
                table = pa.Table.from_batches(pending)
                chunk, rest = table.slice(0, rows_per_file), table.slice(rows_per_file)
                yield _parquet_chunk(chunk, number, first, text_column, where)
                number, first = number + 1, first + rows_per_file
                pending, held = rest.to_batches(), rest.num_rows
        if held:
            table = pa.Table.from_batches(pending, schema=source.schema_arrow)
            yield _parquet_chunk(table, number, first, text_column, where)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputFileError(f"{path} is not a readable Parquet file: {exc}") from None


def _parquet_chunk(table: pa.Table, number: int, first: int, column: str, where: str) -> Chunk:
    table = table.combine_chunks().replace_schema_metadata(None)
    numbers = range(first, first + table.num_rows)
    return Chunk(number, table, text_values(table, column, where=where, row_numbers=numbers), first)


def _check_columns(columns: Sequence[str], text_column: str, where: str) -> None:
    if text_column not in columns:
        raise InputFileError(
            f"{where} has no column {text_column!r}; its columns are: "
            + (", ".join(repr(c) for c in columns) or "(none)")
        )
    check_output_columns(columns, where=where)


# -- the run: output directory, manifest, resumption ---------------------------------------


class RunManifest(BaseModel):
    """What a run embeds; a restart must match it to resume (see :func:`prepare_run`)."""

    embedding_space: str = Field(description="Space id of every vector written.")
    text_column: str = Field(description="Column holding the texts.")
    role: str = Field(description="'document' or 'query'.")
    rows_per_file: int = Field(description="Rows per output file (the chunk size).")
    inputs: list[InputFile] = Field(description="The input files, in argument order.")
    pipeline: PipelineIdentity | None = Field(
        default=None,
        description="Adapter and routing of every vector written (None: a run recorded "
        "before they were, which cannot be resumed).",
    )


class ChunkTask(BaseModel):
    """One output file to produce: which rows of which input go into it."""

    input_path: str = Field(description="The input file.")
    input_format: FileFormat = Field(description="Its format.")
    chunk: int = Field(description="Chunk number within the input (0-based).")
    rows: int = Field(description="Rows the chunk holds.")
    output_path: str = Field(description="The Parquet file to write.")
    done: bool = Field(description="True if a previous run already wrote it.")
    pipeline: PipelineIdentity = Field(description="The pipeline the run embeds with.")
    duplicates: list[int] = Field(
        default_factory=list,
        description="Rows of the chunk (0-based) whose text occurred earlier in the run.",
    )


class RunSummary(BaseModel):
    """What a run did, by route."""

    rows: int = Field(default=0, description="Rows embedded by this run.")
    files_written: int = Field(default=0, description="Output files written by this run.")
    rows_skipped: int = Field(default=0, description="Rows in files finished earlier.")
    files_skipped: int = Field(default=0, description="Output files finished earlier.")
    routes: dict[str, int] = Field(
        default_factory=lambda: dict.fromkeys(SUMMARY_COUNTS, 0),
        description="Rows per route, and the rows repeating a text of the run (duplicate).",
    )

    def add(self, routes: dict[str, int]) -> None:
        """Count one written file with these route counts."""
        self.files_written += 1
        for route, count in routes.items():
            self.routes[route] = self.routes.get(route, 0) + count
            self.rows += count


def prepare_run(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    space: EmbeddingSpace,
    pipeline: PipelineIdentity,
    text_column: str = "text",
    role: str = "document",
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    restart: bool = False,
) -> list[ChunkTask]:
    """Check the inputs and the output directory, and list the output files to produce.

    Every input is read once completely first (column, every text cell, row count), so bad
    input fails before anything is embedded. A directory holding a run with the same
    arguments and the same pipeline (adapter, mode, thresholds) is resumed: its finished
    files are marked ``done``; leftovers of a killed write (hidden temporary files) are
    removed.

    Args:
        inputs: The input files, in order.
        output: The output directory.
        space: The space of the vectors to write.
        pipeline: The identity of the pipeline that will embed (see :func:`bulk_pipeline`).
        text_column: Column holding the texts.
        role: ``document`` or ``query``.
        rows_per_file: Rows per output file.
        restart: Delete the files of the run already in ``output`` (those embed-dataset
            wrote, and its manifest) and start over, instead of resuming it.

    Raises:
        InputFileError: If an input is missing, unreadable, empty or has a bad cell.
        SpaceMismatchError: If ``output`` holds vectors of another space.
        RunMismatchError: If ``output`` holds another run (other inputs, column, role, chunk
            size, adapter, mode or thresholds), naming what differs; nothing is touched.
        ConfigurationError: If ``output`` holds Parquet files this command did not write.

    """
    if rows_per_file < 1:
        raise ConfigurationError(f"rows_per_file must be at least 1, got {rows_per_file}")
    if not inputs:
        raise InputFileError("no input files given")
    scans = [_scan_input(path, text_column=text_column) for path in inputs]
    scanned = [s for s, _ in scans]
    twice = [p for p, n in Counter(s.path for s in scanned).items() if n > 1]
    if twice:
        raise InputFileError(f"input {twice[0]} is given more than once")
    repeated = _repeated_rows([h for _, h in scans])
    del scans
    manifest = RunManifest(
        embedding_space=space.id,
        text_column=text_column,
        role=role,
        rows_per_file=rows_per_file,
        inputs=scanned,
        pipeline=pipeline,
    )
    directory = Path(output).expanduser()
    if directory.exists() and not directory.is_dir():
        raise InputFileError(f"--output {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    if restart:
        _remove_run(directory)
    _check_output_directory(directory, manifest, pipeline)
    for leftover in directory.glob(f"{_TEMPORARY_PREFIX}*"):
        leftover.unlink(missing_ok=True)  # a write killed before its rename
    tasks = []
    for index, source in enumerate(scanned):
        stem = _safe_stem(Path(source.path))
        for chunk in range((source.rows + rows_per_file - 1) // rows_per_file):
            first = chunk * rows_per_file
            rows = min(rows_per_file, source.rows - first)
            target = directory / f"{index:04d}-{stem}-{chunk:06d}.parquet"
            tasks.append(
                ChunkTask(
                    input_path=source.path,
                    input_format=source.format,
                    chunk=chunk,
                    rows=rows,
                    output_path=str(target),
                    done=_finished(target, rows),
                    pipeline=pipeline,
                    duplicates=np.flatnonzero(repeated[index][first : first + rows]).tolist(),
                )
            )
    return tasks


def _remove_run(directory: Path) -> None:
    """Delete the run in ``directory``: the files embed-dataset wrote, then its manifest."""
    manifest_path = directory / RUN_MANIFEST
    if not manifest_path.exists():
        return  # not a run: Parquet files there are someone else's, and are refused below
    for file in output_files(directory):
        if CHUNK_METADATA_KEY.encode() in _file_metadata(file):
            file.unlink()
    manifest_path.unlink()
    _sync_directory(directory)


def _check_output_directory(
    directory: Path, manifest: RunManifest, current: PipelineIdentity
) -> None:
    existing = output_files(directory)
    for file in existing:
        space = file_space(file)
        if space != manifest.embedding_space:
            raise SpaceMismatchError(
                f"--output {directory} holds {file.name} with vectors in space "
                f"{space or '(none recorded)'}, but this run writes "
                f"{manifest.embedding_space}; give another --output directory (or pass "
                "--restart if embed-dataset wrote it)"
            )
    manifest_path = directory / RUN_MANIFEST
    if not manifest_path.exists():
        if existing:
            raise ConfigurationError(
                f"--output {directory} already holds Parquet files not written by "
                "embed-dataset (no run manifest); give an empty or new directory"
            )
        _write_json_atomically(manifest_path, manifest.model_dump(mode="json"))
        return
    try:
        previous = RunManifest.model_validate_json(manifest_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigurationError(f"{manifest_path} is not a run manifest: {exc}") from None
    if previous.embedding_space != manifest.embedding_space:
        raise SpaceMismatchError(
            f"--output {directory} holds a run in space {previous.embedding_space}, but this "
            f"run writes {manifest.embedding_space}; give another --output directory, or pass "
            "--restart to start it over"
        )
    differences = _differences(previous, manifest, current)
    if differences:
        before = previous.pipeline
        pin = ""
        if before is not None and before.adapter != current.adapter and before.adapter_path:
            pin = f" (--adapter {before.adapter_path})"
        raise RunMismatchError(
            f"--output {directory} holds another run ({'; '.join(differences)}); resume it "
            f"with the same inputs, options and adapter{pin}, pass --restart to start it "
            "over, or give another --output directory",
            differences,
        )
    for file in existing:  # e.g. written before the pipeline was recorded
        differences = _pipeline_differences(file_pipeline(file), current)
        if differences:
            raise RunMismatchError(
                f"--output {directory} holds {file.name}, embedded by another pipeline "
                f"({'; '.join(differences)}); pass --restart to start the run over",
                differences,
            )


def _pipeline_differences(
    previous: PipelineIdentity | None, current: PipelineIdentity
) -> list[str]:
    if previous is None:
        return ["adapter, mode and thresholds: not recorded there"]
    return previous.differences(current)


def _differences(
    previous: RunManifest, current: RunManifest, pipeline: PipelineIdentity
) -> list[str]:
    found = [
        f"{name}: {getattr(previous, name)!r} there, {getattr(current, name)!r} now"
        for name in ("text_column", "role", "rows_per_file")
        if getattr(previous, name) != getattr(current, name)
    ]
    found += _pipeline_differences(previous.pipeline, pipeline)
    before = [i.path for i in previous.inputs]
    now = [i.path for i in current.inputs]
    if before != now:
        found.append(f"inputs: {before} there, {now} now")
        return found
    for old, new in zip(previous.inputs, current.inputs, strict=True):
        if (old.rows, old.size, old.mtime_ns) != (new.rows, new.size, new.mtime_ns):
            found.append(f"input {new.path} changed since the run started")
    return found


def _finished(path: Path, rows: int) -> bool:
    if not path.exists():
        return False
    import pyarrow.parquet as pq

    try:
        written = pq.read_metadata(path).num_rows
    except (OSError, ValueError) as exc:
        raise InputFileError(f"{path} is not a readable Parquet file: {exc}") from None
    if written != rows:
        raise ConfigurationError(
            f"{path} holds {written} rows, expected {rows}: it was not written by this run; "
            "give another --output directory"
        )
    return True


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:60] or "input"


def _write_json_atomically(path: Path, value: Any) -> None:
    temporary = path.with_name(f"{_TEMPORARY_PREFIX}{uuid.uuid4().hex}-{path.name}")
    temporary.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -- the local engine ------------------------------------------------------------------------


def chunk_metadata(task: ChunkTask, chunk: Chunk) -> dict[str, str]:
    """The schema metadata saying where an output file's rows came from."""
    where = {"input": task.input_path, "chunk": task.chunk, "first_row": chunk.first_row}
    return {CHUNK_METADATA_KEY: json.dumps({**where, "rows": chunk.table.num_rows})}


def read_task_chunk(task: ChunkTask, *, text_column: str, rows_per_file: int) -> Chunk:
    """The rows of one task, read from its input (the engines of other processes use this)."""
    chunks = iter_chunks(
        Path(task.input_path),
        task.input_format,
        text_column=text_column,
        rows_per_file=rows_per_file,
    )
    chunk = next(islice(chunks, task.chunk, None), None)
    if chunk is None or chunk.table.num_rows != task.rows:
        raise InputFileError(f"{task.input_path} changed while the run was reading it")
    return chunk


def write_task(
    pipeline: EmbeddingPipeline,
    task: ChunkTask,
    chunk: Chunk,
    *,
    role: Role,
    batch_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Embed one chunk, in batches of ``batch_size``, and write its file; route counts back.

    ``on_progress`` is called with the size of each batch embedded.

    Raises:
        RunMismatchError: If ``pipeline`` is not the run's (another adapter, mode or
            thresholds), before embedding, or it changed while the chunk was embedded;
            nothing is written.

    """
    pa = require_pyarrow()
    _check_pipeline(pipeline, task, "is to embed")
    parts = []
    for start in range(0, len(chunk.texts), batch_size):
        texts = chunk.texts[start : start + batch_size]
        parts.append(embed_table(pipeline, chunk.table.slice(start, batch_size), texts, role=role))
        if on_progress is not None:
            on_progress(len(texts))
    _check_pipeline(pipeline, task, "embedded")
    metadata = {SPACE_METADATA_KEY: pipeline.space.id, **task.pipeline.metadata()}
    table = pa.concat_tables(parts).replace_schema_metadata(
        {**metadata, **chunk_metadata(task, chunk)}
    )
    write_embeddings(table, task.output_path)
    return route_counts(table, task.duplicates)


def _check_pipeline(pipeline: EmbeddingPipeline, task: ChunkTask, what: str) -> None:
    differences = task.pipeline.differences(PipelineIdentity.of(pipeline))
    if differences:
        raise RunMismatchError(
            f"the pipeline that {what} {task.output_path} is not the run's "
            f"({'; '.join(differences)}); nothing was written",
            differences,
        )


def embed_files(
    tasks: Sequence[ChunkTask],
    pipeline: EmbeddingPipeline,
    *,
    text_column: str = "text",
    role: Role = "document",
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    batch_size: int = 256,
    on_progress: Callable[[int], None] | None = None,
) -> RunSummary:
    """The in-process engine: stream each input once, write each chunk not done yet.

    Args:
        tasks: From :func:`prepare_run` with the same ``text_column`` and ``rows_per_file``.
        pipeline: The pipeline that embeds.
        text_column: Column holding the texts.
        role: ``document`` or ``query``.
        rows_per_file: The chunk size the tasks were planned with.
        batch_size: Texts per pipeline call (a progress step).
        on_progress: Called with the number of rows of each finished batch.

    """
    summary = RunSummary()
    by_input: dict[str, list[ChunkTask]] = {}
    for task in tasks:
        by_input.setdefault(task.input_path, []).append(task)
    for path, file_tasks in by_input.items():
        pending = {t.chunk: t for t in file_tasks if not t.done}
        for task in file_tasks:
            if task.done:
                summary.files_skipped += 1
                summary.rows_skipped += task.rows
        if not pending:
            continue
        fmt = file_tasks[0].input_format
        chunks = iter_chunks(Path(path), fmt, text_column=text_column, rows_per_file=rows_per_file)
        for chunk in chunks:
            todo = pending.pop(chunk.number, None)
            if todo is None:
                continue
            if chunk.table.num_rows != todo.rows:
                raise InputFileError(f"{path} changed while the run was reading it")
            summary.add(
                write_task(
                    pipeline, todo, chunk, role=role, batch_size=batch_size, on_progress=on_progress
                )
            )
            if not pending:
                break
    return summary
