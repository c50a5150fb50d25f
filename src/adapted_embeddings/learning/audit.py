"""Audits: how good the local route really is on this user's data, and the guard.

An audit sends a text the gate would keep local to the provider as well; the caller gets
the provider's vector, and the agreement between the two (centred cosine) is recorded. The
audited texts are a uniform random sample of the local route, so their agreement is an
unbiased estimate of its quality, with a confidence interval.

The adapter's manifest says what quality its calibration promised for the local route
(its *floor*). When enough audits show the local route clearly below it, the **guard**
raises the confidence threshold, to the level at which the audited texts do meet the floor
(or to 1.0, everything to the provider, when no level does), and warns once. The raise
holds until the adapter changes (``adapt()``) or the process restarts; audits are stored
with the pairs, so a restarted process starts from the same evidence.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.learning.fidelity import wilson_interval
from adapted_embeddings.learning.pairs import AuditRecord
from adapted_embeddings.settings import LearningSettings

logger = logging.getLogger(__name__)

_Z95 = 1.959964


@dataclass(frozen=True)
class QualityFloor:
    """What the adapter's calibration promised for its local route.

    Attributes:
        mean: Mean centred cosine of local-route vectors at the recommended threshold.
        poor_below: A local vector is *poor* below this centred cosine (the 10th percentile
            of the calibration sample).
        origin: Where the numbers come from.

    """

    mean: float
    poor_below: float
    origin: str

    @classmethod
    def of(cls, adapter: Adapter) -> QualityFloor:
        """Read the floor from the manifest (written by ``adapt()``), else derive it.

        Registry adapters record a routing curve: the mean centred cosine of the routed
        mixture (routed rows count as 1.0) at each fallback share ``s``. The local route's
        own mean at the recommended share is ``(m - s) / (1 - s)``, and the oracle curve
        (worst rows routed first) gives the quality distribution's 10th percentile.
        """
        calibration = adapter.manifest.calibration
        stored = calibration.get("quality_floor")
        if isinstance(stored, dict) and {"mean", "poor_below"} <= stored.keys():
            return cls(float(stored["mean"]), float(stored["poor_below"]), "manifest")
        recommended = calibration.get("recommended", {})
        curve = calibration.get("curve", {})
        mixture = recommended.get("centred_cosine")
        share = float(recommended.get("fallback_rate", 0.0))
        if mixture is None or share >= 1.0:
            return cls(0.0, 0.0, "unknown (no calibration in the manifest): guard inactive")
        mean = (float(mixture) - share) / (1.0 - share)
        poor_below = _oracle_percentile(curve, 0.10)
        return cls(mean, mean - 0.25 if poor_below is None else poor_below, "calibration curve")


def _oracle_percentile(curve: dict[str, list[float]], share: float) -> float | None:
    """Quality at the ``share`` quantile, from the slope of the oracle routing curve."""
    shares, oracle = curve.get("shares"), curve.get("oracle_centred_cosine")
    if not shares or not oracle or len(shares) != len(oracle):
        return None
    position = min(range(len(shares)), key=lambda i: abs(shares[i] - share))
    if position + 1 >= len(shares):
        return None
    step = shares[position + 1] - shares[position]
    # Routing the next `step` of worst rows lifts the mean by step * (1 - their quality).
    return 1.0 - (oracle[position + 1] - oracle[position]) / step


@dataclass(frozen=True)
class QualityReport:
    """The running estimate of the local route's quality for one adapter.

    Agreement is the centred cosine between the local vector and the provider's vector of
    the same text; the floor is what calibration promised (:class:`QualityFloor`).
    """

    adapter: str
    audited: int
    mean_agreement: float | None
    agreement_low: float | None
    agreement_high: float | None
    poor_share: float | None
    poor_share_low: float | None
    poor_share_high: float | None
    floor: float
    poor_below: float
    floor_origin: str
    guard_tripped: bool
    raised_threshold: float | None
    audit_rate: float
    local_fidelity: float | None = None
    """Share of audited local texts whose native nearest neighbour (among the stored
    provider vectors) is in their local vector's top 10: the fidelity of the local route."""
    local_fidelity_low: float | None = None
    local_fidelity_high: float | None = None
    fidelity_target: float | None = None

    def as_dict(self) -> dict[str, object]:
        """The report as a plain dict (JSON-ready)."""
        return asdict(self)

    def summary(self) -> str:
        """One human line: audits, mean agreement with its interval, poor share, guard."""
        if not self.audited or self.mean_agreement is None:
            return f"{self.adapter}: no audits yet (audit rate {self.audit_rate:.0%})"
        guard = (
            f"guard TRIPPED, threshold raised to {self.raised_threshold:.3f}"
            if self.guard_tripped
            else "guard ok"
        )
        fidelity = ""
        if self.local_fidelity is not None:
            fidelity = (
                f"; local-route fidelity {self.local_fidelity:.3f} "
                f"[{self.local_fidelity_low:.3f}, {self.local_fidelity_high:.3f}] "
                f"(target {self.fidelity_target:.2f} overall)"
            )
        return (
            f"{self.adapter}: {self.audited} audits, agreement {self.mean_agreement:.3f} "
            f"[{self.agreement_low:.3f}, {self.agreement_high:.3f}] vs floor {self.floor:.3f}; "
            f"poor {self.poor_share:.1%} [{self.poor_share_low:.1%}, "
            f"{self.poor_share_high:.1%}] below {self.poor_below:.3f}{fidelity}; {guard}"
        )


class AuditTracker:
    """Audits of one adapter: the running estimate, the audit rate and the guard."""

    def __init__(
        self,
        adapter: Adapter,
        settings: LearningSettings,
        history: Sequence[AuditRecord] = (),
    ) -> None:
        """Start from stored audits of this adapter (oldest first), if any."""
        self.adapter_id = adapter.id
        self.adapter_name = adapter.name
        self.floor = QualityFloor.of(adapter)
        self.settings = settings
        self._window: deque[AuditRecord] = deque(maxlen=settings.audit_window)
        self._chosen = len(history)  # audits taken (some may still be in flight)
        self._raised: float | None = None
        self._lock = threading.Lock()
        self.record(history, warn=False)

    @property
    def raised_threshold(self) -> float | None:
        """The threshold the guard imposed, or None while it has not tripped."""
        return self._raised

    def audit_rate(self) -> float:
        """Share of local texts to audit now: heavier while audits are few; 0 turns them off."""
        if self.settings.audit_rate == 0:
            return 0.0
        if self._chosen < self.settings.warmup_audits:
            return max(self.settings.audit_rate, self.settings.warmup_audit_rate)
        return self.settings.audit_rate

    def choose(self, draws: np.ndarray) -> np.ndarray:
        """Which of the candidates (one uniform draw each) to audit.

        The warm-up rate applies to at most the ``warmup_audits`` first audits of this
        adapter, however large the batch, so the extra cost of a warm-up is bounded.
        """
        with self._lock:
            if self.settings.audit_rate == 0:
                return np.zeros(len(draws), dtype=bool)
            chosen = draws < self.settings.audit_rate
            budget = self.settings.warmup_audits - self._chosen
            if budget > 0:
                warm = np.flatnonzero(draws < max(self.settings.warmup_audit_rate, 0.0))
                chosen[warm[:budget]] = True
            self._chosen += int(chosen.sum())
            return chosen

    def record(self, audits: Sequence[AuditRecord], *, warn: bool = True) -> None:
        """Add audits, then let the guard look at the evidence."""
        if not audits:
            return
        with self._lock:
            self._window.extend(audits)
            raised = self._guard()
            tripped_now = raised is not None and (self._raised is None or raised > self._raised)
            if tripped_now:
                first = self._raised is None
                self._raised = raised
        if tripped_now and warn and first:
            report = self.report()
            logger.warning(
                "audits show the local route of adapter %s below its calibrated quality "
                "(%s); the confidence threshold is raised to %.3f, so more texts go to the "
                "provider. Call adapt() to learn this domain from the stored pairs.",
                self.adapter_name,
                report.summary(),
                raised,
            )

    def report(self) -> QualityReport:
        """The current estimate, with 95% intervals."""
        with self._lock:
            audits = list(self._window)
            raised = self._raised
        agreement = np.array([a.agreement for a in audits], dtype=np.float64)
        n = len(agreement)
        mean = low = high = poor = poor_low = poor_high = None
        if n:
            mean = float(agreement.mean())
            half = _Z95 * float(agreement.std(ddof=1)) / math.sqrt(n) if n > 1 else 1.0
            low, high = mean - half, mean + half
            hits = int((agreement < self.floor.poor_below).sum())
            poor = hits / n
            poor_low, poor_high = wilson_interval(hits, n)
        return QualityReport(
            adapter=self.adapter_name,
            audited=n,
            mean_agreement=mean,
            agreement_low=low,
            agreement_high=high,
            poor_share=poor,
            poor_share_low=poor_low,
            poor_share_high=poor_high,
            floor=self.floor.mean,
            poor_below=self.floor.poor_below,
            floor_origin=self.floor.origin,
            guard_tripped=raised is not None,
            raised_threshold=raised,
            audit_rate=self.audit_rate(),
        )

    def _guard(self) -> float | None:
        """The threshold the evidence calls for, or None when the local route is fine."""
        settings = self.settings
        if (
            not settings.guard
            or self.floor.mean <= 0
            or len(self._window) < settings.guard_min_audits
        ):
            return None
        agreement = np.array([a.agreement for a in self._window], dtype=np.float64)
        confidence = np.array([a.confidence for a in self._window], dtype=np.float64)
        n = len(agreement)
        high = agreement.mean() + _Z95 * agreement.std(ddof=1) / math.sqrt(n)
        wanted = self.floor.mean - settings.guard_tolerance
        if high >= wanted:
            return None
        # Enough audited survivors left to say so; none: everything goes to the provider
        # until adapt().
        return lowest_threshold_meeting(
            confidence, agreement, self.floor.mean, min_kept=max(settings.guard_min_audits // 2, 5)
        )


def lowest_threshold_meeting(
    confidence: np.ndarray, quality: np.ndarray, floor: float, *, min_kept: int
) -> float:
    """The lowest confidence threshold whose kept rows have a mean ``quality`` >= ``floor``.

    Rows are kept when their confidence reaches the threshold (the gate's ``>=``). A
    threshold counts only if it keeps at least ``min_kept`` rows. Returns 0.0 when every
    row can be kept and 1.0 when no threshold qualifies (everything goes to the provider).
    """
    order = np.argsort(-np.asarray(confidence))
    kept = np.arange(1, len(order) + 1)
    running = np.cumsum(np.asarray(quality, dtype=np.float64)[order]) / kept
    meets = np.flatnonzero((running >= floor) & (kept >= min_kept))
    if not len(meets):
        return 1.0
    if meets[-1] + 1 == len(order):
        return 0.0
    return float(np.asarray(confidence)[order][meets[-1]])
