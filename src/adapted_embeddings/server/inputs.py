"""From a request's ``input`` to the texts the pipeline embeds, with OpenAI's limits.

``input`` may be a string, strings, cl100k token ids, or arrays of them. Token ids are decoded
with the cl100k vocabulary bundled in ``bpe-openai`` (no download), so clients that send
tokens (LangChain's ``OpenAIEmbeddings`` does by default) get the same vectors as for text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from adapted_embeddings.server.openai_errors import bad_request
from adapted_embeddings.tokens import TokenCounter


@dataclass(frozen=True)
class PreparedInputs:
    """Texts to embed, in input order, and their cl100k token count."""

    texts: list[str]
    tokens: int


def prepare_inputs(
    value: str | list[str] | list[int] | list[list[int]],
    *,
    counter: TokenCounter,
    max_inputs: int,
    max_tokens_per_input: int,
) -> PreparedInputs:
    """Check ``value`` against the limits and turn it into texts.

    Raises:
        OpenAIStyleError: 400 naming the input at fault: empty, too many inputs, too many
            tokens, invalid Unicode, or token ids that are not cl100k tokens.

    """
    items: list[Any] = [value] if isinstance(value, str) else list(value)
    if not items:
        raise bad_request("'input' must not be an empty array.", param="input")
    if isinstance(items[0], int):  # one array of token ids: a single input
        items = [items]
    if len(items) > max_inputs:
        raise bad_request(
            f"'input' has {len(items)} items; at most {max_inputs} are allowed per request.",
            param="input",
        )
    texts: list[str] = []
    tokens = 0
    for index, item in enumerate(items):
        if isinstance(item, str):
            count = _count_text(item, index, counter)
            texts.append(item)
        else:
            count = len(item)
            texts.append(_decode_tokens(item, index))
        if count > max_tokens_per_input:
            raise bad_request(
                f"input[{index}] has {count} tokens; the maximum is {max_tokens_per_input} "
                "tokens per input. Shorten or split it.",
                param="input",
                code="context_length_exceeded",
            )
        tokens += count
    return PreparedInputs(texts, tokens)


def _count_text(text: str, index: int, counter: TokenCounter) -> int:
    if not text:
        raise bad_request(
            f"input[{index}] is an empty string; every input must contain text.", param="input"
        )
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_request(
                f"input[{index}] is not valid Unicode: {exc.reason} at character {exc.start}.",
                param="input",
            ) from None
    return counter.count(text)


def _decode_tokens(ids: list[int], index: int) -> str:
    if not ids:
        raise bad_request(
            f"input[{index}] is an empty token array; every input must contain tokens.",
            param="input",
        )
    encoding = _cl100k()
    if encoding is None:
        raise bad_request(
            "token-id inputs need the cl100k tokenizer (package bpe-openai), which is not "
            "available on this server; send the text instead.",
            param="input",
        )
    top = int(encoding.max_token_value)
    out_of_range = next((i for i in ids if not 0 <= i <= top), None)
    if out_of_range is not None:
        raise bad_request(
            f"input[{index}] holds {out_of_range}, which is not a cl100k token id (0..{top}).",
            param="input",
        )
    try:
        return str(encoding.decode(ids))
    except (KeyError, ValueError) as exc:
        raise bad_request(
            f"input[{index}] cannot be decoded as cl100k tokens: {exc}", param="input"
        ) from None


@functools.lru_cache(maxsize=1)
def _cl100k() -> Any:
    try:
        import bpe_openai
    except ImportError:
        return None
    return bpe_openai.get_encoding("cl100k_base")
