"""Single-flight provider calls: concurrent callers that need the same text pay for it once.

Without this, every thread, task or process that misses the cache for a popular text at
the same moment sends it to the provider: 400 concurrent ``aembed_query`` calls over 60
texts paid for each text about seven times, and 4 processes x 8 threads paid twice.

Before calling the provider, a caller takes a *lease* on each text's cache key, in the
cache itself (one SQLite transaction, so it is atomic across processes sharing the
directory). Texts another caller already leases are not sent; once its own request is
done and cached, the caller waits for those to appear in the cache. If the holder
releases without a vector, a waiter in the same process takes over its error (so an
outage costs one set of retries, not one per waiter); a waiter in another process, or
any waiter whose holder died or overran the lease, fetches the text itself.

Leases are only held around a caller's own request and released before it waits for
anyone else's, so two callers can never wait for each other.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import numpy as np

from adapted_embeddings.cache import EmbeddingCache
from adapted_embeddings.errors import ProviderError
from adapted_embeddings.provider import ProviderOutcome

Store = Callable[[dict[int, np.ndarray]], None]
"""Writes provider vectors (by position) to the cache; called before leases are released."""

_HOST = socket.gethostname()


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
        holder, own, followed = self._claim(keys, lease_seconds, outcome, dimensions)
        try:
            if own:
                _merge(outcome, call([texts[i] for i in own]), own)
        finally:
            self._settle(keys, own, outcome, store, holder)
        orphans = self._wait(keys, followed, outcome, dimensions, lease_seconds) if followed else []
        if orphans:
            _merge(outcome, call([texts[i] for i in orphans]), orphans)
            store({i: outcome.vectors[i] for i in orphans if i in outcome.vectors})
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
        """Async :meth:`fetch`: cache writes run in a thread, waiting polls without blocking."""
        outcome = ProviderOutcome()
        holder, own, followed = await asyncio.to_thread(
            self._claim, keys, lease_seconds, outcome, dimensions
        )
        try:
            if own:
                _merge(outcome, await call([texts[i] for i in own]), own)
        finally:
            await asyncio.to_thread(self._settle, keys, own, outcome, store, holder)
        orphans: list[int] = []
        if followed:
            orphans = await self._await(keys, followed, outcome, dimensions, lease_seconds)
        if orphans:
            _merge(outcome, await call([texts[i] for i in orphans]), orphans)
            vectors = {i: outcome.vectors[i] for i in orphans if i in outcome.vectors}
            await asyncio.to_thread(store, vectors)
        return outcome

    # -- leases -------------------------------------------------------------------------

    def _claim(
        self, keys: list[str], lease_seconds: float, outcome: ProviderOutcome, dimensions: int
    ) -> tuple[bytes, list[int], dict[int, bytes]]:
        """Lease what nobody else is fetching; returns (holder, leased, followed -> holder)."""
        holder = f"{_HOST}\0{os.getpid()}\0{uuid.uuid4().hex}".encode()
        current = self.cache.claim(keys, holder, seconds=lease_seconds)
        own = [i for i, h in enumerate(current) if h is None]
        followed = {i: h for i, h in enumerate(current) if h is not None}
        # Another caller may have fetched and released a text between our cache look-up and
        # this claim (the local encode sits in between): take its vector, not a second one.
        cached = self.cache.peek_provider_vectors([keys[i] for i in own], dimensions=dimensions)
        done = [i for i, vector in zip(own, cached, strict=True) if vector is not None]
        for i, vector in zip(own, cached, strict=True):
            if vector is not None:
                outcome.vectors[i] = vector
        if done:
            self.cache.release([keys[i] for i in done], holder)
            own = [i for i in own if i not in outcome.vectors]
        return holder, own, followed

    def _settle(
        self,
        keys: list[str],
        own: list[int],
        outcome: ProviderOutcome,
        store: Store,
        holder: bytes,
    ) -> None:
        """Cache what arrived, note what failed, then release: waiters find one or the other."""
        try:
            vectors = {i: outcome.vectors[i] for i in own if i in outcome.vectors}
            if vectors:
                store(vectors)
            if len(vectors) < len(own):
                error = _first_error(outcome)
                with self._lock:
                    self._failed[holder] = error
                    while len(self._failed) > 1024:
                        self._failed.popitem(last=False)
        finally:
            self.cache.release([keys[i] for i in own], holder)

    def _poll(
        self,
        keys: list[str],
        pending: dict[int, bytes],
        outcome: ProviderOutcome,
        dimensions: int,
        orphans: list[int],
    ) -> None:
        """One look at the cache: settle every pending key whose holder has finished."""
        order = list(pending)
        found = self.cache.peek_provider_vectors([keys[i] for i in order], dimensions=dimensions)
        current = self.cache.holders([keys[i] for i in order])
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
                else:
                    orphans.append(i)  # the holder died, overran its lease, or is elsewhere
            del pending[i]

    def _wait(
        self,
        keys: list[str],
        followed: dict[int, bytes],
        outcome: ProviderOutcome,
        dimensions: int,
        lease_seconds: float,
    ) -> list[int]:
        # An expired lease already reads as released; the deadline only guards a stuck clock.
        pending: dict[int, bytes] = dict(followed)
        orphans: list[int] = []
        deadline = time.monotonic() + 2 * lease_seconds
        while pending:
            self._poll(keys, pending, outcome, dimensions, orphans)
            if pending and time.monotonic() > deadline:
                orphans.extend(pending)
                break
            if pending:
                time.sleep(self.poll_seconds)
        return sorted(orphans)

    async def _await(
        self,
        keys: list[str],
        followed: dict[int, bytes],
        outcome: ProviderOutcome,
        dimensions: int,
        lease_seconds: float,
    ) -> list[int]:
        # An expired lease already reads as released; the deadline only guards a stuck clock.
        pending: dict[int, bytes] = dict(followed)
        orphans: list[int] = []
        deadline = time.monotonic() + 2 * lease_seconds
        while pending:
            # Reads only: SQLite in WAL mode never blocks them, so they may run on the loop.
            self._poll(keys, pending, outcome, dimensions, orphans)
            if pending and time.monotonic() > deadline:
                orphans.extend(pending)
                break
            if pending:
                await asyncio.sleep(self.poll_seconds)
        return sorted(orphans)


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


def _first_error(outcome: ProviderOutcome) -> str:
    if not outcome.failures:
        return "the request failed"
    error = outcome.failures[0][1]
    return f"{type(error).__name__}: {error}"
