"""The same ``SparseIndex`` run by torch FlexAttention (``BlockMask``), as an alternative backend.

Our index already has FlexAttention's split: fully visible blocks (no ``mask_mod``) and partial
ones (``mask_mod`` = the position test). Columns have no FlexAttention form and are refused.
"""

from __future__ import annotations

import functools

import torch

from .index import SparseIndex, TokenOrder


def to_block_mask(index: SparseIndex, order: TokenOrder):
    """Build a FlexAttention ``BlockMask`` from a column-free index."""
    from torch.nn.attention.flex_attention import BlockMask

    index = index.per_head()
    if index.columns.shape[-1]:
        raise ValueError("the FlexAttention backend takes block patterns only; run column (vertical-slash) "
                         "indices with backend='triton'")
    # FlexAttention reads the number of key blocks off the index width: pad the lists to it.
    blocks = torch.nn.functional.pad(index.blocks, (0, order.num_k_blocks - index.blocks.shape[-1]))
    width = blocks.shape[-1]
    slot = torch.arange(width, device=blocks.device)
    partial_count = index.block_count - index.full_count
    take = (slot + index.full_count[..., None]).clamp(max=width - 1)
    partial = blocks.gather(-1, take.long())
    q_pos, k_pos, listed = order.q_pos, order.k_pos, index.block_mask
    bm, bn, shared = index.block_m, index.block_n, listed.shape[1] == 1

    def causal_on_positions(b, h, q_idx, kv_idx):
        # The block test repeats the lists for eager mode, which applies mask_mod alone; compiled
        # kernels evaluate it on partial blocks only.
        head = 0 if shared else h
        return (k_pos[b, kv_idx] <= q_pos[b, q_idx]) & listed[b, head, q_idx // bm, kv_idx // bn]

    return BlockMask.from_kv_blocks(
        partial_count, partial.to(torch.int32), index.full_count, blocks,
        BLOCK_SIZE=(index.block_m, index.block_n), mask_mod=causal_on_positions,
        seq_lengths=(q_pos.shape[1], k_pos.shape[1]),
    )


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, order: TokenOrder,
    *, scale: float | None = None, compiled: bool | None = None,
) -> torch.Tensor:
    """FlexAttention over the index; returns [B, Mq, Hq, D]. Compiled on GPU, eager on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if (q.is_cuda if compiled is None else compiled) else flex_attention
    out = fn(q, k, v, block_mask=to_block_mask(index, order), scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    # Padding query rows see nothing under mask_mod but may be listed in full blocks: zero them.
    return out.transpose(1, 2).masked_fill((order.q_pos < 0)[:, :, None, None], 0.0)
