"""``adapt()`` runs where torch is not installed (the ONNX install learns too).

Learning is on by default (``learning.auto_adapt_every``), so an install without torch must
fit a domain adapter as well as embed. Pairs are stored here; a subprocess that makes torch,
transformers and sentence-transformers look uninstalled (as ``tests/test_torch_free.py``
does) runs ``adapt()`` on them, and the adapter it saves must load and translate here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.encoders import SentenceTransformerEncoder
from adapted_embeddings.learning.pairs import PairRecord, PairStore
from adapted_embeddings.registry import find_adapter
from adapted_embeddings.training.corpora import load_jeopardy

ADAPT_WITHOUT_TORCH = textwrap.dedent(
    """
    import json, sys
    BLOCKED = ("torch", "sentence_transformers", "transformers")
    for name in BLOCKED:
        sys.modules[name] = None  # as if not installed
    from pathlib import Path

    from adapted_embeddings.adapter import Adapter
    from adapted_embeddings.learning.adapt import AdaptOptions, adapt
    from adapted_embeddings.learning.pairs import PairStore
    from adapted_embeddings.registry import find_adapter
    from adapted_embeddings.settings import LearningSettings

    directory = Path(sys.argv[1])
    parent = Adapter.load(find_adapter(source="all-MiniLM-L6-v2", target="ada-002").path)
    report = adapt(
        PairStore(directory),
        parent=None,
        source=parent.source,
        target=parent.target,
        settings=LearningSettings(),
        options=AdaptOptions(fidelity_target=0.9),
        adapter_dir=directory / "adapters",
    )
    loaded = [name for name in BLOCKED if sys.modules.get(name) is not None]
    print(json.dumps({"loaded": loaded, "path": str(report.path), "switched": report.switched}))
    """
)


@pytest.mark.slow
def test_adapt_fits_and_saves_an_adapter_without_torch(tmp_path: Path) -> None:
    corpus = load_jeopardy()
    rows = np.random.default_rng(5).permutation(len(corpus))[:250]
    texts = [corpus.texts[i] for i in rows]
    source = SentenceTransformerEncoder().encode(texts)
    parent = Adapter.load(find_adapter(source="all-MiniLM-L6-v2", target="ada-002").path)
    PairStore(tmp_path).add(
        [
            PairRecord(text, source[i], corpus.ada[row], "document", parent.id, "fallback")
            for i, (text, row) in enumerate(zip(texts, rows, strict=True))
        ],
        source=parent.source,
        target=parent.target,
    )
    run = subprocess.run(
        [sys.executable, "-c", ADAPT_WITHOUT_TORCH, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["loaded"] == []
    # A cold start from 250 pairs: fitted and saved, with its memory of the pairs.
    assert found["switched"], found
    adapter = Adapter.load(found["path"])
    assert adapter.manifest.architecture.memory_rows > 0
    vectors, confidence = adapter.translate(source[:5])
    assert vectors.shape == (5, 1536) and np.all((confidence >= 0) & (confidence <= 1))
