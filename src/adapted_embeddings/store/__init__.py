"""Where a node keeps what it learns: its own disk (the default), or a store its fleet shares.

One setting chooses: ``ADAPTED_EMBEDDINGS_STORE__URL=postgresql://...`` puts provider vectors
and the single-flight leases in that PostgreSQL database, shared by every node that names
it, in front of which each node keeps its disk cache (:class:`SharedCache`). Unset, nothing
changes: the disk cache alone (:class:`~adapted_embeddings.cache.EmbeddingCache`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from adapted_embeddings.errors import ConfigurationError
from adapted_embeddings.settings import AdaptedEmbeddingsSettings
from adapted_embeddings.settings_check import variable_name

if TYPE_CHECKING:
    from adapted_embeddings.store.tiered import SharedCache

__all__ = ["open_shared_cache"]

_lock = threading.Lock()
_open: dict[tuple[object, ...], SharedCache] = {}


def open_shared_cache(settings: AdaptedEmbeddingsSettings) -> SharedCache:
    """The node's disk cache over the shared store ``settings.store.url`` (one per process).

    The store is contacted once now: unreachable, the node starts anyway and serves from
    its disk and the provider until it answers (a warning says so).

    Raises:
        ConfigurationError: If the URL is not a PostgreSQL URL, or psycopg is not installed
            (naming the extra).
        StoreSchemaError: If the store's schema is newer than this library's.
        CacheDirectoryError: If the local cache directory cannot hold a private cache.

    """
    from adapted_embeddings.postgres.extras import PGVECTOR_EXTRA, require
    from adapted_embeddings.postgres.server import libpq_url

    store = settings.store
    assert store.url is not None
    given = store.url.get_secret_value().strip()
    try:
        url = libpq_url(given)
    except ValueError:
        raise ConfigurationError(
            f"{variable_name('store', 'url')} must be a postgresql://... URL, not "
            f"{given.split('://', 1)[0] or given[:20]!r}..."
        ) from None
    require("psycopg", PGVECTOR_EXTRA, what=f"the shared store ({variable_name('store', 'url')})")
    from adapted_embeddings.store.postgres import PostgresStore
    from adapted_embeddings.store.tiered import SharedCache

    cache = settings.cache
    key = (
        str(cache.directory),
        cache.size_limit_mb,
        cache.store_text,
        url,
        store.model_dump_json(),
    )
    with _lock:
        opened = _open.get(key)
        if opened is None:
            shared = PostgresStore(store.model_copy(update={"url": type(store.url)(url)}))
            shared.check()
            opened = SharedCache(
                cache.directory,
                shared,
                size_limit_mb=cache.size_limit_mb,
                store_text=cache.store_text,
                pending_writes=store.pending_writes,
            )
            _open[key] = opened
        return opened
