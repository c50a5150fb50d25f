"""Bearer-token check for the API routes (``Authorization: Bearer <token>``)."""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

from adapted_embeddings.server.openai_errors import OpenAIStyleError

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="adapted-embeddings"'}


def check_bearer(authorization: str | None, expected: SecretStr | None) -> None:
    """Raise a 401 unless ``authorization`` carries the expected token.

    No token configured means no check (the server refuses to start that way beyond
    loopback unless told to). An empty token is never accepted, even against an empty
    key (which the settings refuse anyway). Both tokens are hashed before the constant-time
    comparison, so neither their content nor their length shows in the timing, and neither
    token ever appears in the error.

    Args:
        authorization: The ``Authorization`` header as Starlette decodes it (latin-1).
        expected: The server's token, or None for no check.

    Raises:
        OpenAIStyleError: 401, ``invalid_api_key``.

    """
    if expected is None:
        return
    if not authorization:
        raise OpenAIStyleError(
            401,
            "You didn't provide an API key. Send it in the Authorization header: "
            "'Authorization: Bearer YOUR_KEY'.",
            code="invalid_api_key",
            headers=_CHALLENGE,
        )
    scheme, _, token = authorization.strip().partition(" ")
    # Starlette decodes header bytes as latin-1; encoding back gives the bytes sent.
    given = token.strip().encode("latin-1", "replace")
    wanted = expected.get_secret_value().encode("utf-8")
    same = hmac.compare_digest(_digest(given), _digest(wanted))
    if scheme.lower() != "bearer" or not given or not wanted or not same:
        raise OpenAIStyleError(
            401,
            "Incorrect API key provided. Send the server's key as 'Authorization: Bearer "
            "YOUR_KEY'.",
            code="invalid_api_key",
            headers=_CHALLENGE,
        )


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()
