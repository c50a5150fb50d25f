"""Adapter translate+confidence speed: one query, and per row in batches of 1,024 (medians).

    python benchmarks/adapter_speed.py [--rounds 15] [--calls 60] [--out PATH]
    python benchmarks/adapter_speed.py --instructions [--adapter NAME]   # needs valgrind
    python benchmarks/adapter_speed.py --memory    # with and without adapt()'s memory

On a shared machine run it with ``OPENBLAS_NUM_THREADS=1``: with every core busy, a
two-thread matrix product waits for a second core to free up and its time measures the
scheduler, not the product (the setting is recorded in the JSON).

Every registry adapter is timed through the public ``Adapter.translate`` (input checks
included) on real-shaped unit vectors. Beside them, in the same rounds, a bare float32
``384 x 1536`` matmul is timed as the machine's reference point: one row (a vector-matrix
product) for the single query and 1,024 rows for the batch. Adapters and references are
interleaved round by round, so load from other processes hits them alike; each figure is
the median over all rounds of each round's median.

Wall-clock time on a shared machine moves with the load, so ``--instructions`` also counts
the work: it runs one adapter's forward under ``valgrind --tool=callgrind`` (one BLAS
thread) and reports CPU instructions per single query and per batch row. Instruction counts
do not depend on what else the machine is doing.

Prints a table and writes ``benchmarks/results/adapter_speed.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "adapter_speed.json"
BATCH = 1024
DEFAULT_ADAPTER = "minilm-l6-to-ada-002"


def round_median(call: Callable[[], object], calls: int) -> float:
    """Median seconds of ``calls`` back-to-back calls (after one warm-up call)."""
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def unit_rows(rng: np.random.Generator, rows: int, dims: int) -> np.ndarray:
    """Random unit-length float32 rows."""
    batch = rng.standard_normal((rows, dims)).astype(np.float32)
    batch /= np.linalg.norm(batch, axis=1, keepdims=True)
    return batch


def time_adapters(rounds: int, calls: int) -> dict[str, object]:
    """Interleaved medians for every registry adapter and the two reference matmuls."""
    from adapted_embeddings import Adapter
    from adapted_embeddings.registry import list_adapters

    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((384, 1536)).astype(np.float32)
    reference_batch = unit_rows(rng, BATCH, 384)
    reference_row = reference_batch[0]
    jobs: dict[str, Callable[[], object]] = {
        "reference:row": lambda: reference_row @ matrix,
        "reference:batch": lambda: reference_batch @ matrix,
    }
    adapters = {}
    for entry in list_adapters():
        adapter = Adapter.load(entry.path)
        adapters[adapter.name] = (adapter, entry.path)
        batch = unit_rows(rng, BATCH, adapter.source.dimensions)
        jobs[f"{adapter.name}:one"] = lambda a=adapter, s=batch[0]: a.translate(s)
        jobs[f"{adapter.name}:batch"] = lambda a=adapter, b=batch: a.translate(b)
    samples: dict[str, list[float]] = {key: [] for key in jobs}
    for _ in range(rounds):
        for key, job in jobs.items():
            samples[key].append(round_median(job, calls if key.endswith(("one", "row")) else 8))
    median = {key: float(np.median(values)) for key, values in samples.items()}
    rows = []
    for name, (adapter, path) in adapters.items():
        arch = adapter.manifest.architecture
        rows.append(
            {
                "adapter": name,
                "flavor": adapter.flavor,
                "basis_rank": arch.basis_rank,
                "hidden_dim": arch.hidden_dim,
                "ood_rank": arch.ood_rank,
                "size_mb": round(sum(p.stat().st_size for p in path.iterdir()) / 1e6, 2),
                "single_query_ms": median[f"{name}:one"] * 1e3,
                "per_row_us_batch_1024": median[f"{name}:batch"] / BATCH * 1e6,
            }
        )
    return {
        "reference_row_matmul_ms": median["reference:row"] * 1e3,
        "reference_matmul_us_per_row": median["reference:batch"] / BATCH * 1e6,
        "adapters": rows,
    }


def time_memory(rounds: int, calls: int) -> dict[str, object]:
    """The default adapter with and without a full memory (what adapt() may add), interleaved.

    The memory's cost depends only on its shape, so it is filled with random unit rows:
    ``learning.memory.MEMORY_ROWS`` pairs, the most an adapted adapter remembers.
    """
    from adapted_embeddings import Adapter
    from adapted_embeddings.adapter.network import memory_shapes
    from adapted_embeddings.learning.memory import MEMORY_ROWS
    from adapted_embeddings.registry import find_adapter

    rng = np.random.default_rng(0)
    plain = Adapter.load(find_adapter(name=DEFAULT_ADAPTER).path)
    arch = plain.manifest.architecture.model_copy(
        update={"memory_rows": MEMORY_ROWS, "memory_step": 0.5}
    )
    weights = dict(plain.weights)
    for name, shape in memory_shapes(arch).items():
        weights[name] = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 2:
            weights[name] = unit_rows(rng, *shape)
    remembering = Adapter(plain.manifest.model_copy(update={"architecture": arch}), weights)
    batch = unit_rows(rng, BATCH, plain.source.dimensions)
    jobs: dict[str, Callable[[], object]] = {}
    for label, adapter in (("without", plain), ("with", remembering)):
        jobs[f"{label}:one"] = lambda a=adapter: a.translate(batch[0])
        jobs[f"{label}:batch"] = lambda a=adapter: a.translate(batch)
    samples: dict[str, list[float]] = {key: [] for key in jobs}
    for _ in range(rounds):
        for key, job in jobs.items():
            samples[key].append(round_median(job, calls if key.endswith("one") else 8))
    median = {key: float(np.median(values)) for key, values in samples.items()}
    return {
        "adapter": DEFAULT_ADAPTER,
        "memory_rows": MEMORY_ROWS,
        "single_query_ms": {k: median[f"{k}:one"] * 1e3 for k in ("without", "with")},
        "per_row_us_batch_1024": {
            k: median[f"{k}:batch"] / BATCH * 1e6 for k in ("without", "with")
        },
    }


# -- instruction counts under callgrind -----------------------------------------------------


def _run_workload(adapter_name: str, mode: str, repeats: int) -> None:
    """Load the adapter, warm up both paths, then run ``repeats`` forwards of ``mode``."""
    from adapted_embeddings import Adapter
    from adapted_embeddings.registry import find_adapter

    adapter = Adapter.load(find_adapter(name=adapter_name).path)
    batch = unit_rows(np.random.default_rng(0), BATCH, adapter.source.dimensions)
    adapter.translate(batch[0])
    adapter.translate(batch)
    work = batch[0] if mode == "one" else batch
    for _ in range(repeats):
        adapter.translate(work)


def _callgrind_total(adapter_name: str, mode: str, repeats: int) -> int:
    """Instructions executed by a whole process running ``repeats`` forwards."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0")
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--workload",
            adapter_name,
            mode,
            str(repeats),
        ]
        subprocess.run(command, check=True, env=env, capture_output=True)
        summary = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        assert summary is not None, "no totals line in the callgrind output"
        return int(summary.group(1))


def count_instructions(adapter_name: str) -> dict[str, float]:
    """Instructions per single query and per batch row: (run with N) - (run with 0), / N."""
    base = _callgrind_total(adapter_name, "one", 0)
    single_n, batch_n = 400, 4
    single = (_callgrind_total(adapter_name, "one", single_n) - base) / single_n
    batch = (_callgrind_total(adapter_name, "batch", batch_n) - base) / batch_n / BATCH
    return {"single_query_instructions": single, "per_row_instructions_batch_1024": batch}


def main() -> None:
    """Time every adapter (or count instructions for one) and write the JSON results."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--calls", type=int, default=60, help="single-query calls per round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--instructions", action="store_true", help="count under callgrind")
    parser.add_argument("--adapter", default=DEFAULT_ADAPTER, help="adapter to count")
    parser.add_argument("--workload", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory",
        action="store_true",
        help="time the default adapter with and without a full memory of pairs "
        "(writes results/adapter_speed_memory.json unless --out is given)",
    )
    args = parser.parse_args()
    if args.workload:
        name, mode, repeats = args.workload
        _run_workload(name, mode, int(repeats))
        return
    results: dict[str, object] = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_before": os.getloadavg(),
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        },
        "method": "median over rounds of per-round medians; adapters and references "
        "interleaved in every round",
    }
    if args.memory:
        timed_memory = time_memory(args.rounds, args.calls)
        results["memory"] = timed_memory
        for key in ("single_query_ms", "per_row_us_batch_1024"):
            print(f"{key}: {timed_memory[key]}")
        if args.out == RESULTS:
            args.out = RESULTS.with_name("adapter_speed_memory.json")
    elif args.instructions:
        counted = count_instructions(args.adapter)
        results["instructions"] = {"adapter": args.adapter, **counted}
        print(
            f"{args.adapter}: {counted['single_query_instructions'] / 1e6:.3f} M instructions "
            f"per single query, {counted['per_row_instructions_batch_1024'] / 1e6:.3f} M per "
            "row at batch 1,024 (callgrind, 1 BLAS thread)"
        )
        if args.out.exists():  # keep the timings already recorded in the same file
            previous = json.loads(args.out.read_text())
            previous["instructions"] = results["instructions"]
            results = previous
    else:
        timed = time_adapters(args.rounds, args.calls)
        results.update(timed)
        results["machine"]["load_average_after"] = os.getloadavg()  # type: ignore[index]
        print(
            f"{'adapter':32s} {'flavor':7s} {'r':>4s} {'H':>4s} {'MB':>5s} "
            f"{'1 query (ms)':>13s} {'per row @1024 (us)':>19s}"
        )
        for row in timed["adapters"]:  # type: ignore[attr-defined]
            print(
                f"{row['adapter']:32s} {row['flavor']:7s} {row['basis_rank']:4d} "
                f"{row['hidden_dim']:4d} {row['size_mb']:5.2f} {row['single_query_ms']:13.4f} "
                f"{row['per_row_us_batch_1024']:19.2f}"
            )
        print(
            f"{'reference 384x1536 matmul':54s} {timed['reference_row_matmul_ms']:13.4f} "
            f"{timed['reference_matmul_us_per_row']:19.2f}"
        )
        print(f"load average before/after: {results['machine']}")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
