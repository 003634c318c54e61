"""Heads of a sparse layer computed apart from its natural launch, and written into it after.

The dense heads (exact causal SDPA), and grid heads that are not one run of heads, are computed on
their own; the natural launch writes empty rows for them, and ``PendingHeads.write_into`` fills
those in. A run of heads that
SDPA can read as views (inside one KV head's group, or whole groups) is not copied; other sets
are gathered with ``index_select``. On CUDA the dense heads run on a side stream beside the
layer's sparse launches (``start_dense_heads_aside``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..kernels.launch import to_device


def head_slices(heads: Sequence[int], group: int) -> tuple[slice, slice] | None:
    """(query heads, KV heads) as slices when ``heads`` (sorted) are one run that a GQA call can
    read as views: all in one KV head's group, or whole groups; None otherwise."""
    lo, hi = heads[0], heads[-1] + 1
    if hi - lo != len(heads):
        return None
    if lo // group == (hi - 1) // group:
        return slice(lo, hi), slice(lo // group, lo // group + 1)
    if lo % group == 0 and hi % group == 0:
        return slice(lo, hi), slice(lo // group, hi // group)
    return None


@dataclass
class PendingHeads:
    """Some heads' output, [B, N, H_sub, D], to be written into the layer's [B, N, H, D]."""

    heads: slice | torch.Tensor  # which query heads, as a slice or a device index
    output: torch.Tensor
    # Computed on a side stream: recorded there before and after (timed events).
    began: torch.cuda.Event | None = None
    ready: torch.cuda.Event | None = None

    def write_into(self, out: torch.Tensor) -> None:
        if self.ready is not None:
            reader = torch.cuda.current_stream(out.device)
            reader.wait_event(self.ready)
            self.output.record_stream(reader)
        out[:, :, self.heads] = self.output


def start_dense_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: list[int],
                      scaling: float | None) -> PendingHeads:
    """Causal SDPA over query ``heads`` (a sorted host list) of q [B, Hq, N, D], k, v [B, Hkv, N, D]."""
    group = query.shape[1] // key.shape[1]
    views = head_slices(heads, group)
    if views is not None:
        q_heads, kv_heads = views
        q, k, v = query[:, q_heads], key[:, kv_heads], value[:, kv_heads]
        selected: slice | torch.Tensor = q_heads
    else:  # one KV head per query head, gathered
        selected = to_device(heads, query.device, torch.long)
        kv_of = selected // group
        q, k, v = query.index_select(1, selected), key.index_select(1, kv_of), value.index_select(1, kv_of)
    output = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
    return PendingHeads(selected, output.transpose(1, 2))


def start_dense_heads_aside(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: list[int],
                            scaling: float | None) -> PendingHeads:
    """``start_dense_heads`` on a side stream of the query's CUDA device, so the launches queued
    after it on the current stream run beside it: the index build's small kernels and the sparse
    launches take the SMs its last waves free, and the GPU has its work while the host builds a
    plan (H200, 128K: 3,083 -> 3,039 ms a prefill). ``write_into`` waits for it. Elsewhere than
    CUDA, ``start_dense_heads`` itself."""
    if query.device.type != "cuda":
        return start_dense_heads(query, key, value, heads, scaling)
    main = torch.cuda.current_stream(query.device)
    side = _side_stream(query.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        began = torch.cuda.Event(enable_timing=True)
        began.record(side)
        pending = start_dense_heads(query, key, value, heads, scaling)
        pending.began, pending.ready = began, torch.cuda.Event(enable_timing=True)
        pending.ready.record(side)
    for tensor in (query, key, value):  # read on the side stream: not reused before it is done
        tensor.record_stream(side)
    return pending


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    # Default priority: at a high one the dense heads took the SMs first and the layer's sparse
    # launches waited behind them (H200, 128K: 3,072 vs 3,039 ms a prefill).
    return torch.cuda.Stream(device=device)
