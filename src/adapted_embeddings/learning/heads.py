"""Fitting the confidence: OOD statistics, the out-of-distribution gate and the quality head.

NumPy only: training (:mod:`adapted_embeddings.training`) and ``adapt()`` both use it, and
``adapt()`` must run where torch is not installed.

The runtime confidence is ``quality_head(features) * gate(ood) [* coverage]``
(:func:`adapted_embeddings.adapter.network.forward`):

* **OOD statistics** (no labels needed): a whitened principal-subspace Mahalanobis distance of
  the centred source vector and the energy outside that subspace, fitted on the training
  sources. Nearest-neighbour similarity fails here (topical overlap fools it); a whitened
  distance over the full spectrum sees that a text *type* never seen in training sits in
  low-variance directions.
* **Gate**: a logistic on the two OOD statistics, standardised on the training rows, that is
  ~1 over the bulk of the training distribution and 0.5 at its ``gate_percentile`` — fitted
  at training-distribution percentiles, so it needs no out-of-domain examples.
* **Quality head**: logistic regression from the hidden units, the OOD statistics and two
  output norms to a soft target, the *cross-fitted* (held-out) centred cosine of each
  training row mapped onto [0, 1]. Held-out error is what the head must predict: the
  final model's error on rows it was trained on is optimistic.
"""

from __future__ import annotations

import numpy as np

from adapted_embeddings.adapter.network import OOD_STATISTICS

QUALITY_LOW_PERCENTILE = 5.0
QUALITY_HIGH_PERCENTILE = 95.0


def fit_ood_subspace(
    centred_sources: np.ndarray, rank: int, shrinkage: float = 1e-3
) -> dict[str, np.ndarray]:
    """Principal subspace of the centred training sources, as runtime tensors.

    Args:
        centred_sources: ``(n, d)`` normalised training sources minus their mean.
        rank: Number of principal directions kept (``d`` keeps the full spectrum).
        shrinkage: Added to every eigenvalue, as a fraction of the largest, so directions
            with almost no training variance do not blow up the distance.

    Returns:
        ``ood.projection`` ``(d, rank)`` whitening projection and ``ood.variance`` ``(rank,)``
        (the shrunk eigenvalues, so the runtime can recover the energy inside the subspace).

    """
    x = np.asarray(centred_sources, dtype=np.float64)
    covariance = x.T @ x / max(len(x) - 1, 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][:rank]
    variance = np.maximum(eigenvalues[order], 0.0) + shrinkage * eigenvalues.max()
    projection = eigenvectors[:, order] / np.sqrt(variance)
    return {
        "ood.projection": projection.astype(np.float32),
        "ood.variance": variance.astype(np.float32),
    }


def fit_gate(
    ood_statistics: np.ndarray, *, percentile: float = 99.0, centre_gate: float = 0.98
) -> dict[str, np.ndarray]:
    """Gate tensors: 0.5 at the training ``percentile`` of the combined OOD score.

    The two statistics are standardised by their training median and spread and summed
    (a statistic with no spread, e.g. the outside energy when the subspace is the whole
    space, gets weight 0). The slope puts the gate at ``centre_gate`` on the median row.
    """
    stats = np.asarray(ood_statistics, dtype=np.float64)
    median = np.median(stats, axis=0)
    spread = np.percentile(stats, 90, axis=0) - np.percentile(stats, 10, axis=0)
    weights = np.where(spread > 1e-6, 1.0 / np.maximum(spread, 1e-12), 0.0)
    score = (stats - median) @ weights
    threshold = np.percentile(score, percentile)
    bulk = np.median(score)
    slope = np.log(centre_gate / (1 - centre_gate)) / max(threshold - bulk, 1e-6)
    # gate = sigmoid(slope * (threshold - score)) written as stats @ w + b
    gate_weight = -slope * weights
    gate_bias = slope * (threshold + median @ weights)
    if gate_weight.shape != (OOD_STATISTICS,):
        raise ValueError(f"expected {OOD_STATISTICS} OOD statistics, got {stats.shape[1]}")
    return {
        "gate.weight": gate_weight.astype(np.float32),
        "gate.bias": np.array([gate_bias], dtype=np.float32),
    }


def quality_targets(quality: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Map held-out quality (e.g. centred cosine) onto [0, 1] soft targets.

    The 5th percentile maps to 0 and the 95th to 1, linearly, clipped: confidence then reads
    as "how good this translation is compared with this adapter's typical range".
    """
    low = float(np.percentile(quality, QUALITY_LOW_PERCENTILE))
    high = float(np.percentile(quality, QUALITY_HIGH_PERCENTILE))
    targets = np.clip((quality - low) / max(high - low, 1e-6), 0.0, 1.0)
    return targets.astype(np.float32), {"quality_at_0": low, "quality_at_1": high}


def fit_quality_head(
    features: np.ndarray,
    targets: np.ndarray,
    *,
    l2: float = 1e-3,
    sample_weights: np.ndarray | None = None,
    steps: int = 100,
) -> dict[str, np.ndarray]:
    """Logistic regression on soft targets (binary cross-entropy), as runtime tensors.

    Minimises the (weighted) mean cross-entropy plus ``l2 * |coefficients|^2`` by Newton's
    method with step halving: the problem is convex, so this is the unique optimum (what
    L-BFGS reached too), in NumPy, so ``adapt()`` runs without torch.

    Args:
        features: ``(n, f)`` quality features of the training rows.
        targets: ``(n,)`` soft targets in [0, 1] (:func:`quality_targets`) or 0/1 hits.
        l2: Weight decay on the coefficients (features are standardised first).
        sample_weights: How much each row counts (default 1); the standardisation uses
            the same weights.
        steps: Most Newton iterations.

    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    w = np.ones(len(x)) if sample_weights is None else np.asarray(sample_weights, np.float64)
    w = w / w.sum()
    mean = w @ x
    scale = np.sqrt(w @ (x - mean) ** 2)
    scale = np.where(scale > 1e-6, scale, 1.0)
    design = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    penalty = np.full(design.shape[1], 2 * l2)
    penalty[-1] = 0.0

    def loss(coefficients: np.ndarray) -> float:
        logits = design @ coefficients
        # log(1 + e^z) - y z, computed stably
        per_row = np.logaddexp(0.0, logits) - y * logits
        return float(w @ per_row + l2 * coefficients[:-1] @ coefficients[:-1])

    coefficients = np.zeros(design.shape[1])
    current = loss(coefficients)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ coefficients, -30, 30)))
        gradient = design.T @ (w * (p - y)) + penalty * coefficients
        hessian = (design * (w * p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        hessian[np.diag_indices_from(hessian)] += 1e-10
        update = np.linalg.solve(hessian, gradient)
        step = 1.0
        while step > 1e-4 and loss(coefficients - step * update) > current:
            step /= 2
        coefficients -= step * update
        previous, current = current, loss(coefficients)
        if previous - current < 1e-12:
            break
    return {
        "quality.weight": coefficients[:-1].astype(np.float32),
        "quality.bias": coefficients[-1:].astype(np.float32),
        "quality.feature_mean": mean.astype(np.float32),
        "quality.feature_scale": scale.astype(np.float32),
    }
