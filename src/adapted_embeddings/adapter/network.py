"""Pure-NumPy forward pass: source vectors in, target vectors and confidence out.

Inference deliberately avoids torch: it keeps import time and per-call overhead tiny, and
it means a loaded adapter never executes anything but these few matrix products.

:func:`prepare` folds everything that does not depend on the input into a handful of
combined tensors once, at load time, so a forward pass is three matrix products plus a few
in-place passes:

* the encoder and the OOD projection share one product (both read the centred input), and
  the residual bias is folded into the encoder's bias;
* the GELU's factor 1/2, the quality head's feature scaling and its weights on the hidden
  units are folded into one residual matrix, whose extra column(s) carry the quality logit;
* the quality head's weights on the four scalar statistics (two OOD statistics, two log
  norms) and the OOD gate share one small ``(4, m + 1)`` matrix.

A single row takes a dedicated path that does its scalar arithmetic in Python floats
instead of a dozen one-element NumPy calls. Both paths compute the same function as the
plain formulas in :func:`translate_with_features`'s docstring (tested to float32 rounding).
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

from adapted_embeddings.adapter.manifest import ArchitectureConfig

_GELU_C = np.float32(np.sqrt(2.0 / np.pi))
_GELU_C3 = np.float32(0.044715 * np.sqrt(2.0 / np.pi))
_EPS = np.float32(1e-12)
_LOGIT_CLIP = 30.0
_QUALITY_KEYS = ("quality.feature_scale", "quality.weight", "gate.weight")


MEMORY_FEATURES = 6
"""Inputs of the memory head (see :mod:`adapted_embeddings.adapter.memory`)."""


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


def expected_shapes(arch: ArchitectureConfig) -> dict[str, tuple[int, ...]]:
    """Return the name and shape of every tensor an adapter with ``arch`` must hold."""
    r, h, k = arch.basis_rank, arch.hidden_dim, arch.ood_rank
    shapes: dict[str, tuple[int, ...]] = {
        "source_mean": (arch.input_dim,),
        "encoder.weight": (arch.input_dim, r + h),
        "encoder.bias": (r + h,),
        "decoder.weight": (r, arch.output_dim),
        "decoder.bias": (arch.output_dim,),
        "ood.projection": (arch.input_dim, k),
        "ood.variance": (k,),
    }
    if h:
        shapes["residual.weight"] = (h, r)
        shapes["residual.bias"] = (r,)
    features = quality_feature_count(arch)
    if arch.quality_hidden_dim:
        shapes["quality.hidden.weight"] = (features, arch.quality_hidden_dim)
        shapes["quality.hidden.bias"] = (arch.quality_hidden_dim,)
        shapes["quality.weight"] = (arch.quality_hidden_dim,)
    else:
        shapes["quality.weight"] = (features,)
    shapes["quality.bias"] = (1,)
    shapes["quality.feature_mean"] = (features,)
    shapes["quality.feature_scale"] = (features,)
    shapes["gate.weight"] = (OOD_STATISTICS,)
    shapes["gate.bias"] = (1,)
    shapes.update(memory_shapes(arch))
    return shapes


OOD_STATISTICS = 2
"""Mahalanobis distance inside the OOD subspace and energy outside it (log values)."""

NORM_STATISTICS = 2
"""Log norms of the basis coefficients and of the un-normalised output."""


def quality_feature_count(arch: ArchitectureConfig) -> int:
    """Inputs to the quality head: hidden units, two OOD statistics and two output norms."""
    return arch.hidden_dim + OOD_STATISTICS + NORM_STATISTICS


def gelu(x: np.ndarray) -> np.ndarray:
    """Tanh-approximated GELU, matching ``torch.nn.GELU(approximate="tanh")``."""
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def _twice_gelu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``2 * gelu(x)`` into ``out`` or a new contiguous array (the 1/2 is in the weights)."""
    out = np.multiply(x, x, out=out)
    out *= _GELU_C3
    out += _GELU_C
    out *= x
    np.tanh(out, out=out)
    out += 1.0
    out *= x
    return out


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function as float32; logits are clipped to ±30 so exp never overflows."""
    clipped = np.array(logits, dtype=np.float32)
    np.clip(clipped, -_LOGIT_CLIP, _LOGIT_CLIP, out=clipped)
    np.negative(clipped, out=clipped)
    np.exp(clipped, out=clipped)
    clipped += 1.0
    return np.reciprocal(clipped, out=clipped)


def _scalar_sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-min(max(logit, -_LOGIT_CLIP), _LOGIT_CLIP)))


def l2_normalize(x: np.ndarray, *, inplace: bool = False, return_norms: bool = False) -> np.ndarray:
    """Scale each row to unit length; an all-zero row stays zero instead of becoming NaN.

    Args:
        x: ``(n, d)`` rows (anything array-like unless ``inplace``; computed in float32).
        inplace: Scale ``x`` itself (a float32 array) instead of returning a new array.
        return_norms: Return the ``(n,)`` norms (floored at 1e-12) instead of the rows;
            only with ``inplace``.

    """
    if not inplace:
        x = np.array(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    np.maximum(norms, _EPS, out=norms)
    x *= np.reciprocal(norms)[:, None]
    return norms if return_norms else x


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``(n, d)`` arrays."""
    return np.einsum("ij,ij->i", l2_normalize(a), l2_normalize(b))


def centred_cosine_rows(a: np.ndarray, b: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Row-wise cosine after normalising both sides and subtracting ``mean`` from them.

    Raw cosine is misleading for anisotropic spaces (every ada-002 vector has cosine ~0.7
    with every other), so translation quality, in training and in audits alike, is judged
    on the centred version.
    """
    return cosine_rows(l2_normalize(a) - mean, l2_normalize(b) - mean)


def prepare(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the combined tensors :func:`forward` uses to the checked weights (at load).

    The quality-head and gate tensors are optional here: training computes the features
    the head is fitted on (:func:`translate_with_features`) before the head exists.
    """
    prepared = dict(weights)
    rank = weights["decoder.weight"].shape[0]
    encoder_bias = weights["encoder.bias"].astype(np.float32)
    hidden_dim = encoder_bias.shape[0] - rank
    ood_rank = weights["ood.projection"].shape[1]
    if hidden_dim:
        encoder_bias[:rank] += weights["residual.bias"]
    prepared["fused.weight"] = np.ascontiguousarray(
        np.concatenate([weights["encoder.weight"], weights["ood.projection"]], axis=1)
    )
    prepared["fused.bias"] = np.concatenate([encoder_bias, np.zeros(ood_rank, np.float32)])
    # squared whitened coordinates @ this = (Mahalanobis distance, energy inside)
    prepared["fused.ood"] = np.ascontiguousarray(
        np.stack([np.full(ood_rank, 1.0 / ood_rank), weights["ood.variance"]], axis=1),
        dtype=np.float64,
    )
    # The decoder bias as one more weight row: a batch multiplies [coefficients | 1] by it,
    # which saves a pass over the (n, output_dim) result, the largest array of the forward.
    prepared["fused.decoder"] = np.ascontiguousarray(
        np.concatenate([weights["decoder.weight"], weights["decoder.bias"][None, :]]),
        dtype=np.float32,
    )
    residual = [0.5 * weights["residual.weight"]] if hidden_dim else []
    if all(key in weights for key in _QUALITY_KEYS):
        heads, bias, hidden_weights = _fold_heads(weights, hidden_dim)
        prepared["fused.heads"], prepared["fused.heads_bias"] = heads, bias
        if "quality.hidden.weight" not in weights:
            # A logistic head: the single-row path reads these ten as Python floats.
            prepared["fused.heads_scalars"] = np.concatenate([heads.T.ravel(), bias])
        residual.append(0.5 * hidden_weights)
    if hidden_dim:
        prepared["fused.residual"] = np.ascontiguousarray(
            np.concatenate(residual, axis=1), dtype=np.float32
        )
    return prepared


def _fold_heads(
    weights: dict[str, np.ndarray], hidden_dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold the feature scaling into the quality head and put the gate beside it.

    The head's first layer reads ``(features - mean) / scale``; that equals
    ``features @ (W / scale) + (b - (mean / scale) @ W)``. Its rows for the hidden units
    go into the residual product; its rows for the four statistics, plus the gate's
    weights as one more column, form ``heads`` (4, m + 1).

    Returns:
        ``(heads, heads_bias, hidden_rows)``.

    """
    scale = weights["quality.feature_scale"].astype(np.float64)
    mean = weights["quality.feature_mean"].astype(np.float64)
    if "quality.hidden.weight" in weights:
        first = weights["quality.hidden.weight"].astype(np.float64)
        first_bias = weights["quality.hidden.bias"].astype(np.float64)
    else:
        first = weights["quality.weight"].astype(np.float64)[:, None]
        first_bias = weights["quality.bias"].astype(np.float64)
    scaled = first / scale[:, None]
    bias = first_bias - (mean / scale) @ first
    gate = np.zeros((OOD_STATISTICS + NORM_STATISTICS, 1))
    gate[:OOD_STATISTICS, 0] = weights["gate.weight"]
    heads = np.concatenate([scaled[hidden_dim:], gate], axis=1).astype(np.float32)
    heads_bias = np.append(bias, weights["gate.bias"][0]).astype(np.float32)
    return heads, heads_bias, scaled[:hidden_dim].astype(np.float32)


def forward(
    source: np.ndarray,
    weights: dict[str, np.ndarray],
    arch: ArchitectureConfig,
    token_counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Translate a batch and score it in one pass.

    The confidence is ``quality * gate * coverage``: the quality head's predicted
    translation quality (trained on cross-fitted held-out error), an out-of-distribution
    gate on the two OOD statistics (fitted at training-distribution percentiles, so inputs
    unlike anything the adapter saw score low even where the quality head extrapolates),
    and, when token counts are given, the share of the text the source model actually read.

    Args:
        source: ``(n, input_dim)`` float32 source vectors (finite; normalised here).
        weights: Tensors named as in :func:`expected_shapes`, float32, passed through
            :func:`prepare`.
        arch: The architecture the weights were checked against.
        token_counts: Optional ``(n,)`` source-model token counts of the texts (untruncated,
            special tokens included). Texts longer than ``arch.max_source_tokens`` were cut
            by the source model but not by the target, so their confidence is scaled by the
            fraction that was read (to the power ``arch.coverage_exponent``).

    Returns:
        ``(n, output_dim)`` unit-length target vectors and ``(n,)`` confidences in [0, 1].

    """
    if len(source) == 1 and "fused.heads_scalars" in weights:
        target, confidence = _forward_one(source[0], weights, arch)
    else:
        run = _translate(source, weights, arch)
        heads = run.statistics @ weights["fused.heads"]
        heads += weights["fused.heads_bias"]
        quality_width = heads.shape[1] - 1
        if run.hidden_quality is not None:
            heads[:, :quality_width] += run.hidden_quality
        if arch.quality_hidden_dim:
            logits = gelu(heads[:, :quality_width]) @ weights["quality.weight"]
            logits += weights["quality.bias"][0]
            confidence = sigmoid(logits)
            confidence *= sigmoid(heads[:, quality_width])
        else:
            both = sigmoid(heads)
            confidence = both[:, 0] * both[:, 1]
        target = run.target
    if token_counts is not None and arch.max_source_tokens:
        confidence *= coverage(token_counts, arch) ** np.float32(arch.coverage_exponent)
    return target, confidence


class _Translation(NamedTuple):
    """What one pass of the translation network produced (rows of a batch)."""

    target: np.ndarray
    """``(n, output_dim)`` unit target vectors."""
    statistics: np.ndarray
    """``(n, 4)``: the two OOD statistics, then log coefficient norm and log output norm."""
    twice_hidden: np.ndarray | None
    """``(n, hidden_dim)`` GELU activations times 2 (None for an affine adapter)."""
    hidden_quality: np.ndarray | None
    """``(n, m)`` the quality head's first layer applied to the hidden units, or None."""


class _Scratch(threading.local):
    """Each thread's reusable arrays for a batch's intermediates.

    A fresh multi-megabyte NumPy array is new memory from the kernel, and every page of it
    faults on first touch: at 1,024 rows that was a third of the forward pass. The
    intermediates, which never leave :func:`_translate`, live here instead and are reused by
    the thread's next call (about 10 MB per thread for a batch of 1,024 rows; they grow to
    the largest batch seen). The returned vectors are always a fresh array.
    """

    def __init__(self) -> None:
        self.arrays: dict[tuple[str, int, type], np.ndarray] = {}

    def get(self, name: str, rows: int, columns: int, dtype: type = np.float32) -> np.ndarray:
        """An uninitialised C-contiguous ``(rows, columns)`` array, this thread's own."""
        key = (name, columns, dtype)
        array = self.arrays.get(key)
        if array is None or len(array) < rows:
            array = self.arrays[key] = np.empty((rows, columns), dtype)
        return array[:rows]


_scratch = _Scratch()


def _translate(
    source: np.ndarray, prepared: dict[str, np.ndarray], arch: ArchitectureConfig
) -> _Translation:
    """The batch path: three matrix products and in-place passes (see the module doc).

    Everything but the returned arrays is written into this thread's scratch arrays, so
    ``twice_hidden`` and ``hidden_quality`` are valid only until the thread's next call.
    """
    rank, width = arch.basis_rank, arch.basis_rank + arch.hidden_dim
    n = len(source)
    centred = _scratch.get("centred", n, arch.input_dim)
    centred[...] = source
    l2_normalize(centred, inplace=True)
    centred -= prepared["source_mean"]
    activations = np.matmul(
        centred, prepared["fused.weight"], out=_scratch.get("activations", n, width + arch.ood_rank)
    )
    activations += prepared["fused.bias"]
    # (Mahalanobis distance, energy inside the subspace), then the energy outside it. The
    # outside energy is a small difference of two numbers near 1, so these two sums are
    # taken in float64 (float32 sums would lose about 3 of the 7 digits it has).
    whitened = _scratch.get("whitened", n, arch.ood_rank, np.float64)
    ood = np.square(activations[:, width:], out=whitened) @ prepared["fused.ood"]
    outside = ood[:, 1]
    np.subtract(np.einsum("ij,ij->i", centred, centred, dtype=np.float64), outside, out=outside)
    np.maximum(outside, 0.0, out=outside)
    outside *= arch.input_dim
    statistics = np.empty((len(centred), OOD_STATISTICS + NORM_STATISTICS), np.float32)
    np.log1p(ood, out=statistics[:, :2])
    twice_hidden = hidden_quality = None
    # [coefficients | 1], contiguous (BLAS is ~2x slower on a strided column slice); the 1
    # picks up the decoder bias inside the product.
    extended = _scratch.get("extended", n, rank + 1)
    extended[:, rank] = 1.0
    coefficients = extended[:, :rank]
    if arch.hidden_dim:
        twice_hidden = _twice_gelu(
            activations[:, rank:width], out=_scratch.get("hidden", n, arch.hidden_dim)
        )
        fused_residual = prepared["fused.residual"]
        residual = np.matmul(
            twice_hidden, fused_residual, out=_scratch.get("residual", n, fused_residual.shape[1])
        )
        np.add(activations[:, :rank], residual[:, :rank], out=coefficients)
        if residual.shape[1] > rank:
            hidden_quality = residual[:, rank:]
    else:
        coefficients[...] = activations[:, :rank]
    # In place from here: the (n, output_dim) array is the largest one, and every extra
    # temporary of it costs more memory traffic than the matmul saves.
    target = extended @ prepared["fused.decoder"]
    norms = l2_normalize(target, inplace=True, return_norms=True)
    # How far the map moved away from the mean: an uncertain regression shrinks toward it,
    # so short outputs flag translations that are likely poor.
    statistics[:, 2] = np.einsum("ij,ij->i", coefficients, coefficients)
    np.sqrt(statistics[:, 2], out=statistics[:, 2])
    statistics[:, 3] = norms
    statistics[:, 2:] += _EPS
    np.log(statistics[:, 2:], out=statistics[:, 2:])
    return _Translation(target, statistics, twice_hidden, hidden_quality)


def _forward_one(
    row: np.ndarray, prepared: dict[str, np.ndarray], arch: ArchitectureConfig
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`forward` for one row with a logistic head: vector products + Python floats.

    For a single query, NumPy's per-call overhead dominates, so the scalar statistics are
    computed on Python floats and only the three matrix products touch arrays.
    """
    rank, width = arch.basis_rank, arch.basis_rank + arch.hidden_dim
    norm = max(math.sqrt(float(np.dot(row, row))), 1e-12)
    centred = row * np.float32(1.0 / norm)
    centred -= prepared["source_mean"]
    activations = np.dot(centred, prepared["fused.weight"])
    activations += prepared["fused.bias"]
    whitened = activations[width:].astype(np.float64)
    mahalanobis, inside = np.dot(whitened * whitened, prepared["fused.ood"]).tolist()
    wide = centred.astype(np.float64)
    outside = max(float(np.dot(wide, wide)) - inside, 0.0) * arch.input_dim
    far, off = math.log1p(mahalanobis), math.log1p(outside)
    if arch.hidden_dim:
        residual = np.dot(_twice_gelu(activations[rank:width]), prepared["fused.residual"])
        coefficients = activations[:rank] + residual[:rank]
        quality_logit = float(residual[rank])
    else:
        coefficients = activations[:rank]
        quality_logit = 0.0
    target = np.dot(coefficients, prepared["decoder.weight"])
    target += prepared["decoder.bias"]
    target_norm = max(math.sqrt(float(np.dot(target, target))), 1e-12)
    target *= np.float32(1.0 / target_norm)
    coefficient_norm = math.sqrt(float(np.dot(coefficients, coefficients)))
    q_far, q_off, q_coef, q_norm, g_far, g_off, _, _, q_bias, g_bias = prepared[
        "fused.heads_scalars"
    ].tolist()
    quality_logit += q_far * far + q_off * off + q_bias
    quality_logit += q_coef * math.log(coefficient_norm + 1e-12)
    quality_logit += q_norm * math.log(target_norm + 1e-12)
    gate_logit = g_far * far + g_off * off + g_bias
    confidence = _scalar_sigmoid(quality_logit) * _scalar_sigmoid(gate_logit)
    return target[None, :], np.array([confidence], dtype=np.float32)


def translate_with_features(
    source: np.ndarray, weights: dict[str, np.ndarray], arch: ArchitectureConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The translation plus the quality-head features and OOD statistics it produced.

    In plain formulas (the fused code computes exactly this)::

        centred = l2_normalize(source) - source_mean
        a = centred @ encoder.weight + encoder.bias            # [basis | hidden]
        hidden = gelu(a[:, rank:])
        coefficients = a[:, :rank] + hidden @ residual.weight + residual.bias
        output = coefficients @ decoder.weight + decoder.bias
        target = output / |output|
        whitened = centred @ ood.projection
        ood = log1p([mean(whitened**2), d * max(|centred|**2 - whitened**2 @ ood.variance, 0)])
        features = [hidden, ood, log(|coefficients| + eps), log(|output| + eps)]

    Returns:
        ``(target, features, ood)``: unit target vectors, ``(n, quality_feature_count)``
        head inputs and the ``(n, 2)`` OOD statistics. Training code fits the quality head
        and the gate on exactly these.

    """
    run = _translate(source, weights, arch)
    parts = [run.statistics]
    if run.twice_hidden is not None:
        parts.insert(0, 0.5 * run.twice_hidden)
    return run.target, np.concatenate(parts, axis=1), run.statistics[:, :OOD_STATISTICS].copy()


def ood_gate(ood: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """Near 1 inside the training distribution, falling toward 0 outside it."""
    return sigmoid(ood @ weights["gate.weight"] + weights["gate.bias"][0])


def coverage(token_counts: np.ndarray, arch: ArchitectureConfig) -> np.ndarray:
    """Share of what the target model reads that the source model read too, in (0, 1].

    A text of ``n`` tokens is read up to ``max_source_tokens`` by the source model and up to
    ``max_target_tokens`` (if set) by the target; beyond both windows nothing is lost.
    """
    counts = np.maximum(np.asarray(token_counts, dtype=np.float32), 1.0)
    if arch.max_target_tokens:
        counts = np.minimum(counts, np.float32(arch.max_target_tokens))
    return np.minimum(1.0, np.float32(arch.max_source_tokens) / counts).astype(np.float32)


def quality_head(
    features: np.ndarray, weights: dict[str, np.ndarray], arch: ArchitectureConfig
) -> np.ndarray:
    """Map quality features to a confidence in [0, 1] (a logistic model, optionally deep)."""
    scaled = (features - weights["quality.feature_mean"]) / weights["quality.feature_scale"]
    if arch.quality_hidden_dim:
        scaled = gelu(scaled @ weights["quality.hidden.weight"] + weights["quality.hidden.bias"])
    return sigmoid(scaled @ weights["quality.weight"] + weights["quality.bias"][0])
