"""Validation of parallel training data: every problem is reported before any work starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapted_embeddings.errors import TrainingDataError
from adapted_embeddings.spaces import EmbeddingSpace

MIN_PAIRS = {"linear": 200, "mlp": 1000}
"""Fewest (source, target) pairs each flavor accepts.

The linear flavor is a ridge solve and is usable from a few hundred pairs. The MLP flavor
holds out a validation slice for early stopping and cross-fits its quality head, so below
~1000 pairs each fold is too small to say anything reliable.
"""

FLAVORS = tuple(MIN_PAIRS)


@dataclass(frozen=True)
class ParallelData:
    """Row-aligned source and target vectors, checked and unit-normalised (float32)."""

    source: np.ndarray
    target: np.ndarray
    source_space: EmbeddingSpace
    target_space: EmbeddingSpace

    def __len__(self) -> int:
        return len(self.source)

    def subset(self, rows: np.ndarray) -> ParallelData:
        """The pairs at ``rows`` (an index array or boolean mask)."""
        return ParallelData(
            self.source[rows], self.target[rows], self.source_space, self.target_space
        )


def _check_matrix(vectors: object, space: EmbeddingSpace, what: str) -> np.ndarray:
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise TrainingDataError(f"{what} must be a 2-D array (rows, dims), got shape {array.shape}")
    if array.dtype.kind not in "fiu":
        raise TrainingDataError(f"{what} must be numeric, got dtype {array.dtype}")
    if array.shape[1] != space.dimensions:
        raise TrainingDataError(
            f"{what} have {array.shape[1]} dimensions but the declared space {space.id} has "
            f"{space.dimensions}"
        )
    array = array.astype(np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise TrainingDataError(
            f"{what} contain NaN or Inf in {len(rows)} row(s), first rows {rows[:5].tolist()}"
        )
    norms = np.linalg.norm(array, axis=1)
    zero = norms == 0
    if zero.any():
        rows = np.flatnonzero(zero)
        raise TrainingDataError(
            f"{what} contain {len(rows)} all-zero row(s), first rows {rows[:5].tolist()}"
        )
    return array / norms[:, None]


def check_parallel(
    source_vectors: object,
    target_vectors: object,
    *,
    source: EmbeddingSpace | str,
    target: EmbeddingSpace | str,
    flavor: str | None = None,
) -> ParallelData:
    """Validate a parallel corpus and return it normalised.

    Args:
        source_vectors: ``(n, source.dimensions)`` vectors from the local encoder.
        target_vectors: ``(n, target.dimensions)`` vectors of the same texts from the target.
        source: The source space (or its id).
        target: The target space (or its id).
        flavor: If given, also check there are at least ``MIN_PAIRS[flavor]`` pairs.

    Raises:
        TrainingDataError: Unknown flavor, mismatched row counts, widths that disagree with
            the declared spaces, NaN/Inf or all-zero rows, or too few pairs.

    """
    source_space = EmbeddingSpace.parse(source)
    target_space = EmbeddingSpace.parse(target)
    if flavor is not None and flavor not in MIN_PAIRS:
        raise TrainingDataError(f"unknown flavor {flavor!r}; choose one of {list(FLAVORS)}")
    source_array = _check_matrix(source_vectors, source_space, "source vectors")
    target_array = _check_matrix(target_vectors, target_space, "target vectors")
    if len(source_array) != len(target_array):
        raise TrainingDataError(
            f"source vectors have {len(source_array)} rows but target vectors have "
            f"{len(target_array)}; they must be row-aligned pairs of the same texts"
        )
    if flavor is not None and len(source_array) < MIN_PAIRS[flavor]:
        raise TrainingDataError(
            f"flavor {flavor!r} needs at least {MIN_PAIRS[flavor]} pairs, got {len(source_array)}"
        )
    return ParallelData(source_array, target_array, source_space, target_space)


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train_rows, validation_rows) index arrays; validation gets ``fraction``."""
    return grouped_validation_split(np.arange(n), fraction, seed)


def grouped_validation_split(
    groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train_rows, validation_rows): ``fraction`` of the *groups* go to validation.

    Every row of a group lands on the same side. With one row per group this is the plain
    row split :func:`validation_split` (the same rows for the same seed).
    """
    unique, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    n_validation = max(1, round(len(unique) * fraction))
    held = np.zeros(len(unique), dtype=bool)
    held[order[:n_validation]] = True
    in_validation = held[inverse]
    return np.flatnonzero(~in_validation), np.flatnonzero(in_validation)


def check_output_directory(directory: str | Path, *, overwrite: bool) -> Path:
    """Refuse, before any work, to replace an existing adapter directory without ``overwrite``.

    Raises:
        FileExistsError: ``directory`` exists and ``overwrite`` is False.

    """
    path = Path(directory)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"adapter directory {path} already exists; pass overwrite=True to replace it"
        )
    return path
