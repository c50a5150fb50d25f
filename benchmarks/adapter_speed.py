"""Adapter translate+confidence speed: one query, and per row in batches of 1,024 (medians).

    python benchmarks/adapter_speed.py [--repeats 200]

Every registry adapter is timed through the public ``Adapter.translate`` (input checks
included) on real MiniLM/e5-shaped unit vectors. A bare float32 ``384 x 1536`` matmul is
timed beside it as the machine's reference point. Prints a table and writes
``benchmarks/results/adapter_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from adapted_embeddings import Adapter
from adapted_embeddings.registry import list_adapters

RESULTS = Path(__file__).parent / "results" / "adapter_speed.json"


def median_seconds(fn: object, repeats: int) -> float:
    call = fn  # type: ignore[assignment]
    for _ in range(max(3, repeats // 10)):
        call()  # type: ignore[operator]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows: list[dict[str, object]] = []
    reference_batch = rng.standard_normal((1024, 384)).astype(np.float32)
    reference_matrix = rng.standard_normal((384, 1536)).astype(np.float32)
    reference = median_seconds(lambda: reference_batch @ reference_matrix, args.repeats // 4)
    for entry in list_adapters():
        adapter = Adapter.load(entry.path)
        d = adapter.source.dimensions
        batch = rng.standard_normal((1024, d)).astype(np.float32)
        batch /= np.linalg.norm(batch, axis=1, keepdims=True)
        single = batch[0]
        one = median_seconds(lambda a=adapter, s=single: a.translate(s), args.repeats)
        many = median_seconds(lambda a=adapter, b=batch: a.translate(b), args.repeats // 4)
        arch = adapter.manifest.architecture
        rows.append(
            {
                "adapter": adapter.name,
                "flavor": adapter.flavor,
                "basis_rank": arch.basis_rank,
                "hidden_dim": arch.hidden_dim,
                "ood_rank": arch.ood_rank,
                "size_mb": round(
                    sum(p.stat().st_size for p in entry.path.iterdir() if p.is_file()) / 1e6, 2
                ),
                "single_query_ms": one * 1e3,
                "per_row_us_batch_1024": many / 1024 * 1e6,
            }
        )
    print(
        f"{'adapter':32s} {'flavor':7s} {'r':>4s} {'H':>4s} {'MB':>5s} "
        f"{'1 query (ms)':>13s} {'per row @1024 (us)':>19s}"
    )
    for row in rows:
        print(
            f"{row['adapter']:32s} {row['flavor']:7s} {row['basis_rank']:4d} "
            f"{row['hidden_dim']:4d} {row['size_mb']:5.2f} {row['single_query_ms']:13.4f} "
            f"{row['per_row_us_batch_1024']:19.2f}"
        )
    print(
        f"reference: bare float32 1024x384 @ 384x1536 matmul = {reference / 1024 * 1e6:.2f} us/row"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {"processor": platform.processor(), "cpus": os.cpu_count()},
                "reference_matmul_us_per_row": reference / 1024 * 1e6,
                "adapters": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
