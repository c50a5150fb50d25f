"""A real OpenAI-compatible ``/v1/embeddings`` server on loopback that answers with recorded
vectors: the real ada-002 vectors of the Jeopardy corpus stand in for OpenAI, offline.

Unknown texts get a 400 with OpenAI's error shape, so a benchmark can never silently score
vectors that were not recorded. Every request is counted.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np


class ReplayProvider:
    """Serve ``vectors[i]`` for ``texts[i]`` as model ``model`` on 127.0.0.1."""

    def __init__(self, texts: list[str], vectors: np.ndarray, model: str) -> None:
        self.lookup = {text: vectors[i].tolist() for i, text in enumerate(texts)}
        self.model = model
        self.requests = 0
        self.texts = 0
        self._lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                missing = [t for t in inputs if t not in provider.lookup]
                if missing:
                    self._send(400, {"error": {"message": f"not recorded: {missing[0]!r}"}})
                    return
                with provider._lock:
                    provider.requests += 1
                    provider.texts += len(inputs)
                data = [
                    {"object": "embedding", "index": i, "embedding": provider.lookup[t]}
                    for i, t in enumerate(inputs)
                ]
                usage = {"prompt_tokens": 0, "total_tokens": 0}
                self._send(
                    200, {"object": "list", "data": data, "model": provider.model, "usage": usage}
                )

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
