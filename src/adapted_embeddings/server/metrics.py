"""``GET /metrics``: Prometheus text exposition (format 0.0.4), written by hand.

Pipeline counters come from ``pipeline.stats()`` at scrape time; the server adds request
counts by endpoint and status, a latency histogram, and what it rejected. With
``--workers N`` every worker keeps its own numbers (scrape each, or run one worker).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from adapted_embeddings.pipeline import EmbeddingPipeline

PREFIX = "adapted_embeddings"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds in seconds; a cache hit takes about a millisecond, a provider call ~0.1-1 s."""

KNOWN_PATHS = frozenset(
    {
        "/v1/embeddings",
        "/embeddings",
        "/v1/models",
        "/healthz",
        "/metrics",
        "/v1/usage",
        "/dashboard",
    }
)
MODEL_CARD_PATH = "/v1/models/{model}"
"""The one label for every ``GET /v1/models/<name>``."""
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
OTHER = "other"
"""The label of any other path or method: labels must not be whatever a client sends, or
every new method name or URL would add series to /metrics for as long as the process runs."""
ROUTE_COUNTERS = (
    ("cache", "cache_hits"),
    ("local", "local"),
    ("provider", "provider"),
    ("local_degraded", "degraded"),
)
"""Route label → PipelineStats field."""


class LatencyHistogram:
    """A cumulative histogram of durations in seconds."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Record one duration."""
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
            self._sum += seconds

    def lines(self, name: str, labels: str) -> list[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` samples."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}le="{le}"}} {running}')
        out.append(f"{name}_sum{{{labels.rstrip(',')}}} {total}")
        out.append(f"{name}_count{{{labels.rstrip(',')}}} {running}")
        return out


class ServerMetrics:
    """What the HTTP layer counts; the pipeline's own counters are read at scrape time."""

    def __init__(self) -> None:
        self.responses: Counter[tuple[str, str, int]] = Counter()  # (path, method, status)
        self.latency: dict[str, LatencyHistogram] = {}
        self.inputs = 0
        self.usage_tokens = 0
        self.in_flight = 0
        self._lock = threading.Lock()

    def record(self, path: str, method: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request, under a bounded set of path and method labels."""
        label = path_label(path)
        method = method if method in KNOWN_METHODS else OTHER
        with self._lock:
            self.responses[(label, method, status)] += 1
            histogram = self.latency.setdefault(label, LatencyHistogram())
        histogram.observe(seconds)

    def count_embedded(self, inputs: int, tokens: int) -> None:
        """Count inputs served and their cl100k tokens (what clients were billed in usage)."""
        with self._lock:
            self.inputs += inputs
            self.usage_tokens += tokens

    def render(self, pipeline: EmbeddingPipeline, quality: dict[str, Any] | None = None) -> str:
        """The whole exposition, pipeline counters included."""
        stats = pipeline.stats()
        lines: list[str] = []
        _family(lines, "info", "gauge", "The served space, adapter and mode (value 1).")
        lines.append(
            f'{PREFIX}_info{{space="{_escape(pipeline.space.id)}",'
            f'adapter="{_escape(_adapter_name(pipeline))}",mode="{pipeline.gate.mode}"}} 1'
        )
        _family(lines, "texts_total", "counter", "Texts embedded by the pipeline, by route.")
        for route, field in ROUTE_COUNTERS:
            lines.append(f'{PREFIX}_texts_total{{route="{route}"}} {getattr(stats, field)}')
        _simple(lines, "failed_texts_total", "counter", "Texts that got no vector.", stats.failed)
        _simple(
            lines,
            "cache_hits_total",
            "counter",
            "Texts served from the disk cache.",
            stats.cache_hits,
        )
        _simple(
            lines,
            "audited_texts_total",
            "counter",
            "Texts the gate kept local but sent to the provider to audit the adapter.",
            stats.audited,
        )
        _simple(
            lines,
            "pairs_stored",
            "gauge",
            "(local, provider) vector pairs kept for adapt().",
            stats.pairs_stored,
        )
        _simple(
            lines,
            "provider_requests_total",
            "counter",
            "HTTP requests made to the upstream provider.",
            stats.provider_requests,
        )
        _simple(
            lines,
            "provider_tokens_total",
            "counter",
            "Tokens sent to the upstream provider.",
            stats.provider_tokens,
        )
        _usage(lines, pipeline)
        with self._lock:
            responses = sorted(self.responses.items())
            histograms = sorted(self.latency.items())
            inputs, usage_tokens, in_flight = self.inputs, self.usage_tokens, self.in_flight
        _simple(lines, "inputs_total", "counter", "Inputs answered with a vector.", inputs)
        _simple(
            lines,
            "usage_tokens_total",
            "counter",
            "cl100k tokens reported in 'usage' to clients.",
            usage_tokens,
        )
        _simple(lines, "requests_in_flight", "gauge", "Embedding requests in progress.", in_flight)
        _family(lines, "http_responses_total", "counter", "HTTP responses by path and status.")
        for (path, method, status), count in responses:
            lines.append(
                f'{PREFIX}_http_responses_total{{path="{path}",method="{method}",'
                f'status="{status}"}} {count}'
            )
        name = f"{PREFIX}_http_request_duration_seconds"
        _family(lines, "http_request_duration_seconds", "histogram", "HTTP request latency.")
        for path, histogram in histograms:
            lines.extend(histogram.lines(name, f'path="{path}",'))
        if quality:
            _family(
                lines,
                "quality",
                "gauge",
                "Audited quality of the local route (pipeline.quality_report(); booleans as 0/1).",
            )
            for key, value in sorted(quality.items()):
                number = _number(value)
                if number is not None:
                    lines.append(f'{PREFIX}_quality{{measure="{_escape(key)}"}} {number}')
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Pure ASGI middleware timing every HTTP request and counting its status."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        """Pass the request on, noting the status sent and the time taken."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before sending anything

        async def noting_send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            self.metrics.record(
                scope["path"], scope["method"], status, time.perf_counter() - started
            )


def path_label(path: str) -> str:
    """The label for ``path``: a route of the server, or ``other``."""
    if path in KNOWN_PATHS:
        return path
    return MODEL_CARD_PATH if path.startswith("/v1/models/") else OTHER


def _usage(lines: list[str], pipeline: EmbeddingPipeline) -> None:
    """Cost avoided and audited quality in this process, from its usage ledger (if any).

    As of the ledger's last flush (every ``usage.flush_seconds``).
    """
    ledger = pipeline.ledger
    if ledger is None:
        return
    from adapted_embeddings.usage.prices import dollars, price_of, price_table

    table = price_table(ledger.prices)
    totals = ledger.totals
    avoided = [dollars(n, price_of(space, table)) for space, n in totals.unpaid_tokens.items()]
    _simple(
        lines,
        "cost_avoided_usd_total",
        "counter",
        "USD the provider would have charged for texts served locally or from the cache "
        "(models with a price only).",
        sum(cost for cost in avoided if cost is not None),
    )
    if totals.audits:
        _simple(
            lines,
            "audited_quality",
            "gauge",
            "Share of this process's audits whose local vector was not poor (the report's "
            "audited fidelity).",
            totals.audit_passes / totals.audits,
        )


def _family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {PREFIX}_{name} {help_text}")
    lines.append(f"# TYPE {PREFIX}_{name} {kind}")


def _simple(lines: list[str], name: str, kind: str, help_text: str, value: float) -> None:
    _family(lines, name, kind, help_text)
    lines.append(f"{PREFIX}_{name} {value}")


def _adapter_name(pipeline: EmbeddingPipeline) -> str:
    return pipeline.adapter.name if pipeline.adapter is not None else "none"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None
