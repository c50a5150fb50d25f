"""Parallel data from user files, for the ``train``, ``calibrate`` and ``evaluate`` commands.

A file (CSV, TSV, JSONL or Parquet) holds a text column and, optionally, the target
provider's stored vectors of those texts. The source side is always computed here with the
local encoder; a missing target side is fetched from the provider (cached, resumable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.encoders import SourceEncoder, build_encoder
from adapted_embeddings.errors import TrainingDataError
from adapted_embeddings.io import read_text_records
from adapted_embeddings.settings import ProviderSettings
from adapted_embeddings.spaces import EmbeddingSpace
from adapted_embeddings.training.evaluation import EvaluationSet, evaluate_adapter

ENCODE_CHUNK = 256
"""Texts per local encoder call, so the progress bar moves on long files."""


@dataclass(frozen=True)
class ParallelFile:
    """Row-aligned texts, local source vectors and target vectors read from one file."""

    texts: list[str]
    source_vectors: np.ndarray
    target_vectors: np.ndarray
    source_space: EmbeddingSpace
    target_space: EmbeddingSpace
    target_from: str  # "file" or "provider"


def encode_texts(encoder: SourceEncoder, texts: list[str], *, progress: bool = True) -> np.ndarray:
    """Embed ``texts`` with a local encoder in chunks, with a progress bar on a terminal."""
    from tqdm.auto import tqdm

    parts = []
    with tqdm(
        total=len(texts), unit="text", desc="local encoder", disable=not progress or None
    ) as bar:
        for start in range(0, len(texts), ENCODE_CHUNK):
            parts.append(encoder.encode(texts[start : start + ENCODE_CHUNK]))
            bar.update(len(parts[-1]))
    return np.concatenate(parts).astype(np.float32)


def read_parallel_file(
    path: str | Path,
    *,
    text_column: str = "text",
    vector_column: str | None = None,
    source: Any = "sentence-transformers/all-MiniLM-L6-v2",
    target: EmbeddingSpace | str,
    provider: ProviderSettings | None = None,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> ParallelFile:
    """Read texts (and stored target vectors) from a file and embed the source side.

    Args:
        path: CSV, TSV, JSONL or Parquet file.
        text_column: Column of texts.
        vector_column: Column of the target's stored vectors; None fetches them from the
            provider described by ``provider`` (cached under ``cache_dir``).
        source: The local model (anything ``build_encoder`` accepts).
        target: The target space the vectors live in.
        provider: Provider settings, needed when ``vector_column`` is None.
        cache_dir: Cache for provider vectors (required with ``provider``).
        limit: Read at most this many rows.
        progress: Show progress bars.

    Raises:
        InputFileError: Missing file, wrong column or bad rows (see :mod:`adapted_embeddings.io`).
        TrainingDataError: Stored vectors that do not fit the target space, or no way to get
            target vectors.
        ConfigurationError: The provider has neither an API key nor a base URL.

    """
    target_space = EmbeddingSpace.parse(target)
    records = read_text_records(
        path, text_column=text_column, vector_column=vector_column, limit=limit
    )
    if records.vectors is not None:
        if records.vectors.shape[1] != target_space.dimensions:
            raise TrainingDataError(
                f"column {vector_column!r} of {path} holds {records.vectors.shape[1]}-d vectors, "
                f"but the target space {target_space.id} has {target_space.dimensions}"
            )
        target_vectors, target_from = records.vectors, "file"
    else:
        if provider is None or cache_dir is None:
            raise TrainingDataError(
                "no target vectors: give the column holding them, or a provider to fetch them"
            )
        from adapted_embeddings.provider import require_credentials
        from adapted_embeddings.training.texts import embed_with_provider

        require_credentials(provider)  # before any work or cost notice
        target_vectors = embed_with_provider(
            records.texts,
            target=target_space,
            provider=provider,
            cache_dir=cache_dir,
            progress=progress,
        )
        target_from = "provider"
    encoder = build_encoder(source)
    source_vectors = encode_texts(encoder, records.texts, progress=progress)
    return ParallelFile(
        texts=records.texts,
        source_vectors=source_vectors,
        target_vectors=np.asarray(target_vectors, dtype=np.float32),
        source_space=encoder.space,
        target_space=target_space,
        target_from=target_from,
    )


def evaluate_on_pairs(
    adapter: Adapter, source_vectors: np.ndarray, target_vectors: np.ndarray
) -> dict[str, Any]:
    """Evaluate ``adapter`` on held-out pairs: each text queries an index of all targets.

    The index is the target vectors of every row; each row's translated vector is a query
    whose own row is excluded, and it is scored against what its true target vector
    retrieves (see :func:`adapted_embeddings.training.evaluation.evaluate_adapter`).

    Raises:
        TrainingDataError: If the pairs do not fit the adapter's spaces or are too few.

    """
    from adapted_embeddings.training.data import check_parallel

    data = check_parallel(
        source_vectors, target_vectors, source=adapter.source, target=adapter.target
    )
    if len(data) < 12:
        raise TrainingDataError(f"evaluation needs at least 12 pairs, got {len(data)}")
    translated, confidence = adapter.translate(data.source)
    evaluation = EvaluationSet(
        native_queries=data.target,
        corpus=data.target,
        query_index=np.arange(len(data)),
        labels=None,
        target_mean=adapter.weights["decoder.bias"],
    )
    return {"pairs": len(data), **evaluate_adapter(translated, confidence, evaluation)}
