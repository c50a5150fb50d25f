"""The JSON manifest that sits beside an adapter's weights and says what they are."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapted_embeddings.spaces import EmbeddingSpace

MANIFEST_FILE = "adapter.json"
WEIGHTS_FILE = "model.safetensors"


class ArchitectureConfig(BaseModel):
    """Shape of the translation network; the weights must match it exactly.

    ``hidden_dim == 0`` is a purely affine map (the ``linear`` flavor). The output passes
    through a ``basis_rank``-wide bottleneck because a full ``input_dim x output_dim`` map
    costs more than the whole per-row time budget on a CPU.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["residual_mlp"] = "residual_mlp"
    input_dim: int = Field(gt=0, description="Source vector width.")
    output_dim: int = Field(gt=0, description="Target vector width.")
    basis_rank: int = Field(gt=0, description="Width of the low-rank output basis.")
    hidden_dim: int = Field(ge=0, description="Residual MLP width; 0 means affine only.")
    ood_rank: int = Field(gt=0, description="Principal components used by the OOD statistics.")
    quality_hidden_dim: int = Field(
        default=0, ge=0, description="Hidden width of the quality head; 0 means logistic."
    )
    max_source_tokens: int = Field(
        default=0,
        ge=0,
        description="Source model's window in tokens (0 = unknown); longer texts were cut.",
    )
    max_target_tokens: int = Field(
        default=0,
        ge=0,
        description="Target model's window in tokens (0 = longer than any source window).",
    )
    coverage_exponent: float = Field(
        default=0.5,
        ge=0.0,
        description="Confidence is scaled by coverage**exponent for texts the source cut.",
    )
    memory_rows: int = Field(
        default=0,
        ge=0,
        description="User pairs remembered for the neighbour correction and the memory head "
        "(0 = no memory; only adapters fitted by adapt() carry one).",
    )
    memory_neighbours: int = Field(
        default=10, gt=0, description="Remembered pairs that correct each translation."
    )
    memory_temperature: float = Field(
        default=0.1, gt=0.0, description="Softmax temperature over the neighbours' similarities."
    )
    memory_step: float = Field(
        default=0.0,
        ge=0.0,
        description="Share of the neighbours' weighted residual added to the translation.",
    )


class AdapterManifest(BaseModel):
    """Everything known about an adapter except its weights.

    Loading is strict (``extra="forbid"``): a manifest with fields this version does not
    understand is rejected instead of being half-read.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    name: str = Field(min_length=1, description="Short unique name, e.g. 'minilm-l6-to-ada-002'.")
    flavor: str = Field(min_length=1, description="Architecture family, e.g. 'mlp' or 'linear'.")
    source: EmbeddingSpace = Field(description="Space of the vectors the adapter reads.")
    target: EmbeddingSpace = Field(description="Space of the vectors the adapter writes.")
    architecture: ArchitectureConfig
    recommended_threshold: float = Field(
        ge=0.0, le=1.0, description="Default confidence threshold, chosen by calibration."
    )
    weights_file: str = Field(default=WEIGHTS_FILE, pattern=r"^[A-Za-z0-9_.-]+\.safetensors$")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    description: str = ""
    training: dict[str, Any] = Field(default_factory=dict, description="Data, split, seed.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Measured quality.")
    calibration: dict[str, Any] = Field(default_factory=dict, description="Routing curve.")
