"""Run the embeddings server on 127.0.0.1 for tests: in a thread, or as the real command."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from .conftest import free_port


class LoopbackUrls:
    """The URLs of a server listening on ``127.0.0.1:port``."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


class ThreadedServer(LoopbackUrls):
    """uvicorn serving ``app`` on a free loopback port from a background thread."""

    def __init__(self, app: Any, *, wait_ready: bool = True) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        if wait_ready and not wait_for_ready(self.url, deadline):
            raise RuntimeError(f"{self.url}/healthz never answered 200")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_for_ready(
    url: str,
    deadline: float,
    *,
    interval: float = 0.05,
    exited: Callable[[], bool] = lambda: False,
) -> bool:
    """Poll ``/healthz`` until it answers 200 (the local model is loaded).

    Returns:
        True once it answers; False at ``deadline``, or as soon as ``exited()`` says the
        server is gone.

    """
    while not exited():
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)
    return False


@dataclass
class CommandServer(LoopbackUrls):
    """``python -m adapted_embeddings.cli serve ...`` in a subprocess, stderr to a file."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_command_server(
    arguments: list[str],
    log: Path,
    env: dict[str, str],
    timeout: float = 120,
    python: str | Path = sys.executable,
) -> CommandServer:
    port = free_port()
    command = [str(python), "-m", "adapted_embeddings.cli", "serve", "--port", str(port)]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, *arguments],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    server = CommandServer(process, port, log)
    deadline = time.monotonic() + timeout
    if wait_for_ready(
        server.url, deadline, interval=0.2, exited=lambda: process.poll() is not None
    ):
        return server
    if process.poll() is not None:
        raise RuntimeError(f"serve exited with {process.returncode}:\n{server.output()}")
    process.kill()
    raise RuntimeError(f"serve did not answer /healthz in {timeout}s:\n{server.output()}")
