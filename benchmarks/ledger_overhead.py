"""What the usage ledger costs the hot path: pipeline throughput with and without it.

Run:  python benchmarks/ledger_overhead.py [--texts 1000] [--batch 32] [--repeats 7]
Writes benchmarks/results/ledger_overhead.json and prints a table.

Two pipelines, identical but for ``usage.enabled``, embed the same Python docstrings in
calls of ``--batch`` texts (a server request's size), back to back in alternating order
each repetition, so machine noise hits both alike:

* ``cache hits``: every text already cached (the fastest path, where a fixed cost per call
  shows most);
* ``local encode``: every text a cache miss, encoded by MiniLM and translated (a fresh cache
  directory per pipeline and repetition).

Both run in local mode, so no provider time hides the difference. Reported: median texts/s
of each, and the median over repetitions of the ratio (with ledger / without). The ledger's
background flush runs during the timed calls, as it would in production.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from extra_corpora import load_stdlib_docstrings

from adapted_embeddings.langchain import AdaptedEmbeddings
from adapted_embeddings.settings import load_settings

RESULTS = Path(__file__).parent / "results" / "ledger_overhead.json"


def embedder(cache_dir: Path, ledger: bool) -> AdaptedEmbeddings:
    settings = load_settings(usage={"enabled": ledger, "flush_seconds": 1.0})
    return AdaptedEmbeddings(mode="local", cache_dir=cache_dir, settings=settings)


def throughput(embeddings: AdaptedEmbeddings, texts: list[str], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        embeddings.embed_with_info(texts[i : i + batch])
    return len(texts) / (time.perf_counter() - start)


def measure(
    scenario: str, texts: list[str], batch: int, repeats: int, root: Path
) -> dict[str, Any]:
    rates: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(repeats):
        order = [True, False] if repeat % 2 == 0 else [False, True]
        for ledger in order:
            if scenario == "cache hits":
                directory = root / f"warm-{ledger}"
                embeddings = embedder(directory, ledger)
                if repeat == 0:
                    embeddings.embed_with_info(texts)  # fill the cache once
            else:
                embeddings = embedder(root / f"cold-{ledger}-{repeat}", ledger)
            rates[ledger].append(throughput(embeddings, texts, batch))
    ratios = np.array(rates[True]) / np.array(rates[False])
    return {
        "scenario": scenario,
        "with_ledger_texts_per_s": float(np.median(rates[True])),
        "without_ledger_texts_per_s": float(np.median(rates[False])),
        "median_ratio": float(np.median(ratios)),
        "ratios": [round(float(r), 4) for r in ratios],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    texts = load_stdlib_docstrings(args.texts)
    embedder(Path(tempfile.mkdtemp()), False).pipeline.warm_up()  # load the model untimed
    with tempfile.TemporaryDirectory() as root:
        rows = [
            measure(scenario, texts, args.batch, args.repeats, Path(root))
            for scenario in ("cache hits", "local encode")
        ]
    print(f"{len(texts)} texts in calls of {args.batch}, {args.repeats} repetitions")
    print(f"{'scenario':<14}{'without':>12}{'with ledger':>14}{'ratio':>8}")
    for row in rows:
        print(
            f"{row['scenario']:<14}{row['without_ledger_texts_per_s']:>10.0f}/s"
            f"{row['with_ledger_texts_per_s']:>12.0f}/s{row['median_ratio']:>8.3f}"
        )
    result = {
        "command": "python " + " ".join(sys.argv),
        "texts": len(texts),
        "batch": args.batch,
        "repeats": args.repeats,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
