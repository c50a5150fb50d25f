"""adapted-embeddings: local embeddings translated into a provider's space, with fallback.

The top level exports the parts every user touches; the framework integrations live in
:mod:`adapted_embeddings.langchain` and :mod:`adapted_embeddings.llama_index`.
"""

from adapted_embeddings.adapter import Adapter, AdapterManifest
from adapted_embeddings.errors import (
    AdaptedEmbeddingsError,
    AdapterLoadError,
    AdapterNotFoundError,
    ConfigurationError,
    InvalidVectorError,
    ProviderError,
    ProviderResponseError,
    SpaceMismatchError,
    TrainingDataError,
)
from adapted_embeddings.spaces import EmbeddingSpace, ensure_same_space

__version__ = "0.1.0"

__all__ = [
    "AdaptedEmbeddingsError",
    "Adapter",
    "AdapterLoadError",
    "AdapterManifest",
    "AdapterNotFoundError",
    "ConfigurationError",
    "EmbeddingSpace",
    "InvalidVectorError",
    "ProviderError",
    "ProviderResponseError",
    "SpaceMismatchError",
    "TrainingDataError",
    "__version__",
    "ensure_same_space",
]
