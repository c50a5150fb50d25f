"""Provider prices as data: US dollars per 1M input tokens, by model name.

The defaults are OpenAI's published list prices for its embedding models (standard tier,
as of the library's release); ``usage.prices`` overrides or extends them for another
provider or a negotiated contract, e.g.
``ADAPTED_EMBEDDINGS_USAGE__PRICES='{"text-embedding-3-small": 0.01}'``. Every report says
which prices it used.
"""

from __future__ import annotations

from collections.abc import Mapping

OPENAI_PRICES_PER_MILLION: dict[str, float] = {
    "text-embedding-ada-002": 0.10,
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
}
"""OpenAI's list prices, USD per 1M input tokens."""


def price_table(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """The defaults with ``overrides`` on top (keys are model names, lower case)."""
    table = dict(OPENAI_PRICES_PER_MILLION)
    table.update({model.lower(): float(price) for model, price in (overrides or {}).items()})
    return table


def model_of(space_id: str) -> str:
    """The model in a space id: 'openai/text-embedding-3-small@512' -> 'text-embedding-3-small'."""
    return space_id.split("@")[0].split("/")[-1].lower()


def price_of(space_id: str, table: Mapping[str, float]) -> float | None:
    """USD per 1M tokens for the model of ``space_id`` (None: no price known)."""
    return table.get(model_of(space_id))


def dollars(tokens: int, price_per_million: float | None) -> float | None:
    """What ``tokens`` cost at ``price_per_million`` (None when the price is unknown)."""
    return None if price_per_million is None else tokens * price_per_million / 1_000_000
