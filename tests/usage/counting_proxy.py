"""A proxy that counts what the provider received: texts, requests, and its own token count."""

from __future__ import annotations

import json
import threading

from ..recording_proxy import RecordingProxy


class CountingProxy(RecordingProxy):
    """A :class:`RecordingProxy` that also adds up the ``usage.total_tokens`` answered."""

    def __init__(self, upstream_base_url: str) -> None:
        self.tokens = 0
        self._token_lock = threading.Lock()
        super().__init__(upstream_base_url)

    def forward(self, path: str, body: bytes) -> tuple[int, bytes]:
        status, answer = super().forward(path, body)
        if status == 200:
            with self._token_lock:
                self.tokens += int(json.loads(answer)["usage"]["total_tokens"])
        return status, answer
