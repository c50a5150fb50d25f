"""Bearer-token check for the API routes (``Authorization: Bearer <token>``)."""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from adapted_embeddings.server.openai_errors import OpenAIStyleError

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="adapted-embeddings"'}


def check_bearer(authorization: str | None, expected: SecretStr | None) -> None:
    """Raise a 401 unless ``authorization`` carries the expected token.

    No token configured means no check (the server refuses to start that way beyond
    loopback unless told to). The comparison takes the same time wherever the tokens differ,
    and neither token ever appears in the error.

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
    given = token.strip().encode("utf-8", "surrogatepass")
    wanted = expected.get_secret_value().encode("utf-8")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, wanted):
        raise OpenAIStyleError(
            401,
            "Incorrect API key provided. Send the server's key as 'Authorization: Bearer "
            "YOUR_KEY'.",
            code="invalid_api_key",
            headers=_CHALLENGE,
        )
