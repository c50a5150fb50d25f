"""Adapter files: every damaged or hostile directory gets a clear error, and loading only
ever reads JSON and safetensors, so it cannot run code (no pickle, no torch.load).

Each test copies a real trained adapter into a temp directory and damages the copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import struct
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapted_embeddings.adapter import Adapter
from adapted_embeddings.errors import AdapterLoadError
from adapted_embeddings.registry import list_adapters

MANIFEST = "adapter.json"


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


@pytest.fixture
def copied(adapter: Adapter, tmp_path: Path) -> Path:
    """A byte-for-byte copy of the real adapter's directory."""
    assert adapter.path is not None
    target = tmp_path / "adapter-copy"
    shutil.copytree(adapter.path, target)
    return target


def manifest_of(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / MANIFEST).read_text()))


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest))


def weights_path(directory: Path) -> Path:
    return directory / manifest_of(directory)["weights_file"]


def replace_weights(directory: Path, blob: bytes, *, update_hash: bool) -> None:
    """Write new weight bytes; with update_hash the manifest vouches for them (a tamperer
    who also edits the manifest, or a file corrupted before its hash was recorded)."""
    weights_path(directory).write_bytes(blob)
    if update_hash:
        manifest = manifest_of(directory)
        manifest["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        write_manifest(directory, manifest)


def load_error(directory: Path) -> str:
    with pytest.raises(AdapterLoadError) as caught:
        Adapter.load(directory)
    return str(caught.value)


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any unpickling during these tests fails loudly instead of executing anything."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an adapter load tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(np, "load", refuse)
    torch = sys.modules.get("torch")
    if torch is not None:
        monkeypatch.setattr(torch, "load", refuse)


# -- the intact copy loads, and reads nothing but its JSON and safetensors ----------------

_watch = threading.local()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    opened = getattr(_watch, "opened", None)
    if opened is not None and event == "open" and isinstance(args[0], str | Path):
        opened.append(Path(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only inside watch()


@contextlib.contextmanager
def watch_opens() -> Iterator[list[Path]]:
    """Paths this thread opens inside the block (via the interpreter's audit hook)."""
    _watch.opened = []
    try:
        yield _watch.opened
    finally:
        _watch.opened = None


def test_an_intact_copy_loads_and_translates_like_the_original(
    adapter: Adapter, copied: Path
) -> None:
    loaded = Adapter.load(copied)
    assert loaded.id == adapter.id
    probe = np.random.default_rng(0).standard_normal((4, adapter.source.dimensions))
    np.testing.assert_array_equal(loaded.translate(probe)[0], adapter.translate(probe)[0])


def test_loading_opens_only_the_manifest_and_the_safetensors_file(copied: Path) -> None:
    marker = copied.parent / "pickle-ran"
    for name in ("model.pkl", "pytorch_model.bin", "weights.pt", "adapter.npy"):
        (copied / name).write_bytes(pickle.dumps(_Payload(marker)))

    with watch_opens() as opened:
        Adapter.load(copied)
        list_adapters(extra_dirs=[copied.parent])

    inside = {p.resolve().relative_to(copied.resolve()) for p in opened if copied in p.parents}
    assert inside == {Path(MANIFEST), Path(manifest_of(copied)["weights_file"])}
    assert not marker.exists()


# -- damaged and hostile directories ------------------------------------------------------


def test_truncated_weights_fail_the_hash_check(copied: Path) -> None:
    blob = weights_path(copied).read_bytes()
    replace_weights(copied, blob[: len(blob) // 2], update_hash=False)
    message = load_error(copied)
    assert "sha256" in message and "corrupt or was modified" in message
    # the refused file's own hash is never shown (it would fingerprint whatever it is)
    assert hashlib.sha256(blob[: len(blob) // 2]).hexdigest() not in message


@pytest.mark.parametrize("keep", [0, 7, 8, 200, 0.5, 0.999])
def test_truncated_safetensors_is_a_clear_error_even_when_the_hash_matches(
    copied: Path, keep: float
) -> None:
    blob = weights_path(copied).read_bytes()
    cut = int(len(blob) * keep) if isinstance(keep, float) else keep
    replace_weights(copied, blob[:cut], update_hash=True)
    assert "not a valid safetensors file" in load_error(copied)


def test_one_flipped_bit_in_the_weights_is_caught(copied: Path) -> None:
    blob = bytearray(weights_path(copied).read_bytes())
    blob[-3] ^= 0x01  # inside the last tensor's data: still parses, values differ
    replace_weights(copied, bytes(blob), update_hash=False)
    assert "sha256" in load_error(copied)


@pytest.mark.parametrize(
    "header",
    [
        b"{not json",
        b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 99999]}}',
        b'{"x": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 8]}}',
        b'{"__metadata__": {"format": "pt"}, "x": {"dtype": "OBJ", "shape": [1], '
        b'"data_offsets": [0, 8]}}',
    ],
    ids=["not-json", "offsets-past-end", "absurd-shape", "unknown-dtype"],
)
def test_corrupt_safetensors_headers_are_rejected(copied: Path, header: bytes) -> None:
    blob = struct.pack("<Q", len(header)) + header + b"\0" * 8
    replace_weights(copied, blob, update_hash=True)
    assert "not a valid safetensors file" in load_error(copied)


def test_a_header_length_of_exabytes_is_rejected_without_allocating(copied: Path) -> None:
    replace_weights(copied, struct.pack("<Q", 2**62) + b"{}", update_hash=True)
    assert "not a valid safetensors file" in load_error(copied)


def test_a_pickle_posing_as_safetensors_is_never_unpickled(copied: Path) -> None:
    marker = copied.parent / "pickle-ran"
    replace_weights(copied, pickle.dumps(_Payload(marker)), update_hash=True)
    assert "not a valid safetensors file" in load_error(copied)
    assert not marker.exists()


def test_valid_safetensors_with_the_wrong_tensors_names_them(
    copied: Path, adapter: Adapter
) -> None:
    from safetensors.numpy import save

    weights = dict(adapter.weights)
    weights["backdoor"] = np.zeros(3, np.float32)
    del weights["decoder.bias"]
    replace_weights(copied, save(weights), update_hash=True)
    message = load_error(copied)
    assert "missing keys ['decoder.bias']" in message and "unexpected keys ['backdoor']" in message


@pytest.mark.parametrize("poison", ["nan", "inf", "int"])
def test_non_finite_or_non_float_tensors_are_rejected(
    copied: Path, adapter: Adapter, poison: str
) -> None:
    from safetensors.numpy import save

    weights = {name: np.array(t) for name, t in adapter.weights.items()}
    if poison == "int":
        weights["decoder.bias"] = weights["decoder.bias"].astype(np.int32)
    else:
        weights["decoder.bias"][3] = np.nan if poison == "nan" else np.inf
    replace_weights(copied, save(weights), update_hash=True)
    message = load_error(copied)
    assert "decoder.bias" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m["source"].update(dimensions=512), "does not match the source space"),
        (lambda m: m["target"].update(dimensions=1536), "does not match the target space"),
        (lambda m: m["architecture"].update(input_dim=512), "input_dim 512"),
        (lambda m: m["architecture"].update(basis_rank=7), "has shape"),
        (lambda m: m["architecture"].update(hidden_dim=200), "has shape"),
        (lambda m: m["architecture"].update(type="transformer"), "architecture.type"),
        (lambda m: m.update(format_version=2), "format_version"),
        (lambda m: m.update(unexpected_field=True), "unexpected_field"),
        (lambda m: m.update(weights_file="../../outside.safetensors"), "weights_file"),
        (lambda m: m.update(weights_file="model.pkl"), "weights_file"),
        (lambda m: m.update(weights_sha256="abc"), "weights_sha256"),
        (lambda m: m.pop("architecture"), "architecture"),
        (lambda m: m.update(recommended_threshold=1.5), "recommended_threshold"),
    ],
    ids=[
        "source-dims",
        "target-dims",
        "input-dim",
        "rank-vs-weights",
        "hidden-vs-weights",
        "unknown-architecture",
        "future-format",
        "extra-field",
        "path-traversal",
        "pickle-weights-file",
        "bad-hash",
        "no-architecture",
        "threshold-range",
    ],
)
def test_inconsistent_manifests_are_clear_errors(
    copied: Path, change: Callable[[dict[str, Any]], Any], expected: str
) -> None:
    manifest = manifest_of(copied)
    change(manifest)
    write_manifest(copied, manifest)
    assert expected in load_error(copied)


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"[1, 2, 3]", b"\xff\xfe\x00garbage", pickle.dumps({"name": "x"})],
    ids=["empty", "text", "json-list", "bad-utf8", "pickle"],
)
def test_an_unreadable_manifest_is_a_clear_error(copied: Path, content: bytes) -> None:
    (copied / MANIFEST).write_bytes(content)
    message = load_error(copied)
    assert MANIFEST in message


@pytest.mark.parametrize("missing", ["manifest", "weights", "directory"])
def test_missing_files_are_named(copied: Path, missing: str) -> None:
    if missing == "manifest":
        (copied / MANIFEST).unlink()
        assert f"no {MANIFEST}" in load_error(copied)
    elif missing == "weights":
        weights_path(copied).unlink()
        assert "weights file is missing" in load_error(copied)
    else:
        assert "does not exist" in load_error(copied / "nowhere")


def test_a_broken_adapter_does_not_hide_the_others_from_the_registry(
    copied: Path, adapter: Adapter, tmp_path: Path
) -> None:
    broken = copied.parent / "broken-adapter"
    shutil.copytree(copied, broken)
    (broken / MANIFEST).write_text("{")
    names = {entry.name for entry in list_adapters(extra_dirs=[copied.parent])}
    assert adapter.name in names


# -- hostile files: symlinks, pipes, devices and huge files are refused before reading ---


def loads_within(directory: Path, seconds: float, unblock: Path | None = None) -> str:
    """The AdapterLoadError message of loading ``directory`` in a worker thread; fails if it
    takes longer than ``seconds`` (then opens ``unblock``, a FIFO, for writing so that a
    reader stuck in open() returns and the thread can end)."""
    outcome: dict[str, BaseException] = {}

    def load() -> None:
        try:
            Adapter.load(directory)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        if unblock is not None:
            with contextlib.suppress(OSError):
                os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail(f"loading {directory} did not finish within {seconds} s")
    error = outcome.get("error")
    assert isinstance(error, AdapterLoadError), f"expected AdapterLoadError, got {error!r}"
    return str(error)


def point_at(link: Path, target: str | Path) -> None:
    link.unlink()
    link.symlink_to(target)


def test_weights_symlinked_to_dev_zero_are_refused(copied: Path) -> None:
    point_at(weights_path(copied), "/dev/zero")
    message = loads_within(copied, 10)
    assert "adapter weights file" in message and "is a symbolic link" in message


def test_a_weights_fifo_is_refused_without_hanging(copied: Path) -> None:
    path = weights_path(copied)
    path.unlink()
    os.mkfifo(path)
    message = loads_within(copied, 10, unblock=path)
    assert str(path) in message and "FIFO" in message


def test_a_manifest_fifo_is_refused_and_does_not_hang_the_listing(copied: Path) -> None:
    manifest = copied / MANIFEST
    manifest.unlink()
    os.mkfifo(manifest)
    assert "FIFO" in loads_within(copied, 10, unblock=manifest)
    listed: list[Path] = []
    worker = threading.Thread(
        target=lambda: listed.extend(e.path for e in list_adapters(extra_dirs=[copied.parent])),
        daemon=True,
    )
    worker.start()
    worker.join(20)
    if worker.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(manifest, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("list_adapters hung on a FIFO manifest")
    assert listed and copied not in listed  # the others are listed, the FIFO one skipped


def test_a_3_gb_sparse_weights_file_is_refused_before_reading(copied: Path) -> None:
    path = weights_path(copied)
    with path.open("r+b") as handle:
        handle.truncate(3 * 10**9)  # sparse: costs no disk, would cost 3 GB of memory
    tracemalloc.start()
    try:
        message = loads_within(copied, 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "3,000,000,000 bytes" in message and "declared architecture" in message
    assert peak < 50 * 2**20, f"loading allocated {peak / 2**20:.0f} MiB"


def test_an_architecture_inflated_to_admit_a_huge_file_is_still_capped(copied: Path) -> None:
    manifest = manifest_of(copied)
    for space in ("source", "target"):
        manifest[space]["dimensions"] = 200_000
    manifest["architecture"].update(input_dim=200_000, output_dim=200_000, basis_rank=20_000)
    write_manifest(copied, manifest)
    with weights_path(copied).open("r+b") as handle:
        handle.truncate(3 * 10**9)
    message = loads_within(copied, 10)
    assert "3,000,000,000 bytes" in message and f"{2**30:,}" in message


def test_an_oversized_manifest_is_refused_before_parsing(copied: Path) -> None:
    manifest = copied / MANIFEST
    manifest.write_bytes(manifest.read_bytes() + b" " * 2 * 2**20)  # still valid JSON
    message = loads_within(copied, 10)
    assert MANIFEST in message and "refusing to read it" in message


@pytest.mark.parametrize("which", ["manifest", "weights"])
def test_symlinks_to_etc_passwd_are_refused_and_nothing_about_the_target_is_shown(
    copied: Path, which: str
) -> None:
    target = Path("/etc/passwd")
    link = copied / MANIFEST if which == "manifest" else weights_path(copied)
    point_at(link, target)
    message = loads_within(copied, 10)
    assert str(link) in message and "is a symbolic link" in message
    assert hashlib.sha256(target.read_bytes()).hexdigest() not in message
    assert target.read_text().splitlines()[0] not in message  # nor any of its content


def test_a_symlink_to_a_valid_copy_of_the_weights_is_refused_too(copied: Path) -> None:
    """Even a link to the right bytes: the directory must hold the file itself."""
    path = weights_path(copied)
    elsewhere = copied.parent / "weights-elsewhere.safetensors"
    shutil.copyfile(path, elsewhere)
    point_at(path, elsewhere)
    assert "is a symbolic link" in loads_within(copied, 10)


def test_weights_that_are_a_directory_are_refused(copied: Path) -> None:
    path = weights_path(copied)
    path.unlink()
    path.mkdir()
    assert "is a directory" in loads_within(copied, 10)
