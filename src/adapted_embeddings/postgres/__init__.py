"""PostgreSQL + pgvector: vector tables that know, and enforce, their embedding space.

A vector column does not say which model made its vectors. This package records the
:class:`~adapted_embeddings.spaces.EmbeddingSpace` where the table or collection is created
and refuses, with :class:`~adapted_embeddings.errors.SpaceMismatchError`, every add or query
made in another space or at another width:

* LangChain: :class:`adapted_embeddings.postgres.langchain.SpaceCheckedPGVector`, a
  ``langchain_postgres.PGVector`` that records the space in the collection's metadata
  (``pip install 'adapted-embeddings[pgvector]'``);
* LlamaIndex: :class:`adapted_embeddings.postgres.llama_index.SpaceCheckedPGVectorStore`, a
  ``PGVectorStore`` that records it in its table's comment
  (``pip install 'adapted-embeddings[llama-index-postgres]'``);
* plain SQL: :func:`open_space` / :func:`stamp_space` on any table, via its comment.

Both integrations use the same helper (:mod:`adapted_embeddings.postgres.space_record`).
A table or collection created elsewhere with no recorded space gets an
:class:`UnrecordedSpaceWarning`; :func:`check_space` compares a random sample of its stored
vectors with the embedder's, and :func:`stamp_space` records the space once that check
passed (a table that mixes spaces is refused with :class:`MixedSpaceError`).

With no ``DATABASE_URL``, :func:`database_url` starts an embedded PostgreSQL with pgvector
(``pgserver``) in a private data directory.

Nothing heavy is imported until a name is used, so ``import adapted_embeddings.postgres``
works without the extras; using a name whose extra is missing raises
:class:`~adapted_embeddings.errors.ConfigurationError` naming the ``pip install`` line.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SPACE_KEY": "space_record",
    "CollectionTarget": "space_record",
    "MixedSpaceError": "space_record",
    "SpaceCheck": "space_record",
    "SpaceGuard": "space_record",
    "TableTarget": "space_record",
    "UnrecordedSpaceWarning": "space_record",
    "check_space": "space_record",
    "embedding_space_of": "space_record",
    "open_space": "space_record",
    "recorded_space": "space_record",
    "stamp_space": "space_record",
    "vector_width": "space_record",
    "EmbeddedPostgres": "server",
    "database_url": "server",
    "embedded_server": "server",
    "libpq_url": "server",
    "sqlalchemy_url": "server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
