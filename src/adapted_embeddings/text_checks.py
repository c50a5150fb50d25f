"""The one check that a text can be embedded at all, shared by the pipeline and the readers."""

from __future__ import annotations

from adapted_embeddings.errors import InvalidInputError


def check_encodable(text: str, where: str) -> None:
    r"""Refuse a text that has no UTF-8 form (a lone surrogate).

    A lone surrogate (e.g. from a bad decode with ``errors="surrogateescape"``, or a
    ``\ud800`` escape in JSON) makes the tokenizer raise a bare ``TypeError`` and a provider
    request impossible to serialise, failing every other text in its batch.

    Args:
        text: The text to check.
        where: Where it came from, for the message, e.g. ``"texts[3]"`` or ``"--text #2"``.

    Raises:
        InvalidInputError: Naming ``where``, the offending character and its position.

    """
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{where} is not valid Unicode: it holds a lone surrogate "
            f"{text[exc.start : exc.start + 1]!r} at character {exc.start} (e.g. from bytes "
            "that are not UTF-8); decode your input with errors='replace'"
        ) from None
