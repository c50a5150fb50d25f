"""PostgreSQL as the fleet's shared store: provider vectors and the leases that single-flight them.

Every node of a fleet points ``ADAPTED_EMBEDDINGS_STORE__URL`` at one database. The tables
are created on first use and their layout is versioned in ``ae_schema``: a node refuses a
layout newer than its own (:class:`~adapted_embeddings.errors.StoreSchemaError`), and an
older layout is upgraded in place under an advisory lock, one node at a time.

The database is a shared tier, never a dependency: every call here is bounded by short
connect and statement timeouts, and any failure raises :class:`StoreUnavailableError`,
after which the store is skipped for ``retry_seconds`` (callers serve from their local
tiers and the provider meanwhile) and then reconnected.

Values are the disk cache's own encoding (see :mod:`adapted_embeddings.cache`):
checksummed and bound to their key, so a damaged or swapped row reads as a miss.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import psycopg

from adapted_embeddings.errors import StoreSchemaError
from adapted_embeddings.provider import redact_url
from adapted_embeddings.settings import StoreSettings
from adapted_embeddings.settings_check import variable_name

logger = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 3
"""Layout of the tables below; bumped (with an upgrade step) whenever it changes.

Version 2 added ``ae_pairs``, 3 ``ae_adapters`` and ``ae_adapter_files``; creating what is
missing (``IF NOT EXISTS``) is the upgrade from an older version.
"""

_SCHEMA_LOCK = 0x61655F736368656D  # advisory lock key ("ae_schem"): one node creates at a time
_MAX_IDLE_CONNECTIONS = 4
_TABLES = """
CREATE TABLE IF NOT EXISTS ae_provider_vectors (
    key text PRIMARY KEY,
    value bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ae_leases (
    key text PRIMARY KEY,
    holder bytea NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS ae_pairs (
    id bigserial PRIMARY KEY,
    source_space text NOT NULL,
    target_space text NOT NULL,
    text_sha256 bytea NOT NULL,
    role text NOT NULL,
    adapter_id text NOT NULL,
    kind text NOT NULL,
    confidence double precision,
    agreement double precision,
    created double precision NOT NULL,
    source bytea NOT NULL,
    target bytea NOT NULL,
    text text,
    stored_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (source_space, target_space, text_sha256)
);
CREATE INDEX IF NOT EXISTS ae_pairs_by_space ON ae_pairs (source_space, target_space, id);
CREATE INDEX IF NOT EXISTS ae_pairs_stored_at ON ae_pairs (stored_at);
CREATE TABLE IF NOT EXISTS ae_adapters (
    seq bigserial PRIMARY KEY,
    adapter_id text NOT NULL UNIQUE,
    directory text NOT NULL,
    source_space text NOT NULL,
    target_space text NOT NULL,
    manifest text NOT NULL,
    published_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS ae_adapter_files (
    adapter_id text NOT NULL REFERENCES ae_adapters (adapter_id) ON DELETE CASCADE,
    name text NOT NULL,
    content bytea NOT NULL,
    sha256 text NOT NULL,
    PRIMARY KEY (adapter_id, name)
);
"""


class StoreUnavailableError(Exception):
    """The shared store could not be reached, answered too slowly, or was refused.

    Internal: never raised to users; callers fall back to their local tiers.
    """


class PostgresStore:
    """Thread-safe access to the shared tables, with timeouts, backoff and reconnection."""

    def __init__(self, settings: StoreSettings) -> None:
        """Remember how to connect; nothing is opened until the first call.

        Raises:
            ValueError: If ``settings.url`` is unset.

        """
        if settings.url is None:
            raise ValueError("PostgresStore needs settings.url")
        self.settings = settings
        self._url = settings.url.get_secret_value()
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection] = []
        self._down_until = 0.0
        self._outage = False  # between a failure and the next success: warn once per outage
        self._schema_checked = False
        self._refused: StoreSchemaError | None = None
        self.failures = 0
        """How many calls failed (the store was down, slow or refused); for tests and stats."""

    @property
    def url(self) -> str:
        """The libpq URL (with its password: never log it; see :attr:`where`)."""
        return self._url

    @property
    def where(self) -> str:
        """The store's URL with any password masked, for messages."""
        return redact_url(self._url) or ""

    # -- connections --------------------------------------------------------------------

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A healthy connection (autocommit; use ``conn.transaction()`` for several statements).

        Raises:
            StoreUnavailableError: If the store is down, slow, refused, or in its backoff.

        """
        if self._refused is not None or time.monotonic() < self._down_until:
            raise StoreUnavailableError("the shared store is skipped for now")
        conn = self._take()
        try:
            yield conn
        except psycopg.errors.DeadlockDetected as exc:  # rolled back; the connection is fine
            self._give_back(conn)
            raise StoreUnavailableError(str(exc)) from exc
        except psycopg.Error as exc:
            self._fail(conn, exc)
            raise StoreUnavailableError(str(exc)) from exc
        except BaseException:
            conn.close()  # interrupted mid-statement: its state is unknown
            raise
        else:
            self._give_back(conn)
            if self._outage:
                self._outage = False
                logger.info("shared store %s is back", self.where)

    def run(self, work: Callable[[psycopg.Connection], T]) -> T:
        """``work(conn)``, run again (up to 3 times) if PostgreSQL chose it as a deadlock victim.

        Keys are always locked in sorted order, so a deadlock should not happen; this keeps
        one that does (say with a future statement) from counting as an outage.
        """
        for attempt in range(3):
            try:
                with self.connection() as conn:
                    return work(conn)
            except StoreUnavailableError as exc:
                if attempt == 2 or not isinstance(exc.__cause__, psycopg.errors.DeadlockDetected):
                    raise
        raise AssertionError("unreachable")

    def _take(self) -> psycopg.Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            conn = psycopg.connect(
                self._url,
                autocommit=True,
                connect_timeout=max(1, round(self.settings.connect_timeout)),
                options=f"-c statement_timeout={int(self.settings.statement_timeout * 1000)}",
                application_name="adapted-embeddings",
            )
        except psycopg.Error as exc:
            self._fail(None, exc)
            raise StoreUnavailableError(str(exc)) from exc
        if not self._schema_checked:
            try:
                self._ensure_schema(conn)
            except StoreSchemaError as exc:
                conn.close()
                self._refused = exc
                logger.error("%s; serving without the shared store", exc)
                raise StoreUnavailableError(str(exc)) from exc
            except psycopg.Error as exc:
                self._fail(conn, exc)
                raise StoreUnavailableError(str(exc)) from exc
        return conn

    def _give_back(self, conn: psycopg.Connection) -> None:
        with self._lock:
            if len(self._idle) < _MAX_IDLE_CONNECTIONS and not conn.closed:
                self._idle.append(conn)
                return
        conn.close()

    def _fail(self, conn: psycopg.Connection | None, error: psycopg.Error) -> None:
        """Drop every pooled connection and skip the store for ``retry_seconds``."""
        with self._lock:
            first, self._outage = not self._outage, True
            self._down_until = time.monotonic() + self.settings.retry_seconds
            self.failures += 1
            idle, self._idle = self._idle, []
        for stale in [conn, *idle]:
            if stale is not None:
                with contextlib.suppress(psycopg.Error):
                    stale.close()
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "shared store %s unavailable (%s); serving from local tiers, retrying in %g s",
            self.where,
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
            self.settings.retry_seconds,
        )

    def check(self) -> bool:
        """Connect and check the schema now: True if the store answers, False if not (warned).

        Raises:
            StoreSchemaError: If the store's schema is newer than this library's.

        """
        try:
            with self.connection() as conn:
                self._ensure_schema(conn)  # again: another node may have upgraded it since
            return True
        except StoreSchemaError as exc:
            self._refused = exc
            raise
        except StoreUnavailableError:
            if self._refused is not None:
                raise self._refused from None
            return False

    def close(self) -> None:
        """Close pooled connections (new calls reconnect)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- schema ---------------------------------------------------------------------------

    def _ensure_schema(self, conn: psycopg.Connection) -> None:
        """Create the tables on first use, or refuse a newer layout.

        Raises:
            StoreSchemaError: If ``ae_schema`` records a version newer than
                :data:`SCHEMA_VERSION`.

        """
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS ae_schema (component text PRIMARY KEY, "
                "version integer NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT version FROM ae_schema WHERE component = 'store'").fetchone()
            found = int(row[0]) if row is not None else 0
            if found > SCHEMA_VERSION:
                raise StoreSchemaError(
                    f"the shared store {self.where} (set by "
                    f"{variable_name('store', 'url')}) has schema version {found}, made by "
                    f"a newer adapted-embeddings; this one knows version {SCHEMA_VERSION} and "
                    "will not read or write it: upgrade this node, or point it at another "
                    "database"
                )
            if found < SCHEMA_VERSION:
                conn.execute(_TABLES)
                conn.execute(
                    "INSERT INTO ae_schema (component, version) VALUES ('store', %s) "
                    "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, "
                    "updated_at = now()",
                    (SCHEMA_VERSION,),
                )
            # Leases of nodes that died long ago: harmless (they expired), but not kept forever.
            conn.execute("DELETE FROM ae_leases WHERE expires_at < now() - interval '1 hour'")
        self._schema_checked = True

    # -- provider vectors -----------------------------------------------------------------

    def get_values(self, keys: list[str]) -> dict[str, bytes]:
        """Stored values under ``keys`` (absent keys are left out)."""
        if not keys:
            return {}
        rows = self.run(
            lambda conn: conn.execute(
                "SELECT key, value FROM ae_provider_vectors WHERE key = ANY(%s)", (keys,)
            ).fetchall()
        )
        return {key: bytes(value) for key, value in rows}

    def put_values(self, items: list[tuple[str, bytes]]) -> None:
        """Store values in one transaction; a key already present keeps its first value."""
        if not items:
            return
        ordered = sorted(dict(items).items())  # one lock order for every writer
        keys, values = [k for k, _ in ordered], [v for _, v in ordered]
        self.run(
            lambda conn: conn.execute(
                "INSERT INTO ae_provider_vectors (key, value) "
                "SELECT * FROM unnest(%s::text[], %s::bytea[]) ON CONFLICT (key) DO NOTHING",
                (keys, values),
            )
        )

    def delete_values(self, keys: list[str]) -> None:
        """Drop values that failed their checks, so the next node to fetch rewrites them."""
        self.run(
            lambda conn: conn.execute(
                "DELETE FROM ae_provider_vectors WHERE key = ANY(%s)", (sorted(keys),)
            )
        )

    def count_values(self) -> int:
        """How many provider vectors the fleet shares."""
        row = self.run(
            lambda conn: conn.execute("SELECT count(*) FROM ae_provider_vectors").fetchone()
        )
        return int(row[0]) if row else 0

    # -- leases ---------------------------------------------------------------------------

    def claim(
        self, keys: list[str], holder: bytes, seconds: float, take_over: dict[str, bytes]
    ) -> list[bytes | None]:
        """Take the lease on every key that is free, expired, or held by its stale holder.

        Expiry is judged by the database's clock, the one clock every node shares. Rows are
        locked in key order, so two nodes claiming overlapping keys cannot deadlock.

        Returns:
            None where ``holder`` now holds the lease, else the holder found (``b""`` if it
            released in between: the caller then follows nobody and claims again).

        """
        ordered = sorted(set(keys))
        stale = [k for k in ordered if k in take_over]

        def take(conn: psycopg.Connection) -> tuple[set[str], dict[str, bytes]]:
            won: set[str] = set()
            with conn.transaction():
                if stale:
                    rows = conn.execute(
                        "UPDATE ae_leases AS l SET holder = %s, "
                        "expires_at = clock_timestamp() + make_interval(secs => %s) "
                        "FROM (SELECT * FROM unnest(%s::text[], %s::bytea[]) AS s(key, holder) "
                        "ORDER BY key) AS s "
                        "WHERE l.key = s.key AND l.holder = s.holder RETURNING l.key",
                        (holder, seconds, stale, [take_over[k] for k in stale]),
                    ).fetchall()
                    won.update(row[0] for row in rows)
                rows = conn.execute(
                    "INSERT INTO ae_leases AS l (key, holder, expires_at) "
                    "SELECT k, %s, clock_timestamp() + make_interval(secs => %s) "
                    "FROM unnest(%s::text[]) AS k ORDER BY k "
                    "ON CONFLICT (key) DO UPDATE SET holder = EXCLUDED.holder, "
                    "expires_at = EXCLUDED.expires_at WHERE l.expires_at < clock_timestamp() "
                    "RETURNING l.key",
                    (holder, seconds, [k for k in ordered if k not in won]),
                ).fetchall()
                won.update(row[0] for row in rows)
                others = conn.execute(
                    "SELECT key, holder FROM ae_leases WHERE key = ANY(%s)",
                    ([k for k in ordered if k not in won],),
                ).fetchall()
            return won, {key: bytes(current) for key, current in others}

        won, others = self.run(take)
        return [None if k in won else others.get(k, b"") for k in keys]

    def holders(self, keys: list[str]) -> list[bytes | None]:
        """Current (unexpired) holder of each key, None where nobody holds one."""
        rows = self.run(
            lambda conn: conn.execute(
                "SELECT key, holder FROM ae_leases "
                "WHERE key = ANY(%s) AND expires_at > clock_timestamp()",
                (keys,),
            ).fetchall()
        )
        found = {key: bytes(holder) for key, holder in rows}
        return [found.get(k) for k in keys]

    def release(self, keys: list[str], holder: bytes) -> None:
        """Drop the leases ``holder`` still holds on keys (locked in key order)."""
        self.run(
            lambda conn: conn.execute(
                "DELETE FROM ae_leases WHERE key IN (SELECT key FROM ae_leases "
                "WHERE key = ANY(%s) AND holder = %s ORDER BY key FOR UPDATE)",
                (sorted(keys), holder),
            )
        )
