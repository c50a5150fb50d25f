"""Pure-NumPy forward pass: source vectors in, target vectors and confidence out.

Inference deliberately avoids torch: it keeps import time and per-call overhead tiny, and
it means a loaded adapter never executes anything but these few matrix products.
"""

from __future__ import annotations

import numpy as np

from adapted_embeddings.adapter.manifest import ArchitectureConfig

_GELU_C = np.float32(np.sqrt(2.0 / np.pi))
_EPS = np.float32(1e-12)


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


def l2_normalize(x: np.ndarray, *, inplace: bool = False, return_norms: bool = False) -> np.ndarray:
    """Scale each row to unit length; an all-zero row stays zero instead of becoming NaN.

    With ``return_norms`` it returns the ``(n,)`` norms instead (``x`` must be ``inplace``).
    """
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    np.maximum(norms, _EPS, out=norms)
    if inplace:
        x /= norms
        return norms[:, 0] if return_norms else x
    return x / norms


def prepare(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the fused tensors :func:`forward` uses to the checked weights.

    The encoder and the OOD projection both multiply the centred input, so they are
    concatenated into one matrix: one BLAS call instead of two, which matters most for a
    single query, where call overhead is a large share of the time.
    """
    prepared = dict(weights)
    prepared["fused.weight"] = np.ascontiguousarray(
        np.concatenate([weights["encoder.weight"], weights["ood.projection"]], axis=1)
    )
    ood_rank = weights["ood.projection"].shape[1]
    prepared["fused.bias"] = np.concatenate(
        [weights["encoder.bias"], np.zeros(ood_rank, dtype=np.float32)]
    )
    return prepared


def ood_statistics(
    centred: np.ndarray, whitened: np.ndarray, weights: dict[str, np.ndarray]
) -> np.ndarray:
    """Two distances from the training distribution, as log values, shape (n, 2).

    The first is the Mahalanobis distance inside the top principal subspace (how unusual the
    vector is along directions the adapter knows); the second is the energy outside that
    subspace (how much of the vector lies in directions it never saw).

    Args:
        centred: Normalised source vectors minus the training mean.
        whitened: ``centred @ ood.projection``, computed by the caller's fused matmul.
        weights: The adapter's tensors.

    """
    squared = whitened * whitened
    mahalanobis = squared.mean(axis=1)
    inside = squared @ weights["ood.variance"]
    total = np.einsum("ij,ij->i", centred, centred)
    outside = np.maximum(total - inside, 0.0)
    return np.log1p(np.stack([mahalanobis, outside * centred.shape[1]], axis=1))


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
    target, features, ood = translate_with_features(source, weights, arch)
    confidence = quality_head(features, weights, arch)
    confidence *= ood_gate(ood, weights)
    if token_counts is not None and arch.max_source_tokens:
        confidence *= coverage(token_counts, arch) ** np.float32(arch.coverage_exponent)
    return target, confidence


def translate_with_features(
    source: np.ndarray, weights: dict[str, np.ndarray], arch: ArchitectureConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The translation plus the quality-head features and OOD statistics it produced.

    Returns:
        ``(target, features, ood)``: unit target vectors, ``(n, quality_feature_count)``
        head inputs and the ``(n, 2)`` OOD statistics. Training code fits the quality head
        and the gate on exactly these.

    """
    centred = l2_normalize(source)
    centred -= weights["source_mean"]
    activations = centred @ weights["fused.weight"]
    activations += weights["fused.bias"]
    rank, width = arch.basis_rank, arch.basis_rank + arch.hidden_dim
    # A column slice of `activations` is strided; BLAS is ~2x slower on it, so copy once.
    coefficients = np.ascontiguousarray(activations[:, :rank])
    ood = ood_statistics(centred, activations[:, width:], weights)
    features = [ood]
    if arch.hidden_dim:
        hidden = gelu(activations[:, rank:width])
        coefficients += hidden @ weights["residual.weight"]
        coefficients += weights["residual.bias"]
        features.insert(0, hidden)
    # In-place bias and normalisation: the (n, output_dim) array is the largest one here,
    # and every extra temporary of it costs more memory traffic than the matmul saves.
    target = coefficients @ weights["decoder.weight"]
    target += weights["decoder.bias"]
    norms = l2_normalize(target, inplace=True, return_norms=True)
    # How far the map moved away from the mean: an uncertain regression shrinks toward it,
    # so short outputs flag translations that are likely poor.
    coefficient_norms = np.sqrt(np.einsum("ij,ij->i", coefficients, coefficients))
    features.append(np.log(np.stack([coefficient_norms, norms], axis=1) + _EPS))
    return target, np.concatenate(features, axis=1), ood


def ood_gate(ood: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """Near 1 inside the training distribution, falling toward 0 outside it."""
    logits = ood @ weights["gate.weight"] + weights["gate.bias"][0]
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -30.0, 30.0)))).astype(np.float32)


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
    logits = scaled @ weights["quality.weight"] + weights["quality.bias"][0]
    # Clip before exp so extreme logits give 0/1 instead of an overflow warning.
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -30.0, 30.0)))).astype(np.float32)
