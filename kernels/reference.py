"""Plain PyTorch references with the kernels' exact semantics (for tests; memory O(Mq x Mk))."""

from __future__ import annotations

import math

import torch

from .index import SparseIndex, TokenOrder


def kv_heads(hq: int, hkv: int, head_map: torch.Tensor | None, device) -> torch.Tensor:
    """The KV head each query head reads: ``head_map``, else grouped-query order."""
    return head_map.long() if head_map is not None else torch.arange(hq, device=device) // (hq // hkv)


def index_token_mask(index: SparseIndex, order: TokenOrder) -> torch.Tensor:
    """[B, H, Mq, Mk] booleans: the tokens the index makes a query compute, after causality.
    Built from the block and column lists (not from ``block_mask``), so it checks them."""
    index = index.per_head()
    b, h, nq, _ = index.blocks.shape
    mq, mk = order.q_pos.shape[1], order.k_pos.shape[1]
    nk = order.num_k_blocks
    slot = torch.arange(index.blocks.shape[-1], device=index.blocks.device)
    listed = slot < index.block_count[..., None]
    block_map = torch.zeros((b, h, nq, nk + 1), dtype=torch.bool, device=index.blocks.device)
    block_map.scatter_(-1, torch.where(listed, index.blocks.long(), nk), True)
    block_map = block_map[..., :nk]
    tokens = block_map.repeat_interleave(index.block_m, 2)[:, :, :mq]
    tokens = tokens.repeat_interleave(index.block_n, 3)[..., :mk]
    if index.columns.shape[-1]:
        c = index.columns.shape[-1]
        take = torch.arange(c, device=index.columns.device) < index.column_count[..., None]  # [B, H', NQ, C]
        cols = torch.zeros((b, take.shape[1], nq, mk + 1), dtype=torch.bool, device=index.columns.device)
        idx = torch.where(take, index.columns[:, :, None, :].long().expand_as(take), mk)
        cols.scatter_(-1, idx, True)
        tokens = tokens | cols[..., :mk].repeat_interleave(index.block_m, 2)[:, :, :mq]
    causal = order.k_pos[:, None, None, :] <= order.q_pos[:, None, :, None]
    return tokens & causal


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float | None = None,
    head_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention under a boolean mask [B, H or 1, Mq, Mk] in float32. Returns the output
    [B, Mq, Hq, D] (zero rows where nothing is visible) and the natural-log LSE [B, Hq, Mq]."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    kv_of = kv_heads(hq, hkv, head_map, q.device)
    kf, vf = k.float()[:, kv_of], v.float()[:, kv_of]
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), kf) * (scale or 1.0 / math.sqrt(d))
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", p, vf)
    return out.transpose(1, 2), lse


def reference_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    order: TokenOrder,
    *,
    scale: float | None = None,
    head_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``sparse_attention(..., return_lse=True)`` computes, with padding rows zeroed."""
    out, lse = masked_attention(q, k, v, index_token_mask(index, order), scale=scale, head_map=head_map)
    pad = (order.q_pos < 0)[:, :, None, None]
    return out.masked_fill(pad, 0.0), lse


def chunked_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    order: TokenOrder,
    *,
    scale: float | None = None,
    head_map: torch.Tensor | None = None,
    rows_per_chunk: int = 1024,
) -> torch.Tensor:
    """The kernel's semantics in torch, a chunk of query rows at a time (memory O(chunk x Mk)):
    the backend on CPUs, where Triton has no compiled target. Returns [B, Mq, Hq, D]."""
    index = index.per_head()
    bsz, hq, mq, d = q.shape
    mk = k.shape[2]
    kv_of = kv_heads(hq, k.shape[1], head_map, q.device)
    kf, vf = k[:, kv_of], v[:, kv_of]
    out = q.new_zeros((bsz, mq, hq, d))
    heads = index.block_mask.shape[1]
    bm, bn = index.block_m, index.block_n
    step = max(bm, rows_per_chunk // bm * bm)
    for start in range(0, mq, step):  # a few dozen chunks of a long prompt
        end = min(mq, start + step)
        qb = slice(start // bm, -(-end // bm))
        blocks = index.block_mask[:, :, qb].repeat_interleave(bm, 2)[:, :, : end - start + start % bm]
        tokens = blocks.repeat_interleave(bn, 3)[..., :mk]
        if index.columns.shape[-1]:
            take = torch.arange(index.columns.shape[-1], device=q.device) < index.column_count[:, :, qb, None]
            cols = torch.zeros((bsz, heads, take.shape[2], mk + 1), dtype=torch.bool, device=q.device)
            cols.scatter_(-1, torch.where(take, index.columns[:, :, None, :].long(), mk), True)
            tokens = tokens | cols[..., :mk].repeat_interleave(bm, 2)[:, :, : tokens.shape[2]]
        tokens = tokens[:, :, start % bm:][:, :, : end - start]
        mask = tokens & (order.k_pos[:, None, None, :] <= order.q_pos[:, None, start:end, None])
        o = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:end], kf, vf, attn_mask=mask, scale=scale)
        seen = mask.any(-1) & (order.q_pos[:, None, start:end] >= 0)
        out[:, start:end] = torch.where(seen[..., None], o, 0.0).transpose(1, 2)
    return out


def dense_rows_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    order: TokenOrder,
    sub_blocks,
    rows_per_block: int,
    out: torch.Tensor,
    *,
    scale: float | None = None,
    head_map: torch.Tensor | None = None,
    heads=None,
) -> torch.Tensor:
    """Write into ``out`` [B, Mq, Hq, D] the exact causal attention of the query rows in
    ``sub_blocks`` (of ``rows_per_block`` rows each) of query ``heads`` (default all):
    ``sparse_attention``'s ``dense_rows``."""
    mq = q.shape[2]
    rows = sorted({r for b in sub_blocks for r in range(b * rows_per_block, min(mq, (b + 1) * rows_per_block))})
    if not rows:
        return out
    at = torch.tensor(rows, device=q.device)
    picked = torch.arange(q.shape[1], device=q.device) if heads is None else torch.tensor(heads, device=q.device)
    kv_of = kv_heads(q.shape[1], k.shape[1], head_map, q.device)[picked]
    mask = order.k_pos[:, None, None, :] <= order.q_pos[:, None, at, None]
    o = torch.nn.functional.scaled_dot_product_attention(q[:, picked][:, :, at], k[:, kv_of], v[:, kv_of],
                                                         attn_mask=mask, scale=scale)
    seen = mask.any(-1) & (order.q_pos[:, None, at] >= 0)
    rows_out = out[:, at]  # a copy: written back below
    rows_out[:, :, picked] = torch.where(seen[..., None], o, 0.0).transpose(1, 2).to(out.dtype)
    out[:, at] = rows_out
    return out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm's forward: float32 statistics, the row rounded to x's dtype, then the weight."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product as a stock MLP computes it: ``silu(gate)`` in gate's dtype, times ``up``."""
    return torch.nn.functional.silu(gate) * up
