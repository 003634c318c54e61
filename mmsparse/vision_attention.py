"""Batched attention for the vision tower's many short, independent chunks.

Qwen2.5-VL's vision tower attends within windows and within frame pairs. Unless the attention
implementation is a "flash" one, transformers runs one attention call per chunk in a Python
loop: thousands of tiny kernels for a long video. The flash path instead hands the whole packed
sequence with ``cu_seq_lens`` to the attention function. We register a function under a name
that takes that path (so it must contain "flash") and compute every chunk in one SDPA call:
equal-length chunks are a reshape; unequal ones are padded to the longest with a key mask.
It is switched on for the vision tower only; the LLM never sees this name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

VISION_ATTENTION = "mmsparse_flash_vision"  # "flash" selects transformers' packed (cu_seqlens) path


def packed_chunk_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Bidirectional attention inside each chunk of a packed sequence.

    ``query``/``key``/``value``: [1, H, N, D]; chunk i spans ``cu_seq_lens_q[i]:cu_seq_lens_q[i+1]``.
    Returns [1, N, H, D] like transformers' attention functions.
    """
    _, heads, total, dim = query.shape
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.tensor([0, total], device=query.device)
    lengths = torch.diff(cu_seq_lens_q)
    longest, shortest = (int(x) for x in torch.stack([lengths.max(), lengths.min()]).tolist())
    chunks = lengths.numel()
    if longest == shortest:
        q, k, v = (t[0].view(heads, chunks, longest, dim).transpose(0, 1) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, scale=scaling, dropout_p=dropout)
        return out.transpose(0, 1).reshape(1, heads, total, dim).transpose(1, 2), None
    # Unequal chunks: gather each into a row of [chunks, longest], mask the padding keys.
    offsets = torch.arange(longest, device=query.device)
    valid = offsets[None, :] < lengths[:, None]  # [chunks, longest]
    index = (cu_seq_lens_q[:-1, None] + offsets[None, :]).clamp(max=total - 1)
    q, k, v = (t[0][:, index].transpose(0, 1) for t in (query, key, value))  # [chunks, H, longest, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scaling, dropout_p=dropout)
    packed = out.transpose(1, 2)[valid]  # [N, H, D] in packed order
    return packed.unsqueeze(0), None


def register_vision_attention() -> str:
    """Register the function with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VISION_ATTENTION, packed_chunk_attention)
    return VISION_ATTENTION


def use_packed_vision_attention(model: torch.nn.Module) -> None:
    """Switch a Qwen2.5-VL model's vision tower to batched chunk attention (LLM untouched)."""
    name = register_vision_attention()
    vision = model.config.vision_config
    vision._attn_implementation = name
