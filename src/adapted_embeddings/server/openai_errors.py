"""Errors as OpenAI reports them: a status and an ``{"error": {...}}`` body."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import Response

from adapted_embeddings.server.schemas import ErrorDetail, ErrorResponse

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class OpenAIStyleError(Exception):
    """An error to answer with ``status`` and an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = dict(headers or {})

    def response(self) -> Response:
        """The HTTP response for this error."""
        return error_response(self.status, self.detail, self.headers)


def error_response(
    status: int, detail: ErrorDetail, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON response with OpenAI's error body."""
    body = ErrorResponse(error=detail).model_dump_json()
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def bad_request(
    message: str, param: str | None = None, code: str | None = None
) -> OpenAIStyleError:
    """A 400 ``invalid_request_error``."""
    return OpenAIStyleError(400, message, param=param, code=code)
