"""Embed a corpus of millions on Ray Data (``pip install 'adapted-embeddings[ray]'``).

:func:`embed_dataset` adds ``embedding`` (fixed-width float32), ``confidence`` and ``route``
to a :class:`ray.data.Dataset`, keeping every input column. It uses ``map_batches`` with a
callable class, so each actor builds one pipeline (and loads the model once) from the same
keywords :class:`~adapted_embeddings.langchain.AdaptedEmbeddings` takes. The same code runs
on a laptop (a local Ray instance) and on a cluster (``ray.init(address=...)``).

Provider fallback from many workers shares one limit: a named Ray actor
(:class:`ProviderRateLimiter`) is a token bucket for the whole job, bounding concurrent
provider requests and tokens per minute, and every actor's provider acquires from it
around each HTTP attempt, so N workers never multiply the rate limit. Retries and
``Retry-After`` are handled by the provider as in one process.

Each node has its own cache directory (the settings' ``cache.directory`` on that node's
disk): workers on a node share that node's cache, and the pairs they learn from provider
calls go to that node's pair store in the same directory (an SQLite file shared safely by
the node's processes). Nothing is shipped between nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from adapted_embeddings.datasets import (
    OUTPUT_COLUMNS,
    SUMMARY_COUNTS,
    ChunkTask,
    PipelineIdentity,
    RunMismatchError,
    bulk_pipeline,
    check_output_columns,
    embed_table,
    read_task_chunk,
    require_pyarrow,
    set_model_threads,
    text_values,
    write_task,
)
from adapted_embeddings.errors import AdaptedEmbeddingsError, ConfigurationError
from adapted_embeddings.extras import require

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from adapted_embeddings.pipeline import EmbeddingPipeline, Role
    from adapted_embeddings.settings import AdaptedEmbeddingsSettings

logger = logging.getLogger(__name__)

_ERROR_TAG = re.compile(r"\[adapted-embeddings:(\w+)\] (.*?) \[/adapted-embeddings\]", re.DOTALL)


def require_ray() -> Any:
    """Import ray (with Ray Data), or raise :class:`MissingExtraError` naming its extra."""
    require("ray.data", "ray", needed_for="adapted_embeddings.ray", package="ray[data]")
    import ray

    return ray


def connect(address: str | None = None, **init_keywords: Any) -> None:
    """Connect to the Ray cluster at ``address``, or start a local instance (None).

    A local instance is started minimal and quiet: no dashboard (``include_dashboard=False``;
    Ray still starts its per-node agents), driver logs at WARNING, and no warning that
    token authentication is on (Ray's default for a local instance; it stays on). Does
    nothing if Ray is already initialised in this process.

    Raises:
        ConfigurationError: If ``address`` cannot be reached (one line, naming it).

    """
    ray = require_ray()
    if ray.is_initialized():
        return
    if address not in (None, "auto", "local"):
        _check_reachable(address)
    if address in (None, "local"):
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
    init_keywords.setdefault("include_dashboard", False)
    init_keywords.setdefault("logging_level", logging.WARNING)
    try:
        ray.init(address=address, **init_keywords)
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigurationError(f"cannot connect to Ray at {address!r}: {first_line}") from None


def _check_reachable(address: str) -> None:
    host_port = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigurationError(
            f"--ray-address {address!r} is not host:port (or ray://host:port, or 'auto')"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"cannot reach Ray at {address!r}: {exc.strerror or exc}; is the cluster running "
            "(ray start --head) and the address right?"
        ) from None


# -- the cluster-wide provider limit -------------------------------------------------------


class ProviderRateLimiter:
    """A token bucket shared by every worker of a job, run as a named Ray actor.

    At most ``max_concurrent`` provider requests are in flight at once, cluster-wide, and
    at most ``tokens_per_minute`` tokens are sent per minute (the bucket starts full, like
    the provider's own limit). A slot not released within ``lease_seconds`` (its worker
    died) is taken back.
    """

    def __init__(
        self, max_concurrent: int, tokens_per_minute: int | None, lease_seconds: float
    ) -> None:
        """Start with a full bucket and nothing in flight."""
        self.max_concurrent = max_concurrent
        self.tokens_per_minute = tokens_per_minute
        self.lease_seconds = lease_seconds
        self._level = float(tokens_per_minute or 0)
        self._refilled = time.monotonic()
        self._leases: dict[str, float] = {}
        self._changed: asyncio.Condition | None = None
        self._granted = 0
        self._tokens = 0
        self._most_in_flight = 0

    async def acquire(self, tokens: int) -> str:
        """Wait until a request of ``tokens`` tokens may go; returns its lease id."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            while True:
                wait = self._wait_seconds(tokens)
                if wait == 0.0:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=wait)
            if self.tokens_per_minute is not None:
                self._level -= tokens
            lease = uuid.uuid4().hex
            self._leases[lease] = time.monotonic() + self.lease_seconds
            self._granted += 1
            self._tokens += tokens
            self._most_in_flight = max(self._most_in_flight, len(self._leases))
            return lease

    async def release(self, lease: str) -> None:
        """The request holding ``lease`` is over."""
        self._leases.pop(lease, None)
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """Counters: requests granted, tokens granted, in flight now, most in flight."""
        return {
            "granted": self._granted,
            "tokens": self._tokens,
            "in_flight": len(self._leases),
            "most_in_flight": self._most_in_flight,
            "max_concurrent": self.max_concurrent,
            "tokens_per_minute": self.tokens_per_minute,
        }

    def _wait_seconds(self, tokens: int) -> float:
        """0 if a request may go now, else how long to sleep before looking again."""
        now = time.monotonic()
        for lease, deadline in list(self._leases.items()):
            if deadline < now:
                logger.warning("provider slot %s not released in time; taking it back", lease)
                del self._leases[lease]
        if len(self._leases) >= self.max_concurrent:
            return 1.0  # woken by a release; the timeout only re-checks expired leases
        if self.tokens_per_minute is None:
            return 0.0
        rate = self.tokens_per_minute / 60.0
        self._level = min(
            float(self.tokens_per_minute), self._level + (now - self._refilled) * rate
        )
        self._refilled = now
        # A request larger than the whole bucket waits for a full bucket, then goes.
        needed = min(float(tokens), float(self.tokens_per_minute))
        if self._level >= needed:
            return 0.0
        return max((needed - self._level) / rate, 0.01)


class RayRequestLimiter:
    """The provider's ``RequestLimiter``, backed by a :class:`ProviderRateLimiter` actor.

    ``acquire`` blocks until the actor grants a slot; ``release`` gives one back (slots of
    one worker are interchangeable, so the provider's threads may release in any order).
    """

    def __init__(self, actor: Any) -> None:
        """Wrap a handle to a :class:`ProviderRateLimiter` actor."""
        self._actor = actor
        self._leases: deque[str] = deque()
        self._lock = threading.Lock()

    def acquire(self, tokens: int) -> None:
        """Block until the cluster-wide limit lets a request of ``tokens`` tokens go."""
        ray = require_ray()
        lease = ray.get(self._actor.acquire.remote(int(tokens)))
        with self._lock:
            self._leases.append(lease)

    def release(self) -> None:
        """Give one slot back."""
        ray = require_ray()
        with self._lock:
            lease = self._leases.popleft() if self._leases else None
        if lease is not None:
            ray.get(self._actor.release.remote(lease))


def provider_limiter(
    settings: AdaptedEmbeddingsSettings,
    *,
    max_concurrent: int | None = None,
    tokens_per_minute: int | None = None,
) -> str:
    """Start (or find) the job's :class:`ProviderRateLimiter` for ``settings``' provider.

    Args:
        settings: Resolved settings; the limiter is per provider URL and target model.
        max_concurrent: Requests in flight at once, cluster-wide; default the provider's
            ``max_concurrent_requests`` (so the whole cluster keeps one process's limit).
        tokens_per_minute: Tokens sent per minute, cluster-wide; None: no token limit.

    Returns:
        The actor's name; workers find it with ``ray.get_actor(name)``.

    """
    ray = require_ray()
    provider = settings.provider
    concurrent = max_concurrent or provider.max_concurrent_requests
    if concurrent < 1 or (tokens_per_minute is not None and tokens_per_minute < 1):
        raise ConfigurationError("provider limits must be at least 1")
    identity = f"{provider.base_url}|{settings.target}|{concurrent}|{tokens_per_minute}"
    name = "adapted-embeddings-limiter-" + hashlib.sha256(identity.encode()).hexdigest()[:16]
    # One attempt lasts at most ``timeout`` seconds (the provider's deadline); a slot held
    # much longer belongs to a worker that died.
    lease_seconds = provider.timeout * 2 + 30.0
    if name in _LIMITERS:  # keep the first handle: it owns the actor's lifetime
        return name
    actor_class = ray.remote(ProviderRateLimiter)
    # The driver keeps the handle: a named actor nobody holds a handle to is collected.
    handle = actor_class.options(
        name=name, get_if_exists=True, num_cpus=0, max_concurrency=10_000
    ).remote(concurrent, tokens_per_minute, lease_seconds)
    ray.get(handle.snapshot.remote())  # started and registered before any worker looks it up
    _LIMITERS[name] = handle
    return name


_LIMITERS: dict[str, Any] = {}


def limiter_snapshot(name: str) -> dict[str, Any]:
    """The counters of the limiter actor ``name`` (see :meth:`ProviderRateLimiter.snapshot`)."""
    ray = require_ray()
    handle = _LIMITERS.get(name) or ray.get_actor(name)
    return dict(ray.get(handle.snapshot.remote()))


# -- the workers -----------------------------------------------------------------------------


class _PipelineWorker:
    """One pipeline per actor (the model loads once, not per batch) for one text column and role.

    The pipeline is built from the keywords the driver pinned (:func:`bulk_pipeline`) and
    must have the driver's identity: the same adapter, mode and thresholds.
    """

    def __init__(
        self,
        keywords: dict[str, Any],
        identity: PipelineIdentity,
        limiter: str | None,
        threads: int,
        text_column: str,
        role: Role,
    ) -> None:
        set_model_threads(threads)
        from adapted_embeddings.factory import PipelineOptions

        with _tagged_errors():
            self.pipeline: EmbeddingPipeline = PipelineOptions(**keywords).build_pipeline()
            differences = identity.differences(PipelineIdentity.of(self.pipeline))
            if differences:
                raise RunMismatchError(
                    f"a Ray actor built another pipeline than the driver's "
                    f"({'; '.join(differences)})",
                    differences,
                )
        if limiter is not None and self.pipeline.provider is not None:
            ray = require_ray()
            self.pipeline.provider.limiter = RayRequestLimiter(ray.get_actor(limiter))
        self.text_column = text_column
        self.role: Role = role


class EmbedBatches(_PipelineWorker):
    """``map_batches`` callable: a pyarrow batch in, the same rows with embeddings out."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Embed one batch; a bad cell raises naming the row (by its other columns)."""
        with _tagged_errors():
            texts = _batch_texts(batch, self.text_column)
            return embed_table(self.pipeline, batch, texts, role=self.role)


class EmbedChunkFiles(_PipelineWorker):
    """``map_batches`` callable of ``embed-dataset --engine ray``: tasks in, files written."""

    def __init__(
        self,
        keywords: dict[str, Any],
        identity: PipelineIdentity,
        limiter: str | None,
        threads: int,
        text_column: str,
        role: Role,
        rows_per_file: int,
        batch_size: int,
    ) -> None:
        """Build the actor's pipeline."""
        super().__init__(keywords, identity, limiter, threads, text_column, role)
        self.rows_per_file = rows_per_file
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Read, embed and atomically write each task's chunk; one summary row per task."""
        pa = require_pyarrow()
        rows: list[dict[str, Any]] = []
        with _tagged_errors():
            for encoded in batch.column("task").to_pylist():
                task = ChunkTask.model_validate_json(encoded)
                chunk = read_task_chunk(
                    task, text_column=self.text_column, rows_per_file=self.rows_per_file
                )
                routes = write_task(
                    self.pipeline, task, chunk, role=self.role, batch_size=self.batch_size
                )
                rows.append({"output_path": task.output_path, "rows": task.rows, **routes})
        return pa.Table.from_pylist(rows)


def _batch_texts(batch: pa.Table, column: str) -> list[str]:
    try:
        return text_values(batch, column, where="dataset")
    except AdaptedEmbeddingsError as exc:
        # Row numbers inside a batch mean nothing to the user; name the row by its values.
        match = re.search(r"row (\d+):", str(exc))
        if match is None:
            raise
        row = batch.slice(int(match.group(1)) - 1, 1).to_pylist()[0]
        others = {k: v for k, v in row.items() if k != column and _short(v)}
        detail = str(exc).split(": ", 1)[1]
        raise type(exc)(f"dataset row {dict(list(others.items())[:3])}: {detail}") from None


def _short(value: Any) -> bool:
    return isinstance(value, int | float | str | bool) and len(str(value)) <= 80


# -- errors across the process boundary ------------------------------------------------------


@contextlib.contextmanager
def _tagged_errors() -> Iterator[None]:
    """Tag library errors raised in a worker so the driver can raise the same type again.

    Ray Data wraps exceptions from ``map_batches`` in its own types and keeps only their
    text; :func:`typed_error` finds the tag in that text.
    """
    try:
        yield
    except AdaptedEmbeddingsError as error:
        raise RuntimeError(
            f"[adapted-embeddings:{type(error).__name__}] {error} [/adapted-embeddings]"
        ) from error


def typed_error(error: BaseException) -> BaseException:
    """The library error a Ray worker raised, rebuilt from Ray's wrapper (or ``error``).

    Use it around consuming a dataset from :func:`embed_dataset`::

        try:
            ds.write_parquet(path)
        except Exception as exc:
            raise typed_error(exc) from None
    """
    import adapted_embeddings.datasets as datasets
    import adapted_embeddings.errors as errors
    import adapted_embeddings.io as io

    if isinstance(error, AdaptedEmbeddingsError):
        return error
    match = _ERROR_TAG.search(str(error))
    if match is None:
        return error
    name, message = match.groups()
    kind = next(
        (k for k in (getattr(m, name, None) for m in (errors, io, datasets)) if k is not None),
        None,
    )
    if not (isinstance(kind, type) and issubclass(kind, AdaptedEmbeddingsError)):
        kind = AdaptedEmbeddingsError
    try:
        return kind(message)
    except TypeError:  # errors with required extra fields, e.g. ProviderError
        return kind(message, [])


# -- the public entry points ------------------------------------------------------------------


def embed_dataset(
    ds: ray.data.Dataset,
    *,
    text_column: str = "text",
    role: Role = "document",
    batch_size: int = 256,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    threads: int | None = None,
    provider_concurrency: int | None = None,
    provider_tokens_per_minute: int | None = None,
    **keywords: Any,
) -> ray.data.Dataset:
    """Embed the ``text_column`` of a Ray Dataset; every input column is kept.

    Args:
        ds: Any ``ray.data.Dataset`` with a string column ``text_column``.
        text_column: Column holding the texts (no nulls, only strings).
        role: ``document`` or ``query``.
        batch_size: Rows per ``map_batches`` call (one pipeline call).
        concurrency: Actors, each with its own pipeline (model loaded once per actor).
        num_cpus: CPUs each actor reserves.
        threads: Torch intra-op threads of each actor's model; default ``num_cpus``
            (rounded, at least 1), so actors on the same cores do not oversubscribe them.
        provider_concurrency: Provider requests in flight at once across all actors;
            default the provider's ``max_concurrent_requests``.
        provider_tokens_per_minute: Tokens per minute across all actors; default no limit.
        **keywords: The keywords :class:`~adapted_embeddings.langchain.AdaptedEmbeddings`
            takes (``mode``, ``adapter``, ``base_url``, ``cache_dir``, ...). They are
            resolved here, on the driver, with the driver's environment and ``.env``, and
            so is the adapter, which every actor then uses (see
            :func:`~adapted_embeddings.datasets.bulk_pipeline`: automatic ``adapt()`` is off).

    Returns:
        A lazy Dataset with ``embedding`` (fixed-width float32 list), ``confidence``
        (float32, null when not scored) and ``route`` appended, and ``embedding_space`` and
        the pipeline record (``adapted_embeddings_pipeline``: adapter, mode, thresholds) in
        the schema metadata of every block (so ``write_parquet`` records them). Row order is
        kept if the dataset's ``DataContext.execution_options.preserve_order`` is set; keep
        an id column otherwise. Errors raised by workers surface when the dataset is
        consumed; :func:`typed_error` turns them back into this library's exceptions.

    Raises:
        ConfigurationError: If ray is missing, a keyword is unknown, or the settings cannot
            work (checked before any actor starts).
        InputFileError: If ``text_column`` is missing or an output column already exists.

    """
    require_ray()
    if batch_size < 1 or concurrency < 1 or num_cpus <= 0 or (threads or 1) < 1:
        raise ConfigurationError("batch_size, concurrency and threads must be >= 1, num_cpus > 0")
    worker_keywords, settings, identity = _resolve_keywords(keywords)
    schema = ds.schema()
    if schema is not None:
        columns = list(schema.names)
        if text_column not in columns:
            raise _missing_column(text_column, columns)
        check_output_columns(columns, where="the dataset")
    limiter = _fallback_limiter(settings, provider_concurrency, provider_tokens_per_minute)
    return _map(
        ds,
        EmbedBatches,
        (worker_keywords, identity, limiter, actor_threads(num_cpus, threads), text_column, role),
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=num_cpus,
    )


def embed_tasks(
    tasks: Sequence[ChunkTask],
    *,
    keywords: dict[str, Any],
    text_column: str,
    role: Role,
    rows_per_file: int,
    batch_size: int = 256,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    threads: int | None = None,
    provider_concurrency: int | None = None,
    provider_tokens_per_minute: int | None = None,
) -> Iterator[dict[str, Any]]:
    """The Ray engine of ``embed-dataset``: each actor reads, embeds and writes whole chunks.

    The tasks come from :func:`adapted_embeddings.datasets.prepare_run`; inputs and output
    must be on storage every node sees. Each actor's model runs on ``threads`` torch
    threads (default ``num_cpus``, rounded, at least 1). Yields one summary row per file
    written (its ``rows``, rows per route and ``duplicate`` rows) as soon as it is written.

    Raises:
        AdaptedEmbeddingsError: The error a worker raised, with its own type and message.

    """
    ray = require_ray()
    worker_keywords, settings, identity = _resolve_keywords(keywords)
    limiter = _fallback_limiter(settings, provider_concurrency, provider_tokens_per_minute)
    pending = [t for t in tasks if not t.done]
    if not pending:
        return
    items = ray.data.from_items(
        [{"task": t.model_dump_json()} for t in pending], override_num_blocks=len(pending)
    )
    written = _map(
        items,
        EmbedChunkFiles,
        (
            worker_keywords,
            identity,
            limiter,
            actor_threads(num_cpus, threads),
            text_column,
            role,
            rows_per_file,
            batch_size,
        ),
        batch_size=1,
        concurrency=concurrency,
        num_cpus=num_cpus,
    )
    try:
        for row in written.iter_rows():
            yield {"rows": int(row["rows"]), **{r: int(row[r]) for r in SUMMARY_COUNTS}}
    except Exception as exc:
        raise typed_error(exc) from None


def _resolve_keywords(
    keywords: dict[str, Any],
) -> tuple[dict[str, Any], AdaptedEmbeddingsSettings, PipelineIdentity]:
    """Resolve the settings and the adapter on the driver, once, for every worker.

    Returns:
        The workers' keywords (settings resolved, the adapter pinned as an object), the
        settings, and the identity every worker's pipeline must have.

    """
    _check_keywords(keywords)
    pipeline, pinned = bulk_pipeline(keywords)  # fails here, not in every actor
    settings: AdaptedEmbeddingsSettings = pinned["settings"]
    worker: dict[str, Any] = {"settings": settings}
    # Objects (an Adapter, an encoder) travel to the workers as they are; names and paths
    # are already in the settings.
    for name in ("source", "adapter"):
        value = pinned.get(name)
        if value is not None and not isinstance(value, str) and not hasattr(value, "__fspath__"):
            worker[name] = value
    return worker, settings, PipelineIdentity.of(pipeline)


def _check_keywords(keywords: dict[str, Any]) -> None:
    from adapted_embeddings.factory import PipelineOptions

    unknown = sorted(set(keywords) - set(PipelineOptions.model_fields))
    if unknown:
        raise ConfigurationError(
            f"unknown keyword {unknown[0]!r}; embed_dataset takes the keywords of "
            f"AdaptedEmbeddings: {', '.join(sorted(PipelineOptions.model_fields))}"
        )


def _fallback_limiter(
    settings: AdaptedEmbeddingsSettings, concurrency: int | None, tokens_per_minute: int | None
) -> str | None:
    """The job's :func:`provider_limiter`, or None when the gate never calls the provider."""
    if settings.gate.mode == "local":
        return None
    return provider_limiter(
        settings, max_concurrent=concurrency, tokens_per_minute=tokens_per_minute
    )


def _map(
    ds: ray.data.Dataset,
    worker: type,
    arguments: tuple[Any, ...],
    *,
    batch_size: int,
    concurrency: int,
    num_cpus: float,
) -> ray.data.Dataset:
    ray = require_ray()
    return ds.map_batches(
        worker,
        fn_constructor_args=arguments,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        zero_copy_batch=True,
    )


def actor_threads(num_cpus: float, threads: int | None = None) -> int:
    """The model threads of an actor reserving ``num_cpus``: ``threads``, else ``num_cpus``."""
    return threads or max(1, round(num_cpus))


def _missing_column(column: str, columns: list[str]) -> AdaptedEmbeddingsError:
    from adapted_embeddings.io import InputFileError

    return InputFileError(
        f"the dataset has no column {column!r}; its columns are: "
        + (", ".join(repr(c) for c in columns) or "(none)")
    )


__all__ = [
    "OUTPUT_COLUMNS",
    "ProviderRateLimiter",
    "RayRequestLimiter",
    "actor_threads",
    "connect",
    "embed_dataset",
    "embed_tasks",
    "limiter_snapshot",
    "provider_limiter",
    "typed_error",
]
