"""The server's own settings: where it listens, who may call it, and how much it accepts.

The pipeline behind it reads the library's settings (``ADAPTED_EMBEDDINGS_*``, ``.env``);
these are read from ``ADAPTED_EMBEDDINGS_SERVER_*``, e.g. ``ADAPTED_EMBEDDINGS_SERVER_API_KEY``
(prefer it to ``--api-key``, which other users of the machine can see in the process list).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapted_embeddings.errors import ConfigurationError

OPENAI_MAX_INPUTS = 2048
"""OpenAI's limit on inputs per request, and ours by default."""


class ServerSettings(BaseSettings):
    """Everything about the HTTP server; the embedding pipeline has its own settings."""

    model_config = SettingsConfigDict(
        env_prefix="ADAPTED_EMBEDDINGS_SERVER_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    host: str = Field(default="127.0.0.1", description="Interface to bind.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    api_key: SecretStr | None = Field(
        default=None,
        description="Bearer token clients must send (Authorization: Bearer ...). Required "
        "when the host is not loopback, unless allow_unauthenticated is set. Never empty, "
        "blank or padded with whitespace (a ConfigurationError): unset it to turn auth off.",
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description="Serve without a token on a non-loopback host (--no-auth). Loopback "
        "hosts never need it.",
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, gt=0, description="Largest request body accepted (413 past it)."
    )
    max_inputs: int = Field(
        default=OPENAI_MAX_INPUTS, ge=1, description="Inputs per request (400 past it)."
    )
    max_tokens_per_input: int = Field(
        default=8191, ge=1, description="cl100k tokens per input (400 past it), as OpenAI."
    )
    max_model_chars: int = Field(
        default=256,
        ge=1,
        description="Longest 'model' name accepted (400 string_above_max_length past it).",
    )
    body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Time a request body may take to arrive (408 past it). Bodies are read "
        "before a request takes one of max_concurrent_requests, so slow uploads hold none.",
    )
    max_concurrent_requests: int = Field(
        default=64,
        ge=1,
        description="Embedding requests in progress at once; past it, 429 with Retry-After.",
    )
    retry_after_seconds: int = Field(
        default=1, ge=0, description="Retry-After header value sent with a 429."
    )
    graceful_shutdown_seconds: float = Field(
        default=30.0,
        gt=0,
        description="On SIGTERM/SIGINT, how long in-flight requests may take to finish.",
    )
    workers: int = Field(default=1, ge=1, description="Worker processes (each its own pipeline).")
    log_level: str = Field(default="info", description="uvicorn log level.")

    def __init__(self, **values: Any) -> None:
        """Read the settings (arguments, then ``ADAPTED_EMBEDDINGS_SERVER_*``, then ``.env``).

        Raises:
            ConfigurationError: If the API key is empty, blank or padded with whitespace.
            pydantic.ValidationError: If a value has the wrong type or is out of range.

        """
        super().__init__(**values)
        _check_api_key(self.api_key)

    def check_exposure(self) -> None:
        """Refuse to serve an unauthenticated API beyond this machine.

        Raises:
            ConfigurationError: If the host is not loopback, no token is set and
                ``allow_unauthenticated`` is off; or if the token is empty or blank
                (settings made without validation, e.g. ``model_copy(update=...)``).

        """
        _check_api_key(self.api_key)
        if is_loopback(self.host) or self.api_key is not None or self.allow_unauthenticated:
            return
        raise ConfigurationError(
            f"host {self.host!r} is reachable from other machines, so clients must send a "
            "bearer token: set ADAPTED_EMBEDDINGS_SERVER_API_KEY (or --api-key), or pass "
            "--no-auth to serve without one"
        )


def _check_api_key(key: SecretStr | None) -> None:
    """Refuse a key no client can usefully send: it would turn auth off or never match."""
    if key is None:
        return
    value = key.get_secret_value()
    if not value.strip():
        problem = "empty" if not value else "blank (only whitespace)"
        raise ConfigurationError(
            f"ADAPTED_EMBEDDINGS_SERVER_API_KEY (or --api-key) is {problem}, which would let "
            "any client in with an empty token: set a real token, or unset the variable "
            "(loopback needs no token; --no-auth serves other hosts without one)"
        )
    if value != value.strip():
        raise ConfigurationError(
            "ADAPTED_EMBEDDINGS_SERVER_API_KEY (or --api-key) starts or ends with whitespace, "
            "which an Authorization header cannot carry, so no client could match it: remove "
            "the whitespace"
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False
