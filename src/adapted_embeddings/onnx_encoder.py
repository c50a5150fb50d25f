"""ONNX Runtime inference for a local sentence-transformers model: the same vectors, faster.

The graph is built on first use from the model's own safetensors weights, with numpy and
``onnx`` (no torch, no transformers; :func:`bert_graph`), and cached on disk, in a private
directory, under a name bound to the SHA-256 of the files it came from. Inference reads it
with ``onnxruntime`` and the model's ``tokenizer.json`` with ``tokenizers``, so an install
without torch embeds.

What sentence-transformers does around the transformer is done the same way here: the same
fast tokenizer, truncation at the model's ``max_seq_length`` word pieces, mean pooling over
the attention mask (inside the graph), and L2 normalisation. The tests hold the two
backends to a cosine of at least 0.9999 per text and identical token counts.

Only the common layout is supported: a BERT ``Transformer`` → ``Pooling`` (mean) → optional
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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from adapted_embeddings.errors import AdaptedEmbeddingsError, ConfigurationError
from adapted_embeddings.extras import require

if TYPE_CHECKING:
    import onnx
    import onnxruntime
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "onnx"]
"""``auto``: ONNX Runtime when ``onnxruntime`` is installed and the model supports it."""

BACKENDS: tuple[Backend, ...] = ("auto", "torch", "onnx")

EXPORT_FORMAT = "2"
"""Version of the exported graph's layout; part of the cache key, so a change re-exports."""

OPSET = 17
MAX_PADDING = 0.25
"""Padding allowed per batch, as a share of its real tokens (see :func:`length_batches`)."""
BATCH_TOKENS = 4096
"""Word pieces per forward pass, padding included (``encoder.batch_tokens``). It bounds a
pass's activations: MiniLM's attention scores alone are 12 heads x n x n floats a text, 3 MB
at 256 word pieces, so 16 such texts hold ~50 MB where a batch of 256 would hold 800 MB.
Speed does not depend on it: 53 texts of 256 word pieces ran at 7.4-7.8 texts/s with
budgets from 1,024 to 65,536 (2 threads, loaded machine)."""
_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
"""The graph's inputs."""
_QKV = ("query", "key", "value")
_FUSED_OPS = {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"}
"""ONNX Runtime's contrib operators (domain ``com.microsoft``) the graph is built from."""
SUPERSEDED_AFTER = 86_400.0
"""Seconds after its export that a graph of other weights under the same name may be deleted."""
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
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        architecture = (
            config.get("model_type"),
            config.get("hidden_act", "gelu"),
            config.get("position_embedding_type", "absolute"),
        )
    except (OSError, ValueError, AttributeError) as exc:
        return f"cannot read {directory / 'config.json'}: {exc!r}"
    if architecture != ("bert", "gelu", "absolute"):
        return f"{directory} is not a BERT with GELU and absolute positions: {architecture}"
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
        batch_tokens: int = BATCH_TOKENS,
        max_padding: float = MAX_PADDING,
    ) -> None:
        """Wrap a loaded session and tokenizer; :meth:`load` is the usual way in."""
        self.session = session
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
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
        batch_tokens: int = BATCH_TOKENS,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> OnnxSentenceModel:
        """Load the cached graph of the model at ``location``, exporting it first if needed.

        Args:
            location: Local sentence-transformers model directory.
            name: The model's name, which starts the cached file's name (default: the
                directory's name).
            batch_size: Most texts per forward pass.
            batch_tokens: Most word pieces per forward pass, padding included.
            threads: ONNX Runtime intra-op threads; None: the process's
                :func:`set_threads`, else one per physical core.
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
        return cls(
            session,
            tokenizer,
            max_seq_length=window,
            batch_size=batch_size,
            batch_tokens=batch_tokens,
        )

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
            batches = length_batches(
                lengths, self.batch_size, self.max_padding, max_tokens=self.batch_tokens
            )
            for rows in batches:
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
    lengths: Sequence[int],
    batch_size: int,
    max_padding: float = MAX_PADDING,
    *,
    max_tokens: int = BATCH_TOKENS,
) -> list[list[int]]:
    """Indices of texts grouped longest first, by a token budget, with little padding a batch.

    A batch is padded to its longest text. Fixed batches of a skewed corpus (a few long
    texts among many short ones) spend most of their work on padding: three times the real
    tokens for 300 docstring heads at batch 64. A batch here ends at ``batch_size`` texts,
    before its padded size would pass ``max_tokens`` word pieces (which bounds its memory,
    see :data:`BATCH_TOKENS`), or before it would exceed ``1 + max_padding`` times its real
    tokens. ONNX Runtime, unlike torch, loses
    next to nothing to running more, smaller batches. A single text is always a batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    real = 0  # the batch's tokens before padding
    for index in order:
        padded = lengths[batch[0]] * (len(batch) + 1) if batch else 0
        if batch and (
            len(batch) == batch_size
            or padded > max_tokens
            or padded > (1 + max_padding) * (real + lengths[index])
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


_process_threads: int | None = None


def set_threads(threads: int | None) -> None:
    """ONNX Runtime intra-op threads of the sessions this process creates from now on.

    The process-wide counterpart of ``torch.set_num_threads``, which the bulk engines
    call for each CLI run and each Ray actor (``--threads``); it takes precedence over an
    encoder's own ``threads`` (the ``encoder.threads`` setting). None undoes it.

    Raises:
        ConfigurationError: If ``threads`` is below 1.

    """
    global _process_threads
    if threads is not None and threads < 1:
        raise ConfigurationError(f"model threads must be at least 1, got {threads}")
    _process_threads = threads


def model_threads(own: int | None) -> int | None:
    """The intra-op threads a local model loaded now should use: the process's, else ``own``."""
    return _process_threads or own


def _checked_session(path: Path, key: str, threads: int | None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session of ``path``, checked to be the graph exported under ``key``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    threads = model_threads(threads)
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
    remove_superseded_graphs(path)
    return path


def remove_superseded_graphs(path: Path, *, older_than: float = SUPERSEDED_AFTER) -> list[Path]:
    """Delete the cached graphs of the same model name but other weights (or export format).

    A new version of the model package, or of the exporter, makes a new graph (~90 MB for
    MiniLM) and leaves the old one behind. Only graphs exported more than ``older_than``
    seconds ago go, so two versions in use at once are not exported again and again, and a
    process starting on the other version does not lose its graph while it loads it.

    Returns:
        The graphs deleted.

    """
    stem = path.name[: -len("-0123456789abcdef.onnx")]
    pattern = re.compile(re.escape(stem) + r"-[0-9a-f]{16}\.onnx")
    cutoff = time.time() - older_than
    removed = []
    for other in path.parent.glob(f"{stem}-*.onnx"):
        if other == path or not pattern.fullmatch(other.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            if other.stat().st_mtime < cutoff:
                other.unlink()
                removed.append(other)
                logger.info("removed %s: superseded by %s", other.name, path.name)
    return removed


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
    """Write the ONNX graph of the BERT model at ``location`` to ``destination``.

    Built by :func:`bert_graph` from the safetensors weights with numpy and ``onnx``
    alone: no torch, no transformers.
    """
    import onnx

    graph = bert_graph(location)
    for name, value in metadata.items():
        graph.metadata_props.add(key=name, value=value)
    onnx.save(graph, str(destination))


def bert_graph(location: Path) -> onnx.ModelProto:
    """BERT encoder + mean pooling, as ONNX Runtime's fused CPU operators, from safetensors.

    The layout is the one ONNX Runtime's own transformer optimizer makes of an exported BERT
    (``onnxruntime.transformers.optimizer``, ``model_type="bert"``): one
    ``EmbedLayerNormalization``, then per layer an ``Attention`` over packed Q/K/V weights,
    ``SkipLayerNormalization`` around the output projection and the feed-forward block, and
    ``BiasGelu`` (exact, erf) between the feed-forward MatMuls. Built directly, the graph
    needs no exporter, and the fusions do not depend on a pattern matcher recognising it.
    The attention mask becomes per-row lengths, so rows must be right-padded (they are).
    """
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import load_file

    config = json.loads((location / "config.json").read_text(encoding="utf-8"))
    weights = load_file(str(location / WEIGHTS_FILE))
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    epsilon = float(config.get("layer_norm_eps", 1e-12))

    def tensor(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def weight(name: str, transpose: bool = False) -> str:
        value = weights[prefix + name]
        return tensor(name, value.T if transpose else value)

    def node(op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        domain = "com.microsoft" if op in _FUSED_OPS else ""
        nodes.append(
            helper.make_node(op, inputs, [output], name=output, domain=domain, **attributes)
        )
        return output

    int32 = TensorProto.INT32
    ids = node("Cast", ["input_ids"], "input_ids_int32", to=int32)
    types = node("Cast", ["token_type_ids"], "token_type_ids_int32", to=int32)
    mask = node("Cast", ["attention_mask"], "attention_mask_int32", to=int32)
    embedding = "embeddings.{}"
    nodes.append(
        helper.make_node(
            "EmbedLayerNormalization",
            [
                ids,
                types,
                weight(embedding.format("word_embeddings.weight")),
                weight(embedding.format("position_embeddings.weight")),
                weight(embedding.format("token_type_embeddings.weight")),
                weight(embedding.format("LayerNorm.weight")),
                weight(embedding.format("LayerNorm.bias")),
                mask,
            ],
            ["hidden_0", "mask_index"],
            name="embeddings",
            domain="com.microsoft",
            epsilon=epsilon,
        )
    )
    hidden = "hidden_0"
    for index in range(int(config["num_hidden_layers"])):
        layer = f"encoder.layer.{index}."
        qkv = [weights[f"{prefix}{layer}attention.self.{p}.weight"].T for p in _QKV]
        biases = [weights[f"{prefix}{layer}attention.self.{p}.bias"] for p in _QKV]
        context = node(
            "Attention",
            [
                hidden,
                tensor(f"{layer}qkv.weight", np.concatenate(qkv, axis=1)),
                tensor(f"{layer}qkv.bias", np.concatenate(biases)),
                "mask_index",
            ],
            f"{layer}context",
            num_heads=int(config["num_attention_heads"]),
        )
        projected = node(
            "MatMul",
            [context, weight(f"{layer}attention.output.dense.weight", transpose=True)],
            f"{layer}attention.projected",
        )
        attended = node(
            "SkipLayerNormalization",
            [
                projected,
                hidden,
                weight(f"{layer}attention.output.LayerNorm.weight"),
                weight(f"{layer}attention.output.LayerNorm.bias"),
                weight(f"{layer}attention.output.dense.bias"),
            ],
            f"{layer}attention.normed",
            epsilon=epsilon,
        )
        widened = node(
            "MatMul",
            [attended, weight(f"{layer}intermediate.dense.weight", transpose=True)],
            f"{layer}intermediate.widened",
        )
        activated = node(
            "BiasGelu",
            [widened, weight(f"{layer}intermediate.dense.bias")],
            f"{layer}intermediate.activated",
        )
        narrowed = node(
            "MatMul",
            [activated, weight(f"{layer}output.dense.weight", transpose=True)],
            f"{layer}output.narrowed",
        )
        hidden = node(
            "SkipLayerNormalization",
            [
                narrowed,
                attended,
                weight(f"{layer}output.LayerNorm.weight"),
                weight(f"{layer}output.LayerNorm.bias"),
                weight(f"{layer}output.dense.bias"),
            ],
            f"hidden_{index + 1}",
            epsilon=epsilon,
        )
    # sentence-transformers' mean pooling: sum of the real tokens / max(count, 1e-9).
    mask_3d = node("Unsqueeze", ["attention_mask", tensor("last_axis", np.array([-1]))], "mask_3d")
    real = node("Cast", [mask_3d], "real_tokens", to=TensorProto.FLOAT)
    masked = node("Mul", [hidden, real], "masked")
    axis_1 = tensor("axis_1", np.array([1]))
    summed = node("ReduceSum", [masked, axis_1], "summed", keepdims=0)
    counts = node("ReduceSum", [real, axis_1], "counts", keepdims=0)
    clipped = node("Clip", [counts, tensor("min_count", np.array(1e-9, np.float32))], "clipped")
    node("Div", [summed, clipped], "sentence_embedding")

    width = int(config["hidden_size"])
    graph = helper.make_graph(
        nodes,
        "mean_pooled_bert",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in _INPUT_NAMES
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", width])],
        initializers,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="adapted-embeddings")
