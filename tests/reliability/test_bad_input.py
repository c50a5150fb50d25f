"""Property-based bad input: every case gets a correct result or a typed error, never a crash.

Texts run through the whole hybrid pipeline (MiniLM, the adapter, the confidence gate, the
provider on a loopback server, the disk cache). After each example the same texts are
embedded again and must come back from the cache unchanged, and at the end every entry
in the cache directory must decode to a valid vector: bad input never corrupts the cache.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapted_embeddings.cache import _decode
from adapted_embeddings.errors import AdaptedEmbeddingsError
from adapted_embeddings.pipeline import EmbeddingResult

from . import figures
from .conftest import Rig
from .faultserver import FaultServer, reference_vectors

# The local model takes a few ms per text; these counts keep the file well under a minute.
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Every character strategy below names codec="utf-8": a bare st.characters() may draw a lone
# surrogate ("\ud800"), which is not valid text and which the library rightly refuses (that case
# has its own test below). Which code points a bare strategy draws changed between hypothesis
# releases, so nothing here relies on its default.
any_char = st.characters(codec="utf-8")
blank = st.sampled_from(["", " ", "\n", "\t\r\n ", "\u3000", "\u00a0\u2003", "\u200b", "\ufeff"])
control = st.text(
    st.characters(categories=["Cc", "Cf", "Zl", "Zp"], codec="utf-8"), min_size=1, max_size=20
)
unicode_text = st.text(any_char, max_size=200)  # any encodable code point, incl. astral ones
mixed = st.text(
    st.one_of(any_char, st.characters(categories=["Cc", "Cf", "Mn", "So"], codec="utf-8")),
    min_size=1,
    max_size=80,
)
long_text = st.integers(min_value=2_000, max_value=60_000).map(
    lambda n: ("lorem ipsum dolor sit amet, консектетур 数据 🚀 " * (n // 40 + 1))[:n]
)
lone_surrogate = st.sampled_from(["\ud800", "abc\udfff", "\udbff\udbff tail"])
valid_text = st.one_of(blank, control, unicode_text, mixed, long_text)
non_str = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.binary(max_size=10),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@pytest.fixture
def rig(make_rig: Any, server: FaultServer, adapter: Any) -> Rig:
    # A threshold in the middle of what the adapter outputs, so both the local and the
    # provider route see the odd inputs.
    return make_rig(
        server.base_url,
        mode="hybrid",
        document_threshold=0.5,
        query_threshold=0.5,
        timeout=30,  # a loaded CI machine must not turn slow answers into failures here
    )


def check_results(rig: Rig, texts: list[str], results: list[EmbeddingResult]) -> None:
    assert len(results) == len(texts)
    matrix = np.stack([r.vector for r in results])
    assert matrix.shape == (len(texts), rig.pipeline.space.dimensions)
    assert np.isfinite(matrix).all()
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-3)
    by_text: dict[str, np.ndarray] = {}
    for text, result in zip(texts, results, strict=True):
        assert result.space == rig.pipeline.space
        assert result.route in {"cache", "local", "provider"}
        if result.route == "provider":
            np.testing.assert_array_equal(result.vector, reference_vectors([text])[0])
        if text.strip() == "":
            assert result.route in {"local", "cache"}  # blanks never reach the provider
        previous = by_text.setdefault(text, result.vector)
        np.testing.assert_array_equal(previous, result.vector)  # duplicates agree


def assert_cache_intact(rig: Rig) -> None:
    raw_cache = rig.cache._cache
    for key in raw_cache.iterkeys():
        value = raw_cache[key]
        assert isinstance(value, bytes), key
        assert _decode(key, value, rig.pipeline.space.dimensions) is not None, key


def embed_twice_and_check(rig: Rig, texts: list[str], role: str) -> None:
    figures.add("bad-input texts tried", len(texts))
    first = rig.pipeline.embed(texts, role)  # type: ignore[arg-type]
    check_results(rig, texts, first)
    again = rig.pipeline.embed(texts, role)  # type: ignore[arg-type]
    assert [r.route for r in again] == ["cache"] * len(texts)
    np.testing.assert_array_equal(
        np.stack([r.vector for r in again]), np.stack([r.vector for r in first])
    )


@settings(max_examples=2_000, deadline=None, database=None)
@given(text=valid_text)
def test_the_valid_text_strategy_draws_only_valid_unicode(text: str) -> None:
    # Guards the strategy itself: a text that cannot be encoded as UTF-8 (a lone surrogate)
    # belongs to the invalid-input test, and would make the test below fail at random.
    text.encode("utf-8")


@settings(SETTINGS, max_examples=120)
@given(
    texts=st.lists(valid_text, min_size=1, max_size=8),
    role=st.sampled_from(["query", "document"]),
)
def test_any_valid_unicode_gets_a_correct_cached_result(
    rig: Rig, texts: list[str], role: str
) -> None:
    embed_twice_and_check(rig, texts, role)
    assert_cache_intact(rig)


@SETTINGS
@given(
    texts=st.lists(valid_text, min_size=1, max_size=6),
    bad=non_str,
    where=st.integers(min_value=0, max_value=6),
)
def test_a_non_string_is_a_type_error_naming_its_index(
    rig: Rig, texts: list[str], bad: Any, where: int
) -> None:
    where = min(where, len(texts))
    items: list[Any] = [*texts[:where], bad, *texts[where:]]
    figures.add("bad-input texts tried", len(items))
    before = rig.entry_count()
    with pytest.raises(TypeError, match=rf"texts\[{where}\] is {type(bad).__name__}"):
        rig.pipeline.embed(items)
    assert rig.entry_count() == before  # rejected before anything was embedded or cached
    assert not rig.pipeline.stats().provider_requests


@SETTINGS
@given(texts=st.lists(valid_text, max_size=4), bad=lone_surrogate, where=st.integers(0, 4))
def test_text_that_is_not_valid_unicode_is_a_typed_error_naming_its_index(
    rig: Rig, texts: list[str], bad: str, where: int
) -> None:
    where = min(where, len(texts))
    items = [*texts[:where], bad, *texts[where:]]
    figures.add("bad-input texts tried", len(items))
    before = rig.entry_count()
    with pytest.raises(AdaptedEmbeddingsError, match=rf"texts\[{where}\]"):
        rig.pipeline.embed(items)
    assert rig.entry_count() == before


@pytest.mark.parametrize("value", [None, 42, "a single string", b"bytes", 3.5])
def test_texts_must_be_a_list_of_strings(rig: Rig, value: Any) -> None:
    figures.add("bad-input texts tried")
    with pytest.raises(TypeError):
        rig.pipeline.embed(value)


def test_empty_batch_gives_an_empty_result(rig: Rig) -> None:
    assert rig.pipeline.embed([]) == []


async def test_async_path_rejects_bad_input_the_same_way(rig: Rig) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        await rig.pipeline.aembed(["fine", None])  # type: ignore[list-item]
    results = await rig.pipeline.aembed(["", "\x00\x01", "ok 🚀"])
    check_results(rig, ["", "\x00\x01", "ok 🚀"], results)


@pytest.mark.slow
def test_a_huge_batch_with_duplicates_keeps_order_and_pays_once_per_text(
    rig: Rig, server: FaultServer
) -> None:
    unique = [
        f"item {i}: {'ab' * (i % 7)} {chr(0x4E00 + i)} {math.sqrt(i):.3f}" for i in range(1_000)
    ]
    texts = [unique[(i * 7919) % len(unique)] for i in range(10_000)]  # shuffled, 10x dupes
    figures.add("bad-input texts tried", len(texts))
    reference_vectors(unique)  # the server's answers, ready before the timed client call

    results = rig.pipeline.embed(texts)

    check_results(rig, texts, results)
    sent = server.texts_embedded()
    assert len(sent) == len(set(sent))  # each distinct text was paid for at most once
    assert set(sent) <= set(unique)
    assert_cache_intact(rig)
    stats = rig.cache.stats()
    assert stats.entries == len(unique)
