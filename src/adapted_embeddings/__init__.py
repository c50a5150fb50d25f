"""adapted-embeddings: local embeddings translated into a provider's space, with fallback.

The top level exports the parts every user touches; the framework integrations live in
:mod:`adapted_embeddings.langchain` and :mod:`adapted_embeddings.llama_index`.
"""

from importlib.metadata import PackageNotFoundError, version

from adapted_embeddings.adapter import Adapter, AdapterManifest
from adapted_embeddings.errors import (
    AdaptedEmbeddingsError,
    AdapterLoadError,
    AdapterNotFoundError,
    ConfigurationError,
    InvalidInputError,
    InvalidVectorError,
    MissingExtraError,
    ProviderError,
    ProviderResponseError,
    SpaceMismatchError,
    TrainingDataError,
)
from adapted_embeddings.spaces import EmbeddingSpace, ensure_same_space

try:
    __version__ = version("adapted-embeddings")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AdaptedEmbeddingsError",
    "Adapter",
    "AdapterLoadError",
    "AdapterManifest",
    "AdapterNotFoundError",
    "ConfigurationError",
    "EmbeddingSpace",
    "InvalidInputError",
    "InvalidVectorError",
    "MissingExtraError",
    "ProviderError",
    "ProviderResponseError",
    "SpaceMismatchError",
    "TrainingDataError",
    "__version__",
    "ensure_same_space",
]
