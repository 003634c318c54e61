"""Permuting tokens so the video grid pattern becomes dense blocks (MMInference's idea).

A head that attends along the video grid looks, from a token of frame ``f`` at spatial position
``p``, at the same position ``p`` in earlier frames (and a few neighbours): diagonals at a stride of
``tokens_per_frame`` in the natural order, spread over every block. Reordering the video span from
frame-major (f, p) to position-major (p, f) puts those keys next to the query, so the grid is a
narrow band: ``a_shape``-like blocks in the permuted order. Causality stays exact because the
kernel masks on original positions (``TokenOrder``): the permuted rows carry them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .index import SparseIndex, TokenOrder, compile_block_mask
from .patterns import band_mask
from .sparse_attention import sparse_attention


def grid_permutation(length: int, spans: Sequence[tuple[int, int, int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """``perm`` [length] with ``perm[new] = old``: each video span ``(start, frames, tokens_per_frame)``
    is reordered position-major; everything else stays. Spans must not overlap."""
    perm = torch.arange(length, device=device)
    for start, frames, per_frame in spans:  # one entry per video in the prompt
        end = start + frames * per_frame
        if start < 0 or end > length or frames < 1 or per_frame < 1:
            raise ValueError(f"video span start={start} frames={frames} tokens_per_frame={per_frame} "
                             f"does not fit a sequence of {length} tokens")
        perm[start:end] = perm[start:end].view(frames, per_frame).t().reshape(-1)
    return perm


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), device=perm.device)
    return inv


def permuted_order(perm: torch.Tensor, batch: int, block_m: int, block_n: int) -> TokenOrder:
    """Token order of a full-prompt prefill (queries = keys) whose rows are ``perm``."""
    pos = perm.to(torch.int32)[None].expand(batch, -1)
    return TokenOrder.from_positions(pos, pos, block_m, block_n)


def grid_index(
    order: TokenOrder,
    spans: Sequence[tuple[int, int, int]],
    *,
    sink: int = 128,
    local: int | None = None,
    phase: int = 0,
    heads: int = 1,
) -> SparseIndex:
    """Grid pattern in the permuted order: a band of ``local`` rows (default: two frames' worth of
    the longest video, i.e. the same spatial position in every earlier frame plus its neighbours),
    a second band ``phase`` positions away when ``phase`` is non-zero, sink blocks, and dense rows
    for query blocks holding text (system prompt, question)."""
    frames = max(f for _, f, _ in spans)
    local = 2 * frames if local is None else local
    shifts = (0,) if phase == 0 else (0, phase * frames)
    mask = band_mask(order, sink=sink, local=local, shifts=shifts)[:, 0]  # [B, NQ, NK]
    mq = order.q_pos.shape[1]
    is_video = torch.zeros(mq, dtype=torch.bool, device=mask.device)
    for start, f, per_frame in spans:
        is_video[start:start + f * per_frame] = True
    pad = order.num_q_blocks * order.block_m - mq
    text_block = (~torch.nn.functional.pad(is_video, (0, pad), value=True)).view(-1, order.block_m).any(-1)
    mask = mask | text_block[None, :, None]
    return compile_block_mask(mask[:, None].expand(-1, heads, -1, -1), order)


def permuted_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    build_index: Callable[[TokenOrder], SparseIndex],
    *,
    block_m: int = 128,
    block_n: int = 128,
    **kernel_args,
) -> torch.Tensor:
    """Attention over the rows reordered by ``perm`` (full-prompt prefill: Mq == Mk), with the
    output in the original order: [B, M, Hq, D]. ``build_index`` receives the permuted
    ``TokenOrder``; the kernel reads and writes through ``perm`` (no permuted copies)."""
    if q.shape[2] != k.shape[2] or perm.numel() != q.shape[2]:
        raise ValueError(f"permuted attention needs queries = keys = len(perm); got {q.shape[2]} queries, "
                         f"{k.shape[2]} keys, {perm.numel()} permuted rows")
    order = permuted_order(perm, q.shape[0], block_m, block_n)
    return sparse_attention(q, k, v, build_index(order), order, rows=perm, **kernel_args)
