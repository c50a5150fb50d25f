"""Where a node keeps what it learns: its own disk (the default), or a store its fleet shares.

One setting chooses: ``ADAPTED_EMBEDDINGS_STORE__URL=postgresql://...`` puts provider vectors,
the single-flight leases and the learned pairs and audits in that PostgreSQL database,
shared by every node that names it. Each node keeps its disk cache and pair store in front
of it (:mod:`.tiered`, :mod:`.pairs`). Unset, nothing changes: the disk alone.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from adapted_embeddings.errors import ConfigurationError
from adapted_embeddings.settings import AdaptedEmbeddingsSettings
from adapted_embeddings.settings_check import variable_name

if TYPE_CHECKING:
    from adapted_embeddings.pipeline import EmbeddingPipeline
    from adapted_embeddings.store.adapters import AdapterFollower
    from adapted_embeddings.store.pairs import SharedPairStore
    from adapted_embeddings.store.postgres import PostgresStore
    from adapted_embeddings.store.tiered import SharedCache

__all__ = [
    "close_shared_stores",
    "follow_fleet_adapters",
    "open_shared_cache",
    "open_shared_pair_store",
    "shared_store",
]

_lock = threading.Lock()
_stores: dict[tuple[str, str], PostgresStore] = {}
_caches: dict[tuple[object, ...], SharedCache] = {}
_pair_stores: dict[tuple[object, ...], SharedPairStore] = {}


def shared_store(settings: AdaptedEmbeddingsSettings) -> PostgresStore:
    """The process's connections to the store ``settings.store.url`` (checked once).

    The store is contacted now: unreachable, the node starts anyway and serves from its
    disk and the provider until it answers (a warning says so).

    Raises:
        ConfigurationError: If the URL is not a PostgreSQL URL, or psycopg is not installed
            (naming the extra).
        StoreSchemaError: If the store's schema is newer than this library's.

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

    key = (url, store.model_dump_json())
    with _lock:
        opened = _stores.get(key)
        if opened is None:
            opened = PostgresStore(store.model_copy(update={"url": type(store.url)(url)}))
            _stores[key] = opened
    opened.check()  # every pipeline built checks the schema, not only the process's first
    return opened


def open_shared_cache(settings: AdaptedEmbeddingsSettings) -> SharedCache:
    """The node's disk cache over the shared store (one per process and directory).

    Raises:
        ConfigurationError, StoreSchemaError: See :func:`shared_store`.
        CacheDirectoryError: If the local cache directory cannot hold a private cache.

    """
    from adapted_embeddings.store.tiered import SharedCache

    shared = shared_store(settings)
    cache = settings.cache
    key = (str(cache.directory), cache.size_limit_mb, cache.store_text, id(shared))
    with _lock:
        opened = _caches.get(key)
        if opened is None:
            opened = SharedCache(
                cache.directory,
                shared,
                size_limit_mb=cache.size_limit_mb,
                store_text=cache.store_text,
                pending_writes=settings.store.pending_writes,
            )
            _caches[key] = opened
        return opened


def open_shared_pair_store(settings: AdaptedEmbeddingsSettings) -> SharedPairStore:
    """The node's pair store (beside its cache), synchronised with the fleet's.

    Raises:
        ConfigurationError, StoreSchemaError: See :func:`shared_store`.

    """
    from adapted_embeddings.store.pairs import SharedPairStore

    shared = shared_store(settings)
    learning = settings.learning
    key = (str(settings.cache.directory), learning.max_pairs, learning.store_text, id(shared))
    with _lock:
        opened = _pair_stores.get(key)
        if opened is None:
            opened = SharedPairStore(
                settings.cache.directory,
                shared,
                max_pairs=learning.max_pairs,
                store_text=learning.store_text,
            )
            _pair_stores[key] = opened
        return opened


def follow_fleet_adapters(
    pipeline: EmbeddingPipeline, settings: AdaptedEmbeddingsSettings
) -> AdapterFollower:
    """Publish ``pipeline``'s adapted adapters and switch it to the fleet's newest (polling).

    Raises:
        ConfigurationError, StoreSchemaError: See :func:`shared_store`.

    """
    from adapted_embeddings.learning.adapt import adapted_adapter_dir
    from adapted_embeddings.store.adapters import AdapterFollower

    learned = adapted_adapter_dir(settings.learning, settings.cache.directory)
    follower = AdapterFollower(
        pipeline, shared_store(settings), learned, keep=settings.learning.keep_adapters
    )
    follower.start()
    return follower


def close_shared_stores() -> None:
    """Close this process's connections to every shared store and forget them.

    Pipelines built afterwards open new ones; a pipeline still running reconnects on its
    next call. For a clean shutdown, and for tests that start many nodes in one process.
    """
    with _lock:
        stores = list(_stores.values())
        caches = list(_caches.values())
        _stores.clear()
        _caches.clear()
        _pair_stores.clear()
    for cache in caches:
        cache.flush()
    for store in stores:
        store.close()
