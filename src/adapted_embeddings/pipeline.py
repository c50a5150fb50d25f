"""The one embedding pipeline both integrations wrap.

texts → cache look-up → local encode of the misses → translate and score → gate →
one batched provider call for everything below the threshold → cache write → results in
input order.

Each call is split into a *plan* (everything before the provider) and a *finish*
(everything after), so the sync and async paths share all logic but the provider call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.cache import CachedEmbedding, EmbeddingCache, cache_key
from adapted_embeddings.encoders import SourceEncoder
from adapted_embeddings.errors import ConfigurationError, InvalidInputError, ProviderError
from adapted_embeddings.provider import OpenAIEmbeddingProvider, ProviderOutcome
from adapted_embeddings.settings import GateSettings
from adapted_embeddings.singleflight import SingleFlight
from adapted_embeddings.spaces import EmbeddingSpace, ensure_same_space

logger = logging.getLogger(__name__)

Role = Literal["query", "document"]
Route = Literal["cache", "local", "provider", "local_degraded"]
ROLES: tuple[Role, ...] = ("query", "document")


@dataclass(frozen=True)
class EmbeddingResult:
    """One text's embedding and how it was obtained.

    Attributes:
        vector: Unit-length float32 vector in ``space``.
        confidence: The adapter's confidence in [0, 1], or None when the adapter did not
            score this text (provider mode).
        route: ``cache``, ``local`` (adapter, confident), ``provider`` (fallback), or
            ``local_degraded`` (adapter vector returned because the provider failed).
        space: The embedding space the vector lives in.

    """

    vector: np.ndarray
    confidence: float | None
    route: Route
    space: EmbeddingSpace


@dataclass
class PipelineStats:
    """Running counters since the pipeline was built (or :meth:`reset`)."""

    texts: int = 0
    cache_hits: int = 0
    local: int = 0
    provider: int = 0
    degraded: int = 0
    failed: int = 0
    provider_requests: int = 0
    provider_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


@dataclass
class _Plan:
    """State carried from :meth:`EmbeddingPipeline._plan` to :meth:`_finish`."""

    role: Role
    unique_texts: list[str]
    positions: list[int]  # input position -> index into unique_texts
    keys: list[str]
    results: list[EmbeddingResult | None]
    local_vectors: dict[int, np.ndarray] = field(default_factory=dict)
    local_confidence: dict[int, float] = field(default_factory=dict)
    for_provider: list[int] = field(default_factory=list)
    fresh_local: list[int] = field(default_factory=list)
    published: set[int] = field(default_factory=set)  # provider vectors already cached

    @property
    def provider_texts(self) -> list[str]:
        return [self.unique_texts[u] for u in self.for_provider]


class EmbeddingPipeline:
    """Local encode, adapter translation and confidence gate, provider fallback, disk cache.

    Build one with :func:`adapted_embeddings.factory.build_pipeline` (what the integrations
    do) or directly from parts.
    """

    def __init__(
        self,
        *,
        adapter: Adapter,
        encoder: SourceEncoder,
        provider: OpenAIEmbeddingProvider | None,
        cache: EmbeddingCache | None,
        gate: GateSettings,
    ) -> None:
        """Check that the parts fit together.

        Raises:
            SpaceMismatchError: If the encoder, adapter and provider spaces disagree.
            ConfigurationError: If a mode that may call the provider has none.

        """
        ensure_same_space(adapter.source, encoder.space, what="the local model's vectors")
        if provider is not None:
            ensure_same_space(adapter.target, provider.space, what="the provider's vectors")
        if gate.mode != "local" and provider is None:
            raise ConfigurationError(
                f"mode={gate.mode!r} needs a provider (an API key or a base_url); to run "
                "offline use mode='local'"
            )
        self.adapter = adapter
        self.encoder = encoder
        self.provider = provider
        self.cache = cache
        self.gate = gate
        self._stats = PipelineStats()
        self._stats_lock = threading.Lock()
        # Concurrent callers (threads, tasks, processes sharing the cache directory) that
        # miss the cache for the same text pay for it once: see singleflight.py.
        self._flights = SingleFlight(cache) if cache is not None else None

    @property
    def space(self) -> EmbeddingSpace:
        """The space every returned vector lives in (the adapter's target)."""
        return self.adapter.target

    def threshold(self, role: Role) -> float:
        """Minimum confidence for a local vector of ``role`` to be used."""
        configured = self.gate.query_threshold if role == "query" else self.gate.document_threshold
        return self.adapter.recommended_threshold if configured is None else configured

    def embed(self, texts: Sequence[str], role: Role = "document") -> list[EmbeddingResult]:
        """Embed texts; results are in input order.

        Raises:
            TypeError: If an item is not a ``str`` (naming its index).
            InvalidInputError: If a text is not valid Unicode (naming its index).
            ProviderError: If the provider fails and ``on_provider_error='raise'``; vectors
                that did succeed are cached first, so a retry does not pay for them again.

        """
        plan = self._plan(texts, role)
        outcome = None
        if plan.for_provider:
            assert self.provider is not None  # __init__ refuses provider-less non-local modes
            outcome = self._fetch(plan)
        return self._finish(plan, outcome)

    async def aembed(self, texts: Sequence[str], role: Role = "document") -> list[EmbeddingResult]:
        """Async :meth:`embed`: local work runs in a thread, provider calls use the async client."""
        plan = await asyncio.to_thread(self._plan, texts, role)
        outcome = None
        if plan.for_provider:
            assert self.provider is not None  # guaranteed by _plan
            outcome = await self._afetch(plan)
        return await asyncio.to_thread(self._finish, plan, outcome)

    def stats(self) -> PipelineStats:
        """A snapshot of the running counters."""
        with self._stats_lock:
            return PipelineStats(**self._stats.as_dict())

    def reset_stats(self) -> None:
        """Zero the running counters."""
        with self._stats_lock:
            self._stats = PipelineStats()

    # -- plan: cache, local encode, gate ------------------------------------------------

    def _plan(self, texts: Sequence[str], role: Role) -> _Plan:
        unique_texts, positions = _deduplicate(texts)
        if role not in ROLES:
            raise ValueError(f"role must be 'query' or 'document', got {role!r}")
        keys = (
            [
                cache_key(space=self.space, adapter_id=self.adapter.id, role=role, text=t)
                for t in unique_texts
            ]
            if self.cache is not None
            else []
        )
        plan = _Plan(role, unique_texts, positions, keys, [None] * len(unique_texts))
        self._serve_from_cache(plan)
        mode, threshold = self.gate.mode, self.threshold(role)
        missing = [u for u, result in enumerate(plan.results) if result is None]
        # Blank texts never go to the provider (OpenAI rejects empty input), so they are
        # always embedded locally, whatever the mode.
        to_encode = [u for u in missing if mode != "provider" or _blank(unique_texts[u])]
        self._translate(plan, to_encode)
        for u in missing:
            text = unique_texts[u]
            if u in plan.local_vectors and (
                mode == "local" or _blank(text) or plan.local_confidence[u] >= threshold
            ):
                plan.results[u] = self._result(
                    plan.local_vectors[u], plan.local_confidence[u], "local"
                )
                plan.fresh_local.append(u)
            else:
                plan.for_provider.append(u)
        return plan

    def _serve_from_cache(self, plan: _Plan) -> None:
        if self.cache is None or not plan.keys:
            return
        threshold = self.threshold(plan.role)
        entries = self.cache.get_many(plan.keys, dimensions=self.space.dimensions)
        rejected = 0
        for u, entry in enumerate(entries):
            if entry is None:
                continue
            # A cached local vector is only as good as today's threshold says: if the
            # threshold was raised since, it goes through the gate again.
            usable = (
                entry.route == "provider"
                or _blank(plan.unique_texts[u])  # blank texts are always local, see _plan
                # Local mode keeps every local vector, so recomputing one would give the same.
                or self.gate.mode == "local"
                or (
                    self.gate.mode != "provider"
                    and entry.confidence is not None
                    and entry.confidence >= threshold
                )
            )
            if usable:
                plan.results[u] = self._result(entry.vector, entry.confidence, "cache")
            else:
                rejected += 1
        if rejected:
            self.cache.note_rejected(rejected)

    def _translate(self, plan: _Plan, indices: list[int]) -> None:
        if not indices:
            return
        source = self.encoder.encode([plan.unique_texts[u] for u in indices])
        vectors, confidence = self.adapter.translate(source)
        for row, u in enumerate(indices):
            plan.local_vectors[u] = vectors[row]
            plan.local_confidence[u] = float(confidence[row])

    # -- provider call, single-flight ----------------------------------------------------

    def _fetch(self, plan: _Plan) -> ProviderOutcome:
        assert self.provider is not None
        if self._flights is None:
            return self.provider.embed(plan.provider_texts)
        return self._flights.fetch(
            plan.provider_texts,
            [plan.keys[u] for u in plan.for_provider],
            self.provider.embed,
            functools.partial(self._publish, plan),
            dimensions=self.space.dimensions,
            lease_seconds=self._lease_seconds(len(plan.for_provider)),
        )

    async def _afetch(self, plan: _Plan) -> ProviderOutcome:
        assert self.provider is not None
        if self._flights is None:
            return await self.provider.aembed(plan.provider_texts)
        return await self._flights.afetch(
            plan.provider_texts,
            [plan.keys[u] for u in plan.for_provider],
            self.provider.aembed,
            functools.partial(self._publish, plan),
            dimensions=self.space.dimensions,
            lease_seconds=self._lease_seconds(len(plan.for_provider)),
        )

    def _publish(self, plan: _Plan, vectors: dict[int, np.ndarray]) -> None:
        """Cache provider vectors as soon as they arrive, so waiting callers can use them."""
        assert self.cache is not None
        entries = []
        for position, vector in vectors.items():
            u = plan.for_provider[position]
            entries.append(self._entry(plan, u, vector, "provider", plan.local_confidence.get(u)))
            plan.published.add(u)
        self.cache.put_many(entries)

    def _lease_seconds(self, texts: int) -> float:
        """The longest a provider call for ``texts`` texts can take, with every retry."""
        assert self.provider is not None
        limits = self.provider.settings
        rounds = math.ceil(
            math.ceil(texts / limits.max_inputs_per_request) / limits.max_concurrent_requests
        )
        per_request = limits.timeout * (limits.max_retries + 1) + 8.0 * limits.max_retries
        return rounds * per_request + 10.0

    # -- finish: provider outcome, cache write, ordering --------------------------------

    def _finish(self, plan: _Plan, outcome: ProviderOutcome | None) -> list[EmbeddingResult]:
        to_cache: list[tuple[str, CachedEmbedding]] = []
        failed: list[int] = []
        if outcome is not None:
            for position, u in enumerate(plan.for_provider):
                vector = outcome.vectors.get(position)
                if vector is None:
                    failed.append(u)
                    continue
                confidence = plan.local_confidence.get(u)
                plan.results[u] = self._result(vector, confidence, "provider")
                if u not in plan.published:
                    to_cache.append(self._entry(plan, u, vector, "provider", confidence))
        for u in plan.fresh_local:
            to_cache.append(
                self._entry(plan, u, plan.local_vectors[u], "local", plan.local_confidence[u])
            )
        if self.cache is not None:
            self.cache.put_many(to_cache)
        # Counted per input, like every other counter: a duplicate that failed failed twice.
        failed_set = set(failed)
        failed_inputs = sum(u in failed_set for u in plan.positions)
        if failed and self.gate.on_provider_error == "raise":
            self._count(plan, outcome, degraded=0, failed=failed_inputs)
            raise self._provider_error(plan, outcome, failed)
        if failed:
            self._degrade(plan, outcome, failed)
        self._count(plan, outcome, degraded=failed_inputs, failed=0)
        return [plan.results[u] for u in plan.positions]  # type: ignore[misc]

    def _degrade(self, plan: _Plan, outcome: ProviderOutcome | None, failed: list[int]) -> None:
        self._translate(plan, [u for u in failed if u not in plan.local_vectors])
        for u in failed:
            # Not cached: the next call should try the provider again.
            plan.results[u] = self._result(
                plan.local_vectors[u], plan.local_confidence[u], "local_degraded"
            )
        logger.warning(
            "provider failed for %d of %d texts; returning the adapter's vectors instead "
            "(route 'local_degraded'): %s",
            len(failed),
            len(plan.for_provider),
            _first_error(outcome),
        )

    def _provider_error(
        self, plan: _Plan, outcome: ProviderOutcome | None, failed: list[int]
    ) -> ProviderError:
        failed_set = set(failed)
        failed_positions = [p for p, u in enumerate(plan.positions) if u in failed_set]
        completed = len(plan.for_provider) - len(failed)
        return ProviderError(
            f"the provider failed for {len(failed_positions)} of {len(plan.positions)} "
            f"inputs (input positions {_preview(failed_positions)}) after retries: "
            f"{_first_error(outcome)}. {completed} provider vectors from requests that "
            "succeeded were cached. Pass on_provider_error='local' to fall back to the "
            "adapter's vectors instead.",
            failed_indices=failed_positions,
            completed=completed,
        )

    def _count(
        self, plan: _Plan, outcome: ProviderOutcome | None, *, degraded: int, failed: int
    ) -> None:
        routes = [getattr(plan.results[u], "route", None) for u in plan.positions]
        with self._stats_lock:
            stats = self._stats
            stats.texts += len(plan.positions)
            stats.cache_hits += routes.count("cache")
            stats.local += routes.count("local")
            stats.provider += routes.count("provider")
            stats.degraded += degraded
            stats.failed += failed
            if outcome is not None:
                stats.provider_requests += outcome.requests
                stats.provider_tokens += outcome.tokens

    def _result(
        self, vector: np.ndarray, confidence: float | None, route: Route
    ) -> EmbeddingResult:
        return EmbeddingResult(vector, confidence, route, self.space)

    def _entry(
        self, plan: _Plan, u: int, vector: np.ndarray, route: Any, confidence: float | None
    ) -> tuple[str, CachedEmbedding]:
        return plan.keys[u] if plan.keys else "", CachedEmbedding(
            vector, route, confidence, plan.unique_texts[u]
        )


def _deduplicate(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """Unique texts in first-seen order, and each input's index into them.

    Raises:
        TypeError: If ``texts`` is a bare string or holds a non-``str`` (naming its index).
        InvalidInputError: If a text is not valid Unicode (naming its index).

    """
    if isinstance(texts, str | bytes):
        raise TypeError("texts must be a list of strings, not a single string")
    first_seen: dict[str, int] = {}
    positions: list[int] = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__}, expected str: {text!r:.80}")
        if not text.isascii():
            _check_encodable(text, index)
        positions.append(first_seen.setdefault(text, len(first_seen)))
    return list(first_seen), positions


def _check_encodable(text: str, index: int) -> None:
    # A lone surrogate (e.g. from a bad decode with errors="surrogateescape") has no UTF-8
    # form: the tokenizer raises a bare TypeError and the provider request cannot even be
    # serialised, failing every other text in its batch. Reject it here, by position.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"texts[{index}] is not valid Unicode: {exc.reason} at character {exc.start} "
            f"({text[exc.start : exc.start + 1]!r}); decode your input with errors='replace'"
        ) from None


def _blank(text: str) -> bool:
    return not text.strip()


def _first_error(outcome: ProviderOutcome | None) -> str:
    if outcome is None or not outcome.failures:
        return "no error recorded"
    error = outcome.failures[0][1]
    return f"{type(error).__name__}: {error}"


def _preview(positions: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, positions[:limit]))
    return shown + (f", ... ({len(positions)} in all)" if len(positions) > limit else "")
