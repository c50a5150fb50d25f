"""ONNX Runtime inference for a local sentence-transformers model: the same vectors, faster.

The graph is exported from the model's own local weights on first use (that needs torch,
once) and cached on disk, in a private directory, under a name bound to the SHA-256 of the
files it came from. Later loads read the cached graph with ``onnxruntime`` and the model's
``tokenizer.json`` with ``tokenizers``: they never import torch or transformers.

What sentence-transformers does around the transformer is done the same way here: the same
fast tokenizer, truncation at the model's ``max_seq_length`` word pieces, mean pooling over
the attention mask (inside the graph), and L2 normalisation. The tests hold the two
backends to a cosine of at least 0.9999 per text and identical token counts.

Only the common layout is supported: ``Transformer`` → ``Pooling`` (mean) → optional
``Normalize``, in a local directory with ``tokenizer.json`` and safetensors weights.
:func:`unsupported_reason` says why another model is not, and the encoder uses torch for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import stat
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from adapted_embeddings.errors import AdaptedEmbeddingsError, ConfigurationError
from adapted_embeddings.extras import require

if TYPE_CHECKING:
    import onnxruntime
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "onnx"]
"""``auto``: ONNX Runtime when ``onnxruntime`` is installed and the model supports it."""

BACKENDS: tuple[Backend, ...] = ("auto", "torch", "onnx")

EXPORT_FORMAT = "1"
"""Version of the exported graph's layout; part of the cache key, so a change re-exports."""

OPSET = 17
MAX_PADDING = 0.25
"""Padding allowed per batch, as a share of its real tokens (see :func:`length_batches`)."""
_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
"""The graph's inputs, in order; models without token types take the first two."""
WEIGHTS_FILE = "model.safetensors"
_KEY_FILES = (WEIGHTS_FILE, "config.json", "modules.json", "1_Pooling/config.json")
"""The files the graph is built from; their bytes are hashed into the cache key."""


class OnnxExportError(AdaptedEmbeddingsError, RuntimeError):
    """The ONNX graph could not be exported, cached or loaded (the encoder falls back to torch)."""


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` can be imported (checked without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def default_onnx_dir() -> Path:
    """Where exported graphs are cached: ``onnx/`` under the user's cache directory."""
    from adapted_embeddings.settings import default_cache_dir

    return default_cache_dir() / "onnx"


def unsupported_reason(location: str | Path) -> str | None:
    """Why the model at ``location`` cannot run on ONNX Runtime here, or None if it can."""
    directory = Path(location)
    if not directory.is_dir():
        return f"{location} is not a local model directory"
    for name in ("tokenizer.json", WEIGHTS_FILE, "config.json", "sentence_bert_config.json"):
        if not (directory / name).is_file():
            return f"{directory} has no {name}"
    try:
        modules = json.loads((directory / "modules.json").read_text(encoding="utf-8"))
        pooling = json.loads((directory / "1_Pooling/config.json").read_text(encoding="utf-8"))
        types = [str(module["type"]) for module in modules]
        paths = [module.get("path") or "" for module in modules]
        modes = sorted(
            key for key, value in pooling.items() if key.startswith("pooling_mode") and value
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"cannot read the module layout of {directory}: {exc!r}"
    # Class paths moved between sentence-transformers versions; the class names did not.
    names = [t.rsplit(".", 1)[-1] if t.startswith("sentence_transformers.") else t for t in types]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return f"{directory} is not a Transformer, Pooling, Normalize model: {types}"
    if paths[:2] != ["", "1_Pooling"]:
        return f"{directory} keeps its modules in other directories: {paths}"
    if modes != ["pooling_mode_mean_tokens"]:
        return f"{directory} pools with {modes}, not only mean pooling"
    if max_seq_length(directory) is None:
        return f"{directory} sets no max_seq_length in sentence_bert_config.json"
    return None


def max_seq_length(location: str | Path) -> int | None:
    """The model's window in word pieces, from its ``sentence_bert_config.json``."""
    config = Path(location) / "sentence_bert_config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def graph_path(
    location: str | Path,
    key: str,
    *,
    name: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Where the graph of the model at ``location`` is cached: ``<name>-<key[:16]>.onnx``.

    Args:
        location: The model directory.
        key: Its :func:`graph_key`.
        name: The model's name (default: the directory's), lower-cased, last part only.
        cache_dir: Directory of exported graphs (default :func:`default_onnx_dir`).

    """
    stem = re.sub(r"[^a-z0-9._-]+", "-", Path(name or location).name.lower()).strip(".-")
    return Path(cache_dir or default_onnx_dir()) / f"{stem or 'model'}-{key[:16]}.onnx"


def graph_key(location: str | Path) -> str:
    """SHA-256 of the export format and of the weights and configuration files, in order."""
    digest = hashlib.sha256(f"adapted-embeddings onnx export {EXPORT_FORMAT}\0".encode())
    for name in _KEY_FILES:
        digest.update(f"{name}\0".encode())
        with open(Path(location) / name, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class OnnxSentenceModel:
    """A sentence-transformers model as an ONNX Runtime session and a fast tokenizer.

    Build it with :meth:`load`, which exports the graph first if it is not cached.
    ``encode`` and ``token_counts`` are safe to call from many threads.
    """

    def __init__(
        self,
        session: onnxruntime.InferenceSession,
        tokenizer: Tokenizer,
        *,
        max_seq_length: int,
        batch_size: int = 64,
        max_padding: float = MAX_PADDING,
    ) -> None:
        """Wrap a loaded session and tokenizer; :meth:`load` is the usual way in."""
        self.session = session
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.max_padding = max_padding
        self._inputs = [node.name for node in session.get_inputs()]
        self.dimensions = int(session.get_outputs()[0].shape[-1])
        # A Tokenizer is not documented as thread-safe while its truncation is switched,
        # so the truncating and the counting tokenizers are separate objects.
        self._truncating = tokenizer
        self._counting = tokenizer.__class__.from_str(tokenizer.to_str())
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_seq_length)
        self._counting.no_padding()
        self._counting.no_truncation()
        # One forward at a time, as for torch: parallel runs would oversubscribe the cores.
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        location: str | Path,
        *,
        name: str | None = None,
        batch_size: int = 64,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> OnnxSentenceModel:
        """Load the cached graph of the model at ``location``, exporting it first if needed.

        Args:
            location: Local sentence-transformers model directory.
            name: The model's name, which starts the cached file's name (default: the
                directory's name).
            batch_size: Texts per forward pass.
            threads: ONNX Runtime intra-op threads; None lets it use one per physical core.
            cache_dir: Directory of exported graphs (default :func:`default_onnx_dir`).

        Raises:
            ConfigurationError: The model's layout is not supported (see
                :func:`unsupported_reason`).
            MissingExtraError: ``onnxruntime`` is not installed.
            OnnxExportError: The graph could not be exported, cached or loaded.

        """
        reason = unsupported_reason(location)
        if reason is not None:
            raise ConfigurationError(f"cannot run on ONNX Runtime: {reason}")
        require("onnxruntime", "onnx", needed_for="the ONNX Runtime encoder backend")
        from tokenizers import Tokenizer

        directory = Path(location)
        key = graph_key(directory)
        path = graph_path(directory, key, name=name, cache_dir=cache_dir)
        try:
            session = _checked_session(cached_graph(directory, path, key), key, threads)
        except OnnxExportError as exc:
            if not path.is_file():
                raise
            # A damaged or foreign file under our name: export afresh, once.
            logger.warning("exporting %s again: %s", directory, exc)
            path.unlink()
            session = _checked_session(cached_graph(directory, path, key), key, threads)
        window = max_seq_length(directory)
        assert window is not None  # unsupported_reason checked it
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        return cls(session, tokenizer, max_seq_length=window, batch_size=batch_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts as unit-length float32 vectors, row-aligned with ``texts``.

        Texts are sorted by length and batched so that padding stays small (see
        :func:`length_batches`); a text's vector does not depend on its batch.
        """
        texts = list(texts)
        vectors = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return vectors
        encodings = self._truncating.encode_batch(texts)
        lengths = [len(encoding.ids) for encoding in encodings]
        with self._lock:
            for rows in length_batches(lengths, self.batch_size, self.max_padding):
                feed = _padded([encodings[i] for i in rows])
                (pooled,) = self.session.run(None, {name: feed[name] for name in self._inputs})
                vectors[rows] = pooled
        # F.normalize's eps: an all-zero row stays zero rather than becoming NaN.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """Untruncated token count of each text, special tokens included."""
        encodings = self._counting.encode_batch(list(texts))
        return np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))


def length_batches(
    lengths: Sequence[int], batch_size: int, max_padding: float = MAX_PADDING
) -> list[list[int]]:
    """Indices of texts grouped longest first, at most ``batch_size`` and little padding a batch.

    A batch is padded to its longest text. Fixed batches of a skewed corpus (a few long
    texts among many short ones) spend most of their work on padding: three times the real
    tokens for 300 docstring heads at batch 64. A batch here also ends before its padded
    size would exceed ``1 + max_padding`` times its real tokens; ONNX Runtime, unlike
    torch, loses next to nothing to running more, smaller batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    real = 0  # the batch's tokens before padding
    for index in order:
        padded = lengths[batch[0]] * (len(batch) + 1) if batch else 0
        if batch and (
            len(batch) == batch_size or padded > (1 + max_padding) * (real + lengths[index])
        ):
            batches.append(batch)
            batch, real = [], 0
        batch.append(index)
        real += lengths[index]
    if batch:
        batches.append(batch)
    return batches


def _padded(encodings: Sequence[Any]) -> dict[str, np.ndarray]:
    """A batch of tokenizer encodings as right-padded int64 arrays (pad id 0)."""
    width = max(len(encoding.ids) for encoding in encodings)
    shape = (len(encodings), width)
    batch = {name: np.zeros(shape, np.int64) for name in _INPUT_NAMES}
    for row, encoding in enumerate(encodings):
        length = len(encoding.ids)
        batch["input_ids"][row, :length] = encoding.ids
        batch["attention_mask"][row, :length] = 1
        batch["token_type_ids"][row, :length] = encoding.type_ids
    return batch


def _checked_session(path: Path, key: str, threads: int | None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session of ``path``, checked to be the graph exported under ``key``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning workers burn the cores other threads and processes need between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise OnnxExportError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    found = session.get_modelmeta().custom_metadata_map.get("graph_key")
    if found != key:
        raise OnnxExportError(f"{path} was not exported from these weights (key {found})")
    return session


def cached_graph(location: Path, path: Path, key: str) -> Path:
    """``path``, the cached graph of the model at ``location``, exported there if missing.

    The file is written to a temporary name in the same private (0700) directory and
    renamed into place, so a reader never sees half a graph and concurrent exports
    simply replace one another with the same content.

    Raises:
        OnnxExportError: The directory is not private, or the export failed.

    """
    directory = _private_directory(path.parent)
    if path.is_file():
        return path
    logger.info("exporting %s to ONNX (once; cached in %s)", location, directory)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".export-", suffix=".onnx")
    os.close(descriptor)
    try:
        export_graph(location, Path(temporary), metadata={"graph_key": key})
        os.replace(temporary, path)
    except Exception as exc:
        raise OnnxExportError(f"exporting {location} to ONNX failed: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return path


def _private_directory(directory: Path) -> Path:
    """Create ``directory`` with mode 0700, or check that an existing one is private and ours."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
        if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) != 0o700:
            directory.chmod(0o700)  # ours: drop any group or other bits (umask, setgid parent)
            info = directory.stat()
    except OSError as exc:
        raise OnnxExportError(f"cannot create the ONNX cache directory {directory}: {exc}") from exc
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise OnnxExportError(f"ONNX cache directory {directory} is open to others or not yours")
    return directory


def export_graph(location: Path, destination: Path, *, metadata: dict[str, str]) -> None:
    """Export transformer + mean pooling of the model at ``location`` to ``destination``.

    Needs torch, transformers and onnx. The attention is exported in its eager form, which
    ONNX Runtime fuses into its own attention kernel when it loads the graph.
    """
    import inspect

    import onnx
    import torch
    from transformers import AutoModel

    from adapted_embeddings.encoders import quiet_model_loading

    with quiet_model_loading():
        transformer = AutoModel.from_pretrained(str(location), attn_implementation="eager")
    takes_types = "token_type_ids" in inspect.signature(transformer.forward).parameters
    names = list(_INPUT_NAMES if takes_types else _INPUT_NAMES[:2])
    # Trace with a padded row, so the masking path is the one recorded.
    input_ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    example = (input_ids, (input_ids != 0).long(), torch.zeros_like(input_ids))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's and the legacy exporter's notices
        torch.onnx.export(
            _mean_pooled(transformer).eval(),
            example[: len(names)],
            str(destination),
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter's graph fuses fully in ONNX Runtime
        )
    graph = onnx.load(str(destination))
    for name, value in metadata.items():
        graph.metadata_props.add(key=name, value=value)
    onnx.save(graph, str(destination))


def _mean_pooled(transformer: Any) -> Any:
    """``transformer`` followed by sentence-transformers' mean pooling, as one torch module."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            features = dict(zip(_INPUT_NAMES, inputs, strict=False))
            hidden = self.transformer(**features).last_hidden_state
            mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return MeanPooled()
