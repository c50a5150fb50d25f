"""An adapter's memory of the user's own pairs: a neighbour correction and a sharper confidence.

Only adapters fitted by ``adapt()`` carry one (``architecture.memory_rows > 0``). It holds
up to a few thousand of the pairs the adapter learned from, as three row-aligned tensors:

* ``memory.source``: the pairs' unit source vectors;
* ``memory.residual``: what each pair's *cross-fitted* translation missed, ``native -
  translation`` on unit vectors (the translation by a decoder fitted without that pair);
* ``memory.target``: the pairs' unit native vectors (the user's own index, in small).

A translation is corrected by its nearest remembered pairs in the source space::

    s = l2_normalize(source) @ memory.source.T                 # top `memory_neighbours`
    w = softmax((s - max(s)) / memory_temperature)
    vector = l2_normalize(vector + memory_step * w @ memory.residual[top])

A model's systematic error on a new domain is local (texts alike are mistranslated alike),
so a neighbour's residual predicts much of the text's own; on texts unlike any remembered
pair the weights stay on distant rows and the step is what the fit judged safe.

The confidence is then refined by a logistic *memory head* over six features: the logit of
the adapter's own confidence, the closeness of the nearest remembered sources (top-1 and
mean of the neighbours: novelty), and where the corrected vector lands among the
remembered native vectors (top-1 similarity, top-1 minus top-2, top-1 minus top-10). A text
in a dense neighbourhood of the user's index loses its nearest neighbour to a small error,
one in a sparse one keeps it: the same error costs retrieval quality in one place and not
in another, which is what the fidelity measure counts. NumPy only.
"""

from __future__ import annotations

import numpy as np

from adapted_embeddings.adapter.manifest import ArchitectureConfig

MEMORY_FEATURES = 6
"""Inputs of the memory head (see the module docstring)."""

_DEPTH = 10
_CONFIDENCE_FLOOR = 1e-6


def memory_shapes(arch: ArchitectureConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the memory tensors an adapter with ``arch`` must hold."""
    rows = arch.memory_rows
    if not rows:
        return {}
    return {
        "memory.source": (rows, arch.input_dim),
        "memory.residual": (rows, arch.output_dim),
        "memory.target": (rows, arch.output_dim),
        "memory.head.mean": (MEMORY_FEATURES,),
        "memory.head.scale": (MEMORY_FEATURES,),
        "memory.head.weight": (MEMORY_FEATURES,),
        "memory.head.bias": (1,),
    }


def neighbour_weights(
    similarities: np.ndarray, neighbours: int, temperature: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``neighbours`` most similar rows of each line, best first, and their softmax weights.

    Args:
        similarities: ``(n, m)`` cosine similarities (``-inf`` marks a row to skip).
        neighbours: How many rows to keep (at most ``m``).
        temperature: Softmax temperature.

    Returns:
        ``(rows, weights, top)``: ``(n, k)`` indices, ``(n, k)`` weights summing to 1 and the
        ``(n, k)`` similarities themselves.

    """
    k = min(neighbours, similarities.shape[1])
    rows = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(similarities, rows, axis=1)
    order = np.argsort(-top, axis=1)
    rows, top = np.take_along_axis(rows, order, axis=1), np.take_along_axis(top, order, axis=1)
    weights = np.exp((top - top[:, :1]) / temperature)
    weights /= weights.sum(axis=1, keepdims=True)
    return rows, weights, top


def correct(
    vectors: np.ndarray,
    rows: np.ndarray,
    weights: np.ndarray,
    residual: np.ndarray,
    step: float,
) -> np.ndarray:
    """Unit vectors moved by ``step`` times the neighbours' weighted residual."""
    moved = vectors + step * np.einsum("nk,nkd->nd", weights, residual[rows])
    moved /= np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-12)
    return moved.astype(np.float32)


def head_features(
    confidence: np.ndarray, source_top: np.ndarray, target_similarities: np.ndarray
) -> np.ndarray:
    """The memory head's ``(n, 6)`` inputs (see the module docstring).

    Args:
        confidence: ``(n,)`` the adapter's own confidence.
        source_top: ``(n, k)`` similarities of the nearest remembered sources, best first.
        target_similarities: ``(n, m)`` similarities of the corrected vectors to the
            remembered native vectors (``-inf`` marks a row to skip).

    """
    depth = min(_DEPTH, target_similarities.shape[1])
    top = -np.partition(-target_similarities, depth - 1, axis=1)[:, :depth]
    top = -np.sort(-top, axis=1)
    second = top[:, 1] if depth > 1 else top[:, 0]
    clipped = np.clip(confidence.astype(np.float64), _CONFIDENCE_FLOOR, 1 - _CONFIDENCE_FLOOR)
    return np.column_stack(
        [
            np.log(clipped / (1 - clipped)),
            source_top[:, 0],
            source_top.mean(axis=1),
            top[:, 0],
            top[:, 0] - second,
            top[:, 0] - top[:, -1],
        ]
    )


def head_confidence(features: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The memory head's confidence in [0, 1] for ``(n, 6)`` features."""
    scaled = (features - weights["memory.head.mean"]) / weights["memory.head.scale"]
    logits = np.clip(
        scaled @ weights["memory.head.weight"] + weights["memory.head.bias"][0], -30, 30
    )
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def apply_memory(
    source: np.ndarray,
    vectors: np.ndarray,
    confidence: np.ndarray,
    weights: dict[str, np.ndarray],
    arch: ArchitectureConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Correct ``(n, d)`` unit translations by the remembered pairs and refine their confidence.

    Args:
        source: ``(n, d_source)`` the source vectors translated.
        vectors: ``(n, d_target)`` their unit translations.
        confidence: ``(n,)`` the adapter's own confidence of each.
        weights: The adapter's tensors (with the ``memory.*`` ones).
        arch: Its architecture (``memory_*`` settings).

    Returns:
        ``(vectors, confidence)`` after the correction and the memory head.

    """
    unit = source / np.maximum(np.linalg.norm(source, axis=1, keepdims=True), 1e-12)
    similarities = unit @ weights["memory.source"].T
    rows, neighbour, top = neighbour_weights(
        similarities, arch.memory_neighbours, arch.memory_temperature
    )
    if arch.memory_step:
        vectors = correct(vectors, rows, neighbour, weights["memory.residual"], arch.memory_step)
    features = head_features(confidence, top, vectors @ weights["memory.target"].T)
    return vectors, head_confidence(features, weights)
