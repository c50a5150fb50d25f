"""Fitting an adapter's memory of the user's pairs (NumPy only).

What the memory does at run time is in :mod:`adapted_embeddings.adapter.memory`. Here,
:func:`fit_memory` chooses how far the neighbour correction steps and fits the memory head,
both on cross-fitted translations: each pair's residual is what a decoder fitted without it
missed, each pair is corrected by its neighbours other than itself, and the head learns
whether the corrected vector kept the pair's native nearest neighbour in the top 10 (the
fidelity measure's hit). The step is chosen on those hits, not on cosine: a correction that
raises the mean cosine can still move vectors past their neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adapted_embeddings.adapter.memory import (
    CANDIDATES,
    correct,
    head_features,
    landing,
    nearest,
    softmax_weights,
)
from adapted_embeddings.adapter.network import l2_normalize
from adapted_embeddings.learning.fidelity import neighbour_hits
from adapted_embeddings.learning.heads import fit_quality_head

MEMORY_ROWS = 2048
"""The most pairs an adapter remembers (the newest): 2048 x (384 + 2 x 1536) float32 is
28 MB for ada-002, and every translation is compared with each remembered source."""

NEIGHBOURS = 10
TEMPERATURE = 0.1
STEPS = (0.0, 0.5, 1.0)
"""Correction steps tried (share of the neighbours' weighted residual)."""

_HEAD_TENSORS = {
    "weight": "weight",
    "bias": "bias",
    "mean": "feature_mean",
    "scale": "feature_scale",
}
"""The memory head's tensors, by the names :func:`fit_quality_head` gives them."""
_JUDGED_ROWS = 768
_HEAD_ROWS = 2048
_HEAD_L2 = 0.5


@dataclass(frozen=True)
class FittedMemory:
    """A memory ready to store: its settings, tensors and what the fit measured."""

    step: float
    tensors: dict[str, np.ndarray]
    hit_rate: dict[float, float]
    """Cross-fitted hit rate of each step tried (the fidelity at 0% routed, on the pairs)."""

    @property
    def rows(self) -> int:
        """How many pairs are remembered."""
        return int(self.tensors["memory.source"].shape[0])


def fit_memory(
    source: np.ndarray,
    predicted: np.ndarray,
    target: np.ndarray,
    confidence: np.ndarray,
    *,
    row_weights: np.ndarray | None = None,
    judged_in: np.ndarray | None = None,
    seed: int = 0,
) -> FittedMemory:
    """Choose the correction step and fit the memory head on cross-fitted translations.

    Args:
        source: ``(n, d_source)`` the pairs' source vectors, oldest first.
        predicted: ``(n, d_target)`` each pair's translation by a decoder fitted without it.
        target: ``(n, d_target)`` the pairs' native vectors.
        confidence: ``(n,)`` the adapter's own confidence of each pair.
        row_weights: How many texts of the traffic each pair stands for (default 1).
        judged_in: How many texts of the user's index each pair stands for (default 1).
        seed: Fixes the subsample the step is chosen on.

    """
    source_unit, predicted_unit = l2_normalize(source), l2_normalize(predicted)
    target_unit = l2_normalize(target)
    weights = np.ones(len(source)) if row_weights is None else np.asarray(row_weights, float)
    kept = np.arange(max(len(source) - MEMORY_ROWS, 0), len(source))
    residual = target_unit[kept] - predicted_unit[kept]
    similarities = source_unit @ source_unit[kept].T
    _exclude_self(similarities, kept)
    rows, top = nearest(similarities, max(NEIGHBOURS, CANDIDATES))
    del similarities
    near, neighbour = rows[:, :NEIGHBOURS], softmax_weights(top[:, :NEIGHBOURS], TEMPERATURE)

    order = np.random.default_rng(seed).permutation(len(source))
    judged = order[:_JUDGED_ROWS]
    hit_rate = {}
    for step in STEPS:
        moved = correct(predicted_unit[judged], near[judged], neighbour[judged], residual, step)
        hits = neighbour_hits(moved, target_unit[judged], target_unit, judged, judged_in)
        hit_rate[step] = float(np.average(hits, weights=weights[judged]))
    # The smallest step within a hair of the best: a larger one has more to lose off-domain.
    best = max(hit_rate.values())
    step = min(s for s, rate in hit_rate.items() if rate >= best - 0.002)

    # The head has six inputs: a few thousand rows fit it; judging every pair of a large
    # store in the whole index would cost more than the rest of adapt().
    fitted_on = np.sort(order[:_HEAD_ROWS])
    corrected = correct(
        predicted_unit[fitted_on], near[fitted_on], neighbour[fitted_on], residual, step
    )
    hits = neighbour_hits(corrected, target_unit[fitted_on], target_unit, fitted_on, judged_in)
    landed = landing(corrected, rows[fitted_on], target_unit[kept])
    features = head_features(np.asarray(confidence)[fitted_on], top[fitted_on, :NEIGHBOURS], landed)
    fitted = fit_quality_head(
        features, hits, l2=_HEAD_L2 / len(features), sample_weights=weights[fitted_on]
    )
    head = {
        f"memory.head.{name}": fitted[f"quality.{fitted_as}"]
        for name, fitted_as in _HEAD_TENSORS.items()
    }
    tensors = {
        "memory.source": source_unit[kept],
        "memory.residual": residual.astype(np.float32),
        "memory.target": target_unit[kept],
        **head,
    }
    return FittedMemory(step=step, tensors=tensors, hit_rate=hit_rate)


def _exclude_self(similarities: np.ndarray, kept: np.ndarray) -> None:
    """A pair is never its own neighbour: row ``kept[j]`` skips column ``j``."""
    similarities[kept, np.arange(len(kept))] = -np.inf
