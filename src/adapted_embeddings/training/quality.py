"""Fitting the confidence: OOD statistics, the out-of-distribution gate and the quality head.

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
import torch

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
    steps: int = 300,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Logistic regression on soft targets (binary cross-entropy), as runtime tensors.

    Args:
        features: ``(n, f)`` quality features of the training rows.
        targets: ``(n,)`` soft targets in [0, 1] (:func:`quality_targets`).
        l2: Weight decay on the coefficients (features are standardised first).
        steps: Full-batch L-BFGS iterations.
        seed: Torch seed (the problem is convex; this only fixes float reductions).

    """
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    torch.manual_seed(seed)
    inputs = torch.as_tensor((x - mean) / scale, dtype=torch.float64)
    labels = torch.as_tensor(targets, dtype=torch.float64)
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = inputs @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        loss = loss + l2 * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return {
        "quality.weight": weight.detach().numpy().astype(np.float32),
        "quality.bias": bias.detach().numpy().astype(np.float32),
        "quality.feature_mean": mean.astype(np.float32),
        "quality.feature_scale": scale.astype(np.float32),
    }
