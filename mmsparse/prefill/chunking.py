"""Chunked non-attention work for very long prefills.

At 512K tokens a 7B model's MLP intermediate alone is ~20 GB per tensor (gate, up, product).
``chunked_mlp(model, chunk)`` swaps each decoder layer's ``mlp`` submodule for a wrapper that runs
the same module over ``chunk`` tokens at a time (a pointwise op along the sequence, so the result
is identical), and puts the originals back on exit. Composition, not patching: no method of any
transformers class is replaced. Logits for the last token only come from ``logits_to_keep=1``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class ChunkedMLP(torch.nn.Module):
    """Runs ``mlp`` on slices of the sequence axis (dim -2) of at most ``chunk`` tokens."""

    def __init__(self, mlp: torch.nn.Module, chunk: int) -> None:
        super().__init__()
        self.mlp = mlp
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-2] <= self.chunk:
            return self.mlp(hidden)
        out = torch.empty_like(hidden)
        for start in range(0, hidden.shape[-2], self.chunk):  # a few dozen slices of a long prompt
            out[..., start:start + self.chunk, :] = self.mlp(hidden[..., start:start + self.chunk, :])
        return out


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "mlp") and hasattr(m, "self_attn")]


@contextlib.contextmanager
def chunked_mlp(model: torch.nn.Module, chunk: int = 32768) -> Iterator[int]:
    """Within the context, every decoder layer's MLP runs ``chunk`` tokens at a time; yields the
    number of layers wrapped."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    layers = _decoder_layers(model)
    originals = [layer.mlp for layer in layers]
    for layer, mlp in zip(layers, originals):
        layer.mlp = ChunkedMLP(mlp, chunk)
    try:
        yield len(layers)
    finally:
        for layer, mlp in zip(layers, originals):
            layer.mlp = mlp
