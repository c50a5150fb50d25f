"""The usage ledger: what was embedded, how, what it cost and what audits measured.

Every pipeline call hands a :class:`CallUsage` to :meth:`UsageLedger.note` (a list append,
no I/O, no token counting). A background thread drains the notes every
``usage.flush_seconds``: it counts the unpaid texts' tokens with the provider's tokenizer,
adds everything into one :class:`UsageRow` per (hour, space, adapter, role, route) and
upserts those into a :class:`LedgerStore`. The process also flushes at exit and on
:meth:`UsageLedger.flush`.

The store beside the cache is SQLite (:class:`SQLiteLedgerStore`): one private (0600)
file in the private cache directory, every flush one transaction whose
``ON CONFLICT DO UPDATE`` adds the counts, so any number of processes (server workers,
Ray tasks) can share it. It holds counts only, never a text or a hash of one. It is
bounded: hourly rows older than ``usage.hourly_days`` are rolled up into one row per day,
and daily rows older than ``usage.retention_days`` are dropped.

Another store (say a shared PostgreSQL one) only has to implement :class:`LedgerStore`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import astuple, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from adapted_embeddings.errors import UsageLedgerError
from adapted_embeddings.tokens import TokenCounter

if TYPE_CHECKING:
    from adapted_embeddings.settings import AdaptedEmbeddingsSettings

logger = logging.getLogger(__name__)

LEDGER_FILE = "usage.sqlite3"
HOUR = 3600
DAY = 86_400
Period = Literal["hour", "day"]
UNPAID_ROUTES = ("local", "cache", "local_degraded")
"""Routes whose texts the provider did not embed (their tokens are counted locally)."""
TOKEN_COUNTS_KEPT = 50_000
"""Token counts remembered by text hash (a cache hit is a text seen before: not counted twice)."""
EVENTS = "event"
"""The route of rows that only count guard trips and adapter switches."""


@dataclass
class UsageRow:
    """Counts for one (period start, space, adapter, role, route); never any text."""

    period: Period
    start: int  # epoch seconds, UTC, start of the hour or day
    space: str
    adapter: str
    role: str
    route: str
    texts: int = 0  # inputs answered this way (a repeated text counts each time)
    tokens: int = 0  # the provider's count for paid texts; its tokenizer's count otherwise
    provider_texts: int = 0  # texts the provider embedded for these calls
    provider_requests: int = 0
    failed: int = 0  # inputs that got no vector
    audits: int = 0
    audit_passes: int = 0  # audits whose local vector was not poor (see QualityFloor)
    agreement_sum: float = 0.0  # sum of the audits' centred cosines
    guard_trips: int = 0
    adapter_switches: int = 0

    @property
    def key(self) -> tuple[str, int, str, str, str, str]:
        """What identifies the row in the store."""
        return (self.period, self.start, self.space, self.adapter, self.role, self.route)

    def add(self, other: UsageRow) -> None:
        """Add ``other``'s counts into this row."""
        for name in COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


KEY_FIELDS = ("period", "start", "space", "adapter", "role", "route")
COUNT_FIELDS = tuple(f.name for f in fields(UsageRow) if f.name not in KEY_FIELDS)


@dataclass(frozen=True)
class CallUsage:
    """One pipeline call, as the pipeline hands it over (texts only for token counting)."""

    space: str
    adapter: str
    role: str
    unpaid: dict[str, list[str]]  # route -> the inputs answered that way
    provider: int  # inputs answered with a provider vector
    provider_texts: int
    provider_requests: int
    provider_tokens: int
    failed: int = 0
    agreements: list[float] = field(default_factory=list)  # one per audit
    poor_below: float | None = None  # the adapter's quality floor (QualityFloor.poor_below)


class LedgerStore(Protocol):
    """Where rows are kept; every implementation adds counts, never overwrites them."""

    def add(self, rows: Sequence[UsageRow]) -> None:
        """Add the rows' counts to the stored ones, in one transaction."""
        ...

    def rows(self, since: float | None = None) -> list[UsageRow]:
        """Every row whose period starts at or after ``since`` (all if None), oldest first."""
        ...

    def compact(self, *, hourly_before: float, drop_before: float) -> int:
        """Roll hourly rows older than ``hourly_before`` into days; how many were rolled.

        Rows older than ``drop_before`` are deleted.
        """
        ...

    @property
    def location(self) -> str:
        """Where the ledger is, for messages."""
        ...


_COUNT_COLUMNS = ", ".join(
    f"{name} {'REAL' if name == 'agreement_sum' else 'INTEGER'} NOT NULL DEFAULT 0"
    for name in COUNT_FIELDS
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS usage (
    period TEXT NOT NULL, start INTEGER NOT NULL, space TEXT NOT NULL, adapter TEXT NOT NULL,
    role TEXT NOT NULL, route TEXT NOT NULL, {_COUNT_COLUMNS},
    PRIMARY KEY (period, start, space, adapter, role, route)
);
"""
_ADD_COUNTS = ", ".join(f"{name} = {name} + excluded.{name}" for name in COUNT_FIELDS)
_COLUMNS = ", ".join((*KEY_FIELDS, *COUNT_FIELDS))
_UPSERT = (
    f"INSERT INTO usage ({_COLUMNS}) VALUES ({', '.join('?' * len(fields(UsageRow)))}) "
    f"ON CONFLICT (period, start, space, adapter, role, route) DO UPDATE SET {_ADD_COUNTS}"
)
_ROLL_UP = (
    f"INSERT INTO usage ({_COLUMNS}) SELECT 'day', start - start % {DAY}, space, adapter, "
    f"role, route, {', '.join(f'SUM({name})' for name in COUNT_FIELDS)} FROM usage "
    "WHERE period = 'hour' AND start < ? GROUP BY 2, 3, 4, 5, 6 "
    f"ON CONFLICT (period, start, space, adapter, role, route) DO UPDATE SET {_ADD_COUNTS}"
)


class SQLiteLedgerStore:
    """The ledger in ``<cache dir>/usage.sqlite3``, shared by every process using the cache."""

    def __init__(self, directory: str | Path) -> None:
        """Keep the ledger in ``directory`` (created 0700 if missing); opened on each use.

        A relative ``directory`` is taken from the working directory now: the ledger is
        written later (at a flush, at exit), when the process may be working elsewhere.
        """
        self.directory = Path(directory).expanduser().absolute()
        self.path = self.directory / LEDGER_FILE

    @property
    def location(self) -> str:
        """The ledger file."""
        return str(self.path)

    def add(self, rows: Sequence[UsageRow]) -> None:
        """Upsert the rows, adding their counts, in one transaction."""
        if rows:
            with self._transaction() as connection:
                connection.executemany(_UPSERT, [astuple(row) for row in rows])

    def rows(self, since: float | None = None) -> list[UsageRow]:
        """Rows whose period starts at or after ``since`` (a day row counts from its day)."""
        if not self.directory.exists():  # nothing recorded yet: do not create the cache
            return []
        floor = -1 if since is None else int(since)
        with self._transaction(write=False) as connection:
            found = connection.execute(
                f"SELECT {_COLUMNS} FROM usage WHERE start >= ? OR (period = 'day' AND "
                "start > ? - 86400) ORDER BY start, space, adapter, role, route",
                (floor, floor),
            ).fetchall()
        return [UsageRow(*row) for row in found]

    def compact(self, *, hourly_before: float, drop_before: float) -> int:
        """Roll up old hours into days (aligned to whole days) and drop rows past retention."""
        cutoff = int(hourly_before) - int(hourly_before) % DAY
        with self._transaction() as connection:
            connection.execute(_ROLL_UP, (cutoff,))
            rolled = connection.execute(
                "DELETE FROM usage WHERE period = 'hour' AND start < ?", (cutoff,)
            ).rowcount
            connection.execute("DELETE FROM usage WHERE start < ?", (int(drop_before),))
        return int(rolled)

    @contextlib.contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        try:
            connection = self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise UsageLedgerError(f"cannot open the usage ledger {self.path}: {exc}") from None
        try:
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield connection
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise UsageLedgerError(f"usage ledger {self.path}: {exc}") from None
        finally:
            connection.close()

    def _connect(self) -> sqlite3.Connection:
        from adapted_embeddings.cache import ensure_private_directory

        # The cache's own rule: an open directory keeps its files in a private subdirectory.
        self.path = ensure_private_directory(self.directory) / LEDGER_FILE
        if not self.path.exists():  # create it private before SQLite opens it with the umask
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        connection = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        connection.execute(_SCHEMA)
        return connection


@dataclass
class ProcessTotals:
    """Totals of this process since it started, for ``/metrics`` (what was flushed so far)."""

    unpaid_tokens: dict[str, int] = field(default_factory=dict)  # space -> tokens
    audits: int = 0
    audit_passes: int = 0


class UsageLedger:
    """Collects call usage in memory and writes it to a :class:`LedgerStore` off the hot path."""

    def __init__(
        self,
        store: LedgerStore,
        *,
        token_counter: TokenCounter,
        prices: dict[str, float] | None = None,
        flush_seconds: float = 5.0,
        hourly_days: int = 14,
        retention_days: int = 400,
    ) -> None:
        """Write to ``store`` every ``flush_seconds``; ``prices`` are the report's overrides."""
        self.store = store
        self.prices = dict(prices or {})
        self.flush_seconds = flush_seconds
        self.hourly_days = hourly_days
        self.retention_days = retention_days
        self.totals = ProcessTotals()
        self._tokens = token_counter
        self._token_counts: dict[int, int] = {}  # hash(text) -> tokens; no text is kept
        self.clock: Callable[[], float] = time.time
        """When a call happened (a replay of past traffic may set its own)."""
        self._pending: list[tuple[float, CallUsage] | UsageRow] = []
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner_pid = 0
        self._failed = False
        self._compacted = 0.0
        _LIVE.add(self)

    def note(self, call: CallUsage) -> None:
        """Queue one call's usage (cheap: no I/O, no token counting here)."""
        with self._pending_lock:
            self._pending.append((self.clock(), call))
        self._ensure_flusher()

    def note_event(
        self, *, space: str, adapter: str, guard_trips: int = 0, adapter_switches: int = 0
    ) -> None:
        """Count a guard trip on ``adapter``, or a switch to it."""
        row = UsageRow(
            "hour",
            _hour(self.clock()),
            space,
            adapter,
            "-",
            EVENTS,
            guard_trips=guard_trips,
            adapter_switches=adapter_switches,
        )
        with self._pending_lock:
            self._pending.append(row)
        self._ensure_flusher()

    def flush(self) -> None:
        """Write everything noted so far now (and compact the store, at most once an hour).

        Raises:
            UsageLedgerError: If the store cannot be written; the counts stay queued.

        """
        with self._flush_lock:
            with self._pending_lock:
                pending, self._pending = self._pending, []
            rows = self._rows(pending)
            if not rows:
                return
            try:
                self.store.add(rows)
            except UsageLedgerError:
                with self._pending_lock:  # keep them, as rows: the tokens are counted
                    self._pending[:0] = rows
                raise
            self._add_totals(rows)
            now = time.time()
            if now - self._compacted < HOUR:
                return
            self._compacted = now
            self.store.compact(
                hourly_before=now - self.hourly_days * DAY,
                drop_before=now - self.retention_days * DAY,
            )

    def close(self) -> None:
        """Flush what is pending and stop the background thread."""
        thread, self._thread = self._thread, None
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        self._flush_quietly()

    def _rows(self, pending: list[tuple[float, CallUsage] | UsageRow]) -> list[UsageRow]:
        merged: dict[tuple[str, int, str, str, str, str], UsageRow] = {}
        for item in pending:
            for row in [item] if isinstance(item, UsageRow) else self._call_rows(*item):
                existing = merged.get(row.key)
                if existing is None:
                    merged[row.key] = row
                else:
                    existing.add(row)
        return list(merged.values())

    def _call_rows(self, at: float, call: CallUsage) -> list[UsageRow]:
        start = _hour(at)

        def row(route: str, **counts: float) -> UsageRow:
            return UsageRow("hour", start, call.space, call.adapter, call.role, route, **counts)  # type: ignore[arg-type]

        rows = [
            row(route, texts=len(texts), tokens=sum(map(self._count_tokens, texts)))
            for route, texts in call.unpaid.items()
            if texts
        ]
        floor = call.poor_below
        if call.provider or call.provider_texts or call.failed or call.agreements:
            rows.append(
                row(
                    "provider",
                    texts=call.provider,
                    tokens=call.provider_tokens,
                    provider_texts=call.provider_texts,
                    provider_requests=call.provider_requests,
                    failed=call.failed,
                    audits=len(call.agreements),
                    audit_passes=sum(floor is None or a >= floor for a in call.agreements),
                    agreement_sum=float(sum(call.agreements)),
                )
            )
        return rows

    def _count_tokens(self, text: str) -> int:
        key = hash(text)  # 64 bits: a collision among 50,000 texts is a ~1e-10 event
        count = self._token_counts.get(key)
        if count is None:
            count = self._tokens.count(text)
            if len(self._token_counts) >= TOKEN_COUNTS_KEPT:
                self._token_counts.clear()
            self._token_counts[key] = count
        return count

    def _add_totals(self, rows: list[UsageRow]) -> None:
        totals = self.totals
        for row in rows:
            if row.route in ("local", "cache"):
                spent = totals.unpaid_tokens.get(row.space, 0)
                totals.unpaid_tokens[row.space] = spent + row.tokens
            totals.audits += row.audits
            totals.audit_passes += row.audit_passes

    def _ensure_flusher(self) -> None:
        # Started lazily, and again in a forked child (threads do not survive a fork).
        if self._thread is not None and self._owner_pid == os.getpid():
            return
        with self._pending_lock:
            if self._thread is not None and self._owner_pid == os.getpid():
                return
            self._owner_pid = os.getpid()
            self._wake.clear()
            self._thread = threading.Thread(
                target=self._run, name="adapted-embeddings-usage", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        me = threading.current_thread()
        while self._thread is me:
            self._wake.wait(self.flush_seconds)
            self._flush_quietly()

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except UsageLedgerError as exc:  # usage accounting never fails an embedding call
            if not self._failed:
                logger.warning("usage ledger not written (will retry): %s", exc)
            self._failed = True
        else:
            self._failed = False


def _hour(at: float) -> int:
    return int(at) - int(at) % HOUR


_LIVE: weakref.WeakSet[UsageLedger] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for ledger in list(_LIVE):
        ledger.close()


def open_ledger(settings: AdaptedEmbeddingsSettings) -> UsageLedger | None:
    """The process's ledger for these settings, beside the cache (None: off or no cache).

    Pipelines sharing a cache directory share one ledger (and one flushing thread).
    """
    if not settings.usage.enabled or not settings.cache.enabled:
        return None
    return _shared_ledger(str(settings.cache.directory), settings.usage.model_dump_json())


@functools.lru_cache(maxsize=8)
def _shared_ledger(directory: str, usage_json: str) -> UsageLedger:
    from adapted_embeddings.settings import UsageSettings
    from adapted_embeddings.tokens import default_token_counter

    usage = UsageSettings.model_validate_json(usage_json)
    return UsageLedger(
        SQLiteLedgerStore(directory),
        token_counter=default_token_counter(),
        prices=usage.prices,
        flush_seconds=usage.flush_seconds,
        hourly_days=usage.hourly_days,
        retention_days=usage.retention_days,
    )
