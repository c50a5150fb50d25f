"""What the pipeline asks of learning: whom to audit, where pairs go, what the guard says.

One :class:`DomainLearner` per pipeline. It owns the pair store handle, one
:class:`~adapted_embeddings.learning.audit.AuditTracker` per adapter the pipeline has used,
and the optional background re-adaptation. Learning never fails an embedding call: a pair
store that cannot be written is reported once and skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.errors import PairStoreError
from adapted_embeddings.learning.audit import AuditTracker, QualityReport
from adapted_embeddings.learning.fidelity import (
    K,
    index_weights,
    neighbour_hits,
    traffic_weights,
    wilson_interval,
)
from adapted_embeddings.learning.pairs import AuditRecord, PairRecord, PairStore
from adapted_embeddings.settings import LearningSettings
from adapted_embeddings.spaces import EmbeddingSpace

logger = logging.getLogger(__name__)

_FIDELITY_INDEX_ROWS = 5_000
"""Newest stored rows searched when the report measures the local route's fidelity."""


class DomainLearner:
    """Pairs, audits and the guard for one pipeline."""

    def __init__(
        self,
        store: PairStore | None,
        settings: LearningSettings,
        *,
        source: EmbeddingSpace,
        target: EmbeddingSpace,
        seed: int | None = None,
    ) -> None:
        """Learn into ``store`` (None: audits and guard only, nothing kept on disk)."""
        self.store = store
        self.settings = settings
        self.source = source
        self.target = target
        self._trackers: dict[str, AuditTracker] = {}
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._store_failed = False
        self._pairs_since_adapt = 0
        self._adapting = threading.Event()
        self.on_enough_pairs: Callable[[], None] | None = None
        self.on_guard_trip: Callable[[Adapter], None] | None = None
        """Called when audits make the guard raise ``adapter``'s threshold (the usage ledger)."""
        self.pairs_stored = 0
        self._fidelity_key: tuple[str, int] | None = None
        self._fidelity: tuple[float, float, float] | None = None

    @property
    def learning(self) -> bool:
        """Whether pairs are being kept."""
        return self.store is not None and self.settings.learn and not self._store_failed

    def tracker(self, adapter: Adapter) -> AuditTracker:
        """The audit tracker of ``adapter``, seeded from its stored audits on first use."""
        with self._lock:
            tracker = self._trackers.get(adapter.id)
            if tracker is None:
                history = []
                if self.store is not None:
                    try:
                        history = self.store.audits(adapter.id, limit=self.settings.audit_window)
                    except PairStoreError as exc:
                        self._report_store_failure(exc)
                tracker = AuditTracker(adapter, self.settings, history)
                self._trackers[adapter.id] = tracker
            return tracker

    def choose_audits(self, adapter: Adapter, candidates: Sequence[int]) -> list[int]:
        """A random share of the texts the gate keeps local, to be checked by the provider."""
        if not candidates:
            return []
        with self._lock:
            draws = self._rng.random(len(candidates))
        chosen = self.tracker(adapter).choose(draws)
        return [c for c, pick in zip(candidates, chosen, strict=True) if pick]

    def raised_threshold(self, adapter: Adapter) -> float | None:
        """The guard's threshold for ``adapter`` (None while it has not tripped)."""
        return self.tracker(adapter).raised_threshold

    def report(self, adapter: Adapter) -> QualityReport:
        """The running quality estimate of ``adapter``'s local route, with its fidelity.

        The fidelity of the local route is measured on the stored audits of ``adapter`` (a
        uniform sample of its local texts) in the index of the newest stored provider
        vectors (at most 5,000 rows, each weighted by the traffic it stands for, as in
        :func:`~adapted_embeddings.learning.fidelity.traffic_weights`); it is recomputed
        only when the store has new pairs.
        """
        report = self.tracker(adapter).report()
        measured = self._local_fidelity(adapter)
        if measured is None:
            return replace(report, fidelity_target=self.settings.fidelity_target)
        fidelity, low, high = measured
        return replace(
            report,
            local_fidelity=fidelity,
            local_fidelity_low=low,
            local_fidelity_high=high,
            fidelity_target=self.settings.fidelity_target,
        )

    def _local_fidelity(self, adapter: Adapter) -> tuple[float, float, float] | None:
        if self.store is None:
            return None
        try:
            key = (adapter.id, self.store.last_id())
            if self._fidelity_key == key:
                return self._fidelity
            newest = max(key[1] - _FIDELITY_INDEX_ROWS, 0)
            pairs = self.store.load(source=self.source, target=self.target, after_id=newest)
        except PairStoreError as exc:
            self._report_store_failure(exc)
            return None
        rows = np.array(
            [
                row
                for row, (kind, owner) in enumerate(
                    zip(pairs.kinds, pairs.adapter_ids, strict=True)
                )
                if kind == "audit" and owner == adapter.id
            ],
            dtype=np.int64,
        )
        result = None
        if len(rows) and len(pairs) > K + 1:
            translated, _ = adapter.translate(pairs.source[rows])
            weights = index_weights(traffic_weights(pairs, self.settings), self.settings.index_size)
            hits = neighbour_hits(translated, pairs.target[rows], pairs.target, rows, weights)
            low, high = wilson_interval(int(hits.sum()), len(hits))
            result = (float(hits.mean()), low, high)
        self._fidelity_key, self._fidelity = key, result
        return result

    def record(
        self,
        adapter: Adapter | None,
        pairs: Sequence[PairRecord],
        local_sources: np.ndarray | None = None,
    ) -> None:
        """Keep the pairs (if learning) and feed the audits to the guard.

        ``local_sources``: the source vectors of the texts served locally and not audited
        (kept too, so ``adapt()`` counts call rates on the whole traffic).
        """
        if self.learning and local_sources is not None and len(local_sources):
            assert self.store is not None
            try:
                self.store.add_local_sources(local_sources, source=self.source, target=self.target)
            except PairStoreError as exc:
                self._report_store_failure(exc)
                return
        if not pairs:
            return
        if adapter is not None:
            audits = [
                AuditRecord(float(p.confidence or 0.0), float(p.agreement))
                for p in pairs
                if p.kind == "audit" and p.agreement is not None
            ]
            tracker = self.tracker(adapter)
            before = tracker.raised_threshold
            tracker.record(audits)
            if tracker.raised_threshold != before and self.on_guard_trip is not None:
                self.on_guard_trip(adapter)
        if not self.learning:
            return
        assert self.store is not None
        try:
            stored = self.store.add(pairs, source=self.source, target=self.target)
        except PairStoreError as exc:
            self._report_store_failure(exc)
            return
        self.pairs_stored += stored
        self._maybe_adapt(stored)

    def forget_adapter(self, adapter_id: str) -> None:
        """Drop the tracker of an adapter the pipeline no longer uses."""
        with self._lock:
            self._trackers.pop(adapter_id, None)

    def adaptation_started(self) -> bool:
        """Claim the single background adaptation slot; False if one is running."""
        with self._lock:
            if self._adapting.is_set():
                return False
            # A fleet's shared pair store lets one node at a time adapt for all of them.
            if self.store is not None and not self.store.claim_fleet_adaptation():
                self._pairs_since_adapt = 0  # another node is learning from these pairs
                return False
            self._adapting.set()
            self._pairs_since_adapt = 0
            return True

    def adaptation_finished(self) -> None:
        """Release the background adaptation slot."""
        if self.store is not None:
            self.store.release_fleet_adaptation()
        self._adapting.clear()

    def _maybe_adapt(self, stored: int) -> None:
        every = self.settings.auto_adapt_every
        if not every or self.on_enough_pairs is None:  # None or 0: off
            return
        with self._lock:
            self._pairs_since_adapt += stored
            due = self._pairs_since_adapt >= every and not self._adapting.is_set()
        if due:
            self.on_enough_pairs()

    def _report_store_failure(self, exc: PairStoreError) -> None:
        if not self._store_failed:
            logger.warning("learning is off for this process: %s", exc)
        self._store_failed = True
