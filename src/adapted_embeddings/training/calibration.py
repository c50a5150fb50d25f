"""Calibration: the routing curve and the confidence threshold that goes into the manifest.

On a held-out parallel sample, route the least confident share ``s`` of the rows to the
provider (they get the true target vector) and translate the rest. The routing curve is the
quality of that mix for every ``s``, relative to the native target (= 1.0):

* ``centred_cosine``: mean centred cosine between each final vector and its true vector.
* ``neighbour_agreement_at_10``: share of rows whose native top-1 neighbour in the sample
  (self excluded) is within the mix's top 10 — retrieval structure, not just closeness.

A threshold is then chosen for a maximum fallback rate ("send at most 10% to the
provider") or a quality floor ("never below 99% of native neighbour agreement").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapted_embeddings.errors import TrainingDataError
from adapted_embeddings.training import metrics

SHARES = tuple(round(i / 100, 2) for i in range(101))
"""Fallback shares the curve is computed at (0%, 1%, ..., 100%)."""

CURVE_METRICS = ("centred_cosine", "neighbour_agreement_at_10")


@dataclass(frozen=True)
class RoutingCurve:
    """Quality of the translated/provider mix at each fallback share."""

    shares: list[float]
    thresholds: list[float]
    centred_cosine: list[float]
    neighbour_agreement_at_10: list[float]
    oracle_centred_cosine: list[float]
    sample_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in the manifest's ``calibration`` section."""
        return {
            "sample_size": self.sample_size,
            "shares": self.shares,
            "thresholds": self.thresholds,
            "centred_cosine": self.centred_cosine,
            "neighbour_agreement_at_10": self.neighbour_agreement_at_10,
            "oracle_centred_cosine": self.oracle_centred_cosine,
            **self.extra,
        }


def routing_curve(
    translated: np.ndarray,
    confidence: np.ndarray,
    true_targets: np.ndarray,
    *,
    target_mean: np.ndarray | None = None,
) -> RoutingCurve:
    """Compute the routing curve of one adapter on a held-out parallel sample.

    Args:
        translated: ``(n, d)`` adapter outputs.
        confidence: ``(n,)`` adapter confidences.
        true_targets: ``(n, d)`` the provider's vectors of the same texts.
        target_mean: Mean used for centring (defaults to the sample's own mean).

    Raises:
        TrainingDataError: If the sample is too small (< 20 rows) or shapes disagree.

    """
    n = len(translated)
    if n < 20 or true_targets.shape != translated.shape or confidence.shape != (n,):
        raise TrainingDataError(
            f"calibration needs >= 20 aligned rows; got translated {translated.shape}, "
            f"targets {true_targets.shape}, confidence {confidence.shape}"
        )
    mean = true_targets.mean(axis=0) if target_mean is None else target_mean
    quality = metrics.centred_cosine_rows(translated, true_targets, mean)
    index = np.arange(n)
    native_top1 = metrics.top_k_excluding_self(true_targets, true_targets, index, 1)[:, 0]
    # Each row's top-10 depends only on its own query vector, so agreement is per row:
    # a routed row gets the native vector, which always agrees (= 1).
    neighbours = metrics.top_k_excluding_self(translated, true_targets, index, 10)
    agrees = (neighbours == native_top1[:, None]).any(axis=1).astype(np.float64)
    order = np.argsort(confidence, kind="stable")  # least confident first
    oracle_order = np.argsort(quality, kind="stable")
    centred, agreement, oracle, thresholds = [], [], [], []
    for share in SHARES:
        routed = order[: round(share * n)]
        centred.append(float(np.where(np.isin(index, routed), 1.0, quality).mean()))
        agreement.append(float(np.where(np.isin(index, routed), 1.0, agrees).mean()))
        oracle_routed = oracle_order[: round(share * n)]
        oracle.append(float(np.where(np.isin(index, oracle_routed), 1.0, quality).mean()))
        thresholds.append(threshold_for_share(confidence, share))
    return RoutingCurve(
        shares=list(SHARES),
        thresholds=thresholds,
        centred_cosine=centred,
        neighbour_agreement_at_10=agreement,
        oracle_centred_cosine=oracle,
        sample_size=n,
    )


def threshold_for_share(confidence: np.ndarray, share: float) -> float:
    """Smallest threshold that routes at most ``share`` of ``confidence`` (rows < threshold)."""
    if share <= 0:
        return 0.0
    ordered = np.sort(np.asarray(confidence, dtype=np.float64))
    count = round(share * len(ordered))
    if count >= len(ordered):
        return 1.0
    # Route rows strictly below the (count)-th smallest value: ties never push us over.
    return float(ordered[count])


def recommend_threshold(
    curve: RoutingCurve,
    *,
    max_fallback_rate: float | None = 0.10,
    quality_floor: float | None = None,
    metric: str = "neighbour_agreement_at_10",
) -> dict[str, Any]:
    """Pick the threshold for a fallback budget or a quality floor.

    Args:
        curve: The routing curve.
        max_fallback_rate: Route at most this share of in-distribution inputs.
        quality_floor: Instead, the smallest share whose ``metric`` (relative to native
            = 1.0) reaches this floor; if even 100% is needed, that is what is returned.
        metric: Which curve to hold to the floor (one of :data:`CURVE_METRICS`).

    Returns:
        ``{"threshold", "fallback_rate", "criterion", metric values at that share}``.

    """
    if metric not in CURVE_METRICS:
        raise ValueError(f"metric must be one of {CURVE_METRICS}, got {metric!r}")
    values = getattr(curve, metric)
    if quality_floor is not None:
        position = next(
            (i for i, v in enumerate(values) if v >= quality_floor), len(curve.shares) - 1
        )
        criterion = f"{metric} >= {quality_floor}"
    elif max_fallback_rate is not None:
        if not 0.0 <= max_fallback_rate <= 1.0:
            raise ValueError(f"max_fallback_rate must be in [0, 1], got {max_fallback_rate}")
        position = max(i for i, s in enumerate(curve.shares) if s <= max_fallback_rate + 1e-9)
        criterion = f"fallback <= {max_fallback_rate}"
    else:
        raise ValueError("give max_fallback_rate or quality_floor")
    return {
        "threshold": curve.thresholds[position],
        "fallback_rate": curve.shares[position],
        "criterion": criterion,
        "centred_cosine": curve.centred_cosine[position],
        "neighbour_agreement_at_10": curve.neighbour_agreement_at_10[position],
    }


def plot_routing_curve(
    curve: RoutingCurve, path: str | Path, *, title: str, recommended: dict[str, Any] | None
) -> Path:
    """Save the routing curve as a PNG (headless matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = np.array(curve.shares) * 100
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=110)
    axis.plot(shares, curve.neighbour_agreement_at_10, label="neighbour agreement R@10")
    axis.plot(shares, curve.centred_cosine, label="centred cosine (routed by confidence)")
    axis.plot(shares, curve.oracle_centred_cosine, "--", label="centred cosine (oracle routing)")
    axis.axhline(1.0, color="grey", linewidth=0.8, label="native target = 1.0")
    if recommended is not None:
        axis.axvline(
            recommended["fallback_rate"] * 100,
            color="black",
            linestyle=":",
            label=f"recommended threshold {recommended['threshold']:.3f}",
        )
    axis.set_xlabel("share of inputs sent to the provider (%)")
    axis.set_ylabel("quality relative to native target")
    axis.set_title(title)
    axis.set_xlim(0, 100)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
