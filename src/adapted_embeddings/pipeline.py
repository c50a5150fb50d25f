"""The one embedding pipeline both integrations wrap.

texts → cache look-up (provider vectors first, then this adapter's local vectors) → local
encode of the misses → translate and score → gate (+ random audits of the confident) → one
batched provider call for everything below the threshold and every audit → cache write and
pair store → results in input order.

Each call is split into a *plan* (everything before the provider) and a *finish*
(everything after), so the sync and async paths share all logic but the provider call.

Learning (:mod:`adapted_embeddings.learning`) rides on the same pass: every provider vector
for a text the adapter also scored becomes a (source, provider) pair, audits measure the
local route, the guard raises the threshold when they show it failing, and :meth:`adapt`
fits a domain adapter from the pairs and switches to it. With no adapter at all (a target
nothing was trained for), the pipeline starts by sending everything to the provider and
learning from it (*cold start*).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.adapter.network import centred_cosine_rows
from adapted_embeddings.cache import CachedEmbedding, EmbeddingCache, cache_key, provider_cache_key
from adapted_embeddings.encoders import SourceEncoder
from adapted_embeddings.errors import ConfigurationError, InvalidInputError, ProviderError
from adapted_embeddings.learning.lineage import lineage
from adapted_embeddings.learning.pairs import PairKind, PairRecord
from adapted_embeddings.provider import OpenAIEmbeddingProvider, ProviderOutcome
from adapted_embeddings.settings import GateSettings
from adapted_embeddings.singleflight import SingleFlight
from adapted_embeddings.spaces import EmbeddingSpace, ensure_same_space
from adapted_embeddings.text_checks import check_encodable
from adapted_embeddings.types import ROLES, Role, Route
from adapted_embeddings.usage.ledger import CallUsage

if TYPE_CHECKING:
    from adapted_embeddings.learning.adapt import AdaptationReport, AdaptOptions
    from adapted_embeddings.learning.audit import QualityReport
    from adapted_embeddings.learning.learner import DomainLearner
    from adapted_embeddings.usage.ledger import UsageLedger

logger = logging.getLogger(__name__)

__all__ = ["ROLES", "EmbeddingPipeline", "EmbeddingResult", "PipelineStats", "Role", "Route"]


@dataclass(frozen=True)
class EmbeddingResult:
    """One text's embedding and how it was obtained.

    Attributes:
        vector: Unit-length float32 vector in ``space``. Every result owns its array (two
            results never share one, even for the same text) and it is always writable.
        confidence: The adapter's confidence in [0, 1], or None when the adapter did not
            score this text (provider mode, cold start, a cached provider vector).
        route: ``cache``, ``local`` (adapter, confident), ``provider`` (fallback or audit),
            or ``local_degraded`` (adapter vector returned because the provider failed).
        space: The embedding space the vector lives in.
        audited: True when the gate would have kept the text local but it was sent to the
            provider as an audit; the vector is then the provider's.
        adapter: The id (``name:hash``) of the adapter that made the vector, None for a
            provider vector. After ``adapt()`` a re-embedded text can come from an ancestor
            adapter's cache entry: the id is then the ancestor's. Record it beside the
            vector to know which adapter made what (a fleet switches together, but an index
            outlives any one adapter).

    """

    vector: np.ndarray
    confidence: float | None
    route: Route
    space: EmbeddingSpace
    audited: bool = False
    adapter: str | None = None


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
    audited: int = 0
    pairs_stored: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)


@dataclass
class _Plan:
    """State carried from :meth:`EmbeddingPipeline._plan` to :meth:`_finish`."""

    role: Role
    adapter: Adapter | None  # the adapter in force when the call started
    unique_texts: list[str]
    positions: list[int]  # input position -> index into unique_texts
    local_keys: list[str]
    provider_keys: list[str]
    results: list[EmbeddingResult | None]
    source_vectors: dict[int, np.ndarray] = field(default_factory=dict)
    local_vectors: dict[int, np.ndarray] = field(default_factory=dict)
    local_confidence: dict[int, float] = field(default_factory=dict)
    for_provider: list[int] = field(default_factory=list)
    audited: set[int] = field(default_factory=set)
    fresh_local: list[int] = field(default_factory=list)
    published: set[int] = field(default_factory=set)  # provider vectors already cached
    unpaid_local: list[int] = field(default_factory=list)  # hybrid: kept local, not audited

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
        adapter: Adapter | None,
        encoder: SourceEncoder,
        provider: OpenAIEmbeddingProvider | None,
        cache: EmbeddingCache | None,
        gate: GateSettings,
        target: EmbeddingSpace | None = None,
        learner: DomainLearner | None = None,
        ledger: UsageLedger | None = None,
    ) -> None:
        """Check that the parts fit together.

        Args:
            adapter: The adapter, or None for a cold start (everything goes to the provider
                until :meth:`adapt` creates one).
            encoder: The local source model.
            provider: The fallback provider (None only in local mode).
            cache: The disk cache, or None.
            gate: Mode, thresholds, provider-error policy.
            target: The target space; required when ``adapter`` is None.
            learner: Pair store, audits and guard; None turns learning off.
            ledger: Where usage is counted (:mod:`adapted_embeddings.usage`); None: nowhere.

        Raises:
            SpaceMismatchError: If the encoder, adapter and provider spaces disagree.
            ConfigurationError: If a mode that may call the provider has none, or a cold
                start has no target space or is not in hybrid/provider mode.

        """
        if adapter is not None:
            ensure_same_space(adapter.source, encoder.space, what="the local model's vectors")
            target = target or adapter.target
            ensure_same_space(target, adapter.target, what="the adapter's vectors")
        if target is None:
            raise ConfigurationError("a pipeline without an adapter needs its target space")
        if adapter is None and gate.mode == "local":
            raise ConfigurationError(
                f"no adapter for {encoder.space.id} -> {target.id}, so mode='local' has "
                "nothing to embed with; use mode='hybrid' to start from the provider and "
                "learn an adapter (adapt()), or train one"
            )
        if provider is not None:
            ensure_same_space(target, provider.space, what="the provider's vectors")
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
        self.learner = learner
        self.ledger = ledger
        self._space = target
        self._stats = PipelineStats()
        self._stats_lock = threading.Lock()
        self._adapt_lock = threading.Lock()
        self.last_adaptation: AdaptationReport | None = None
        """The report of the latest adapt(), called or automatic (None before any)."""
        # Concurrent callers (threads, tasks, processes sharing the cache directory) that
        # miss the cache for the same text pay for it once: see singleflight.py.
        self._flights = SingleFlight(cache) if cache is not None else None
        if learner is not None:
            learner.on_enough_pairs = self._adapt_in_background
            if ledger is not None:
                learner.on_guard_trip = lambda adapter: ledger.note_event(
                    space=target.id, adapter=adapter.id, guard_trips=1
                )

    @property
    def space(self) -> EmbeddingSpace:
        """The space every returned vector lives in (the target)."""
        return self._space

    def threshold(self, role: Role, adapter: Adapter | None = None) -> float:
        """Minimum confidence for a local vector of ``role`` to be used.

        The configured threshold (or the adapter's calibrated one), raised by the guard
        when audits showed the local route failing (see :meth:`quality_report`).
        """
        adapter = adapter or self.adapter
        if adapter is None:
            return 1.0
        configured = self.gate.query_threshold if role == "query" else self.gate.document_threshold
        threshold = adapter.recommended_threshold if configured is None else configured
        raised = self.learner.raised_threshold(adapter) if self.learner is not None else None
        return threshold if raised is None else max(threshold, raised)

    def embed(self, texts: Sequence[str], role: Role = "document") -> list[EmbeddingResult]:
        """Embed texts; results are in input order.

        Raises:
            TypeError: If an item is not a ``str`` (naming its index).
            InvalidInputError: If a text is not valid Unicode (naming its index).
            ProviderError: If the provider fails and ``on_provider_error='raise'``; vectors
                that did succeed are cached first, so a retry does not pay for them again.

        """
        chunks = self._guard_chunks(texts)
        if chunks is None:
            return self._embed_once(texts, role)
        unique, positions, bounds = chunks
        results: list[EmbeddingResult] = []
        for start, stop in bounds:
            with _chunk_errors(positions, start):
                results += self._embed_once(unique[start:stop], role)
        return self._spread(results, positions, unique, role)

    async def aembed(self, texts: Sequence[str], role: Role = "document") -> list[EmbeddingResult]:
        """Async :meth:`embed`: local work runs in a thread, provider calls use the async client."""
        chunks = self._guard_chunks(texts)
        if chunks is None:
            return await self._aembed_once(texts, role)
        unique, positions, bounds = chunks
        results: list[EmbeddingResult] = []
        for start, stop in bounds:
            with _chunk_errors(positions, start):
                results += await self._aembed_once(unique[start:stop], role)
        return self._spread(results, positions, unique, role)

    def _spread(
        self,
        unique_results: list[EmbeddingResult],
        positions: list[int],
        unique_texts: list[str],
        role: Role,
    ) -> list[EmbeddingResult]:
        """One result per input from one per distinct text, each with its own vector copy.

        The chunks counted each distinct text once; repeats are counted here under their
        route, as a single pass counts them.
        """
        seen: set[int] = set()
        ordered, repeats, repeated = [], [], []
        for u in positions:
            result = unique_results[u]
            if u in seen:
                result = replace(result, vector=np.array(result.vector, dtype=np.float32))
                repeats.append(result.route)
                repeated.append(u)
            seen.add(u)
            ordered.append(result)
        if repeated:  # the ledger counts them too, as served
            results: list[EmbeddingResult | None] = list(unique_results)
            plan = _Plan(role, self.adapter, unique_texts, repeated, [], [], results)
            self._note_usage(plan, None, failed=0, pairs=[])
        with self._stats_lock:
            self._stats.texts += len(repeats)
            self._stats.cache_hits += repeats.count("cache")
            self._stats.local += repeats.count("local")
            self._stats.provider += repeats.count("provider")
        return ordered

    def _embed_once(self, texts: Sequence[str], role: Role) -> list[EmbeddingResult]:
        plan = self._plan(texts, role)
        outcome = None
        if plan.for_provider:
            assert self.provider is not None  # __init__ refuses provider-less non-local modes
            outcome = self._fetch(plan)
        return self._finish(plan, outcome)

    async def _aembed_once(self, texts: Sequence[str], role: Role) -> list[EmbeddingResult]:
        plan = await asyncio.to_thread(self._plan, texts, role)
        outcome = None
        if plan.for_provider:
            assert self.provider is not None  # guaranteed by _plan
            outcome = await self._afetch(plan)
        return await asyncio.to_thread(self._finish, plan, outcome)

    def _guard_chunks(
        self, texts: Sequence[str]
    ) -> tuple[list[str], list[int], list[tuple[int, int]]] | None:
        """Chunks of a long call, so the guard can act between them (None: one pass).

        The guard acts on audits, and audits come back with the provider's answer. In one
        pass, a long call on a domain where the adapter is confidently wrong would be
        served entirely at the old threshold; in chunks of ``learning.guard_chunk`` distinct
        texts, at most one chunk is (each chunk plans with the threshold the previous
        chunks' audits left). Only while the guard can still act: hybrid mode, audits and
        guard on, and not already routing everything.
        """
        learner, adapter = self.learner, self.adapter
        if (
            learner is None
            or adapter is None
            or self.gate.mode != "hybrid"
            or not learner.settings.guard
            or learner.settings.audit_rate == 0
            or learner.settings.guard_chunk is None
            or len(texts) <= learner.settings.guard_chunk
            or (learner.raised_threshold(adapter) or 0.0) >= 1.0
        ):
            return None
        unique, positions = _deduplicate(texts)  # validates, naming the caller's indices
        size = learner.settings.guard_chunk
        bounds = [(start, min(start + size, len(unique))) for start in range(0, len(unique), size)]
        return unique, positions, bounds

    def warm_up(self) -> None:
        """Load the local model now instead of on the first cache miss.

        A server calls this at start, so no request pays for loading and readiness can be
        reported honestly. Encoders without a ``load()`` (a LangChain source) have nothing to
        load.
        """
        load = getattr(self.encoder, "load", None)
        if callable(load):
            load()

    def stats(self) -> PipelineStats:
        """A snapshot of the running counters."""
        with self._stats_lock:
            stats = PipelineStats(**self._stats.as_dict())
        if self.learner is not None:
            stats.pairs_stored = self.learner.pairs_stored
        return stats

    def reset_stats(self) -> None:
        """Zero the running counters."""
        with self._stats_lock:
            self._stats = PipelineStats()

    # -- learning -------------------------------------------------------------------------

    def quality_report(self) -> QualityReport | None:
        """How good the local route is on this user's data, from audits (None: no adapter).

        Raises:
            ConfigurationError: If learning is off (``learner`` is None).

        """
        if self.learner is None:
            raise ConfigurationError("quality reports need learning on (learn=True, a cache)")
        adapter = self.adapter
        return None if adapter is None else self.learner.report(adapter)

    def adapt(self, options: AdaptOptions | None = None) -> AdaptationReport:
        """Fit a domain adapter from the stored pairs and switch to it if it is better.

        See :func:`adapted_embeddings.learning.adapt.adapt`. Embedding calls go on while
        it runs; calls that start after the switch use the new adapter.
        """
        from adapted_embeddings.learning.adapt import adapt, builtin_target_mean

        if self.learner is None or self.learner.store is None:
            raise ConfigurationError(
                "adapt() needs the pair store: turn learning on (learn=True) with a cache"
            )
        with self._adapt_lock:
            report = adapt(
                self.learner.store,
                parent=self.adapter,
                source=self.encoder.space,
                target=self.space,
                settings=self.learner.settings,
                options=options,
                parent_thresholds=None
                if self.adapter is None
                else {role: self.threshold(role) for role in ROLES},
                parent_trusted=self.adapter is None
                or self.learner.raised_threshold(self.adapter) is None,
                reference_mean=builtin_target_mean(self.space),
            )
            if report.switched and report.adapter is not None:
                self.use_adapter(report.adapter)
            self.last_adaptation = report
        return report

    def use_adapter(self, adapter: Adapter) -> None:
        """Switch to ``adapter`` (same spaces); calls already under way finish on the old one."""
        ensure_same_space(adapter.source, self.encoder.space, what="the local model's vectors")
        ensure_same_space(adapter.target, self.space, what="the adapter's vectors")
        previous, self.adapter = self.adapter, adapter
        if previous is not None and self.learner is not None:
            self.learner.forget_adapter(previous.id)
        if self.ledger is not None:
            self.ledger.note_event(space=self.space.id, adapter=adapter.id, adapter_switches=1)
        logger.info("pipeline now uses adapter %s", adapter.name)

    def _adapt_in_background(self) -> None:
        """Automatic mode: adapt in a daemon thread, never blocking an embed call."""
        learner = self.learner
        if learner is None or not learner.adaptation_started():
            return

        def run() -> None:
            try:
                report = self.adapt()
                logger.info("automatic adapt(): %s", report.summary())
            except Exception as exc:  # a background refit must never take the process down
                logger.warning("automatic adapt() failed: %s", exc)
            finally:
                learner.adaptation_finished()

        threading.Thread(target=run, name="adapted-embeddings-adapt", daemon=True).start()

    # -- plan: cache, local encode, gate, audits ------------------------------------------

    def _plan(self, texts: Sequence[str], role: Role) -> _Plan:
        unique_texts, positions = _deduplicate(texts)
        if role not in ROLES:
            raise ValueError(f"role must be 'query' or 'document', got {role!r}")
        adapter = self.adapter
        plan = _Plan(role, adapter, unique_texts, positions, [], [], [None] * len(unique_texts))
        if self.cache is not None:
            plan.provider_keys = [
                provider_cache_key(space=self.space, text=t) for t in unique_texts
            ]
            if adapter is not None:
                plan.local_keys = [
                    cache_key(space=self.space, adapter_id=adapter.id, role=role, text=t)
                    for t in unique_texts
                ]
        mode, threshold = self.gate.mode, self.threshold(role, adapter)
        self._serve_from_cache(plan, threshold)
        missing = [u for u, result in enumerate(plan.results) if result is None]
        if adapter is None:
            self._plan_cold_start(plan, missing)
            return plan
        # Blank texts never go to the provider (OpenAI rejects empty input), so they are
        # always embedded locally, whatever the mode.
        to_encode = [u for u in missing if mode != "provider" or _blank(unique_texts[u])]
        self._translate(plan, to_encode)
        confident = []
        for u in missing:
            text = unique_texts[u]
            if u in plan.local_vectors and (
                mode == "local" or _blank(text) or plan.local_confidence[u] >= threshold
            ):
                confident.append(u)
            else:
                plan.for_provider.append(u)
        if mode != "hybrid":
            plan.fresh_local.extend(confident)
        else:
            # After adapt(), what an earlier adapter of this lineage already embedded is
            # neither paid for again nor audited again: re-indexing the same texts is free.
            known = self._embedded_by_ancestors(plan, missing)
            for u in plan.for_provider:
                if u in known:
                    entry, maker = known[u]
                    plan.results[u] = self._result(entry.vector, entry.confidence, "cache", maker)
            plan.for_provider = [u for u in plan.for_provider if u not in known]
            if self.learner is not None:
                auditable = [u for u in confident if not _blank(unique_texts[u]) and u not in known]
                plan.audited = set(self.learner.choose_audits(adapter, auditable))
            plan.for_provider += [u for u in confident if u in plan.audited]
            plan.fresh_local.extend(u for u in confident if u not in plan.audited)
            if self.learner is not None and self.learner.learning:
                # Kept local unpaid: with the pairs, the whole traffic the gate judged.
                plan.unpaid_local = [u for u in plan.fresh_local if not _blank(unique_texts[u])]
        for u in plan.fresh_local:
            plan.results[u] = self._result(
                plan.local_vectors[u], plan.local_confidence[u], "local", adapter.id
            )
        return plan

    def _embedded_by_ancestors(
        self, plan: _Plan, candidates: list[int]
    ) -> dict[int, tuple[CachedEmbedding, str]]:
        """Texts an earlier adapter of this lineage kept local: cached entry, adapter id.

        An entry counts if its confidence reached the threshold that adapter was held to
        when ``adapt()`` replaced it (the guard's raise included), so vectors the guard had
        found wanting are not revived.
        """
        assert plan.adapter is not None
        ancestors = (lineage(plan.adapter.manifest) or {}).get("ancestors", [])
        found: dict[int, tuple[CachedEmbedding, str]] = {}
        if self.cache is None or not ancestors:
            return found
        pending = [u for u in candidates if not _blank(plan.unique_texts[u])]
        for ancestor in ancestors:
            if not pending:
                break
            threshold = float(ancestor["thresholds"][plan.role])
            keys = [
                cache_key(
                    space=self.space,
                    adapter_id=ancestor["id"],
                    role=plan.role,
                    text=plan.unique_texts[u],
                )
                for u in pending
            ]
            entries = self.cache.get_many(keys, dimensions=self.space.dimensions)
            for u, entry in zip(pending, entries, strict=True):
                if entry is not None and (entry.confidence or 0.0) >= threshold:
                    found[u] = (entry, ancestor["id"])
            pending = [u for u in pending if u not in found]
        return found

    def _plan_cold_start(self, plan: _Plan, missing: list[int]) -> None:
        """No adapter yet: everything goes to the provider, and is learned from."""
        for u in missing:
            if _blank(plan.unique_texts[u]):
                raise InvalidInputError(
                    f"texts[{plan.positions.index(u)}] is blank: with no adapter yet it can "
                    "only go to the provider, which rejects empty input"
                )
        plan.for_provider = list(missing)
        if self.learner is not None and self.learner.learning and missing:
            source = self.encoder.encode([plan.unique_texts[u] for u in missing])
            for row, u in enumerate(missing):
                plan.source_vectors[u] = source[row]

    def _serve_from_cache(self, plan: _Plan, threshold: float) -> None:
        if self.cache is None or not plan.provider_keys:
            return
        dimensions = self.space.dimensions
        # A provider vector is the best there is, whatever the adapter or mode.
        for u, entry in enumerate(self.cache.get_many(plan.provider_keys, dimensions=dimensions)):
            if entry is not None:
                plan.results[u] = self._result(entry.vector, None, "cache", None)
        if not plan.local_keys:
            return
        missing = [u for u, result in enumerate(plan.results) if result is None]
        entries = self.cache.get_many([plan.local_keys[u] for u in missing], dimensions=dimensions)
        rejected = 0
        for u, entry in zip(missing, entries, strict=True):
            if entry is None:
                continue
            # A cached local vector is only as good as today's threshold says: if the
            # threshold was raised since, it goes through the gate again.
            usable = (
                _blank(plan.unique_texts[u])  # blank texts are always local, see _plan
                # Local mode keeps every local vector, so recomputing one would give the same.
                or self.gate.mode == "local"
                or (
                    self.gate.mode != "provider"
                    and entry.confidence is not None
                    and entry.confidence >= threshold
                )
            )
            if usable:  # local keys are the current adapter's
                assert plan.adapter is not None
                plan.results[u] = self._result(
                    entry.vector, entry.confidence, "cache", plan.adapter.id
                )
            else:
                rejected += 1
        if rejected:
            self.cache.note_rejected(rejected)

    def _translate(self, plan: _Plan, indices: list[int]) -> None:
        if not indices:
            return
        assert plan.adapter is not None
        texts = [plan.unique_texts[u] for u in indices]
        source = self.encoder.encode(texts)
        vectors, confidence = plan.adapter.translate(
            source, token_counts=self._token_counts(plan.adapter, texts)
        )
        for row, u in enumerate(indices):
            plan.source_vectors[u] = source[row]
            plan.local_vectors[u] = vectors[row]
            plan.local_confidence[u] = float(confidence[row])

    def _token_counts(self, adapter: Adapter, texts: list[str]) -> np.ndarray | None:
        """Source-model token counts, so texts the model cut lose confidence (if it can tell)."""
        counter = getattr(self.encoder, "token_counts", None)
        if counter is None or not adapter.manifest.architecture.max_source_tokens:
            return None
        return np.asarray(counter(texts), dtype=np.float32)

    # -- provider call, single-flight ----------------------------------------------------

    def _fetch(self, plan: _Plan) -> ProviderOutcome:
        assert self.provider is not None
        if self._flights is None:
            return self.provider.embed(plan.provider_texts)
        return self._flights.fetch(
            plan.provider_texts,
            [plan.provider_keys[u] for u in plan.for_provider],
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
            [plan.provider_keys[u] for u in plan.for_provider],
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
            entries.append(_provider_entry(plan, u, vector))
            plan.published.add(u)
        self.cache.put_many(entries)

    def _lease_seconds(self, texts: int) -> float:
        """How long a lease lasts: the longest the provider call can take, and a margin."""
        assert self.provider is not None
        return self.provider.max_call_seconds(texts) + 10.0

    # -- finish: provider outcome, cache write, pairs, ordering --------------------------

    def _finish(self, plan: _Plan, outcome: ProviderOutcome | None) -> list[EmbeddingResult]:
        to_cache: list[tuple[str, CachedEmbedding]] = []
        failed: list[int] = []
        pairs: list[PairRecord] = []
        if outcome is not None:
            for position, u in enumerate(plan.for_provider):
                vector = outcome.vectors.get(position)
                if vector is None:
                    failed.append(u)
                    continue
                confidence = plan.local_confidence.get(u)
                plan.results[u] = EmbeddingResult(
                    vector, confidence, "provider", self.space, audited=u in plan.audited
                )
                if u not in plan.published and plan.provider_keys:
                    to_cache.append(_provider_entry(plan, u, vector))
                if u in plan.source_vectors:
                    pairs.append(self._pair(plan, u, vector))
        for u in plan.fresh_local:
            to_cache.append(
                (
                    plan.local_keys[u] if plan.local_keys else "",
                    CachedEmbedding(
                        plan.local_vectors[u],
                        "local",
                        plan.local_confidence[u],
                        plan.unique_texts[u],
                    ),
                )
            )
        if self.cache is not None:
            self.cache.put_many([entry for entry in to_cache if entry[0]])
        if self.learner is not None and (pairs or plan.unpaid_local):
            unpaid = [plan.source_vectors[u] for u in plan.unpaid_local]
            self.learner.record(plan.adapter, pairs, np.stack(unpaid) if unpaid else None)
        # Counted per input, like every other counter: a duplicate that failed failed twice.
        failed_set = set(failed)
        failed_inputs = sum(u in failed_set for u in plan.positions)
        if failed and self.gate.on_provider_error == "raise":
            self._count(plan, outcome, degraded=0, failed=failed_inputs, pairs=pairs)
            raise self._provider_error(plan, outcome, failed)
        if failed:
            self._degrade(plan, outcome, failed)
        self._count(plan, outcome, degraded=failed_inputs, failed=0, pairs=pairs)
        return _in_input_order(plan)

    def _pair(self, plan: _Plan, u: int, vector: np.ndarray) -> PairRecord:
        kind: PairKind = "audit" if u in plan.audited else "fallback"
        agreement = None
        if plan.adapter is None:
            kind = "cold_start"
        elif u in plan.audited:
            agreement = float(
                centred_cosine_rows(
                    plan.local_vectors[u][None], vector[None], plan.adapter.target_mean
                )[0]
            )
        return PairRecord(
            text=plan.unique_texts[u],
            source=plan.source_vectors[u],
            target=vector,
            role=plan.role,
            adapter_id=plan.adapter.id if plan.adapter is not None else "none",
            kind=kind,
            confidence=plan.local_confidence.get(u),
            agreement=agreement,
        )

    def _degrade(self, plan: _Plan, outcome: ProviderOutcome | None, failed: list[int]) -> None:
        if plan.adapter is None:  # a cold start has nothing local to fall back on
            raise self._provider_error(plan, outcome, failed)
        self._translate(plan, [u for u in failed if u not in plan.local_vectors])
        for u in failed:
            # Not cached: the next call should try the provider again.
            plan.results[u] = self._result(
                plan.local_vectors[u], plan.local_confidence[u], "local_degraded", plan.adapter.id
            )
        logger.warning(
            "provider failed for %d of %d texts; returning the adapter's vectors instead "
            "(route 'local_degraded'): %s",
            len(failed),
            len(plan.for_provider),
            outcome.first_error if outcome is not None else "no error recorded",
        )

    def _provider_error(
        self, plan: _Plan, outcome: ProviderOutcome | None, failed: list[int]
    ) -> ProviderError:
        failed_set = set(failed)
        failed_positions = [p for p, u in enumerate(plan.positions) if u in failed_set]
        completed = len(plan.for_provider) - len(failed)
        fallback = (
            "Pass on_provider_error='local' to fall back to the adapter's vectors instead."
            if plan.adapter is not None
            else "There is no adapter yet to fall back on (cold start)."
        )
        return ProviderError(
            f"the provider failed for {len(failed_positions)} of {len(plan.positions)} "
            f"inputs (input positions {_preview(failed_positions)}) after retries: "
            f"{outcome.first_error if outcome is not None else 'no error recorded'}. "
            f"{completed} provider vectors from requests that succeeded were cached. "
            f"{fallback}",
            failed_indices=failed_positions,
            completed=completed,
        )

    def _count(
        self,
        plan: _Plan,
        outcome: ProviderOutcome | None,
        *,
        degraded: int,
        failed: int,
        pairs: list[PairRecord],
    ) -> None:
        results = [plan.results[u] for u in plan.positions]
        routes = [getattr(r, "route", None) for r in results]
        with self._stats_lock:
            stats = self._stats
            stats.texts += len(plan.positions)
            stats.cache_hits += routes.count("cache")
            stats.local += routes.count("local")
            stats.provider += routes.count("provider")
            stats.audited += sum(bool(getattr(r, "audited", False)) for r in results)
            stats.degraded += degraded
            stats.failed += failed
            if outcome is not None:
                stats.provider_requests += outcome.requests
                stats.provider_tokens += outcome.tokens
        self._note_usage(plan, outcome, failed=failed, pairs=pairs)

    def _note_usage(
        self,
        plan: _Plan,
        outcome: ProviderOutcome | None,
        *,
        failed: int,
        pairs: list[PairRecord],
    ) -> None:
        """Hand the call's usage to the ledger: a list append; it is counted off-thread."""
        if self.ledger is None:
            return
        unpaid: dict[str, list[str]] = {}
        provider = 0
        for u in plan.positions:
            route = getattr(plan.results[u], "route", None)
            if route == "provider":
                provider += 1
            elif route is not None:
                unpaid.setdefault(route, []).append(plan.unique_texts[u])
        agreements = [p.agreement for p in pairs if p.agreement is not None]
        adapter, learner = plan.adapter, self.learner
        floor = None
        if agreements and adapter is not None and learner is not None:
            floor = learner.tracker(adapter).floor.poor_below
        self.ledger.note(
            CallUsage(
                space=self.space.id,
                adapter=adapter.id if adapter is not None else "none",
                role=plan.role,
                unpaid=unpaid,
                provider=provider,
                provider_texts=len(outcome.vectors) if outcome is not None else 0,
                provider_requests=outcome.requests if outcome is not None else 0,
                provider_tokens=outcome.tokens if outcome is not None else 0,
                failed=failed,
                agreements=agreements,
                poor_below=floor,
            )
        )

    def _result(
        self, vector: np.ndarray, confidence: float | None, route: Route, adapter: str | None
    ) -> EmbeddingResult:
        return EmbeddingResult(vector, confidence, route, self.space, adapter=adapter)


def _provider_entry(plan: _Plan, u: int, vector: np.ndarray) -> tuple[str, CachedEmbedding]:
    # The confidence is the adapter's, not the provider's: it is not stored with a vector
    # every adapter shares.
    return plan.provider_keys[u], CachedEmbedding(vector, "provider", None, plan.unique_texts[u])


@contextlib.contextmanager
def _chunk_errors(positions: list[int], offset: int) -> Iterator[None]:
    """Re-raise a chunk's ProviderError with the caller's input positions."""
    try:
        yield
    except ProviderError as exc:
        failed = {offset + i for i in exc.failed_indices}
        exc.failed_indices = [p for p, u in enumerate(positions) if u in failed]
        exc.args = (
            f"{exc.args[0]} (in a call of {len(positions)} inputs embedded in chunks, so the "
            f"guard can act between them: input positions {_preview(exc.failed_indices)}; "
            "chunks after this one were not embedded)",
        )
        raise


def _in_input_order(plan: _Plan) -> list[EmbeddingResult]:
    """One result per input, each with its own writable copy of the vector."""
    ordered = []
    for u in plan.positions:
        result = plan.results[u]
        assert result is not None
        ordered.append(replace(result, vector=np.array(result.vector, dtype=np.float32)))
    return ordered


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
        check_encodable(text, f"texts[{index}]")
        positions.append(first_seen.setdefault(text, len(first_seen)))
    return list(first_seen), positions


def _blank(text: str) -> bool:
    return not text.strip()


def _preview(positions: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, positions[:limit]))
    return shown + (f", ... ({len(positions)} in all)" if len(positions) > limit else "")
