"""The translation network in torch, for training only; it exports the runtime's tensors.

It computes exactly what :func:`adapted_embeddings.adapter.network.forward` computes for the
vectors (same tensor names, tanh-GELU, normalisation), so weights trained here run
unchanged in the NumPy runtime. Torch keeps the ``(out, in)`` layout of ``nn.Linear``; the
runtime stores ``(in, out)``, and :meth:`TranslationNet.export` transposes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TranslationNet(nn.Module):
    """``x -> l2norm(decoder(coef))`` with ``coef = linear(xc) + residual(gelu(hidden(xc)))``.

    Args:
        source_mean: Mean of the normalised training source vectors (kept fixed).
        linear_map: ``(input_dim, rank)`` initial linear path (closed-form solution).
        linear_bias: ``(rank,)`` initial bias of the linear path.
        basis: ``(rank, output_dim)`` initial output basis (rows orthonormal).
        target_mean: ``(output_dim,)`` initial decoder bias.
        hidden_dim: Width of the residual MLP (0 = affine only).
        dropout: Dropout on the hidden units during training.
        train_basis: Whether the output basis is trained or stays the PCA basis.
        seed: Seeds the hidden layer's random initialisation.

    """

    def __init__(
        self,
        source_mean: np.ndarray,
        linear_map: np.ndarray,
        linear_bias: np.ndarray,
        basis: np.ndarray,
        target_mean: np.ndarray,
        *,
        hidden_dim: int,
        dropout: float = 0.1,
        train_basis: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        input_dim, rank = linear_map.shape
        output_dim = basis.shape[1]
        self.rank, self.hidden_dim = rank, hidden_dim
        self.source_mean: torch.Tensor
        self.register_buffer("source_mean", torch.as_tensor(source_mean, dtype=torch.float32))
        self.encoder = nn.Linear(input_dim, rank + hidden_dim)
        self.decoder = nn.Linear(rank, output_dim)
        self.residual = nn.Linear(hidden_dim, rank) if hidden_dim else None
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.encoder.weight[:rank] = torch.as_tensor(linear_map.T, dtype=torch.float32)
            self.encoder.bias[:rank] = torch.as_tensor(linear_bias, dtype=torch.float32)
            if hidden_dim:
                # Hidden units see the centred input, whose rows have norm ~0.5-0.8; this scale
                # puts their pre-activations in GELU's curved range at the start.
                scale = 3.0 / np.sqrt(input_dim)
                self.encoder.weight[rank:] = (
                    torch.randn(hidden_dim, input_dim, generator=generator) * scale
                )
                self.encoder.bias[rank:] = 0.0
                # The residual starts at zero, so training starts from the closed form exactly.
                assert self.residual is not None
                self.residual.weight.zero_()
                self.residual.bias.zero_()
            self.decoder.weight.copy_(torch.as_tensor(basis.T, dtype=torch.float32))
            self.decoder.bias.copy_(torch.as_tensor(target_mean, dtype=torch.float32))
        self.decoder.weight.requires_grad_(train_basis)
        self.dropout = nn.Dropout(dropout)

    def hidden(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the linear coefficients and the GELU hidden units (None if affine)."""
        centred = F.normalize(source, dim=1) - self.source_mean
        activations = self.encoder(centred)
        linear = activations[:, : self.rank]
        if not self.hidden_dim:
            return linear, None
        return linear, F.gelu(activations[:, self.rank :], approximate="tanh")

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        """Unit-length target vectors for a batch of source vectors."""
        coefficients, hidden = self.hidden(source)
        if hidden is not None:
            assert self.residual is not None
            coefficients = coefficients + self.residual(self.dropout(hidden))
        return F.normalize(self.decoder(coefficients), dim=1)

    def export(self) -> dict[str, np.ndarray]:
        """The translation tensors in the runtime's names and ``(in, out)`` layout."""

        def numpy(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))

        tensors = {
            "source_mean": numpy(self.source_mean),
            "encoder.weight": numpy(self.encoder.weight.T),
            "encoder.bias": numpy(self.encoder.bias),
            "decoder.weight": numpy(self.decoder.weight.T),
            "decoder.bias": numpy(self.decoder.bias),
        }
        if self.residual is not None:
            tensors["residual.weight"] = numpy(self.residual.weight.T)
            tensors["residual.bias"] = numpy(self.residual.bias)
        return tensors
