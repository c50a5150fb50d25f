"""LlamaIndex: a ``PGVectorStore`` whose table records and enforces its embedding space.

.. code-block:: python

    from adapted_embeddings.llama_index import AdaptedEmbeddings
    from adapted_embeddings.postgres.llama_index import SpaceCheckedPGVectorStore

    embed_model = AdaptedEmbeddings(model="text-embedding-ada-002")
    store = SpaceCheckedPGVectorStore(embed_model=embed_model, table_name="docs")
    index = store.build_index(documents)            # or store.as_index() for an existing one
    index.as_retriever(similarity_top_k=3).retrieve("...")

What this adds to ``PGVectorStore`` (``pip install 'adapted-embeddings[llama-index-postgres]'``):

* the table (``data_<table_name>``) is created with ``vector(dimensions)`` (``embed_dim``) and
  its comment records ``embedding_space=provider/model@dimensions``;
* a table recorded in another space, or of another width, is refused with
  :class:`~adapted_embeddings.errors.SpaceMismatchError` on every add, query and delete; one
  with rows but no recorded space warns
  (:class:`~adapted_embeddings.postgres.space_record.UnrecordedSpaceWarning`);
* every node and query vector is checked for width before SQL runs, and
  :meth:`~SpaceCheckedPGVectorStore.as_index` / :meth:`~SpaceCheckedPGVectorStore.build_index`
  refuse an embedding model of another space.

A LlamaIndex vector store receives vectors, never the model that made them: an index built
around this store by hand (``VectorStoreIndex.from_vector_store(store, embed_model=...)``)
is checked for width only, so build indexes with :meth:`as_index` or :meth:`build_index`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import PrivateAttr

from adapted_embeddings.errors import ConfigurationError, SpaceMismatchError
from adapted_embeddings.postgres.extras import LLAMA_INDEX_POSTGRES_EXTRA, require
from adapted_embeddings.postgres.server import database_url, sqlalchemy_url
from adapted_embeddings.postgres.space_record import (
    SpaceGuard,
    TableTarget,
    embedding_space_of,
    open_space,
)
from adapted_embeddings.spaces import EmbeddingSpace

require(
    "llama_index.vector_stores.postgres",
    LLAMA_INDEX_POSTGRES_EXTRA,
    what="SpaceCheckedPGVectorStore",
)

from llama_index.core import StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.schema import BaseNode, Document  # noqa: E402
from llama_index.core.vector_stores.types import (  # noqa: E402
    VectorStoreQuery,
    VectorStoreQueryResult,
)
from llama_index.vector_stores.postgres import PGVectorStore  # noqa: E402

DEFAULT_TABLE = "llamaindex"


class SpaceCheckedPGVectorStore(PGVectorStore):
    """``PGVectorStore`` bound to one embedding space, recorded in its table's comment."""

    _guard: SpaceGuard = PrivateAttr()
    _embed_model: Any = PrivateAttr(default=None)
    _space_opened: bool = PrivateAttr(default=False)
    _space_recorded: bool = PrivateAttr(default=False)

    def __init__(
        self,
        *,
        embed_model: Any = None,
        space: EmbeddingSpace | str | None = None,
        connection_string: str | None = None,
        async_connection_string: str | None = None,
        table_name: str = DEFAULT_TABLE,
        schema_name: str = "public",
        embed_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Open (or create) the table for the space of ``embed_model`` (or ``space``).

        Args:
            embed_model: The embedding model; its ``.space`` is the table's space
                (``AdaptedEmbeddings`` has one). Used by :meth:`as_index`/:meth:`build_index`.
            space: The space, when there is no model or it does not say; must match it.
            connection_string: Sync URL; defaults to ``DATABASE_URL``, else the embedded
                pgserver. A driverless URL gets psycopg2 (what this store is tested with).
            async_connection_string: Async URL; defaults to the same server via asyncpg.
            table_name: LlamaIndex's table name (the table is ``data_<table_name>``).
            schema_name: The schema.
            embed_dim: Optional; must equal the space's dimensions if given.
            **kwargs: Passed on to ``PGVectorStore`` (``hnsw_kwargs``, ``use_jsonb``, ...).

        Raises:
            SpaceMismatchError: ``embed_model``, ``space`` and ``embed_dim`` disagree.
            ConfigurationError: Neither names a space, or the extra is missing.

        """
        if space is not None:
            resolved = EmbeddingSpace.parse(space)
        elif embed_model is not None:
            resolved = embedding_space_of(embed_model)
        else:
            raise ConfigurationError(
                "SpaceCheckedPGVectorStore needs embed_model= (an AdaptedEmbeddings) or "
                "space='provider/model@dimensions'"
            )
        if embed_dim not in (None, resolved.dimensions):
            raise SpaceMismatchError(
                f"embed_dim={embed_dim} but space {resolved.id} has {resolved.dimensions} "
                "dimensions"
            )
        url = connection_string or database_url()
        super().__init__(
            connection_string=_with_driver(url, "psycopg2"),
            async_connection_string=_with_driver(async_connection_string or url, "asyncpg"),
            table_name=table_name,
            schema_name=schema_name,
            embed_dim=resolved.dimensions,
            **kwargs,
        )
        target = TableTarget(
            table=self._table_class.__tablename__,
            schema_name=self.schema_name,
            vector_column="embedding",
            text_column="text",
        )
        self._guard = SpaceGuard(space=resolved, target=target)
        if embed_model is not None:
            self._guard.check_embedder(embed_model, what="the embed_model's vectors")
        self._embed_model = embed_model

    @classmethod
    def class_name(cls) -> str:
        """Name LlamaIndex uses when serialising this component."""
        return "SpaceCheckedPGVectorStore"

    @property
    def space(self) -> EmbeddingSpace:
        """The space every vector in this table lives in."""
        return self._guard.space

    @property
    def target(self) -> TableTarget:
        """The table, for :func:`check_space` / :func:`stamp_space`."""
        target = self._guard.target
        assert isinstance(target, TableTarget)
        return target

    @property
    def space_recorded(self) -> bool:
        """Whether the table's comment records this space (False: rows with no record)."""
        self._initialize()
        return self._space_recorded

    def _initialize(self) -> None:
        super()._initialize()
        if not self._space_opened:  # checked until it passes, so a mismatch refuses every call
            assert self._engine is not None
            self._space_recorded = open_space(self._engine, self.target, self.space)
            self._space_opened = True

    def _check_nodes(self, nodes: Sequence[BaseNode], kwargs: dict[str, Any]) -> None:
        self._guard.check_space(kwargs.pop("embedding_space", None), what="nodes to add")
        self._guard.check_vectors([node.get_embedding() for node in nodes], what="nodes to add")

    def _check_query(self, query: VectorStoreQuery, kwargs: dict[str, Any]) -> None:
        self._guard.check_space(kwargs.pop("embedding_space", None), what="query vector")
        if query.query_embedding is not None:
            self._guard.check_vectors([query.query_embedding], what="query vector")

    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """``PGVectorStore.add`` (one transaction) after checking the table and widths."""
        self._initialize()
        self._check_nodes(nodes, add_kwargs)
        return super().add(list(nodes), **add_kwargs)

    async def async_add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        """Async :meth:`add`."""
        self._initialize()
        self._check_nodes(nodes, kwargs)
        return await super().async_add(list(nodes), **kwargs)

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """``PGVectorStore.query`` after checking the table and the query vector."""
        self._initialize()
        self._check_query(query, kwargs)
        return super().query(query, **kwargs)

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Async :meth:`query`."""
        self._initialize()
        self._check_query(query, kwargs)
        return await super().aquery(query, **kwargs)

    def _model(self, embed_model: Any) -> Any:
        model = embed_model if embed_model is not None else self._embed_model
        if model is None:
            raise ConfigurationError("give embed_model= here or to SpaceCheckedPGVectorStore")
        self._guard.check_embedder(model, what="the embed_model's vectors")
        return model

    def as_index(self, embed_model: Any = None, **kwargs: Any) -> VectorStoreIndex:
        """A ``VectorStoreIndex`` over this table, after checking the model's space."""
        return VectorStoreIndex.from_vector_store(
            self, embed_model=self._model(embed_model), **kwargs
        )

    def build_index(
        self, documents: Sequence[Document], embed_model: Any = None, **kwargs: Any
    ) -> VectorStoreIndex:
        """``VectorStoreIndex.from_documents`` into this table, after checking the model."""
        return VectorStoreIndex.from_documents(
            documents,
            storage_context=StorageContext.from_defaults(vector_store=self),
            embed_model=self._model(embed_model),
            **kwargs,
        )


def _with_driver(url: str, driver: str) -> str:
    return url if url.startswith("postgresql+") else sqlalchemy_url(url, driver)
