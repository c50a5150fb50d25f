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
    return shapes


def quality_feature_count(arch: ArchitectureConfig) -> int:
    """Number of inputs to the quality head: hidden units plus two OOD statistics."""
    return arch.hidden_dim + 2


def gelu(x: np.ndarray) -> np.ndarray:
    """Tanh-approximated GELU, matching ``torch.nn.GELU(approximate="tanh")``."""
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def l2_normalize(x: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """Scale each row to unit length; an all-zero row stays zero instead of becoming NaN."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    np.maximum(norms, _EPS, out=norms)
    if inplace:
        x /= norms
        return x
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
) -> tuple[np.ndarray, np.ndarray]:
    """Translate a batch and score it in one pass.

    Args:
        source: ``(n, input_dim)`` float32 source vectors (finite; normalised here).
        weights: Tensors named as in :func:`expected_shapes`, float32, passed through
            :func:`prepare`.
        arch: The architecture the weights were checked against.

    Returns:
        ``(n, output_dim)`` unit-length target vectors and ``(n,)`` confidences in [0, 1].

    """
    centred = l2_normalize(source)
    centred -= weights["source_mean"]
    activations = centred @ weights["fused.weight"]
    activations += weights["fused.bias"]
    rank, width = arch.basis_rank, arch.basis_rank + arch.hidden_dim
    # A column slice of `activations` is strided; BLAS is ~2x slower on it, so copy once.
    coefficients = np.ascontiguousarray(activations[:, :rank])
    features = [ood_statistics(centred, activations[:, width:], weights)]
    if arch.hidden_dim:
        hidden = gelu(activations[:, rank:width])
        coefficients += hidden @ weights["residual.weight"]
        coefficients += weights["residual.bias"]
        features.insert(0, hidden)
    # In-place bias and normalisation: the (n, output_dim) array is the largest one here,
    # and every extra temporary of it costs more memory traffic than the matmul saves.
    target = coefficients @ weights["decoder.weight"]
    target += weights["decoder.bias"]
    l2_normalize(target, inplace=True)
    confidence = quality_head(np.concatenate(features, axis=1), weights, arch)
    return target, confidence


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
