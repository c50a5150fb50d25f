"""The :class:`Adapter`: translate source vectors into a target space and score each one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from adapted_embeddings.adapter.manifest import AdapterManifest
from adapted_embeddings.adapter.memory import apply_memory
from adapted_embeddings.adapter.network import coverage, expected_shapes, forward, prepare
from adapted_embeddings.adapter.persistence import (
    read_manifest,
    read_weights,
    serialize_weights,
    write_adapter,
)
from adapted_embeddings.errors import AdapterLoadError, InvalidVectorError
from adapted_embeddings.spaces import EmbeddingSpace

# Rows per forward call: large enough for BLAS to run at full speed, small enough that the
# intermediate activations of a huge batch do not balloon memory.
_CHUNK_ROWS = 4096


class Adapter:
    """A trained map from a source embedding space into a target space, with confidence.

    Load one with :meth:`load` (a directory) or :meth:`from_registry` (a built-in one).

    Example:
        >>> adapter = Adapter.from_registry(
        ...     source="sentence-transformers/all-MiniLM-L6-v2", target="text-embedding-ada-002"
        ... )
        >>> vectors, confidence = adapter.translate(minilm_vectors)  # doctest: +SKIP

    """

    def __init__(self, manifest: AdapterManifest, weights: dict[str, np.ndarray]) -> None:
        """Wrap already-validated weights; prefer :meth:`load` or :meth:`from_registry`."""
        shapes = expected_shapes(manifest.architecture)
        if set(shapes) != set(weights):
            missing, unexpected = (
                sorted(set(shapes) - set(weights)),
                sorted(set(weights) - set(shapes)),
            )
            raise AdapterLoadError(
                f"weights do not match the architecture: missing {missing}, unexpected {unexpected}"
            )
        self.manifest = manifest
        self._weights = {name: np.asarray(w, dtype=np.float32) for name, w in weights.items()}
        self._prepared = prepare(self._weights)
        self.path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> Adapter:
        """Load an adapter directory (``adapter.json`` + safetensors weights).

        Raises:
            AdapterLoadError: If anything is missing, corrupt, tampered with or inconsistent.

        """
        directory = Path(path)
        if not directory.is_dir():
            raise AdapterLoadError(f"adapter directory does not exist: {directory}")
        manifest = read_manifest(directory)
        adapter = cls(manifest, read_weights(directory, manifest))
        adapter.path = directory
        return adapter

    @classmethod
    def from_registry(
        cls,
        source: str | EmbeddingSpace | None = None,
        target: str | EmbeddingSpace | None = None,
        flavor: str | None = None,
        *,
        name: str | None = None,
    ) -> Adapter:
        """Load a built-in adapter by (source, target, flavor) or by name.

        Raises:
            AdapterNotFoundError: Listing the adapters that do exist.

        """
        from adapted_embeddings.registry import find_adapter

        return cls.load(find_adapter(source=source, target=target, flavor=flavor, name=name).path)

    def save(self, path: str | Path, *, overwrite: bool = False, private: bool = False) -> Path:
        """Write this adapter to ``path`` (atomically); refuses to overwrite unless asked.

        ``private`` makes the directory 0700 and its files 0600 (for adapters fitted on a
        user's own vectors).

        Returns:
            The directory written.

        """
        blob = serialize_weights(self._weights)
        digest = hashlib.sha256(blob).hexdigest()
        self.manifest = self.manifest.model_copy(update={"weights_sha256": digest})
        write_adapter(Path(path), self.manifest, blob, overwrite=overwrite, private=private)
        self.path = Path(path)
        return self.path

    @property
    def source(self) -> EmbeddingSpace:
        """Space of the vectors this adapter reads."""
        return self.manifest.source

    @property
    def target(self) -> EmbeddingSpace:
        """Space of the vectors this adapter produces."""
        return self.manifest.target

    @property
    def name(self) -> str:
        """The adapter's short name."""
        return self.manifest.name

    @property
    def flavor(self) -> str:
        """Architecture family, e.g. ``mlp`` or ``linear``."""
        return self.manifest.flavor

    @property
    def id(self) -> str:
        """Name plus weights hash: changes whenever the weights do (used in cache keys)."""
        return f"{self.manifest.name}:{self.manifest.weights_sha256}"

    @property
    def recommended_threshold(self) -> float:
        """The confidence threshold calibration chose for this adapter."""
        return self.manifest.recommended_threshold

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """The float32 tensors (read-only views; copy before modifying)."""
        views = {}
        for name, tensor in self._weights.items():
            view = tensor.view()
            view.flags.writeable = False
            views[name] = view
        return views

    @property
    def parameter_count(self) -> int:
        """Total number of scalars in the weights."""
        return int(sum(t.size for t in self._weights.values()))

    @property
    def target_mean(self) -> np.ndarray:
        """Mean target vector (the decoder bias): quality is judged centred on it."""
        view = self._weights["decoder.bias"].view()
        view.flags.writeable = False
        return view

    def translate(
        self, source_vectors: np.ndarray, *, token_counts: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Translate source vectors and score each translation, in one forward pass.

        Args:
            source_vectors: ``(n, d_source)`` or ``(d_source,)`` array in the source space.
            token_counts: Optional source-model token count of each text (untruncated, with
                special tokens). A text longer than the source model's window
                (``architecture.max_source_tokens``) lost content the target model still
                sees, so its confidence is multiplied by the share that was read.

        Returns:
            ``(vectors, confidence)``: ``(n, d_target)`` float32 unit vectors in the target
            space and ``(n,)`` float32 confidences in [0, 1]. A 1-D input gives a 1-D vector
            and a 0-d confidence.

        Raises:
            SpaceMismatchError: If the input width is not the source space's.
            InvalidVectorError: If the input holds NaN or Inf.

        """
        single = np.ndim(source_vectors) == 1
        batch = self.source.check_vectors(source_vectors, what="source vectors")
        counts = None
        if token_counts is not None:
            counts = np.atleast_1d(np.asarray(token_counts, dtype=np.float32))
            if counts.shape != (len(batch),):
                raise InvalidVectorError(
                    f"token_counts has shape {counts.shape}, expected ({len(batch)},)"
                )
        if len(batch) <= _CHUNK_ROWS:
            vectors, confidence = self._forward(batch, counts)
        else:
            parts = [
                self._forward(
                    batch[start : start + _CHUNK_ROWS],
                    None if counts is None else counts[start : start + _CHUNK_ROWS],
                )
                for start in range(0, len(batch), _CHUNK_ROWS)
            ]
            vectors = np.concatenate([p[0] for p in parts])
            confidence = np.concatenate([p[1] for p in parts])
        if single:
            return vectors[0], confidence[0]
        return vectors, confidence

    def _forward(
        self, batch: np.ndarray, counts: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        arch = self.manifest.architecture
        if not arch.memory_rows:
            return forward(batch, self._prepared, arch, counts)
        # With a memory, its head refines the network's own confidence, and the share of the
        # text the source read scales the result (as it scales the confidence without one).
        vectors, confidence = forward(batch, self._prepared, arch, None)
        vectors, confidence = apply_memory(batch, vectors, confidence, self._weights, arch)
        if counts is not None and arch.max_source_tokens:
            confidence *= coverage(counts, arch) ** np.float32(arch.coverage_exponent)
        return vectors, confidence

    def __repr__(self) -> str:
        return (
            f"Adapter(name={self.name!r}, flavor={self.flavor!r}, source={self.source.id!r}, "
            f"target={self.target.id!r}, threshold={self.recommended_threshold:.3f})"
        )
