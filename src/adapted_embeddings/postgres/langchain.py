"""LangChain: a ``langchain_postgres.PGVector`` whose collection records and enforces its space.

.. code-block:: python

    from adapted_embeddings.langchain import AdaptedEmbeddings
    from adapted_embeddings.postgres.langchain import SpaceCheckedPGVector

    embeddings = AdaptedEmbeddings(model="text-embedding-ada-002")
    store = SpaceCheckedPGVector(embeddings, collection_name="docs")  # DATABASE_URL or pgserver
    store.add_texts(["..."])
    store.similarity_search("...", k=4)

Everything else is ``PGVector`` as documented by langchain-postgres. What this adds:

* the collection is created with ``{"embedding_space": "provider/model@dimensions"}`` in its
  metadata, and the table's column is ``vector(dimensions)`` (``embedding_length``);
* opening a collection recorded in another space, or a table of another width, raises
  :class:`~adapted_embeddings.errors.SpaceMismatchError`; one with no recorded space but rows
  warns (:class:`~adapted_embeddings.postgres.space_record.UnrecordedSpaceWarning`);
* every add and every query, sync or async, checks the store's embedder and the width of
  each vector first, so nothing of another space reaches the table.

langchain-postgres keeps every collection in one table (``langchain_pg_embedding``), whose
``vector(N)`` is fixed when it is created: one database (or schema) holds one width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adapted_embeddings.errors import SpaceMismatchError
from adapted_embeddings.postgres.extras import PGVECTOR_EXTRA, require
from adapted_embeddings.postgres.server import database_url, sqlalchemy_url
from adapted_embeddings.postgres.space_record import (
    SPACE_KEY,
    CollectionTarget,
    SpaceGuard,
    embedding_space_of,
    open_space,
)
from adapted_embeddings.spaces import EmbeddingSpace

require("langchain_postgres", PGVECTOR_EXTRA, what="SpaceCheckedPGVector")
require("psycopg", PGVECTOR_EXTRA, what="SpaceCheckedPGVector")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_postgres import PGVector  # noqa: E402

DEFAULT_COLLECTION = "langchain"


class SpaceCheckedPGVector(PGVector):
    """``PGVector`` bound to one embedding space, recorded in its collection's metadata."""

    def __init__(
        self,
        embeddings: Embeddings,
        *,
        connection: Any = None,
        collection_name: str = DEFAULT_COLLECTION,
        collection_metadata: dict[str, Any] | None = None,
        space: EmbeddingSpace | str | None = None,
        embedding_length: int | None = None,
        async_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Open (or create) ``collection_name`` for the space of ``embeddings``.

        Args:
            embeddings: The embedder; its ``.space`` is the collection's space
                (``AdaptedEmbeddings`` has one; for others pass ``space=``).
            connection: URL or SQLAlchemy (async) engine; defaults to ``DATABASE_URL``, else
                the embedded pgserver. ``postgres://`` URLs get the psycopg driver.
            collection_name: The collection.
            collection_metadata: Extra metadata stored with a new collection.
            space: The space, when the embedder does not say it; must match it if it does.
            embedding_length: Optional; must equal the space's dimensions if given.
            async_mode: As in ``PGVector``: the space is then checked on first use.
            **kwargs: Passed on to ``PGVector``.

        Raises:
            SpaceMismatchError: Embedder, ``space``, ``embedding_length``, the collection's
                recorded space or the table's ``vector(N)`` disagree.
            ConfigurationError: The embedder's space is unknown, or an extra is missing.

        """
        resolved = EmbeddingSpace.parse(space) if space else embedding_space_of(embeddings)
        guard = SpaceGuard(space=resolved, target=CollectionTarget(collection=collection_name))
        if space is not None and getattr(embeddings, "space", None) is not None:
            guard.check_embedder(embeddings, what="the embedder's vectors")
        if embedding_length not in (None, resolved.dimensions):
            raise SpaceMismatchError(
                f"embedding_length={embedding_length} but space {resolved.id} has "
                f"{resolved.dimensions} dimensions"
            )
        if connection is None:
            connection = database_url()
        if isinstance(connection, str):
            connection = _psycopg_url(connection)
        self._guard = guard
        self._space_opened = False
        self.space_recorded = False
        super().__init__(
            embeddings,
            connection=connection,
            embedding_length=resolved.dimensions,
            collection_name=collection_name,
            collection_metadata={**(collection_metadata or {}), SPACE_KEY: resolved.id},
            async_mode=async_mode,
            **kwargs,
        )
        if not self.async_mode:
            assert self._engine is not None
            self.space_recorded = open_space(self._engine, guard.target, resolved)
            self._check_table_class()
            self._space_opened = True

    @property
    def space(self) -> EmbeddingSpace:
        """The space every vector in this collection lives in."""
        return self._guard.space

    def _check_table_class(self) -> None:
        # langchain-postgres builds its table class once per process, with the width of the
        # first store opened; a store of another width would fail deep inside SQLAlchemy.
        width = self.EmbeddingStore.__table__.c.embedding.type.dim
        if width != self.space.dimensions:
            raise SpaceMismatchError(
                f"langchain-postgres already uses vector({width}) in this process (one table, "
                f"langchain_pg_embedding, holds every collection); space {self.space.id} needs "
                f"vector({self.space.dimensions}): use another process and database or schema"
            )

    async def _aopen_space(self) -> None:
        if self._space_opened:
            return
        await self.acreate_collection()  # runs PGVector's lazy async set-up first
        assert self._async_engine is not None
        async with self._async_engine.begin() as conn:
            self.space_recorded = await conn.run_sync(
                open_space, self._guard.target, self._guard.space
            )
        self._check_table_class()
        self._space_opened = True

    def _check(self, vectors: Sequence[Sequence[float]], space: Any, *, what: str) -> None:
        if getattr(self.embeddings, "space", None) is not None:
            self._guard.check_embedder(self.embeddings, what=f"the store's embedder's {what}")
        self._guard.check_space(space, what=what)
        self._guard.check_vectors(vectors, what=what)

    async def _acheck(self, vectors: Sequence[Sequence[float]], space: Any, *, what: str) -> None:
        """:meth:`_check` once the collection's space is opened (async stores open lazily)."""
        await self._aopen_space()
        self._check(vectors, space, what=what)

    def add_embeddings(
        self,
        texts: Sequence[str],
        embeddings: list[list[float]],
        metadatas: list[dict[Any, Any]] | None = None,
        ids: list[str] | None = None,
        *,
        space: EmbeddingSpace | str | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """``PGVector.add_embeddings`` after checking the embedder, ``space`` and widths."""
        self._check(embeddings, space, what="vectors to add")
        return super().add_embeddings(texts, embeddings, metadatas, ids, **kwargs)

    async def aadd_embeddings(
        self,
        texts: Sequence[str],
        embeddings: list[list[float]],
        metadatas: list[dict[Any, Any]] | None = None,
        ids: list[str] | None = None,
        *,
        space: EmbeddingSpace | str | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Async :meth:`add_embeddings`."""
        await self._acheck(embeddings, space, what="vectors to add")
        return await super().aadd_embeddings(texts, embeddings, metadatas, ids, **kwargs)

    def similarity_search_with_score_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        filter: dict[Any, Any] | None = None,
        *,
        space: EmbeddingSpace | str | None = None,
    ) -> list[tuple[Document, float]]:
        """Every similarity search ends here: check, then ``PGVector``'s query."""
        self._check([embedding], space, what="query vector")
        return super().similarity_search_with_score_by_vector(embedding, k=k, filter=filter)

    async def asimilarity_search_with_score_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        filter: dict[Any, Any] | None = None,
        *,
        space: EmbeddingSpace | str | None = None,
    ) -> list[tuple[Document, float]]:
        """Async :meth:`similarity_search_with_score_by_vector`."""
        await self._acheck([embedding], space, what="query vector")
        return await super().asimilarity_search_with_score_by_vector(embedding, k=k, filter=filter)

    def max_marginal_relevance_search_with_score_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> list[tuple[Document, float]]:
        """Every MMR search ends here: check, then ``PGVector``'s query."""
        self._check([embedding], kwargs.pop("space", None), what="query vector")
        return super().max_marginal_relevance_search_with_score_by_vector(
            embedding, k=k, fetch_k=fetch_k, lambda_mult=lambda_mult, filter=filter, **kwargs
        )

    async def amax_marginal_relevance_search_with_score_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> list[tuple[Document, float]]:
        """Async :meth:`max_marginal_relevance_search_with_score_by_vector`."""
        await self._acheck([embedding], kwargs.pop("space", None), what="query vector")
        return await super().amax_marginal_relevance_search_with_score_by_vector(
            embedding, k=k, fetch_k=fetch_k, lambda_mult=lambda_mult, filter=filter, **kwargs
        )


def _psycopg_url(url: str) -> str:
    """PGVector speaks psycopg 3; plain ``postgres://`` URLs get that driver."""
    if url.startswith("postgresql+"):
        return url
    return sqlalchemy_url(url, "psycopg")
