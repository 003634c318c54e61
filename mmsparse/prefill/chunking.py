"""Chunked non-attention work for very long prefills.

At 512K tokens a 7B model's MLP intermediate alone is ~20 GB per tensor (gate, up, product), and
an RMSNorm upcasts its whole input to float32 (15 GB at 1M tokens). ``chunked_pointwise(model,
chunk)`` swaps each decoder layer's ``mlp``, ``input_layernorm`` and ``post_attention_layernorm``
submodules, and the text model's final ``norm``, for a wrapper that runs the same module over
``chunk`` tokens at a time. They act on each token alone, so the result is identical. The
originals are put back on exit. Composition, not patching: no method of any transformers class
is replaced. Logits for the last token only come from ``logits_to_keep=1``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

LAYER_PARTS = ("mlp", "input_layernorm", "post_attention_layernorm")


class ChunkedAlongSequence(torch.nn.Module):
    """Runs a per-token ``module`` on slices of the sequence axis (dim -2) of at most ``chunk``
    tokens, writing into one output tensor."""

    def __init__(self, module: torch.nn.Module, chunk: int) -> None:
        super().__init__()
        self.module = module
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-2] <= self.chunk:
            return self.module(hidden)
        out = torch.empty_like(hidden)
        for start in range(0, hidden.shape[-2], self.chunk):  # a few dozen slices of a long prompt
            out[..., start:start + self.chunk, :] = self.module(hidden[..., start:start + self.chunk, :])
        return out


def _pointwise_parts(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of every per-token submodule of the decoder stacks: modules with a
    ``layers`` list of attention + MLP blocks and a final ``norm`` (a vision encoder has no
    ``norm`` there and is left alone)."""
    parts = []
    for stack in model.modules():
        layers = getattr(stack, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not isinstance(getattr(stack, "norm", None), torch.nn.Module):
            continue
        blocks = [layer for layer in layers if hasattr(layer, "mlp") and hasattr(layer, "self_attn")]
        parts += [(layer, name) for layer in blocks for name in LAYER_PARTS
                  if isinstance(getattr(layer, name, None), torch.nn.Module)]
        if blocks:
            parts.append((stack, "norm"))
    return parts


@contextlib.contextmanager
def chunked_pointwise(model: torch.nn.Module, chunk: int = 32768) -> Iterator[int]:
    """Within the context, the MLPs and norms of every decoder stack run ``chunk`` tokens at a
    time; yields the number of submodules wrapped."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    parts = _pointwise_parts(model)
    originals = [getattr(parent, name) for parent, name in parts]
    for (parent, name), module in zip(parts, originals):
        setattr(parent, name, ChunkedAlongSequence(module, chunk))
    try:
        yield len(parts)
    finally:
        for (parent, name), module in zip(parts, originals):
            setattr(parent, name, module)
