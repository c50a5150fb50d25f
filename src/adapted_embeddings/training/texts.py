"""Train from texts: embed them locally and with the provider, then :func:`train_adapter`.

Provider calls are the only part that costs money, so they are

* **estimated first**: tokens are counted offline and the cost printed before any call;
* **batched** through the library's own provider client (request limits respected);
* **cached on disk** after every batch in the library's :class:`EmbeddingCache` (data-only,
  never unpickled; private directory), under the same provider key the pipeline uses, so a
  crash or a second run resumes without paying again, and a pipeline over the same cache
  directory reuses what training paid for (and the other way round);
* shown with a **progress bar**.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.cache import CachedEmbedding, EmbeddingCache, provider_cache_key
from adapted_embeddings.errors import ProviderError, TrainingDataError
from adapted_embeddings.settings import ProviderSettings
from adapted_embeddings.spaces import EmbeddingSpace

PRICE_PER_MILLION_TOKENS = {
    "text-embedding-ada-002": 0.10,
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
}
"""OpenAI list prices in USD (for the estimate only; check your own pricing)."""

BATCH_TEXTS = 512

logger = logging.getLogger(__name__)


def estimate_cost(texts: Sequence[str], target: EmbeddingSpace) -> dict[str, Any]:
    """Tokens the provider will bill for ``texts`` and the estimated price (USD, or None)."""
    from adapted_embeddings.tokens import default_token_counter

    counter = default_token_counter()
    tokens = sum(counter.count(t) for t in texts)
    price = PRICE_PER_MILLION_TOKENS.get(target.model)
    return {
        "texts": len(texts),
        "tokens": tokens,
        "usd": None if price is None else tokens / 1e6 * price,
    }


def embed_with_provider(
    texts: Sequence[str],
    *,
    target: EmbeddingSpace | str,
    provider: ProviderSettings,
    cache_dir: str | Path,
    progress: bool = True,
) -> np.ndarray:
    """The provider's vectors of ``texts``, reusing every vector already cached.

    Raises:
        ProviderError: If some batches still fail after retries; everything that did
            succeed is cached, so rerunning resumes from there.

    """
    from tqdm.auto import tqdm

    from adapted_embeddings.provider import OpenAIEmbeddingProvider

    space = EmbeddingSpace.parse(target)
    keys = [provider_cache_key(space=space, text=text) for text in texts]
    store = EmbeddingCache(cache_dir)
    try:
        result = np.zeros((len(texts), space.dimensions), dtype=np.float32)
        missing = []
        cached = store.peek_provider_vectors(keys, dimensions=space.dimensions)
        for i, vector in enumerate(cached):
            if vector is None:
                missing.append(i)
            else:
                result[i] = vector
        if missing:
            estimate = estimate_cost([texts[i] for i in missing], space)
            usd = "unknown price" if estimate["usd"] is None else f"~${estimate['usd']:.4f}"
            # A warning, so the notice of spending is shown without any logging set up.
            logger.warning(
                "embedding %d texts with %s (%d tokens, %s); %d already cached",
                len(missing),
                space.id,
                estimate["tokens"],
                usd,
                len(texts) - len(missing),
            )
            client = OpenAIEmbeddingProvider(provider, space)
            failed: list[int] = []
            try:
                bar = tqdm(total=len(missing), disable=not progress, unit="text")
                for start in range(0, len(missing), BATCH_TEXTS):
                    batch = missing[start : start + BATCH_TEXTS]
                    outcome = client.embed([texts[i] for i in batch])
                    store.put_many(
                        [
                            (keys[batch[position]], CachedEmbedding(vector, "provider", None))
                            for position, vector in outcome.vectors.items()
                        ]
                    )
                    for position, vector in outcome.vectors.items():
                        result[batch[position]] = vector
                    failed.extend(batch[p] for p in outcome.failed_positions)
                    bar.update(len(batch))
                bar.close()
            finally:
                client.close()
            if failed:
                raise ProviderError(
                    f"{len(failed)} of {len(missing)} texts got no vector from the provider; "
                    "the rest are cached, rerun to resume",
                    failed_indices=failed,
                    completed=len(missing) - len(failed),
                )
        return result
    finally:
        store.close()


def train_adapter_from_texts(
    texts: Sequence[str],
    *,
    target: EmbeddingSpace | str,
    provider: ProviderSettings,
    cache_dir: str | Path,
    source: Any = "sentence-transformers/all-MiniLM-L6-v2",
    flavor: str = "mlp",
    progress: bool = True,
    **train_kwargs: Any,
) -> Adapter:
    """Embed ``texts`` with the local source encoder and the provider, then train.

    Args:
        texts: Training texts, representative of what the adapter will see.
        target: The provider's space, e.g. ``openai/text-embedding-ada-002@1536``.
        provider: Provider settings (API key or ``base_url`` of a compatible server).
        cache_dir: Where provider vectors are cached (an :class:`EmbeddingCache` directory;
            resumable, never paid twice).
        source: Anything :func:`adapted_embeddings.encoders.build_encoder` accepts.
        flavor: ``"mlp"`` or ``"linear"``.
        progress: Show a progress bar for provider calls.
        **train_kwargs: Passed on to :func:`adapted_embeddings.training.train_adapter`.

    Raises:
        TrainingDataError: Empty, non-string or duplicate-only input, or bad pairs.
        ProviderError: Provider failures that persist after retries.

    """
    from adapted_embeddings.encoders import build_encoder
    from adapted_embeddings.training.data import MIN_PAIRS
    from adapted_embeddings.training.trainer import train_adapter

    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise TrainingDataError(f"texts must be non-empty strings; bad positions {bad[:5]}")
    unique = list(dict.fromkeys(texts))
    if flavor in MIN_PAIRS and len(unique) < MIN_PAIRS[flavor]:
        raise TrainingDataError(
            f"flavor {flavor!r} needs at least {MIN_PAIRS[flavor]} pairs, got {len(unique)} "
            "distinct texts"
        )
    target_space = EmbeddingSpace.parse(target)
    target_vectors = embed_with_provider(
        unique, target=target_space, provider=provider, cache_dir=cache_dir, progress=progress
    )
    encoder = build_encoder(source)
    source_vectors = encoder.encode(unique)
    train_kwargs.setdefault("max_source_tokens", int(getattr(encoder, "max_seq_length", 0) or 0))
    info = dict(train_kwargs.pop("training_info", None) or {})
    info.setdefault("data", f"{len(unique)} distinct user texts")
    return train_adapter(
        source_vectors,
        target_vectors,
        source=encoder.space,
        target=target_space,
        flavor=flavor,
        training_info=info,
        **train_kwargs,
    )
