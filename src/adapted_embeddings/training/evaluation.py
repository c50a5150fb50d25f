"""``evaluate``: translated queries against an index of native target vectors, side by side.

The setting is the product's: an index built with the provider's real vectors, queried with
vectors that are either native, translated by an adapter, or translated with the least
confident share routed to the provider. Every metric is also computed for an *oracle*
router that sends the truly worst translations, as a reference for the confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from adapted_embeddings.training import metrics

FALLBACK_RATES = (0.0, 0.05, 0.10, 0.20)


@dataclass(frozen=True)
class EvaluationSet:
    """Held-out queries with their native vectors, inside a corpus of native vectors.

    Attributes:
        native_queries: ``(q, d)`` the provider's vectors of the query texts.
        corpus: ``(n, d)`` the provider's vectors of the whole index (queries included).
        query_index: ``(q,)`` row of each query inside ``corpus`` (excluded as "self").
        labels: Optional ``(n,)`` labels for category precision@10.
        target_mean: Mean used for centred cosine (the training targets' mean).

    """

    native_queries: np.ndarray
    corpus: np.ndarray
    query_index: np.ndarray
    labels: np.ndarray | None
    target_mean: np.ndarray

    @cached_property
    def native_top1(self) -> np.ndarray:
        """Each query's native top-1 neighbour (self excluded), computed once."""
        return metrics.top_k_excluding_self(self.native_queries, self.corpus, self.query_index, 1)[
            :, 0
        ]


def query_metrics(queries: np.ndarray, data: EvaluationSet) -> dict[str, float]:
    """Every retrieval/fidelity metric of one set of query vectors (in the target space)."""
    return {
        "mean_cosine": float(metrics.cosine_rows(queries, data.native_queries).mean()),
        "mean_centred_cosine": float(
            metrics.centred_cosine_rows(queries, data.native_queries, data.target_mean).mean()
        ),
        **_retrieval_metrics(queries, data.corpus, data),
    }


def source_only_metrics(
    source_queries: np.ndarray, source_corpus: np.ndarray, data: EvaluationSet
) -> dict[str, float]:
    """Metrics when query *and* corpus stay in the source space (no adapter, no provider)."""
    return _retrieval_metrics(source_queries, source_corpus, data)


def _retrieval_metrics(
    queries: np.ndarray, corpus: np.ndarray, data: EvaluationSet
) -> dict[str, float]:
    """Self-recall, native-neighbour recall and (with labels) category precision@10.

    Args:
        queries: ``(q, d)`` query vectors, in the same space as ``corpus``.
        corpus: ``(n, d)`` the index they search, row ``data.query_index[i]`` being query i.
        data: The evaluation set: query rows, native top-1 neighbours and labels.

    """
    neighbours = metrics.top_k_excluding_self(queries, corpus, data.query_index, 10)
    ranks = metrics.self_rank(queries, corpus, data.query_index)
    result = {f"self_r@{k}": float((ranks < k).mean()) for k in (1, 5, 10)}
    for k, value in metrics.neighbour_agreement(neighbours, data.native_top1).items():
        result[f"neighbour_r@{k}"] = value
    if data.labels is not None:
        result["category_p@10"] = metrics.category_precision(
            neighbours, data.labels, data.query_index
        )
    return result


def routed(
    translated: np.ndarray, order: np.ndarray, share: float, native: np.ndarray
) -> np.ndarray:
    """Translated vectors with the first ``share`` of ``order`` replaced by native ones."""
    mixed = translated.copy()
    routed_rows = order[: round(share * len(order))]
    mixed[routed_rows] = native[routed_rows]
    return mixed


def evaluate_adapter(
    translated: np.ndarray,
    confidence: np.ndarray,
    data: EvaluationSet,
    *,
    fallback_rates: Sequence[float] = FALLBACK_RATES,
    oracle: bool = True,
) -> dict[str, Any]:
    """Metrics at each fallback rate (by confidence and, unless not wanted, by an oracle)."""
    quality = metrics.centred_cosine_rows(translated, data.native_queries, data.target_mean)
    by_confidence = np.argsort(confidence, kind="stable")
    by_truth = np.argsort(quality, kind="stable")
    result: dict[str, Any] = {"routed": {}, "oracle": {}}
    for share in fallback_rates:
        key = f"{round(share * 100)}%"
        result["routed"][key] = query_metrics(
            routed(translated, by_confidence, share, data.native_queries), data
        )
        if share and oracle:
            result["oracle"][key] = query_metrics(
                routed(translated, by_truth, share, data.native_queries), data
            )
    result["confidence"] = confidence_quality(confidence, translated, data)
    return result


def confidence_quality(
    confidence: np.ndarray, translated: np.ndarray, data: EvaluationSet
) -> dict[str, float]:
    """How well confidence separates good from poor translations (poor = bottom decile)."""
    raw = metrics.cosine_rows(translated, data.native_queries)
    centred = metrics.centred_cosine_rows(translated, data.native_queries, data.target_mean)
    return {
        "auroc_poor_raw_cosine": auroc(raw < np.percentile(raw, 10), -confidence),
        "auroc_poor_centred_cosine": auroc(centred < np.percentile(centred, 10), -confidence),
        "spearman_raw_cosine": spearman(confidence, raw),
        "spearman_centred_cosine": spearman(confidence, centred),
        "mean_confidence": float(confidence.mean()),
    }


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``positive`` labels (ties averaged)."""
    positive = np.asarray(positive, dtype=bool)
    ranks = _average_ranks(np.asarray(score, dtype=np.float64))
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation."""
    return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return np.asarray(sums[inverse] / counts[inverse])
