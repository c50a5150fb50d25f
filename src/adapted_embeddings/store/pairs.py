"""The fleet's pairs and audits: each node's pair store, synchronised through PostgreSQL.

:class:`SharedPairStore` *is* a :class:`~adapted_embeddings.learning.pairs.PairStore` (the
learner and ``adapt()`` use it unchanged): every read is served by the node's own SQLite
file, bounded by ``max_pairs`` as without a fleet. What the fleet adds is a sync:

* **push**: the node's new rows (those after a cursor kept in the file itself) go to the
  ``ae_pairs`` table in one transaction, keyed like the file (spaces + SHA-256 of the text),
  so a replayed push never duplicates a pair. The cursor moves only after the commit: a
  database that is away, or a node killed between the two, costs a re-push, never a pair;
* **pull**: rows other nodes pushed come back into the file (a newer pair for the same text
  wins, an equal one is left as it is), so ``adapt()`` learns from the union of the fleet's
  pairs and the guard judges from every node's audits.

Pairs hold no text unless ``learning.store_text``, in the database as on disk. While the
database is away the node learns from its own pairs; the sync resumes when it answers.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from adapted_embeddings.learning.pairs import (
    AuditRecord,
    PairRecord,
    PairSet,
    PairStore,
    PairStoreStats,
)
from adapted_embeddings.spaces import EmbeddingSpace
from adapted_embeddings.store.postgres import PostgresStore, StoreUnavailableError

logger = logging.getLogger(__name__)

_COLUMNS = (
    "source_space, target_space, text_sha256, role, adapter_id, kind, confidence, agreement, "
    "created, source, target, text"
)
_BATCH = 2000  # rows per push or pull statement
_ADAPT_LOCK = 0x61655F6164617074  # advisory lock key ("ae_adapt"): one adapt() for the fleet
_LATE_COMMITS = "30 seconds"  # rows stored this recently are pulled again (ids commit out of order)


class SharedPairStore(PairStore):
    """A node's pair store, pushed to and pulled from the fleet's PostgreSQL store."""

    def __init__(
        self,
        directory: str | Path,
        shared: PostgresStore,
        *,
        max_pairs: int = 100_000,
        store_text: bool = False,
        pull_seconds: float = 1.0,
    ) -> None:
        """Use the pair store in ``directory``, synchronised through ``shared``.

        Reads pull the fleet's new pairs at most every ``pull_seconds`` (``load`` always
        does, so ``adapt()`` sees everything the database holds).
        """
        super().__init__(directory, max_pairs=max_pairs, store_text=store_text)
        self.shared = shared
        self.pull_seconds = pull_seconds
        self._pulled_at = 0.0
        self._adapt_lock_connection: psycopg.Connection | None = None

    # -- the PairStore interface: local, after a sync -------------------------------------

    def add(
        self, records: Sequence[PairRecord], *, source: EmbeddingSpace, target: EmbeddingSpace
    ) -> int:
        """Store pairs on disk (see :meth:`PairStore.add`), then push them to the fleet."""
        written = super().add(records, source=source, target=target)
        self.sync()
        return written

    def load(self, *, source: EmbeddingSpace, target: EmbeddingSpace, after_id: int = 0) -> PairSet:
        """Every pair the fleet has shared so far, and this node's own (see PairStore.load)."""
        self.sync(pull_now=True)
        return super().load(source=source, target=target, after_id=after_id)

    def count(self, *, source: EmbeddingSpace, target: EmbeddingSpace, after_id: int = 0) -> int:
        """How many pairs this node knows of, the fleet's included (see PairStore.count)."""
        self.sync()
        return super().count(source=source, target=target, after_id=after_id)

    def stats(self, *, source: EmbeddingSpace, target: EmbeddingSpace) -> PairStoreStats:
        """Pair counts by kind, the fleet's included (see PairStore.stats)."""
        self.sync(pull_now=True)
        return super().stats(source=source, target=target)

    def add_local_sources(
        self, vectors: np.ndarray, *, source: EmbeddingSpace, target: EmbeddingSpace
    ) -> int:
        """Nothing: a node's unpaid texts are not the fleet's (see :meth:`local_sources`)."""
        return 0

    def local_sources(
        self, *, source: EmbeddingSpace, target: EmbeddingSpace
    ) -> tuple[np.ndarray, np.ndarray]:
        """None: the pairs are the fleet's, and one node's unpaid texts would not match them.

        ``adapt()`` then estimates the call rate from the pairs alone (audits weighted by
        the local texts they stand for), as a node's own store does before it has any.
        """
        return np.zeros((0, source.dimensions), dtype=np.float32), np.zeros(0)

    def audits(self, adapter_id: str, *, limit: int) -> list[AuditRecord]:
        """The newest audits of ``adapter_id`` from every node (see PairStore.audits)."""
        self.sync()
        return super().audits(adapter_id, limit=limit)

    # -- one learner for the fleet ----------------------------------------------------------

    def claim_fleet_adaptation(self) -> bool:
        """Take the fleet's adaptation lock (a session advisory lock); False if another holds it.

        Held on a connection of its own until :meth:`release_fleet_adaptation`, so a node
        that dies mid-``adapt()`` releases it with its connection. With the database away
        the node may adapt on its own (True): learning must not wait for it.
        """
        try:
            conn = psycopg.connect(
                self.shared.url,
                autocommit=True,
                connect_timeout=max(1, round(self.shared.settings.connect_timeout)),
            )
        except psycopg.Error:
            return True
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_ADAPT_LOCK,)).fetchone()
        except psycopg.Error:
            conn.close()
            return True
        if not (row and row[0]):
            conn.close()
            return False
        self._adapt_lock_connection = conn
        return True

    def release_fleet_adaptation(self) -> None:
        """Release the lock :meth:`claim_fleet_adaptation` took (closing its connection)."""
        conn, self._adapt_lock_connection = self._adapt_lock_connection, None
        if conn is not None:
            conn.close()

    # -- sync -----------------------------------------------------------------------------

    def sync(self, *, pull_now: bool = False) -> None:
        """Push this node's new pairs, and pull the fleet's if due; skipped while it is away."""
        try:
            self._push()
            if pull_now or time.monotonic() - self._pulled_at >= self.pull_seconds:
                self._pull()
                self._pulled_at = time.monotonic()
        except StoreUnavailableError:
            pass  # the cursors did not move: the next sync does it

    def unpushed(self) -> int:
        """Pairs of this node not in the fleet's store yet."""
        row = self._query_one("SELECT COUNT(*) FROM pairs WHERE id > ?", (self._cursor("pushed"),))
        return int(row[0]) if row else 0

    def _push(self) -> None:
        while True:
            pushed = self._cursor("pushed")
            rows = self._query_all(
                f"SELECT id, {_COLUMNS} FROM pairs WHERE id > ? ORDER BY id LIMIT ?",
                (pushed, _BATCH),
            )
            if not rows:
                return
            self.shared.run(functools.partial(self._write, [row[1:] for row in rows]))
            self._set_cursor("pushed", int(rows[-1][0]), only_if=pushed)

    def _write(self, rows: list[tuple[Any, ...]], conn: psycopg.Connection) -> None:
        """One transaction: upsert ``rows`` (newer pairs win), then evict past ``max_pairs``."""
        ordered = sorted(rows, key=lambda row: (row[0], row[1], row[2]))  # one lock order
        with conn.transaction():
            with conn.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO ae_pairs ({_COLUMNS}) VALUES "
                    "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (source_space, target_space, text_sha256) DO UPDATE "
                    "SET role = EXCLUDED.role, adapter_id = EXCLUDED.adapter_id, "
                    "kind = EXCLUDED.kind, confidence = EXCLUDED.confidence, "
                    "agreement = EXCLUDED.agreement, created = EXCLUDED.created, "
                    "source = EXCLUDED.source, target = EXCLUDED.target, "
                    "text = EXCLUDED.text, id = nextval('ae_pairs_id_seq'), "
                    "stored_at = clock_timestamp() "
                    "WHERE ae_pairs.created < EXCLUDED.created",
                    ordered,
                )
            for source_space, target_space in sorted({(row[0], row[1]) for row in rows}):
                conn.execute(  # bounded as on disk
                    "DELETE FROM ae_pairs WHERE id IN (SELECT id FROM ae_pairs "
                    "WHERE source_space = %s AND target_space = %s ORDER BY id DESC OFFSET %s)",
                    (source_space, target_space, self.max_pairs),
                )

    def _pull(self) -> None:
        while True:
            pulled = self._cursor("pulled")
            rows = self.shared.run(functools.partial(_read_after, pulled))
            fresh = [row for row in rows if int(row[0]) > pulled]
            self._merge([row[1:] for row in rows])
            if not fresh:
                return
            self._set_cursor("pulled", max(int(row[0]) for row in fresh))
            if len(rows) < _BATCH:
                return

    def _merge(self, rows: list[tuple[object, ...]]) -> None:
        """Pulled rows into the file: newer pairs replace older ones, equal ones are left."""
        if not rows:
            return
        with self._transaction() as connection:
            before = connection.execute("SELECT COALESCE(MAX(id), 0) FROM pairs").fetchone()[0]
            pushed = _meta_int(connection, "shared_pushed")
            connection.executemany(
                f"INSERT INTO pairs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (source_space, target_space, text_sha256) DO UPDATE SET "
                "role = excluded.role, adapter_id = excluded.adapter_id, kind = excluded.kind, "
                "confidence = excluded.confidence, agreement = excluded.agreement, "
                "created = excluded.created, source = excluded.source, "
                "target = excluded.target, text = excluded.text "
                "WHERE excluded.created > pairs.created",
                [_local(row) for row in rows],
            )
            for source_space, target_space in {(row[0], row[1]) for row in rows}:
                self._evict(
                    connection,
                    EmbeddingSpace.parse(str(source_space)),
                    EmbeddingSpace.parse(str(target_space)),
                )
            if pushed >= before:  # nothing of ours was waiting: what came in needs no push
                after = connection.execute("SELECT COALESCE(MAX(id), 0) FROM pairs").fetchone()[0]
                _set_meta(connection, "shared_pushed", int(after))

    def _cursor(self, name: str) -> int:
        row = self._query_one("SELECT value FROM meta WHERE name = ?", (f"shared_{name}",))
        return int(row[0]) if row else 0

    def _set_cursor(self, name: str, value: int, only_if: int | None = None) -> None:
        with self._transaction() as connection:
            if only_if is not None and _meta_int(connection, f"shared_{name}") != only_if:
                return  # a pull moved it meanwhile (past rows it brought in)
            _set_meta(connection, f"shared_{name}", value)


def _read_after(pulled: int, conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    """Rows after the ``pulled`` cursor, and any stored lately (ids commit out of order)."""
    return conn.execute(
        f"SELECT id, {_COLUMNS} FROM ae_pairs WHERE id > %s "
        f"OR stored_at > clock_timestamp() - interval '{_LATE_COMMITS}' ORDER BY id LIMIT %s",
        (pulled, _BATCH),
    ).fetchall()


def _meta_int(connection: sqlite3.Connection, name: str) -> int:
    row = connection.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _set_meta(connection: sqlite3.Connection, name: str, value: int) -> None:
    connection.execute(
        "INSERT INTO meta (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, str(value)),
    )


def _local(row: tuple[object, ...]) -> tuple[object, ...]:
    """A database row as SQLite stores it (bytea comes back as bytes, text hash as bytes)."""
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
