from __future__ import annotations

import numpy as np
import pytest

from adapted_embeddings import EmbeddingSpace, ensure_same_space
from adapted_embeddings.errors import InvalidVectorError, SpaceMismatchError
from adapted_embeddings.spaces import OPENAI_ADA_002


def test_space_id_round_trips() -> None:
    space = EmbeddingSpace(provider="openai", model="text-embedding-3-small", dimensions=512)
    assert space.id == "openai/text-embedding-3-small@512"
    assert EmbeddingSpace.parse(space.id) == space
    assert EmbeddingSpace.parse(space.model_dump()) == space


@pytest.mark.parametrize("bad", ["openai/ada", "ada@1536", "/x@3", "openai/x@-1", ""])
def test_parse_rejects_malformed_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        EmbeddingSpace.parse(bad)


def test_ensure_same_space_names_what_differs() -> None:
    other = EmbeddingSpace(provider="openai", model="text-embedding-3-small", dimensions=1536)
    ensure_same_space(OPENAI_ADA_002, OPENAI_ADA_002.id)
    with pytest.raises(SpaceMismatchError, match="model: 'text-embedding-ada-002' != "):
        ensure_same_space(OPENAI_ADA_002, other, what="query vectors")


def test_check_vectors_rejects_wrong_width_and_non_finite() -> None:
    with pytest.raises(SpaceMismatchError, match="1535 dimensions"):
        OPENAI_ADA_002.check_vectors(np.zeros((2, 1535)))
    bad = np.zeros((3, 1536))
    bad[2, 7] = np.nan
    with pytest.raises(InvalidVectorError, match=r"rows \[2\]"):
        OPENAI_ADA_002.check_vectors(bad)
    assert OPENAI_ADA_002.check_vectors(np.zeros(1536)).shape == (1, 1536)
