"""Keep the upstream provider's key out of every log line the server writes."""

from __future__ import annotations

import logging

SERVER_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "adapted_embeddings")
REDACTED = "[redacted]"


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with every non-empty secret replaced by ``[redacted]``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class SecretRedactingFilter(logging.Filter):
    """Replaces each secret in a record's formatted message with ``[redacted]``."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place when it contains a secret; never drop it."""
        if not self.secrets:
            return True
        message = record.getMessage()
        exception = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        if any(s in message or s in exception for s in self.secrets):
            message, exception = redact(message, self.secrets), redact(exception, self.secrets)
            record.msg, record.args = message, None
            if record.exc_info:
                record.msg = f"{message}\n{exception}"
                record.exc_info, record.exc_text = None, None
        return True


def install_secret_redaction(secrets: list[str]) -> None:
    """Add the filter to every handler of the server's loggers.

    The library's own warnings (e.g. a provider failure) get a stderr handler here, since
    uvicorn configures only its own loggers.
    """
    library = logging.getLogger("adapted_embeddings")
    if not library.handlers:
        stderr = logging.StreamHandler()
        stderr.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        library.addHandler(stderr)
        library.propagate = False
    redaction = SecretRedactingFilter(secrets)
    for name in SERVER_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, SecretRedactingFilter) for f in handler.filters):
                handler.addFilter(redaction)
