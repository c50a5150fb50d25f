"""The pair store: (source vector, provider vector) pairs the provider was already paid for.

Every provider vector for a text the adapter also scored (a fallback or an audit) is kept
here, beside the cache, so :func:`~adapted_embeddings.learning.adapt.adapt` can fit a
domain adapter from the user's own data at no extra cost.

Embeddings can be inverted to recover much of their text, so the store is as sensitive as
the cache: it lives in the private (0700) cache directory, its file is 0600, and it holds
the text only when ``store_text`` is on (a SHA-256 of the text is kept to avoid duplicates).

The store is one SQLite file in WAL mode: any number of threads and processes may write to
it at once, and every batch is one transaction, so a crash leaves whole batches or none.
It is bounded: past ``max_pairs`` for a (source, target) pair of spaces, the oldest go.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from adapted_embeddings.errors import PairStoreError
from adapted_embeddings.spaces import EmbeddingSpace
from adapted_embeddings.types import Role

logger = logging.getLogger(__name__)

PAIR_STORE_FILE = "pairs.sqlite3"
_SCHEMA_VERSION = 1
PairKind = Literal["fallback", "audit", "cold_start"]
"""Why the provider embedded the text: below threshold, a random audit, or no adapter yet."""
SUSPECT = "suspect"
"""The kind of a pair whose provider vector failed ``adapt()``'s plausibility check: kept
for inspection, never learned from; :meth:`PairStore.drop_suspect` removes them."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_space TEXT NOT NULL,
    target_space TEXT NOT NULL,
    text_sha256 BLOB NOT NULL,
    role TEXT NOT NULL,
    adapter_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    confidence REAL,
    agreement REAL,
    created REAL NOT NULL,
    source BLOB NOT NULL,
    target BLOB NOT NULL,
    text TEXT,
    UNIQUE (source_space, target_space, text_sha256)
);
CREATE INDEX IF NOT EXISTS pairs_by_space ON pairs (source_space, target_space, id);
CREATE INDEX IF NOT EXISTS audits_by_adapter ON pairs (adapter_id, kind, id);
CREATE TABLE IF NOT EXISTS local_sources (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_space TEXT NOT NULL,
    target_space TEXT NOT NULL,
    created REAL NOT NULL,
    source BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS local_sources_by_space
    ON local_sources (source_space, target_space, id);
"""
MAX_LOCAL_SOURCES = 10_000
"""The newest unpaid local texts' source vectors kept per (source, target) (~15 MB at 384)."""


@dataclass(frozen=True)
class PairRecord:
    """One pair to store: what the local model saw and what the provider returned."""

    text: str
    source: np.ndarray
    target: np.ndarray
    role: Role
    adapter_id: str
    kind: PairKind
    confidence: float | None = None
    agreement: float | None = None


@dataclass(frozen=True)
class PairSet:
    """Row-aligned pairs read back from the store, oldest first."""

    ids: np.ndarray
    source: np.ndarray
    target: np.ndarray
    roles: list[str]
    kinds: list[str]
    adapter_ids: list[str]
    confidence: np.ndarray  # NaN where the adapter did not score the text
    created: np.ndarray
    texts: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class AuditRecord:
    """One audit: the adapter's confidence and how well its vector agreed with the provider."""

    confidence: float
    agreement: float


@dataclass(frozen=True)
class PairStoreStats:
    """How many pairs the store holds for one (source, target), by kind."""

    path: str
    source_space: str
    target_space: str
    pairs: int
    by_kind: dict[str, int]
    newest: float | None
    local_sources: int = 0
    """Unpaid local texts whose source vectors are kept (:meth:`PairStore.add_local_sources`)."""


class PairStore:
    """Process- and thread-safe store of (source, provider) vector pairs.

    Example:
        >>> store = PairStore(cache_dir)  # doctest: +SKIP
        >>> pairs = store.load(source=encoder.space, target=adapter.target)  # doctest: +SKIP

    """

    def __init__(
        self, directory: str | Path, *, max_pairs: int = 100_000, store_text: bool = False
    ) -> None:
        """Use the store in ``directory`` (a private directory); it is opened on first use.

        Every method raises :class:`PairStoreError` if the file is not a readable pair
        store; :meth:`clear` is the way out (it moves a damaged file aside).
        """
        self.directory = Path(directory).expanduser().absolute()  # opened again later
        self.path = self.directory / PAIR_STORE_FILE
        self.max_pairs = max_pairs
        self.store_text = store_text
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None

    # -- writing --------------------------------------------------------------------------

    def add(
        self, records: Sequence[PairRecord], *, source: EmbeddingSpace, target: EmbeddingSpace
    ) -> int:
        """Store pairs (one transaction); a text already stored is replaced by the newer pair.

        Returns:
            How many pairs were written.

        Raises:
            PairStoreError: If a vector has the wrong width or is not finite (nothing is
                written then), or the store cannot be written.

        """
        if not records:
            return 0
        rows = [self._row(i, r, source, target) for i, r in enumerate(records)]
        with self._transaction() as connection:
            connection.executemany(
                "INSERT OR REPLACE INTO pairs (source_space, target_space, text_sha256, role, "
                "adapter_id, kind, confidence, agreement, created, source, target, text) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._evict(connection, source, target)
        return len(rows)

    def add_local_sources(
        self, vectors: np.ndarray, *, source: EmbeddingSpace, target: EmbeddingSpace
    ) -> int:
        """Keep the source vectors of texts served locally without a provider call.

        The pairs are not the traffic: every routed text is a pair, but of the texts kept
        local only the audits are. These vectors (no text, no provider vector: nothing was
        paid for them) complete the picture, so ``adapt()`` can count the share of the
        traffic a threshold routes instead of inferring it from the audits' weights. The
        newest :data:`MAX_LOCAL_SOURCES` per (source, target) are kept.

        Returns:
            How many were written (rows of the wrong width or not finite are skipped).

        """
        array = np.asarray(vectors, dtype="<f4")
        if array.ndim != 2 or array.shape[1] != source.dimensions or not len(array):
            return 0
        rows = [
            (source.id, target.id, time.time(), row.tobytes())
            for row in np.ascontiguousarray(array)
            if np.isfinite(row).all()
        ]
        with self._transaction() as connection:
            connection.executemany(
                "INSERT INTO local_sources (source_space, target_space, created, source) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )
            connection.execute(
                "DELETE FROM local_sources WHERE source_space = ? AND target_space = ? AND id <= "
                "(SELECT id FROM local_sources WHERE source_space = ? AND target_space = ? "
                "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (source.id, target.id, source.id, target.id, MAX_LOCAL_SOURCES),
            )
        return len(rows)

    def clear(
        self, *, source: EmbeddingSpace | None = None, target: EmbeddingSpace | None = None
    ) -> int:
        """Delete pairs (those of one source/target, or all); returns how many were deleted.

        The unpaid local texts' source vectors go with them. A damaged store file is moved
        aside (kept for inspection) and a new one created.
        """
        try:
            with self._transaction() as connection:
                where, arguments = _space_filter(source, target)
                connection.execute(f"DELETE FROM local_sources{where}", arguments)
                cursor = connection.execute(f"DELETE FROM pairs{where}", arguments)
                return int(cursor.rowcount)
        except PairStoreError:
            if source is not None or target is not None:
                raise
            self._move_aside()
            return 0

    def drop_invalid(self, *, source: EmbeddingSpace, target: EmbeddingSpace) -> int:
        """Delete only the rows that cannot be read back (wrong widths, NaN); returns how many."""
        bad = [row_id for row_id, _ in self._scan(source, target, raise_on_bad=False)[1]]
        if bad:
            with self._transaction() as connection:
                connection.executemany("DELETE FROM pairs WHERE id = ?", [(i,) for i in bad])
        return len(bad)

    def mark_suspect(self, ids: np.ndarray) -> int:
        """Mark pairs whose provider vectors failed a plausibility check; returns how many.

        Marked pairs stay in the store (for inspection) but are never loaded for learning.
        """
        with self._transaction() as connection:
            cursor = connection.executemany(
                f"UPDATE pairs SET kind = '{SUSPECT}' WHERE id = ?", [(int(i),) for i in ids]
            )
            return int(cursor.rowcount)

    def drop_suspect(self, *, source: EmbeddingSpace, target: EmbeddingSpace) -> int:
        """Delete the pairs marked suspect for (source, target); returns how many."""
        with self._transaction() as connection:
            cursor = connection.execute(
                "DELETE FROM pairs WHERE source_space = ? AND target_space = ? AND kind = ?",
                (source.id, target.id, SUSPECT),
            )
            return int(cursor.rowcount)

    # -- reading --------------------------------------------------------------------------

    def load(self, *, source: EmbeddingSpace, target: EmbeddingSpace, after_id: int = 0) -> PairSet:
        """Every pair stored for (source, target), oldest first (pairs marked suspect excepted).

        Raises:
            PairStoreError: If a row holds vectors of the wrong width or NaN/Inf values
                (naming the rows; :meth:`drop_invalid` removes just those), or the file
                is damaged.

        """
        pairs, _ = self._scan(source, target, raise_on_bad=True, after_id=after_id)
        return pairs

    def local_sources(
        self, *, source: EmbeddingSpace, target: EmbeddingSpace
    ) -> tuple[np.ndarray, np.ndarray]:
        """The kept source vectors of unpaid local texts, oldest first, and when each came.

        Returns:
            ``(vectors, created)``: ``(m, d)`` float32 and ``(m,)`` Unix times.

        """
        rows = self._query_all(
            "SELECT created, source FROM local_sources WHERE source_space = ? AND "
            "target_space = ? ORDER BY id",
            (source.id, target.id),
        )
        width = 4 * source.dimensions
        kept = [(float(c), b) for c, b in rows if isinstance(b, bytes) and len(b) == width]
        vectors = _stack([np.frombuffer(b, dtype="<f4") for _, b in kept], source.dimensions)
        finite = np.isfinite(vectors).all(axis=1)
        return vectors[finite], np.array([c for c, _ in kept])[finite]

    def count(self, *, source: EmbeddingSpace, target: EmbeddingSpace, after_id: int = 0) -> int:
        """How many pairs are stored for (source, target) with ``id > after_id``."""
        row = self._query_one(
            "SELECT COUNT(*) FROM pairs WHERE source_space = ? AND target_space = ? AND id > ?",
            (source.id, target.id, after_id),
        )
        return int(row[0]) if row else 0

    def last_id(self) -> int:
        """The newest row id (0 when empty): pairs after it are new."""
        row = self._query_one("SELECT COALESCE(MAX(id), 0) FROM pairs", ())
        return int(row[0]) if row else 0

    def audits(self, adapter_id: str, *, limit: int) -> list[AuditRecord]:
        """The newest ``limit`` audits of ``adapter_id``, oldest first."""
        rows = self._query_all(
            "SELECT confidence, agreement FROM pairs WHERE adapter_id = ? AND kind = 'audit' "
            "AND agreement IS NOT NULL ORDER BY id DESC LIMIT ?",
            (adapter_id, limit),
        )
        return [AuditRecord(float(c or 0.0), float(a)) for c, a in reversed(rows)]

    def stats(self, *, source: EmbeddingSpace, target: EmbeddingSpace) -> PairStoreStats:
        """Pair counts by kind for (source, target)."""
        rows = self._query_all(
            "SELECT kind, COUNT(*), MAX(created) FROM pairs WHERE source_space = ? AND "
            "target_space = ? GROUP BY kind",
            (source.id, target.id),
        )
        by_kind = {str(kind): int(count) for kind, count, _ in rows}
        newest = max((float(t) for _, _, t in rows if t is not None), default=None)
        local = self._query_one(
            "SELECT COUNT(*) FROM local_sources WHERE source_space = ? AND target_space = ?",
            (source.id, target.id),
        )
        return PairStoreStats(
            str(self.path),
            source.id,
            target.id,
            sum(by_kind.values()),
            by_kind,
            newest,
            int(local[0]) if local else 0,
        )

    def claim_fleet_adaptation(self) -> bool:
        """Whether this node may run ``adapt()`` now: a store of its own always may.

        A store shared by a fleet lets one node at a time adapt for all (see
        :class:`~adapted_embeddings.store.pairs.SharedPairStore`).
        """
        return True

    def release_fleet_adaptation(self) -> None:
        """Give back what :meth:`claim_fleet_adaptation` took (nothing here)."""

    def close(self) -> None:
        """Close the SQLite connection."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # -- internals ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fresh = not self.path.exists()
            if fresh:  # create it private before SQLite opens it with the umask's mode
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            connection = sqlite3.connect(
                self.path, timeout=60, isolation_level=None, check_same_thread=False
            )
            _enable_wal(connection)
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(_SCHEMA)
            version = connection.execute(
                "SELECT value FROM meta WHERE name = 'schema_version'"
            ).fetchone()
            if version is None:
                connection.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                    (str(_SCHEMA_VERSION),),
                )
            elif version[0] != str(_SCHEMA_VERSION):
                raise PairStoreError(
                    f"pair store {self.path} has schema version {version[0]}, this library "
                    f"reads {_SCHEMA_VERSION}; upgrade adapted-embeddings or move the file aside"
                )
        except sqlite3.Error as exc:
            raise PairStoreError(
                f"pair store {self.path} cannot be opened ({exc}); it is kept as it is. "
                "Move it aside, or run `adapted-embeddings pairs clear --yes` to start a new one"
            ) from exc
        except OSError as exc:
            raise PairStoreError(
                f"pair store directory {self.directory} is not usable: {exc.strerror}"
            ) from exc
        self._connection = connection
        return connection

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            connection = self._connect()
            try:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    yield connection
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
            except sqlite3.Error as exc:
                raise PairStoreError(f"pair store {self.path} could not be written: {exc}") from exc

    def _query_all(self, sql: str, arguments: tuple[object, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._connect().execute(sql, arguments).fetchall())
            except sqlite3.Error as exc:
                raise PairStoreError(f"pair store {self.path} could not be read: {exc}") from exc

    def _query_one(self, sql: str, arguments: tuple[object, ...]) -> tuple[Any, ...] | None:
        rows = self._query_all(sql, arguments)
        return rows[0] if rows else None

    def _row(
        self, index: int, record: PairRecord, source: EmbeddingSpace, target: EmbeddingSpace
    ) -> tuple[object, ...]:
        vectors = []
        for space, vector, what in (
            (source, record.source, "source"),
            (target, record.target, "provider"),
        ):
            array = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
            if array.size != space.dimensions or not np.isfinite(array).all():
                raise PairStoreError(
                    f"pair {index}: the {what} vector has {array.size} values (expected "
                    f"{space.dimensions} for {space.id}) or is not finite; nothing was stored"
                )
            vectors.append(array.tobytes())
        text_hash = hashlib.sha256(record.text.encode("utf-8", "surrogatepass")).digest()
        return (
            source.id,
            target.id,
            text_hash,
            record.role,
            record.adapter_id,
            record.kind,
            record.confidence,
            record.agreement,
            time.time(),
            vectors[0],
            vectors[1],
            record.text if self.store_text else None,
        )

    def _evict(
        self, connection: sqlite3.Connection, source: EmbeddingSpace, target: EmbeddingSpace
    ) -> None:
        (count,) = connection.execute(
            "SELECT COUNT(*) FROM pairs WHERE source_space = ? AND target_space = ?",
            (source.id, target.id),
        ).fetchone()
        excess = int(count) - self.max_pairs
        if excess > 0:
            connection.execute(
                "DELETE FROM pairs WHERE id IN (SELECT id FROM pairs WHERE source_space = ? "
                "AND target_space = ? ORDER BY id LIMIT ?)",
                (source.id, target.id, excess),
            )

    def _scan(
        self,
        source: EmbeddingSpace,
        target: EmbeddingSpace,
        *,
        raise_on_bad: bool,
        after_id: int = 0,
    ) -> tuple[PairSet, list[tuple[int, str]]]:
        rows = self._query_all(
            "SELECT id, role, kind, adapter_id, confidence, created, source, target, text "
            "FROM pairs WHERE source_space = ? AND target_space = ? AND id > ? AND kind != ? "
            "ORDER BY id",
            (source.id, target.id, after_id, SUSPECT),
        )
        good: list[tuple[Any, ...]] = []
        sources: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        bad: list[tuple[int, str]] = []
        for row in rows:
            row_id = int(row[0])
            problem = None
            decoded = []
            for blob, space, what in ((row[6], source, "source"), (row[7], target, "provider")):
                if not isinstance(blob, bytes) or len(blob) != 4 * space.dimensions:
                    size = len(blob) // 4 if isinstance(blob, bytes) else 0
                    problem = f"{what} vector of {size} values, expected {space.dimensions}"
                    break
                vector = np.frombuffer(blob, dtype="<f4")
                if not np.isfinite(vector).all():
                    problem = f"{what} vector with NaN or Inf"
                    break
                decoded.append(vector)
            if problem is not None:
                bad.append((row_id, problem))
                continue
            good.append(row)
            sources.append(decoded[0])
            targets.append(decoded[1])
        if bad and raise_on_bad:
            shown = "; ".join(f"row {i}: {p}" for i, p in bad[:3])
            raise PairStoreError(
                f"pair store {self.path} holds {len(bad)} unreadable pairs for "
                f"{source.id} -> {target.id} ({shown}). Other pairs are intact: "
                "PairStore.drop_invalid() (or `adapted-embeddings pairs clear`) removes them"
            )
        pairs = PairSet(
            ids=np.array([int(r[0]) for r in good], dtype=np.int64),
            source=_stack(sources, source.dimensions),
            target=_stack(targets, target.dimensions),
            roles=[str(r[1]) for r in good],
            kinds=[str(r[2]) for r in good],
            adapter_ids=[str(r[3]) for r in good],
            confidence=np.array(
                [np.nan if r[4] is None else float(r[4]) for r in good],
                dtype=np.float32,
            ),
            created=np.array([float(r[5]) for r in good]),
            texts=[None if r[8] is None else str(r[8]) for r in good],
        )
        return pairs, bad

    def _move_aside(self) -> None:
        with self._lock:
            if self._connection is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._connection.close()
                self._connection = None
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for suffix in ("", "-wal", "-shm"):
                damaged = Path(f"{self.path}{suffix}")
                if damaged.exists():
                    damaged.rename(f"{self.path}.damaged-{stamp}{suffix}")
            logger.warning("pair store %s was damaged; moved aside and started anew", self.path)
        self._connect()


_WAL_SWITCH_SECONDS = 60.0


def _enable_wal(connection: sqlite3.Connection) -> None:
    """Switch to WAL, waiting while another process holds the lock.

    SQLite does not call the busy handler for a journal-mode change, so two processes
    opening a new store at once could fail with "database is locked" (seen in CI): retry
    for as long as the connection's own timeout.
    """
    deadline = time.monotonic() + _WAL_SWITCH_SECONDS
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _stack(vectors: list[np.ndarray], width: int) -> np.ndarray:
    if not vectors:
        return np.zeros((0, width), dtype=np.float32)
    return np.stack(vectors).astype(np.float32, copy=False)


def _space_filter(
    source: EmbeddingSpace | None, target: EmbeddingSpace | None
) -> tuple[str, tuple[str, ...]]:
    clauses, arguments = [], []
    if source is not None:
        clauses.append("source_space = ?")
        arguments.append(source.id)
    if target is not None:
        clauses.append("target_space = ?")
        arguments.append(target.id)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(arguments)
