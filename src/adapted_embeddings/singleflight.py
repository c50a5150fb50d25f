"""Single-flight provider calls: concurrent callers that need the same text pay for it once.

Without this, every thread, task or process that misses the cache for a popular text at
the same moment sends it to the provider: 400 concurrent ``aembed_query`` calls over 60
texts paid for each text about seven times, and 4 processes x 8 threads paid twice.

Before calling the provider, a caller takes a *lease* on each text's cache key, in the
cache itself (one SQLite transaction, so it is atomic across processes sharing the
directory). Texts another caller already leases are not sent; once its own request is
done and cached, the caller waits for those to appear in the cache. If the holder
releases without a vector, a waiter in the same process takes over its error (so an
outage costs one set of retries, not one per waiter). Otherwise (the holder was
cancelled, died, overran its lease, or lives in another process) the waiter claims the
text again, taking a dead or overrun holder's lease over, and fetches it itself unless
another waiter got there first.

Leases are only held around a caller's own request and released before it waits for
anyone else's, so two callers can never wait for each other. A cancelled async caller
releases what it claimed, even when the cancel lands while the claim is still running
in its worker thread.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from adapted_embeddings.cache import EmbeddingCache
from adapted_embeddings.errors import ProviderError
from adapted_embeddings.provider import ProviderOutcome

Store = Callable[[dict[int, np.ndarray]], None]
"""Writes provider vectors (by position) to the cache; called before leases are released."""

T = TypeVar("T")

_HOST = socket.gethostname()


@dataclass
class _Lease:
    """One round's claim: what this caller fetches and whom it follows for the rest."""

    holder: bytes
    own: list[int] = field(default_factory=list)
    followed: dict[int, bytes] = field(default_factory=dict)


@dataclass
class _Orphans:
    """Positions to claim again, and the stale leases (key -> holder) that may be taken over."""

    positions: list[int] = field(default_factory=list)
    take_over: dict[str, bytes] = field(default_factory=dict)


class SingleFlight:
    """Coordinates provider calls through leases in a shared :class:`EmbeddingCache`."""

    def __init__(self, cache: EmbeddingCache, *, poll_seconds: float = 0.01) -> None:
        """Use ``cache`` for leases, and look for other callers' results every ``poll_seconds``."""
        self.cache = cache
        self.poll_seconds = poll_seconds
        # Holder -> error of flights that ended without vectors, for waiters in this process.
        self._failed: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def fetch(
        self,
        texts: list[str],
        keys: list[str],
        call: Callable[[list[str]], ProviderOutcome],
        store: Store,
        *,
        dimensions: int,
        lease_seconds: float,
    ) -> ProviderOutcome:
        """Embed ``texts`` through ``call``, sending only those no other caller is fetching.

        ``lease_seconds`` should cover the slowest the call can be (all its retries): past
        it, a waiter assumes this caller is stuck and fetches the text itself.
        """
        outcome = ProviderOutcome()
        orphans = _Orphans(list(range(len(keys))))
        while orphans.positions:
            lease = self._claim(keys, orphans, lease_seconds, outcome, dimensions)
            finished = False
            try:
                if lease.own:
                    _merge(outcome, call([texts[i] for i in lease.own]), lease.own)
                finished = True
            finally:
                self._settle(keys, lease, outcome, store, finished)
            waiting = self._waiting(keys, lease.followed, outcome, dimensions, lease_seconds)
            orphans = self._drive(waiting)
        return outcome

    async def afetch(
        self,
        texts: list[str],
        keys: list[str],
        call: Callable[[list[str]], Awaitable[ProviderOutcome]],
        store: Store,
        *,
        dimensions: int,
        lease_seconds: float,
    ) -> ProviderOutcome:
        """Async :meth:`fetch`: cache writes run in a thread, waiting polls without blocking.

        Cancellation is safe at any point: leases this caller claimed are released (a
        claim still running in its thread is released when it finishes), and callers
        waiting on them fetch the texts themselves.
        """
        outcome = ProviderOutcome()
        orphans = _Orphans(list(range(len(keys))))
        while orphans.positions:
            lease = await _shielded(
                asyncio.to_thread(self._claim, keys, orphans, lease_seconds, outcome, dimensions),
                on_cancel=lambda claimed: self._release_in_thread(keys, claimed),
            )
            finished = False
            try:
                if lease.own:
                    _merge(outcome, await call([texts[i] for i in lease.own]), lease.own)
                finished = True
            finally:
                await _shielded(
                    asyncio.to_thread(self._settle, keys, lease, outcome, store, finished)
                )
            waiting = self._waiting(keys, lease.followed, outcome, dimensions, lease_seconds)
            orphans = await self._adrive(waiting)
        return outcome

    # -- leases -------------------------------------------------------------------------

    def _claim(
        self,
        keys: list[str],
        wanted: _Orphans,
        lease_seconds: float,
        outcome: ProviderOutcome,
        dimensions: int,
    ) -> _Lease:
        """Lease what nobody else is fetching among ``wanted``; follow the rest."""
        lease = _Lease(f"{_HOST}\0{os.getpid()}\0{uuid.uuid4().hex}".encode())
        positions = wanted.positions
        current = self.cache.claim(
            [keys[i] for i in positions],
            lease.holder,
            seconds=lease_seconds,
            take_over=wanted.take_over,
        )
        own = [i for i, h in zip(positions, current, strict=True) if h is None]
        lease.followed = {i: h for i, h in zip(positions, current, strict=True) if h is not None}
        # Another caller may have fetched and released a text between our cache look-up and
        # this claim (the local encode sits in between): take its vector, not a second one.
        cached = self.cache.peek_provider_vectors([keys[i] for i in own], dimensions=dimensions)
        done = [i for i, vector in zip(own, cached, strict=True) if vector is not None]
        for i, vector in zip(own, cached, strict=True):
            if vector is not None:
                outcome.vectors[i] = vector
        if done:
            self.cache.release([keys[i] for i in done], lease.holder)
        lease.own = [i for i in own if i not in outcome.vectors]
        return lease

    def _settle(
        self,
        keys: list[str],
        lease: _Lease,
        outcome: ProviderOutcome,
        store: Store,
        finished: bool,
    ) -> None:
        """Cache what arrived, note what failed, then release: waiters find one or the other.

        A flight that did not finish (cancelled, or an exception) records no error, so its
        waiters fetch the texts themselves rather than inherit a failure that never was.
        """
        try:
            vectors = {i: outcome.vectors[i] for i in lease.own if i in outcome.vectors}
            if vectors:
                store(vectors)
            if finished and len(vectors) < len(lease.own):
                with self._lock:
                    self._failed[lease.holder] = outcome.first_error
                    while len(self._failed) > 1024:
                        self._failed.popitem(last=False)
        finally:
            self.cache.release([keys[i] for i in lease.own], lease.holder)

    def _release_in_thread(self, keys: list[str], lease: _Lease) -> None:
        """Release a cancelled caller's leases without blocking the event loop."""
        if lease.own:
            own = [keys[i] for i in lease.own]
            threading.Thread(target=self.cache.release, args=(own, lease.holder)).start()

    # -- waiting for other callers --------------------------------------------------------

    def _waiting(
        self,
        keys: list[str],
        followed: dict[int, bytes],
        outcome: ProviderOutcome,
        dimensions: int,
        lease_seconds: float,
    ) -> Generator[None, None, _Orphans]:
        """Poll until every followed key is settled; yields between polls (see _drive)."""
        pending: dict[int, bytes] = dict(followed)
        orphans = _Orphans()
        # An expired lease already reads as released; the deadline only guards a stuck clock.
        deadline = time.monotonic() + 2 * lease_seconds
        while pending:
            self._poll(keys, pending, outcome, dimensions, orphans)
            if pending and time.monotonic() > deadline:
                for i, holder in pending.items():
                    orphans.positions.append(i)
                    orphans.take_over[keys[i]] = holder
                break
            if pending:
                yield
        orphans.positions.sort()
        return orphans

    def _drive(self, waiting: Generator[None, None, T]) -> T:
        """Run a polling generator, sleeping the thread between polls."""
        while True:
            try:
                next(waiting)
            except StopIteration as done:
                return done.value
            time.sleep(self.poll_seconds)

    async def _adrive(self, waiting: Generator[None, None, T]) -> T:
        """Run a polling generator on the event loop (its reads never block: SQLite WAL)."""
        while True:
            try:
                next(waiting)
            except StopIteration as done:
                return done.value
            await asyncio.sleep(self.poll_seconds)

    def _poll(
        self,
        keys: list[str],
        pending: dict[int, bytes],
        outcome: ProviderOutcome,
        dimensions: int,
        orphans: _Orphans,
    ) -> None:
        """One look at the cache: settle every pending key whose holder has finished."""
        order = list(pending)
        # Holders first, vectors second. A holder stores its vectors before it releases, so
        # a key read as released here has its vector visible to the read below. The other
        # order was the race that paid twice (issue 9): a flight that stored and released
        # between the two reads looked like one that ended without a vector.
        current = self.cache.holders([keys[i] for i in order])
        found = self.cache.peek_provider_vectors([keys[i] for i in order], dimensions=dimensions)
        for i, vector, holder in zip(order, found, current, strict=True):
            followed = pending[i]
            if vector is not None:
                outcome.vectors[i] = vector
            elif holder == followed and _alive(followed):
                continue
            else:
                with self._lock:
                    error = self._failed.get(followed)
                if error is not None:
                    outcome.failures.append(
                        ([i], ProviderError(f"(another caller's request) {error}", [i]))
                    )
                else:  # cancelled, died, overran its lease, or failed in another process
                    orphans.positions.append(i)
                    if holder == followed:  # a dead holder's lease: take it over
                        orphans.take_over[keys[i]] = followed
            del pending[i]


async def _shielded(work: Awaitable[T], on_cancel: Callable[[T], None] | None = None) -> T:
    """Await ``work`` so that cancelling the caller does not cancel it.

    If the caller is cancelled first, ``on_cancel`` gets the result once ``work`` finishes.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if on_cancel is not None:
            callback = on_cancel

            def finished(done: asyncio.Future[Any]) -> None:
                if not done.cancelled() and done.exception() is None:
                    callback(done.result())

            task.add_done_callback(finished)
        raise


def _merge(outcome: ProviderOutcome, part: ProviderOutcome, positions: list[int]) -> None:
    """Add a sub-call's outcome, mapping its positions back to the caller's."""
    for position, vector in part.vectors.items():
        outcome.vectors[positions[position]] = vector
    for failed, error in part.failures:
        outcome.failures.append(([positions[p] for p in failed], error))
    outcome.requests += part.requests
    outcome.tokens += part.tokens


def _alive(holder: bytes) -> bool:
    """False if the holder was a process on this host that no longer exists."""
    host, _, rest = holder.partition(b"\0")
    pid_text = rest.partition(b"\0")[0]
    if host.decode(errors="replace") != _HOST or not pid_text.isdigit():
        return True  # cannot tell from here: trust the lease's expiry
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
