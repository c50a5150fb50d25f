"""The embedding cache of a fleet node: its own disk first, the fleet's PostgreSQL second.

:class:`SharedCache` *is* an :class:`~adapted_embeddings.cache.EmbeddingCache` (the pipeline
and its single flight use it unchanged), with two tiers:

* **local disk** (the node's own cache directory): read first, written always. It holds
  both kinds of entries, and is what the node serves from while the database is away;
* **shared** (:class:`~adapted_embeddings.store.postgres.PostgresStore`): provider vectors
  only, keyed exactly as on disk (space with its ``dimensions``, text hash) and stored in
  the same checksummed encoding. A vector found there is copied to the local disk, so the
  next hit costs no round trip. Local (adapter) vectors stay per node: they cost no
  provider call to recompute.

The single-flight leases live in the shared store too, so two nodes that miss on the same
text at once pay for it once; expiry is judged by the database's clock.

When the database is down or slow, every call falls back to the local tier within the
store's timeouts: leases are taken on the local disk (one node still pays once per text),
and provider vectors wait in a bounded in-memory queue, written (``ON CONFLICT DO NOTHING``,
so never twice) as soon as the database answers again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from adapted_embeddings.cache import (
    CachedEmbedding,
    EmbeddingCache,
    _DamagedEntryError,
    _decode,
    _encode,
)
from adapted_embeddings.store.postgres import PostgresStore, StoreUnavailableError

logger = logging.getLogger(__name__)

_MAX_LOCAL_HOLDERS = 4096  # leases taken on disk during an outage, remembered for release


class SharedCache(EmbeddingCache):
    """A node's disk cache in front of the fleet's shared store (see the module docstring)."""

    def __init__(
        self,
        directory: str | Path,
        shared: PostgresStore,
        *,
        size_limit_mb: int = 1024,
        store_text: bool = False,
        pending_writes: int = 10_000,
    ) -> None:
        """Open the local tier in ``directory`` (see :class:`EmbeddingCache`) over ``shared``.

        Raises:
            CacheDirectoryError: If the directory cannot hold a private cache.

        """
        super().__init__(directory, size_limit_mb=size_limit_mb, store_text=store_text)
        self.shared = shared
        self.pending_limit = pending_writes
        self._pending: OrderedDict[str, bytes] = OrderedDict()
        self._pending_lock = threading.Lock()
        self._dropped = 0
        self._local_holders: OrderedDict[bytes, None] = OrderedDict()
        self.shared_hits = 0
        """Entries this process found in the shared store and not on its own disk."""

    # -- entries --------------------------------------------------------------------------

    def put_many(self, items: list[tuple[str, CachedEmbedding]]) -> None:
        """Store entries on disk; provider vectors also in the shared store (queued if down)."""
        super().put_many(items)
        shared = [
            (key, _encode(key, entry, self.store_text))
            for key, entry in items
            if entry.route == "provider"
        ]
        with self._pending_lock:
            for key, value in shared:
                self._pending[key] = value
            while len(self._pending) > self.pending_limit:
                self._pending.popitem(last=False)
                self._dropped += 1
        self.flush()

    def flush(self) -> int:
        """Write queued provider vectors to the shared store; how many are still waiting."""
        with self._pending_lock:
            batch = list(self._pending.items())
        if batch:
            try:
                self.shared.put_values(batch)
            except StoreUnavailableError:
                return len(batch)
            with self._pending_lock:
                for key, value in batch:
                    if self._pending.get(key) == value:
                        del self._pending[key]
        with self._pending_lock:
            if self._dropped:
                logger.warning(
                    "%d provider vectors were not shared (the store was away for over %d "
                    "writes); this node keeps them on its disk",
                    self._dropped,
                    self.pending_limit,
                )
                self._dropped = 0
            return len(self._pending)

    def _lookup(self, keys: list[str], dimensions: int) -> list[CachedEmbedding | None]:
        """Keys on disk, then the misses in the shared store (hits are copied down)."""
        found = self._read(keys, dimensions)
        missing = [key for key, entry in zip(keys, found, strict=True) if entry is None]
        if not missing:
            return found
        if self._pending:
            self.flush()
        try:
            values = self.shared.get_values(missing)
        except StoreUnavailableError:
            return found
        fetched: dict[str, CachedEmbedding] = {}
        damaged = []
        for key, raw in values.items():
            try:
                entry = _decode(key, raw, dimensions)
            except _DamagedEntryError as exc:
                self._note_damaged(key, exc)
                damaged.append(key)
                continue
            if entry is not None and entry.route == "provider":
                fetched[key] = entry
        if damaged:
            with contextlib.suppress(StoreUnavailableError):  # else misses again next time
                self.shared.delete_values(damaged)
        if fetched:
            super().put_many(list(fetched.items()))  # the next hit needs no round trip
            with self._lock:
                self.shared_hits += len(fetched)
        return [entry or fetched.get(key) for key, entry in zip(keys, found, strict=True)]

    # -- leases: in the shared store, on disk while it is away -----------------------------

    def claim(
        self,
        keys: list[str],
        holder: bytes,
        *,
        seconds: float,
        take_over: dict[str, bytes] | None = None,
    ) -> list[bytes | None]:
        """Take leases in the shared store, so every node sees them (see the base class)."""
        try:
            return self.shared.claim(keys, holder, seconds, take_over or {})
        except StoreUnavailableError:
            with self._lock:
                self._local_holders[holder] = None
                while len(self._local_holders) > _MAX_LOCAL_HOLDERS:
                    self._local_holders.popitem(last=False)
            return super().claim(keys, holder, seconds=seconds, take_over=take_over)

    def holders(self, keys: list[str]) -> list[bytes | None]:
        """Current holder of each key, in the shared store or (outage leases) on disk."""
        local = super().holders(keys)
        try:
            shared = self.shared.holders(keys)
        except StoreUnavailableError:
            return local
        return [s if s is not None else h for s, h in zip(shared, local, strict=True)]

    def release(self, keys: list[str], holder: bytes) -> None:
        """Drop ``holder``'s leases wherever they were taken (unreleased ones expire)."""
        with self._lock:
            local = holder in self._local_holders
            self._local_holders.pop(holder, None)
        if local:
            super().release(keys, holder)
            return
        with contextlib.suppress(StoreUnavailableError):  # else they expire on their own
            self.shared.release(keys, holder)

    @property
    def pending(self) -> int:
        """Provider vectors waiting for the shared store to come back."""
        with self._pending_lock:
            return len(self._pending)

    def close(self) -> None:
        """Write what is queued (if the store answers), then close both tiers."""
        self.flush()
        super().close()
        self.shared.close()
