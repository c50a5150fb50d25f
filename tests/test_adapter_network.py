"""The fused NumPy forward pass computes what the plain formulas compute.

``reference_*`` below is the straightforward implementation (one NumPy expression per
formula, as the network was first written); every shipped adapter, an affine one and a
deep quality head must agree with it to float32 rounding, through the batch path, the
single-row fast path and the training entry point ``translate_with_features``.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from adapted_embeddings.adapter import Adapter, ArchitectureConfig
from adapted_embeddings.adapter.network import (
    expected_shapes,
    forward,
    l2_normalize,
    ood_gate,
    prepare,
    quality_head,
    sigmoid,
    translate_with_features,
)
from adapted_embeddings.registry import list_adapters

# Float32 rounding, measured against the float64 reference. The second OOD statistic is
# log1p(d * (|centred|^2 - inside)), a difference of two numbers near 1 that is ~1e-4:
# float32 inputs alone leave ~4e-5 of error in its log (the pre-fusion code had 1.4e-4), and
# the gate multiplies it by its weight (~10-20), so the confidence gets a looser bound.
TARGET_ATOL = 1e-6
CONFIDENCE_ATOL = 2e-5
FEATURE_ATOL = 1e-5
OUTSIDE_ENERGY_ATOL = 1e-4

# -- the reference: the plain formulas, kept deliberately unfused -----------------------


def reference_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def reference_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


def reference_features(
    source: np.ndarray, w: dict[str, np.ndarray], arch: ArchitectureConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(target, features, ood)`` exactly as documented, in float64."""
    x = source.astype(np.float64)
    w = {name: t.astype(np.float64) for name, t in w.items()}
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centred = unit - w["source_mean"]
    encoded = centred @ w["encoder.weight"] + w["encoder.bias"]
    rank = arch.basis_rank
    coefficients = encoded[:, :rank]
    features = []
    if arch.hidden_dim:
        hidden = reference_gelu(encoded[:, rank:])
        coefficients = coefficients + hidden @ w["residual.weight"] + w["residual.bias"]
        features.append(hidden)
    output = coefficients @ w["decoder.weight"] + w["decoder.bias"]
    output_norm = np.maximum(np.linalg.norm(output, axis=1), 1e-12)
    target = output / output_norm[:, None]
    whitened = centred @ w["ood.projection"]
    mahalanobis = (whitened**2).mean(axis=1)
    outside = np.maximum((centred**2).sum(axis=1) - (whitened**2) @ w["ood.variance"], 0.0)
    ood = np.log1p(np.stack([mahalanobis, outside * arch.input_dim], axis=1))
    norms = np.stack([np.linalg.norm(coefficients, axis=1), output_norm], axis=1)
    features += [ood, np.log(norms + 1e-12)]
    return target, np.concatenate(features, axis=1), ood


def reference_forward(
    source: np.ndarray,
    w: dict[str, np.ndarray],
    arch: ArchitectureConfig,
    token_counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    target, features, ood = reference_features(source, w, arch)
    w = {name: t.astype(np.float64) for name, t in w.items()}
    scaled = (features - w["quality.feature_mean"]) / w["quality.feature_scale"]
    if arch.quality_hidden_dim:
        scaled = reference_gelu(scaled @ w["quality.hidden.weight"] + w["quality.hidden.bias"])
    quality = reference_sigmoid(scaled @ w["quality.weight"] + w["quality.bias"][0])
    gate = reference_sigmoid(ood @ w["gate.weight"] + w["gate.bias"][0])
    confidence = quality * gate
    if token_counts is not None and arch.max_source_tokens:
        counts = np.maximum(token_counts.astype(np.float64), 1.0)
        if arch.max_target_tokens:
            counts = np.minimum(counts, arch.max_target_tokens)
        confidence *= np.minimum(1.0, arch.max_source_tokens / counts) ** arch.coverage_exponent
    return target, confidence


# -- inputs -----------------------------------------------------------------------------


def probe_vectors(weights: dict[str, np.ndarray], rows: int, seed: int = 0) -> np.ndarray:
    """A mix of inputs: near the training mean along its principal directions (high
    confidence), plain random directions (out of distribution), scaled and tiny rows."""
    rng = np.random.default_rng(seed)
    mean = weights["source_mean"]
    # ood.projection holds the principal directions divided by their standard deviations
    variance = weights["ood.variance"]
    spread = rng.standard_normal((rows, len(variance))) * variance * 0.8
    near = mean + spread @ weights["ood.projection"].T
    far = rng.standard_normal((rows, mean.shape[0]))
    pick = rng.random(rows) < 0.7
    batch = np.where(pick[:, None], near, far).astype(np.float32)
    batch[::5] *= 37.0  # the input is normalised: scale must not matter
    batch[1::7] *= 1e-6
    return batch


@functools.cache
def shipped() -> list[Adapter]:
    return [Adapter.load(entry.path) for entry in list_adapters()]


@pytest.fixture(scope="module", params=[e.name for e in list_adapters()])
def adapter(request: pytest.FixtureRequest) -> Adapter:
    return next(a for a in shipped() if a.name == request.param)


def deep_head_adapter(
    adapter: Adapter, width: int = 6, seed: int = 1
) -> tuple[dict[str, np.ndarray], ArchitectureConfig]:
    """The adapter's translation weights with a random two-layer quality head."""
    arch = adapter.manifest.architecture.model_copy(update={"quality_hidden_dim": width})
    rng = np.random.default_rng(seed)
    weights = {name: np.array(t) for name, t in adapter.weights.items()}
    for name, shape in expected_shapes(arch).items():
        if name.startswith("quality."):
            weights[name] = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    weights["quality.feature_scale"] = np.abs(weights["quality.feature_scale"]) + 0.1
    return weights, arch


# -- tests -------------------------------------------------------------------------------


def test_the_shipped_adapters_cover_both_paths() -> None:
    flavors = {(a.manifest.architecture.hidden_dim > 0) for a in shipped()}
    assert flavors == {True, False}  # an MLP and an affine adapter


@pytest.mark.parametrize("rows", [1, 2, 7, 300, 1024])
def test_forward_matches_the_reference(adapter: Adapter, rows: int) -> None:
    arch = adapter.manifest.architecture
    source = probe_vectors(adapter.weights, rows, seed=rows)
    expected_target, expected_confidence = reference_forward(source, adapter.weights, arch)
    target, confidence = forward(source, prepare(adapter.weights), arch)
    assert target.dtype == confidence.dtype == np.float32
    assert target.shape == expected_target.shape and confidence.shape == (rows,)
    np.testing.assert_allclose(target, expected_target, atol=TARGET_ATOL)
    np.testing.assert_allclose(confidence, expected_confidence, atol=CONFIDENCE_ATOL)
    if rows >= 300:  # the probe covers confident and unconfident rows alike
        assert expected_confidence.min() < 0.2 and expected_confidence.max() > 0.5


def test_translate_one_row_equals_the_same_row_in_a_batch(adapter: Adapter) -> None:
    source = probe_vectors(adapter.weights, 64)
    batch_vectors, batch_confidence = adapter.translate(source)
    for i in range(len(source)):
        vector, confidence = adapter.translate(source[i])
        assert vector.shape == (adapter.target.dimensions,) and confidence.shape == ()
        np.testing.assert_allclose(vector, batch_vectors[i], atol=TARGET_ATOL)
        np.testing.assert_allclose(confidence, batch_confidence[i], atol=CONFIDENCE_ATOL)


def test_token_counts_scale_the_confidence_like_the_reference(adapter: Adapter) -> None:
    arch = adapter.manifest.architecture
    source = probe_vectors(adapter.weights, 9)
    counts = np.array([1, 5, 100, 255, 256, 257, 600, 5_000, 10**6], dtype=np.float32)
    _, expected = reference_forward(source, adapter.weights, arch, counts)
    _, confidence = adapter.translate(source, token_counts=counts)
    np.testing.assert_allclose(confidence, expected, atol=CONFIDENCE_ATOL)
    for i in (0, 6):  # and through the single-row path
        _, one = adapter.translate(source[i], token_counts=counts[i : i + 1])
        np.testing.assert_allclose(one, expected[i], atol=CONFIDENCE_ATOL)


def test_training_features_match_the_reference_even_before_the_head_exists(
    adapter: Adapter,
) -> None:
    """The trainer calls translate_with_features(source, prepare(weights), arch) on weights
    whose quality head and gate are placeholders or not there at all."""
    arch = adapter.manifest.architecture
    source = probe_vectors(adapter.weights, 50)
    expected = reference_features(source, adapter.weights, arch)
    without_head = {
        name: t for name, t in adapter.weights.items() if not name.startswith(("quality", "gate"))
    }
    for weights in (adapter.weights, without_head):
        target, features, ood = translate_with_features(source, prepare(weights), arch)
        assert target.dtype == features.dtype == ood.dtype == np.float32
        np.testing.assert_allclose(target, expected[0], atol=TARGET_ATOL)
        outside = arch.hidden_dim + 1  # the column of the outside-energy statistic
        strict = np.arange(features.shape[1]) != outside
        np.testing.assert_allclose(features[:, strict], expected[1][:, strict], atol=FEATURE_ATOL)
        np.testing.assert_allclose(ood[:, 0], expected[2][:, 0], atol=FEATURE_ATOL)
        np.testing.assert_allclose(features[:, outside], ood[:, 1])
        np.testing.assert_allclose(ood[:, 1], expected[2][:, 1], atol=OUTSIDE_ENERGY_ATOL)
    target, features, ood = translate_with_features(source, prepare(adapter.weights), arch)
    np.testing.assert_allclose(
        quality_head(features, adapter.weights, arch) * ood_gate(ood, adapter.weights),
        adapter.translate(source)[1],
        atol=CONFIDENCE_ATOL,
    )


def test_a_deep_quality_head_matches_the_reference(adapter: Adapter) -> None:
    weights, arch = deep_head_adapter(adapter)
    for rows in (1, 33):
        source = probe_vectors(weights, rows, seed=rows)
        expected_target, expected_confidence = reference_forward(source, weights, arch)
        target, confidence = forward(source, prepare(weights), arch)
        np.testing.assert_allclose(target, expected_target, atol=TARGET_ATOL)
        np.testing.assert_allclose(confidence, expected_confidence, atol=CONFIDENCE_ATOL)


def test_prepare_leaves_the_checked_weights_untouched(adapter: Adapter) -> None:
    weights = {name: np.array(t) for name, t in adapter.weights.items()}
    prepared = prepare(weights)
    for name, tensor in adapter.weights.items():
        np.testing.assert_array_equal(weights[name], tensor)
        np.testing.assert_array_equal(prepared[name], tensor)


def test_extreme_inputs_give_finite_results_without_warnings(adapter: Adapter) -> None:
    arch = adapter.manifest.architecture
    source = np.zeros((3, arch.input_dim), np.float32)
    source[1, 0] = 1e18
    source[2] = adapter.weights["source_mean"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for rows in (source, source[:1], source[1:2]):
            target, confidence = forward(rows, prepare(adapter.weights), arch)
            assert np.isfinite(target).all() and np.isfinite(confidence).all()
            assert ((confidence >= 0) & (confidence <= 1)).all()


def test_l2_normalize_and_sigmoid() -> None:
    rows = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(l2_normalize(rows), [[0.6, 0.8], [0, 0], [1e-18, 0]], atol=1e-7)
    assert rows[0, 0] == 3.0  # not in place unless asked
    norms = l2_normalize(rows, inplace=True, return_norms=True)
    np.testing.assert_allclose(norms, [5.0, 1e-12, 1e-12], rtol=1e-6)
    np.testing.assert_allclose(rows[0], [0.6, 0.8], rtol=1e-6)
    assert l2_normalize([[1, 1]]).dtype == np.float32
    logits = np.array([-1e4, -2.0, 0.0, 2.0, 1e4], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = sigmoid(logits)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, reference_sigmoid(logits.astype(np.float64)), atol=1e-7)
    assert float(sigmoid(np.float32(0.0))) == 0.5
