"""Training-only code: corpora, adapter training, quality head, calibration and evaluation.

Nothing here is imported by the inference runtime (:mod:`adapted_embeddings.adapter`).

Example:
    >>> from adapted_embeddings.training import train_adapter
    >>> adapter = train_adapter(  # doctest: +SKIP
    ...     minilm_vectors, ada_vectors,
    ...     source="sentence-transformers/all-MiniLM-L6-v2@384",
    ...     target="openai/text-embedding-ada-002@1536",
    ...     output_dir="my-adapter",
    ... )

"""

from adapted_embeddings.training.data import MIN_PAIRS, check_parallel
from adapted_embeddings.training.texts import estimate_cost, train_adapter_from_texts
from adapted_embeddings.training.trainer import AdapterTrainingConfig, recalibrate, train_adapter
from adapted_embeddings.training.translation import TranslationConfig

__all__ = [
    "MIN_PAIRS",
    "AdapterTrainingConfig",
    "TranslationConfig",
    "check_parallel",
    "estimate_cost",
    "recalibrate",
    "train_adapter",
    "train_adapter_from_texts",
]
