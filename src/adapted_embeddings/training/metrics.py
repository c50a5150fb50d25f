"""Retrieval and agreement metrics for translated vectors (NumPy only).

Every metric compares a *query* matrix against a *corpus* matrix in which row ``i`` of the
queries is the same item as ``query_index[i]`` of the corpus, so "self" can be excluded or
looked for. The realistic setting is an index built with the provider's real vectors and
queried with translated vectors; source-only baselines pass a source-space corpus instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Agreement of translated rows with native ones lives with the forward pass, which audits use
# at inference; re-exported here beside the retrieval metrics.
from adapted_embeddings.adapter.network import centred_cosine_rows as centred_cosine_rows
from adapted_embeddings.adapter.network import cosine_rows as cosine_rows
from adapted_embeddings.adapter.network import l2_normalize

_BLOCK = 1024  # query rows per similarity block: bounds memory at 1024 x corpus floats


def top_k_excluding_self(
    queries: np.ndarray, corpus: np.ndarray, query_index: np.ndarray, k: int
) -> np.ndarray:
    """Indices of each query's ``k`` most similar corpus rows, its own row excluded."""
    queries, corpus = l2_normalize(queries), l2_normalize(corpus)
    result = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), _BLOCK):
        sims = queries[start : start + _BLOCK] @ corpus.T
        rows = np.arange(len(sims))
        sims[rows, query_index[start : start + _BLOCK]] = -np.inf
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        result[start : start + _BLOCK] = np.take_along_axis(part, order, axis=1)
    return result


def self_rank(queries: np.ndarray, corpus: np.ndarray, query_index: np.ndarray) -> np.ndarray:
    """0-based rank of each query's own corpus row among all corpus rows."""
    queries, corpus = l2_normalize(queries), l2_normalize(corpus)
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), _BLOCK):
        sims = queries[start : start + _BLOCK] @ corpus.T
        own = sims[np.arange(len(sims)), query_index[start : start + _BLOCK]]
        ranks[start : start + _BLOCK] = (sims > own[:, None]).sum(axis=1)
    return ranks


def category_precision(
    neighbours: np.ndarray, labels: np.ndarray, query_index: np.ndarray, k: int = 10
) -> float:
    """Mean share of the top-``k`` neighbours that have the query's label."""
    return float((labels[neighbours[:, :k]] == labels[query_index][:, None]).mean())


def neighbour_agreement(
    neighbours: np.ndarray, native_top1: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Share of queries whose native top-1 neighbour is within their top-k, per k."""
    return {k: float((neighbours[:, :k] == native_top1[:, None]).any(axis=1).mean()) for k in ks}


def effective_rank(x: np.ndarray) -> float:
    """exp(entropy) of the normalised singular-value spectrum of the centred rows.

    A collapsed map (everything sent to a few directions) has a small effective rank even
    when its mean cosine to the targets looks good.
    """
    centred = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))
