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
remembered native vectors (top-1 similarity, top-1 minus top-2, top-1 minus top-10). A
text in a dense neighbourhood of the user's index loses its nearest neighbour to a small
error, one in a sparse one keeps it: the same error costs retrieval quality in one place
and not in another, which is what the fidelity measure counts. The landing is read among
the native vectors of the text's ``CANDIDATES`` nearest remembered sources, not the whole
memory: a text lands near the pairs it resembles, and a product with every remembered
vector in the target width cost 5x the network's own forward pass (measured). NumPy only.
"""

from __future__ import annotations

import numpy as np

from adapted_embeddings.adapter.manifest import ArchitectureConfig
from adapted_embeddings.adapter.network import sigmoid

CANDIDATES = 16
"""Nearest remembered sources whose native vectors the landing features read."""

_DEPTH = 10
_CONFIDENCE_FLOOR = 1e-6
_CHUNK_ROWS = 128  # bounds the (rows, candidates, d_target) gathers to ~12 MB at 1536


def nearest(similarities: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` most similar rows of each line, best first, and their similarities.

    ``-inf`` marks a row to skip (a pair is never its own neighbour in training).
    """
    count = min(count, similarities.shape[1])
    rows = np.argpartition(-similarities, count - 1, axis=1)[:, :count]
    top = np.take_along_axis(similarities, rows, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(top, order, axis=1)


def softmax_weights(top: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax over each line's similarities (best first), at ``temperature``."""
    weights = np.exp((top - top[:, :1]) / temperature)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights


def correct(
    vectors: np.ndarray,
    rows: np.ndarray,
    weights: np.ndarray,
    residual: np.ndarray,
    step: float,
) -> np.ndarray:
    """Unit vectors moved by ``step`` times the neighbours' weighted residual."""
    moved = np.array(vectors, dtype=np.float32)
    for start in range(0, len(moved), _CHUNK_ROWS):
        block = slice(start, start + _CHUNK_ROWS)
        moved[block] += step * np.einsum("nk,nkd->nd", weights[block], residual[rows[block]])
    moved /= np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-12)
    return moved


def landing(vectors: np.ndarray, rows: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``(n, c)`` similarities of each vector to the remembered native vectors ``rows``."""
    landed = np.empty(rows.shape, np.float32)
    for start in range(0, len(rows), _CHUNK_ROWS):
        block = slice(start, start + _CHUNK_ROWS)
        landed[block] = np.einsum("nd,ncd->nc", vectors[block], target[rows[block]])
    return landed


def head_features(confidence: np.ndarray, source_top: np.ndarray, landed: np.ndarray) -> np.ndarray:
    """The memory head's ``(n, 6)`` inputs (see the module docstring).

    Args:
        confidence: ``(n,)`` the adapter's own confidence.
        source_top: ``(n, k)`` similarities of the nearest remembered sources, best first.
        landed: ``(n, c)`` similarities of the corrected vectors to the candidates' native
            vectors (:func:`landing`).

    """
    depth = min(_DEPTH, landed.shape[1])
    top = -np.sort(-landed, axis=1)[:, :depth]
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
    return sigmoid(scaled @ weights["memory.head.weight"] + weights["memory.head.bias"][0])


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
    k = arch.memory_neighbours
    rows, top = nearest(unit @ weights["memory.source"].T, max(k, CANDIDATES))
    if arch.memory_step:
        neighbour = softmax_weights(top[:, :k], arch.memory_temperature)
        residual = weights["memory.residual"]
        vectors = correct(vectors, rows[:, :k], neighbour, residual, arch.memory_step)
    features = head_features(
        confidence, top[:, :k], landing(vectors, rows, weights["memory.target"])
    )
    return vectors, head_confidence(features, weights)
