"""Fidelity: the share of native retrieval quality the pipeline's vectors keep (NumPy only).

The measure, in the user's terms. Take held-out pairs (texts the provider embedded, whose
native vectors are known, that were not used to fit or calibrate what is judged). The
*index* is the user's own provider vectors: every stored pair's native vector. For each
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

K = 10
"""Depth of the neighbour-agreement measure (R@10)."""

_Z95 = 1.959964
_BLOCK = 1024


def neighbour_hits(
    returned: np.ndarray, native: np.ndarray, index: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Whether each returned vector retrieves its text's native nearest neighbour in the top 10.

    Args:
        returned: ``(m, d)`` the vectors the pipeline returns for the judged texts.
        native: ``(m, d)`` the provider's vectors of the same texts.
        index: ``(n, d)`` the user's provider vectors (the index searched).
        rows: ``(m,)`` the row of ``index`` that is each judged text itself (excluded from
            both searches), or -1 when the text is not in the index.

    Returns:
        ``(m,)`` booleans.

    """
    index = l2_normalize(index)
    returned, native = l2_normalize(returned), l2_normalize(native)
    hits = np.zeros(len(returned), dtype=bool)
    k = min(K, max(len(index) - 1, 1))
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
        hits[block] = (sims > target[:, None]).sum(axis=1) < k
    return hits


def wilson_interval(hits: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (0, 1 when ``n`` is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
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


class FidelityCurve:
    """Fidelity against the share routed, over every threshold, for one set of judged texts."""

    def __init__(self, confidence: np.ndarray, hits: np.ndarray) -> None:
        """Judge texts with these confidences, whose local vectors hit (or miss)."""
        self.confidence = np.asarray(confidence, dtype=np.float64)
        self.hits = np.asarray(hits, dtype=bool)
        if self.confidence.shape != self.hits.shape:
            raise ValueError("confidence and hits must have the same length")

    def at(self, threshold: float) -> FidelityPoint:
        """Fidelity when texts with confidence below ``threshold`` are routed."""
        routed = self.confidence < threshold
        good = int((self.hits | routed).sum())
        n = len(self.hits)
        low, high = wilson_interval(good, n)
        return FidelityPoint(
            threshold=float(threshold),
            routed=float(routed.mean()) if n else 0.0,
            fidelity=good / n if n else 1.0,
            low=low,
            high=high,
            judged=n,
        )

    def at_share(self, share: float) -> FidelityPoint:
        """Fidelity when the ``share`` least confident texts are routed."""
        n = len(self.confidence)
        count = min(max(round(share * n), 0), n)
        if count == 0:
            return self.at(0.0)
        ordered = np.sort(self.confidence)
        threshold = float(np.nextafter(ordered[count - 1], np.inf)) if count < n else 1.01
        return self.at(min(threshold, 1.01))

    def threshold_for(self, target: float) -> FidelityPoint:
        """The lowest call rate whose fidelity (point estimate) meets ``target``.

        Candidate thresholds are 0 (nothing routed) and each judged confidence; the result
        routes everything (threshold above 1) when the local route cannot meet the target
        at any share.
        """
        candidates = np.unique(np.concatenate([[0.0], self.confidence]))
        for threshold in candidates:  # increasing threshold = increasing call rate
            point = self.at(float(threshold))
            if point.fidelity >= target:
                return point
        return self.at(1.01)

    def table(self, shares: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)) -> list[FidelityPoint]:
        """Fidelity at a few routed shares (the routing curve)."""
        return [self.at_share(share) for share in shares]


__all__ = [
    "FidelityCurve",
    "FidelityPoint",
    "K",
    "neighbour_hits",
    "wilson_interval",
]
