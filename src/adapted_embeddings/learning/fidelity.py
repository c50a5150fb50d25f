"""Fidelity: the share of native retrieval quality the pipeline's vectors keep (NumPy only).

The measure, in the user's terms. Take held-out pairs (texts the provider embedded, whose
native vectors are known, that were not used to fit or calibrate what is judged). The
*index* is the user's own provider vectors: every stored pair's native vector, each
weighted by the texts of the traffic it stands for (:func:`traffic_weights`), so the
index judged is the size and make-up of the traffic seen (or of ``learning.index_size``
vectors, :func:`index_weights`), not of the stored sample. For each
held-out text, the pipeline returns either its local (adapted) vector, when the confidence
reaches the threshold, or the native vector, when the text is routed. The text is a *hit*
when its native nearest neighbour in the index (itself excluded) is among the top 10 that
the returned vector retrieves from the same index. **Fidelity** is the share of hits: the
neighbour agreement R@10 of the returned vectors. Native vectors score 1.0 by definition,
so fidelity is directly "the share of native retrieval quality kept". A routed text is
always a hit; the local route's misses are what lower it.

:func:`fidelity_curve` gives fidelity against the share routed for every threshold, with
95% Wilson intervals, and :meth:`FidelityCurve.threshold_for` the lowest call rate whose
fidelity meets a target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from adapted_embeddings.adapter.network import l2_normalize
from adapted_embeddings.learning.pairs import PairSet
from adapted_embeddings.settings import LearningSettings

K = 10
"""Depth of the neighbour-agreement measure (R@10)."""

MAX_TRAFFIC_WEIGHT = 10.0
"""The most texts of the traffic one stored pair may stand for."""

_Z95 = 1.959964
_BLOCK = 1024


def neighbour_hits(
    returned: np.ndarray,
    native: np.ndarray,
    index: np.ndarray,
    rows: np.ndarray,
    index_weights: np.ndarray | None = None,
) -> np.ndarray:
    """Whether each returned vector retrieves its text's native nearest neighbour in the top 10.

    Args:
        returned: ``(m, d)`` the vectors the pipeline returns for the judged texts.
        native: ``(m, d)`` the provider's vectors of the same texts.
        index: ``(n, d)`` the user's provider vectors (the index searched).
        rows: ``(m,)`` the row of ``index`` that is each judged text itself (excluded from
            both searches), or -1 when the text is not in the index.
        index_weights: How many texts of the user's index each row stands for (default 1).
            A row that outranks the native neighbour counts that many times: a sample of
            the stored pairs then judges as the whole traffic's index would.

    Returns:
        ``(m,)`` booleans: fewer than 10 (weighted) rows outrank the native neighbour.

    """
    index = l2_normalize(index)
    returned, native = l2_normalize(returned), l2_normalize(native)
    weights = np.ones(len(index)) if index_weights is None else np.asarray(index_weights)
    hits = np.zeros(len(returned), dtype=bool)
    k = min(K, max(float(weights.sum()) - 1, 1))
    for start in range(0, len(returned), _BLOCK):
        block = slice(start, start + _BLOCK)
        own = np.asarray(rows[block])
        positions = np.arange(len(own))
        mask = own >= 0
        native_sims = native[block] @ index.T
        native_sims[positions[mask], own[mask]] = -np.inf
        top1 = np.argmax(native_sims, axis=1)
        sims = returned[block] @ index.T
        sims[positions[mask], own[mask]] = -np.inf
        target = sims[positions, top1]
        hits[block] = (sims > target[:, None]) @ weights < k
    return hits


def traffic_weights(pairs: PairSet, settings: LearningSettings) -> np.ndarray:
    """How many texts of the traffic each stored pair stands for.

    The pairs are not a sample of the traffic: every text the gate routed is stored, but of
    the texts it kept local only the audits are, a random ``1/rate`` share. So a fallback
    (or a cold-start pair) stands for itself, and an audit for ``1/rate`` local texts: the
    warm-up rate for an adapter's first ``warmup_audits`` audits, ``audit_rate`` after.
    Weighted so, the pairs estimate fidelity and call rate on the traffic that produced
    them, in an index the size of that traffic.

    A weight is capped at :data:`MAX_TRAFFIC_WEIGHT`: one audit at the 2% rate stands for 50
    texts, a tenth of a first 500, and one miss among a handful of them moved the chosen
    call rate from 30% to 90% (measured). The cap trades that variance for a small bias
    toward the routed texts, which are the harder ones (so toward routing more).
    """
    weights = np.ones(len(pairs))
    warm_rate = max(settings.audit_rate, settings.warmup_audit_rate)
    seen: dict[str, int] = {}
    for row, (kind, adapter_id) in enumerate(zip(pairs.kinds, pairs.adapter_ids, strict=True)):
        if kind != "audit":
            continue
        earlier = seen.get(adapter_id, 0)
        seen[adapter_id] = earlier + 1
        rate = warm_rate if earlier < settings.warmup_audits else settings.audit_rate
        weights[row] = min(1.0 / rate, MAX_TRAFFIC_WEIGHT) if rate > 0 else 1.0
    return weights


def index_weights(traffic: np.ndarray, index_size: int | None) -> np.ndarray:
    """What each stored pair counts for in the index the hits are judged in.

    Its traffic weight, scaled so the pairs stand for ``index_size`` vectors (the user's
    index, ``learning.index_size``) rather than for the traffic seen so far: in an index
    ``s`` times larger, about ``s`` times as many vectors outrank a text's neighbour.
    """
    if index_size is None or not traffic.sum():
        return traffic
    return traffic * (index_size / float(traffic.sum()))


def traffic_call_rate(
    paid: np.ndarray, paid_weight: float, unpaid: np.ndarray, threshold: float
) -> tuple[float, float, float]:
    """The share of the traffic a threshold routes, with its 95% interval.

    The traffic is the texts the provider embedded (the pairs; ``paid``: their confidence,
    each standing for ``paid_weight`` texts, e.g. a held-out fold for every fold) and the
    texts kept local unpaid (``unpaid``: their confidence, one text each). No native vector
    is needed to count what a threshold routes, so this counts every text kept local, where
    the pairs alone know them only through the audits' weights.

    Returns:
        ``(rate, low, high)``.

    """
    weights = np.concatenate([np.full(len(paid), float(paid_weight)), np.ones(len(unpaid))])
    routed = np.concatenate([np.asarray(paid) < threshold, np.asarray(unpaid) < threshold])
    total = float(weights.sum())
    if not total:
        return 0.0, 0.0, 1.0
    rate = float(weights[routed].sum()) / total
    effective = total**2 / float((weights**2).sum())
    low, high = wilson_interval(rate * effective, effective)
    return rate, low, high


def wilson_interval(hits: float, n: float) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (0, 1 when ``n`` is 0).

    ``hits`` and ``n`` may be fractional (a weighted count and an effective sample size).
    """
    if n == 0:
        return 0.0, 1.0
    p = min(max(hits / n, 0.0), 1.0)
    denominator = 1 + _Z95**2 / n
    centre = (p + _Z95**2 / (2 * n)) / denominator
    half = _Z95 * math.sqrt(p * (1 - p) / n + _Z95**2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class FidelityPoint:
    """Fidelity at one threshold, on the judged texts."""

    threshold: float
    """Confidence threshold (texts below it are routed to the provider)."""
    routed: float
    """Share of the judged texts routed."""
    fidelity: float
    """Share of native retrieval quality kept (R@10 of the returned vectors)."""
    low: float
    """Lower end of the 95% interval of ``fidelity``."""
    high: float
    """Upper end of the 95% interval of ``fidelity``."""
    judged: int
    """Number of judged texts."""

    def as_dict(self) -> dict[str, float]:
        """The point as a JSON-ready dict."""
        return asdict(self)

    def summary(self) -> str:
        """E.g. ``fidelity 0.991 [0.978, 0.996] at 24% routed (threshold 0.412, 400 texts)``."""
        return (
            f"fidelity {self.fidelity:.3f} [{self.low:.3f}, {self.high:.3f}] at "
            f"{self.routed:.0%} routed (threshold {self.threshold:.3f}, {self.judged} texts)"
        )


def routing_threshold(confidence: np.ndarray, weights: np.ndarray, share: float) -> float:
    """The threshold that routes the least confident ``share`` (by weight) of the texts.

    Returns 0.0 when nothing is to be routed and ``inf`` when everything is.
    """
    if share <= 0 or not len(confidence):
        return 0.0
    order = np.argsort(confidence, kind="stable")
    cumulative = np.cumsum(np.asarray(weights, np.float64)[order])
    count = int(np.searchsorted(cumulative / cumulative[-1], share - 1e-9, side="left")) + 1
    if count >= len(order):
        return float("inf")
    return float(np.nextafter(np.asarray(confidence)[order][count - 1], np.inf))


class FidelityCurve:
    """Fidelity against the share routed, over every threshold, for one set of judged texts.

    ``weights`` make the judged texts stand for the traffic they were sampled from (e.g. an
    audit stands for the 1/audit-rate local texts it was drawn among); the interval then
    uses the effective sample size ``(sum w)^2 / sum w^2``.
    """

    def __init__(
        self, confidence: np.ndarray, hits: np.ndarray, weights: np.ndarray | None = None
    ) -> None:
        """Judge texts with these confidences, whose local vectors hit (or miss)."""
        self.confidence = np.asarray(confidence, dtype=np.float64)
        self.hits = np.asarray(hits, dtype=bool)
        self.weights = (
            np.ones(len(self.hits)) if weights is None else np.asarray(weights, np.float64)
        )
        if not self.confidence.shape == self.hits.shape == self.weights.shape:
            raise ValueError("confidence, hits and weights must have the same length")
        total = float(self.weights.sum())
        self._total = total
        self._effective = total**2 / float((self.weights**2).sum()) if total else 0.0

    def at(self, threshold: float) -> FidelityPoint:
        """Fidelity when texts with confidence below ``threshold`` are routed."""
        routed = self.confidence < threshold
        if not self._total:
            return FidelityPoint(float(threshold), 0.0, 1.0, 0.0, 1.0, 0)
        fidelity = float(self.weights[self.hits | routed].sum()) / self._total
        low, high = wilson_interval(fidelity * self._effective, self._effective)
        return FidelityPoint(
            threshold=float(threshold),
            routed=float(self.weights[routed].sum()) / self._total,
            fidelity=fidelity,
            low=low,
            high=high,
            judged=len(self.hits),
        )

    def at_share(self, share: float) -> FidelityPoint:
        """Fidelity when the least confident ``share`` (by weight) of the texts is routed."""
        return self.at(routing_threshold(self.confidence, self.weights, share))

    def threshold_for(self, target: float) -> FidelityPoint:
        """The lowest call rate whose fidelity (point estimate) meets ``target``.

        Candidate thresholds are 0 (nothing routed) and each judged confidence (so tied
        texts are routed together); the result routes everything (an infinite threshold)
        when the local route cannot meet the target at any share.
        """
        if not self._total:
            return self.at(0.0)
        order = np.argsort(self.confidence, kind="stable")
        ordered, weights = self.confidence[order], self.weights[order]
        missed_routed = np.concatenate([[0.0], np.cumsum(weights * ~self.hits[order])])
        # Routing the first k: every routed text becomes a hit; the misses left are local.
        fidelity = 1.0 - (missed_routed[-1] - missed_routed) / self._total
        boundary = np.ones(len(ordered) + 1, dtype=bool)
        boundary[1:-1] = ordered[:-1] < ordered[1:]
        meets = np.flatnonzero(boundary & (fidelity >= target - 1e-12))
        if not len(meets):
            return self.at(float("inf"))
        k = int(meets[0])
        if k == 0:
            return self.at(0.0)
        return self.at(float(ordered[k]) if k < len(ordered) else float("inf"))

    def table(self, shares: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)) -> list[FidelityPoint]:
        """Fidelity at a few routed shares (the routing curve)."""
        return [self.at_share(share) for share in shares]


__all__ = [
    "MAX_TRAFFIC_WEIGHT",
    "FidelityCurve",
    "FidelityPoint",
    "K",
    "index_weights",
    "neighbour_hits",
    "routing_threshold",
    "traffic_call_rate",
    "traffic_weights",
    "wilson_interval",
]
