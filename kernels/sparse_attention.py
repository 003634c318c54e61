"""Block-sparse + column-sparse causal attention in Triton (FlashAttention-2 style forward).

One program per (query block, batch x query head): all heads in one launch, GQA inside the
kernel (query head ``h`` reads KV head ``h // group``, or ``head_map[h]``; no ``repeat_kv``).
Two loops over one online softmax: the row's key blocks (fully visible first; the partially
visible ones masked on positions), then the extra key columns (gathered rows).

Long rows (``long_rows``: the query blocks of a trailing question, dense in every sparse head)
are split: one program would walk the whole row while the rest of a sparse launch is long done
(H200, 128K: a launch of one grid head took 3.2 ms, nearly all of it that one row). A second
launch gives each ``SEGMENT_BLOCKS`` key blocks of those rows their own program, writing partial
(sum, max, normaliser) tiles that ``_merge_segments`` combines (FlashDecoding's split-KV).
Dense rows (``dense_rows``) walk every causal key block without an index, split the same way;
each of their programs stacks one sub-block's rows of two query heads that share a KV head, so one
K/V tile load serves both heads' products (a question's 64 rows alone made 64-row programs that
read K and V once a head).
Semantics, index format and positions: ``index.py``. Reference: ``reference.py``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from .index import SparseIndex, TokenOrder
from .launch import on_device, runs_triton, to_device

LOG2E = 1.4426950408889634
SEGMENT_BLOCKS = 64  # key blocks per program of a split row
MIN_SEGMENT_BLOCKS = 8  # ... when too few rows are split to fill the GPU (more partial tiles to merge)
PROGRAM_COST_BLOCKS = 2  # a split program's fixed work (its Q tile, its partial tile's store), in key blocks
BLOCK_ROWS = 128  # query rows per program (at most the index's block_m)


@triton.jit
def _softmax_pv(acc, m_i, l_i, qk, v, qk_scale):
    """One step of the online softmax: fold scores ``qk`` of one key tile into (acc, m, l)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # one FMA per score
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)  # accumulate in place: no second fp32 tile, no extra adds
    return acc, m_new, l_i


@triton.jit
def _gathered_keys_pv(acc, m_i, l_i, q, q_pos, k_base, v_base, k_pos_base, keys, k_rows, k_ok, stride_kn, stride_vn,
                      qk_scale):
    """Fold one tile of gathered keys (positions ``keys``, K/V rows ``k_rows``, valid where
    ``k_ok``) into the online softmax, masked causally on positions."""
    k_pos = tl.load(k_pos_base + keys, mask=k_ok, other=2147483647)
    k = tl.load(k_base + k_rows[:, None] * stride_kn, mask=k_ok[:, None], other=0.0)
    v = tl.load(v_base + k_rows[:, None] * stride_vn, mask=k_ok[:, None], other=0.0)
    qk = tl.dot(q, tl.trans(k))
    qk = tl.where((k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :], qk, float("-inf"))
    return _softmax_pv(acc, m_i, l_i, qk, v, qk_scale)


# Segment counts change with the prompt length, and the walked heads from layer to layer:
# specialising on their values (divisibility by 16) would recompile the kernel mid-prefill.
@triton.jit(do_not_specialize=["SEGMENTS", "SPLIT_COUNT", "SEGMENT", "WALK_COUNT", "PAIR_COUNT"])
def _sparse_attention_fwd(
    Q, K, V, KD, VD, O, LSE, QPOS, KPOS, BLOCKS, BLOCK_COUNT, FULL_COUNT, BLOCK_MASK, COLUMNS, COLUMN_COUNT, HEAD_MAP,
    HEAD_ROWS, LONG, SPLIT_ROWS, PART_ACC, PART_ML, QROWS, KROWS, WALK_PAIRS, WALK_HEADS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_ib, stride_ih, stride_iq,  # blocks / block_mask share B, H, NQ strides up to the last axis
    stride_mb, stride_mh, stride_mq,
    stride_cb, stride_ch,
    stride_nb, stride_nh,  # counts [B, H, NQ]
    H, GROUP, MQ, MK, NQ, qk_scale, SEGMENTS, SPLIT_COUNT, SEGMENT, WALK_COUNT, PAIR_COUNT,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_COLUMNS: tl.constexpr, HAS_HEAD_MAP: tl.constexpr, HAS_HEAD_ROWS: tl.constexpr, WRITE_LSE: tl.constexpr,
    ROW_MAPS: tl.constexpr,
    USE_TMA: tl.constexpr, HEADS_FASTEST: tl.constexpr, SKIP_LONG: tl.constexpr, SPLIT: tl.constexpr,
    SUB_M: tl.constexpr, TILE_N: tl.constexpr, DENSE_WALK: tl.constexpr, WALK_ROWS: tl.constexpr,
):
    # Heaviest (latest) query blocks first. With HEADS_FASTEST the heads of one query block run
    # side by side, so the heads of a GQA group read their shared key blocks while they are in L2.
    # SPLIT: program (bh, (i * SEGMENTS + s) * SUBS + sub) computes segment s of split row
    # SPLIT_ROWS[i]. Each program takes SUB_M of the query block's BLOCK_M rows (sub-block ``sub``).
    # DENSE_WALK (a SPLIT launch): SPLIT_ROWS[i] is a sub-block (qb * SUBS + sub) of WALK_ROWS rows
    # of a dense row, computed over every causal key block whatever the index holds (natural
    # order). Program (b * PAIR_COUNT + p, i * SEGMENTS + s) takes segment s of it for the heads of
    # pair p: rows [0, WALK_ROWS) of the program are head WALK_HEADS[WALK_PAIRS[2p]]'s, the rest
    # (SUB_M = 2 * WALK_ROWS) the second head's (slot -1: none). Both read the same KV head;
    # partial tiles go to (b, slot). With SUB_M = WALK_ROWS a program takes one head.
    PART_M: tl.constexpr = WALK_ROWS if DENSE_WALK else BLOCK_M  # rows of a partial tile
    SUBS: tl.constexpr = BLOCK_M // PART_M if DENSE_WALK else BLOCK_M // SUB_M
    if DENSE_WALK:
        bh = tl.program_id(0)
        split_at = tl.program_id(1) // SEGMENTS
        seg = tl.program_id(1) % SEGMENTS
        at = tl.load(SPLIT_ROWS + split_at)
        qb = at // SUBS
        sub = at % SUBS
        pair = bh % PAIR_COUNT
        slot = tl.where(tl.arange(0, SUB_M) < PART_M, tl.load(WALK_PAIRS + 2 * pair),
                        tl.load(WALK_PAIRS + 2 * pair + 1))  # per row
        row_heads = tl.load(WALK_HEADS + tl.maximum(slot, 0))
        bh = (bh // PAIR_COUNT) * H + tl.load(WALK_HEADS + tl.load(WALK_PAIRS + 2 * pair))  # the first head's
    elif SPLIT:
        bh = tl.program_id(0)
        sub = tl.program_id(1) % SUBS
        split_at = tl.program_id(1) // SUBS // SEGMENTS
        seg = tl.program_id(1) // SUBS % SEGMENTS
        qb = tl.load(SPLIT_ROWS + split_at)
    elif HEADS_FASTEST:
        bh = tl.program_id(0)
        qb = NQ - 1 - tl.program_id(1) // SUBS
        sub = tl.program_id(1) % SUBS
    else:
        qb = NQ - 1 - tl.program_id(0) // SUBS
        sub = tl.program_id(0) % SUBS
        bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if HAS_HEAD_MAP:
        kvh = tl.load(HEAD_MAP + h)
    else:
        kvh = h // GROUP
    # 64-bit tensor offsets: at 1M tokens, 28 heads x 1M rows x 128 overflows int32.
    b64, h64, kvh64 = b.to(tl.int64), h.to(tl.int64), kvh.to(tl.int64)
    if HAS_HEAD_ROWS:  # heads with the same pattern share one index row
        ih = tl.load(HEAD_ROWS + h)
    else:
        ih = h

    if DENSE_WALK:  # the pair's two heads: the same PART_M rows stacked
        offs_m = qb * BLOCK_M + sub * PART_M + tl.arange(0, SUB_M) % PART_M
        row_ok = (offs_m < MQ) & (slot >= 0)
        q_heads = row_heads.to(tl.int64)[:, None]
    else:
        offs_m = qb * BLOCK_M + sub * SUB_M + tl.arange(0, SUB_M)
        row_ok = offs_m < MQ
        q_heads = h64
    offs_n = tl.arange(0, TILE_N)  # keys per tile: an index block is BLOCK_N // TILE_N tiles
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = offs_m
    if ROW_MAPS:  # row i of the order is row QROWS[i] of Q and O (a permutation read in place)
        q_rows = tl.load(QROWS + b * MQ + offs_m, mask=row_ok, other=0)
    rows64 = q_rows.to(tl.int64)[:, None]
    row = BLOCKS + b * stride_ib + ih * stride_ih + qb * stride_iq
    count_at = b * stride_nb + ih * stride_nh + qb
    n_blocks = tl.load(BLOCK_COUNT + count_at)
    n_full = tl.load(FULL_COUNT + count_at)
    if DENSE_WALK:  # key i at position i: blocks up to the last row's, whole up to the first row's
        pos = tl.load(QPOS + b * MQ + offs_m, mask=row_ok, other=-1)
        n_blocks = tl.max(pos) // BLOCK_N + 1
        n_full = (tl.min(tl.where(pos >= 0, pos, 2147483646)) + 1) // BLOCK_N
    first = 0
    if SKIP_LONG:  # a split row: the SPLIT launch computes it (this program writes zeros, overwritten)
        is_long = tl.load(LONG + qb) != 0
        n_blocks = tl.where(is_long, 0, n_blocks)
    if SPLIT:
        first = seg * SEGMENT
        n_blocks = tl.minimum(n_blocks, first + SEGMENT)
    # An empty row (a head computed in another launch) reads no Q: it only writes its zeros.
    busy = (n_blocks > first) | (HAS_COLUMNS and not DENSE_WALK)
    q = tl.load(Q + b64 * stride_qb + q_heads * stride_qh + rows64 * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & busy, other=0.0)
    q_pos = tl.load(QPOS + b * MQ + offs_m, mask=row_ok, other=-1)

    k_base = K + b64 * stride_kb + kvh64 * stride_kh + offs_d[None, :]
    v_base = V + b64 * stride_vb + kvh64 * stride_vh + offs_d[None, :]
    m_i = tl.full([SUB_M], -1.0e30, dtype=tl.float32)  # finite: fully masked rows stay NaN-free
    l_i = tl.zeros([SUB_M], dtype=tl.float32)
    acc = tl.zeros([SUB_M, HEAD_DIM], dtype=tl.float32)
    # One loop over the row's blocks, fully visible ones first; the last few (partially visible:
    # the diagonal) take a branch that masks on positions. One loop keeps the load pipeline
    # running into the diagonal block; two loops drained and refilled it (H200, 64K at 5%: 67% ->
    # 79% of cuDNN's rate, with the reciprocal epilogue below).
    for j in range(first, n_blocks):
        if DENSE_WALK:
            block_start = j * BLOCK_N
        else:
            block_start = tl.load(row + j) * BLOCK_N
        for t in tl.static_range(BLOCK_N // TILE_N):
            start = block_start + t * TILE_N
            keys = start + offs_n
            k_ok = keys < MK
            if USE_TMA:  # the copy engine zero-fills rows past the end
                k = KD.load([b, kvh, start, 0]).reshape(TILE_N, HEAD_DIM)
                v = VD.load([b, kvh, start, 0]).reshape(TILE_N, HEAD_DIM)
            else:
                k_rows = keys
                if ROW_MAPS:
                    k_rows = tl.load(KROWS + b * MK + keys, mask=k_ok, other=0)
                k = tl.load(k_base + k_rows[:, None] * stride_kn, mask=k_ok[:, None], other=0.0)
                v = tl.load(v_base + k_rows[:, None] * stride_vn, mask=k_ok[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k))
            if j >= n_full:
                k_pos = tl.load(KPOS + b * MK + keys, mask=k_ok, other=2147483647)
                qk = tl.where(k_pos[None, :] <= q_pos[:, None], qk, float("-inf"))
            acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, qk, v, qk_scale)
    if HAS_COLUMNS and not DENSE_WALK:  # a dense row has read every key
        n_cols = tl.load(COLUMN_COUNT + count_at)
        if SKIP_LONG:
            n_cols = tl.where(is_long, 0, n_cols)
        if SPLIT:  # the columns go with the first segment
            n_cols = tl.where(seg == 0, n_cols, 0)
        col_row = COLUMNS + b * stride_cb + ih * stride_ch
        mask_row = BLOCK_MASK + b * stride_mb + ih * stride_mh + qb * stride_mq
        for c in range(0, n_cols, TILE_N):
            at = c + offs_n
            keys = tl.load(col_row + at, mask=at < n_cols, other=0)
            in_block = tl.load(mask_row + keys // BLOCK_N, mask=at < n_cols, other=1).to(tl.int1)
            k_ok = (at < n_cols) & (keys < MK) & (in_block == 0)
            k_rows = keys
            if ROW_MAPS:
                k_rows = tl.load(KROWS + b * MK + keys, mask=k_ok, other=0)
            acc, m_i, l_i = _gathered_keys_pv(acc, m_i, l_i, q, q_pos, k_base, v_base, KPOS + b * MK, keys, k_rows,
                                              k_ok, stride_kn, stride_vn, qk_scale)

    if DENSE_WALK:  # each row's partial tile at its head's slot
        part = ((b * WALK_COUNT + slot).to(tl.int64) * SPLIT_COUNT + split_at) * SEGMENTS + seg
        offs_r = tl.arange(0, SUB_M) % PART_M
        ok = slot >= 0
        tl.store(PART_ACC + (part * PART_M + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=ok[:, None])
        tl.store(PART_ML + part * 2 * PART_M + offs_r, m_i, mask=ok)
        tl.store(PART_ML + part * 2 * PART_M + PART_M + offs_r, tl.where(q_pos >= 0, l_i, 0.0), mask=ok)
    elif SPLIT:  # partial tile, its running max and normaliser (padding rows: normaliser 0)
        part = (bh.to(tl.int64) * SPLIT_COUNT + split_at) * SEGMENTS + seg
        offs_r = sub * SUB_M + tl.arange(0, SUB_M)
        tl.store(PART_ACC + part * PART_M * HEAD_DIM + offs_r[:, None] * HEAD_DIM + offs_d[None, :], acc)
        tl.store(PART_ML + part * 2 * PART_M + offs_r, m_i)
        tl.store(PART_ML + part * 2 * PART_M + PART_M + offs_r, tl.where(q_pos >= 0, l_i, 0.0))
    else:
        seen = (l_i > 0) & (q_pos >= 0)  # padding rows may have summed keys in full blocks: drop them
        inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)  # one division per row, not per element
        out = acc * inv_l[:, None]
        tl.store(O + b64 * stride_ob + h64 * stride_oh + rows64 * stride_om + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])
        if WRITE_LSE:
            lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
            tl.store(LSE + bh.to(tl.int64) * MQ + q_rows, lse, mask=row_ok)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: TokenOrder, index: SparseIndex,
           head_map: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Hq, Mq, D] and k, v [B, Hkv, Mk, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or (head_map is None and q.shape[1] % k.shape[1]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim, or "
                         "the query heads are not a multiple of the KV heads (pass head_map for a head subset)")
    if head_map is not None and (head_map.shape != (q.shape[1],) or head_map.dtype != torch.int32):
        raise ValueError(f"head_map must be int32 [{q.shape[1]}] (the KV head of each query head)")
    if q.shape[-1] not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {q.shape[-1]} is not supported; use one of 16, 32, 64, 128, 256")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the last dimension of q, k and v must be contiguous")
    if (order.block_m, order.block_n) != (index.block_m, index.block_n):
        raise ValueError(f"index blocks {index.block_m}x{index.block_n} differ from the token order's "
                         f"{order.block_m}x{order.block_n}")
    if order.q_pos.shape != (q.shape[0], q.shape[2]) or order.k_pos.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"token order covers {tuple(order.q_pos.shape)} queries and {tuple(order.k_pos.shape)} "
                         f"keys but q has {q.shape[2]} rows and k {k.shape[2]}")
    if index.head_rows is not None:
        if index.head_rows.shape != (q.shape[1],) or index.head_rows.dtype != torch.int32:
            raise ValueError(f"index.head_rows must be int32 [{q.shape[1]}] (the index row of each query head)")
    elif index.blocks.shape[1] not in (1, q.shape[1]):
        raise ValueError(f"index has {index.blocks.shape[1]} heads; use 1 or the {q.shape[1]} query heads")


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    order: TokenOrder,
    *,
    scale: float | None = None,
    head_map: torch.Tensor | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_tma: bool | None = None,
    heads_fastest: bool = False,
    long_rows: Sequence[int] = (),
    segment: int | None = None,
    block_rows: int | None = None,
    key_tile: int | None = None,
    rows: torch.Tensor | None = None,
    dense_rows: Sequence[int] = (),
    dense_block: int = 64,
    dense_row_heads: Sequence[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse causal attention. q [B, Hq, Mq, D], k/v [B, Hkv, Mk, D] (any strides with a
    contiguous last axis). On a CPU without the Triton interpreter it runs the same semantics
    in chunked torch (``reference.chunked_sparse_attention``). Returns [B, Mq, Hq, D] (the
    layout transformers' attention functions return), or write into ``out`` of that shape; with
    ``return_lse`` also the natural-log log-sum-exp [B, Hq, Mq] in float32 (-inf for rows that
    see nothing), for merging partials. ``head_map``: int32 [Hq], the KV head of each query head
    (default ``h // (Hq // Hkv)``), on q's device or on the CPU (copied without waiting; a map on
    the CPU also lets ``dense_rows`` pair the heads that share a KV head).
    ``long_rows``: query blocks (host ints) whose rows are split into programs of ``segment``
    key blocks each (default: as many as make whole waves of programs on the GPU,
    ``_segment_blocks``); the result is the same, only the work is spread
    (see the module docstring). ``block_rows``: query rows per program, a power of two dividing
    the index's ``block_m`` (default ``BLOCK_ROWS``, capped at ``block_m``); ``key_tile``: keys per
    K/V tile, one dividing ``block_n`` (default ``block_n``). Smaller tiles take less shared
    memory, so more programs may share an SM and hide the latency of short rows; 64-row
    programs alone were slower at 128K (H100: the K/V stages, not Q, fill shared memory).
    ``rows`` [Mq] (queries = keys): the index and ``order`` are in a permuted order whose row i
    is row ``rows[i]`` of q, k and v, and of the output (and LSE). The kernel reads and writes
    through it, so a permutation (the grid pattern's) costs no gathered copies of Q, K, V or O.
    ``dense_rows``: sub-blocks of ``dense_block`` query rows (row ``r`` is in sub-block
    ``r // dense_block``; host ints) computed over every causal key whatever the index holds
    (a question's text rows, dense in every sparse head), split like long rows and written over
    the index's result there; natural order only (key ``i`` at position ``i``).
    ``dense_row_heads``: the query heads whose ``dense_rows`` are computed (default all); the
    others keep what the index gives there (heads another launch overwrites)."""
    _check(q, k, v, order, index, head_map)
    if rows is not None:
        if rows.shape != (q.shape[2],) or q.shape[2] != k.shape[2] or rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"rows must be an integer permutation of the {q.shape[2]} rows of q, k and v "
                             f"(queries = keys); got {tuple(rows.shape)} {rows.dtype} for {k.shape[2]} keys")
        if use_tma:
            raise ValueError("use_tma reads whole key tiles; it cannot read through rows (leave use_tma off)")
    if dense_rows and (rows is not None or dense_block < 16 or dense_block & (dense_block - 1)
                       or index.block_m % dense_block):
        raise ValueError(f"dense_rows need the natural order (no rows) and a power-of-two dense_block >= 16 "
                         f"dividing block_m={index.block_m}; got dense_block={dense_block}")
    walk = list(range(q.shape[1])) if dense_row_heads is None else sorted(set(dense_row_heads))
    if walk and not 0 <= walk[0] <= walk[-1] < q.shape[1]:
        raise ValueError(f"dense_row_heads must be query heads in [0, {q.shape[1]}); got {walk}")
    if not walk:
        dense_rows = ()
    host_map = head_map  # as given: on the CPU it tells the dense rows which heads to pair
    if head_map is not None and head_map.device != q.device:
        head_map = to_device(head_map, q.device)
    if not runs_triton(q):
        if return_lse:
            raise ValueError("return_lse needs the Triton kernel (a CUDA device, or TRITON_INTERPRET=1 on the CPU)")
        from .reference import chunked_sparse_attention, dense_rows_attention

        if rows is None:
            result = chunked_sparse_attention(q, k, v, index, order, scale=scale, head_map=head_map)
            if dense_rows:
                dense_rows_attention(q, k, v, order, dense_rows, dense_block, result, scale=scale, head_map=head_map,
                                     heads=walk)
            return out.copy_(result) if out is not None else result
        rows = rows.long()
        q, k, v = (t.index_select(2, rows) for t in (q, k, v))
        result = chunked_sparse_attention(q, k, v, index, order, scale=scale, head_map=head_map)
        if out is None:
            out = torch.empty_like(result)
        return out.index_copy_(1, rows, result)
    bsz, hq, mq, d = q.shape
    hkv, mk = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty((bsz, mq, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, hq, mq), dtype=torch.float32, device=q.device) if return_lse else out
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nq = order.num_q_blocks
    bi, bm, cc, nc = index.blocks, index.block_mask, index.columns, index.block_count
    split = sorted({r for r in long_rows if 0 <= r < nq})
    if segment is None:
        segment = _segment_blocks(bi.shape[-1], bsz * hq * len(split), q.device)
    segments = -(-bi.shape[-1] // segment)
    if segments <= 1:
        split = []

    def hstride(t: torch.Tensor, axis: int = 1) -> int:
        return 0 if t.shape[axis] == 1 else t.stride(axis)

    has_cols = cc.shape[-1] > 0
    sub_m = min(index.block_m, BLOCK_ROWS if block_rows is None else block_rows)
    if index.block_m % sub_m or sub_m < 16 or sub_m & (sub_m - 1):
        raise ValueError(f"block_rows must be a power of two >= 16 dividing block_m={index.block_m}; got {sub_m}")
    subs = index.block_m // sub_m
    tile_n = index.block_n if key_tile is None else key_tile
    if index.block_n % tile_n or tile_n < 16 or tile_n & (tile_n - 1):
        raise ValueError(f"key_tile must be a power of two >= 16 dividing block_n={index.block_n}; got {tile_n}")
    if num_warps is None:
        num_warps = _warps(sub_m, tile_n, q)
    if num_stages is None:
        num_stages = 3 if q.is_cuda else 1
    if use_tma is None:
        use_tma = False
    kd = vd = None
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        kd = TensorDescriptor.from_tensor(k, [1, 1, tile_n, d])
        vd = TensorDescriptor.from_tensor(v, [1, 1, tile_n, d])
    row_map = nc if rows is None else rows.to(torch.int32).expand(bsz, -1).contiguous()
    flags = nc  # a placeholder for pointers a launch does not read
    if split:
        flags = torch.zeros(nq, dtype=torch.int8, device=q.device).index_fill_(
            0, to_device(split, q.device, torch.long), 1)

    def launch(grid: tuple[int, int], skip_long: bool, parts: _Parts | None = None, rows_per_program: int = sub_m,
               warps: int = num_warps, pairs: _Pairs | None = None) -> None:
        split_rows, part_acc, part_ml = (nc, nc, nc) if parts is None else (parts.rows, parts.acc, parts.ml)
        walk_pairs, walk_heads = (nc, nc) if pairs is None else (pairs.slots, pairs.heads)
        _sparse_attention_fwd[grid](
            q, k, v, kd, vd, out, lse, order.q_pos, order.k_pos, bi, nc, index.full_count, bm, cc, index.column_count,
            head_map if head_map is not None else nc, index.head_rows if index.head_rows is not None else nc,
            flags, split_rows, part_acc, part_ml, row_map, row_map, walk_pairs, walk_heads,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(2), out.stride(1),
            bi.stride(0), hstride(bi), bi.stride(2),
            bm.stride(0), hstride(bm), bm.stride(2),
            cc.stride(0), hstride(cc),
            nc.stride(0), hstride(nc),
            hq, max(1, hq // hkv), mq, mk, nq, scale * LOG2E,
            1 if parts is None else parts.segments, 1 if parts is None else parts.count,
            1 if parts is None else parts.segment, 1 if pairs is None else pairs.walked,
            1 if pairs is None else pairs.count,
            HEAD_DIM=d, BLOCK_M=index.block_m, BLOCK_N=index.block_n,
            HAS_COLUMNS=has_cols, HAS_HEAD_MAP=head_map is not None, HAS_HEAD_ROWS=index.head_rows is not None,
            WRITE_LSE=return_lse, ROW_MAPS=rows is not None, USE_TMA=use_tma, HEADS_FASTEST=heads_fastest,
            SKIP_LONG=skip_long, SPLIT=parts is not None, SUB_M=rows_per_program, TILE_N=tile_n,
            DENSE_WALK=parts is not None and parts.dense, WALK_ROWS=dense_block if pairs is not None else 0,
            num_warps=warps,
            num_stages=num_stages,
        )

    dense = sorted({r for r in dense_rows if 0 <= r < nq * (index.block_m // dense_block)})
    with on_device(q):
        launch((bsz * hq, nq * subs) if heads_fastest else (nq * subs, bsz * hq), bool(split))
        if split:
            parts = _Parts.make(split, segment, segments, bsz * hq, index.block_m, d, q.device)
            launch((bsz * hq, len(split) * segments * subs), False, parts)
        if dense:  # after the launches above: its rows are written over theirs
            pairs = _Pairs.make(walk, _host_kv_heads(hq, hkv, host_map), q.device)
            key_blocks = -(-mk // index.block_n)
            d_segment = _segment_blocks(key_blocks, bsz * pairs.count * len(dense), q.device)
            d_parts = _Parts.make(dense, d_segment, -(-key_blocks // d_segment), bsz * pairs.walked, dense_block, d,
                                  q.device, dense=True)
            stacked = dense_block * (2 if pairs.count < pairs.walked else 1)  # one head a program if none pair
            launch((bsz * pairs.count, len(dense) * d_parts.segments), False, d_parts, stacked,
                   _warps(stacked, tile_n, q), pairs)
    if split:
        _merge_segments(parts.acc, parts.ml, split, index.block_m, out, lse if return_lse else None, rows)
    if dense:
        _merge_segments(d_parts.acc, d_parts.ml, dense, dense_block, out, lse if return_lse else None,
                        heads=pairs.heads if pairs.walked < hq else None)
    return (out, lse) if return_lse else out


def _warps(rows: int, keys: int, q: torch.Tensor) -> int:
    """Warps of a program of ``rows`` query rows and K/V tiles of ``keys`` keys."""
    return 8 if rows * keys >= 128 * 64 and q.is_cuda else 4


@dataclass
class _Parts:
    """A split launch's rows (device int32), its segments and its partial tiles."""

    rows: torch.Tensor
    count: int
    segment: int
    segments: int
    acc: torch.Tensor  # [B*Hq, R, S, rows a tile, D] float32
    ml: torch.Tensor  # [B*Hq, R, S, 2, rows a tile] float32: running max (log2 units), normaliser
    dense: bool = False

    @classmethod
    def make(cls, rows: list[int], segment: int, segments: int, heads: int, tile_rows: int, d: int,
             device: torch.device, dense: bool = False) -> "_Parts":
        acc = torch.empty((heads, len(rows), segments, tile_rows, d), dtype=torch.float32, device=device)
        ml = torch.empty((heads, len(rows), segments, 2, tile_rows), dtype=torch.float32, device=device)
        return cls(to_device(rows, device, torch.int32), len(rows), segment, segments, acc, ml, dense)


def _host_kv_heads(hq: int, hkv: int, head_map: torch.Tensor | None) -> list[int]:
    """The KV head each query head reads, on the host. A ``head_map`` on the GPU is not read back
    (that would wait for the device): every head gets a KV head of its own, so none is paired
    (pass the map on the CPU)."""
    from .reference import kv_heads

    if head_map is not None and head_map.device.type != "cpu":
        return list(range(hq))
    return kv_heads(hq, hkv, head_map, "cpu").tolist()


@dataclass
class _Pairs:
    """The heads of a dense-row walk (device int32 ``heads``, ``walked`` of them) paired within
    their KV head: ``slots`` [2 * count] holds each pair's two indices into ``heads``, -1 for no
    second head (an odd count in a GQA group)."""

    heads: torch.Tensor
    walked: int
    slots: torch.Tensor
    count: int

    @classmethod
    def make(cls, walk: list[int], kv_of: list[int], device: torch.device) -> "_Pairs":
        by_kv: dict[int, list[int]] = {}
        for slot, h in enumerate(walk):
            by_kv.setdefault(kv_of[h], []).append(slot)
        slots = [s for group in by_kv.values() for i in range(0, len(group), 2)
                 for s in (group[i], group[i + 1] if i + 1 < len(group) else -1)]
        return cls(to_device(walk, device, torch.int32), len(walk), to_device(slots, device, torch.int32),
                   len(slots) // 2)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _segment_blocks(width: int, split_rows: int, device: torch.device) -> int:
    """Key blocks per program of a split row, so that the split launch's waves of programs come
    out whole: the count ``s`` of segments a row minimises waves x (blocks a program walks + a
    program's fixed cost), fewest segments on a tie, never under ``MIN_SEGMENT_BLOCKS`` (a
    FlashDecoding-style split heuristic; one program per SM). 28 heads' question row at 128K: 14
    segments of 74 blocks make 392 programs, three waves on 132 SMs; 16 of 64 made 448, the
    fourth wave 39% full. Two rows get one wave of 128 programs. Off CUDA: ``SEGMENT_BLOCKS``."""
    if device.type != "cuda" or split_rows == 0:
        return SEGMENT_BLOCKS
    sms = _sm_count(device)

    def cost(s: int) -> int:
        return -(-split_rows * s // sms) * (-(-width // s) + PROGRAM_COST_BLOCKS)

    best = min(range(1, max(1, -(-width // MIN_SEGMENT_BLOCKS)) + 1), key=lambda s: (cost(s), s))
    return -(-width // best)


@triton.jit(do_not_specialize=["SEGMENTS", "COUNT"])
def _merge_segments_fwd(
    PART_ACC, PART_ML, SPLIT_ROWS, O, LSE, ROWMAP, HEADS, H, MQ, SEGMENTS, COUNT, WALKED,
    stride_ob, stride_om, stride_oh,
    PART_M: tl.constexpr, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, WRITE_LSE: tl.constexpr,
    ROW_MAPS: tl.constexpr, HAS_HEADS: tl.constexpr,
):
    # Program (bh, i * CHUNKS + c): rows c * CHUNK.. of split row i, merged over its segments.
    # HAS_HEADS: partial tiles of WALKED heads a batch row, bh = b * WALKED + slot, head HEADS[slot].
    CHUNKS: tl.constexpr = PART_M // CHUNK
    bh = tl.program_id(0)
    i = tl.program_id(1) // CHUNKS
    c = tl.program_id(1) % CHUNKS
    if HAS_HEADS:
        b = bh // WALKED
        h = tl.load(HEADS + bh % WALKED)
    else:
        b = bh // H
        h = bh % H
    offs_r = c * CHUNK + tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    first = (bh.to(tl.int64) * COUNT + i) * SEGMENTS
    top = tl.full([CHUNK], -1.0e30, dtype=tl.float32)
    for seg in range(SEGMENTS):
        top = tl.maximum(top, tl.load(PART_ML + (first + seg) * 2 * PART_M + offs_r))
    acc = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)
    norm = tl.zeros([CHUNK], dtype=tl.float32)
    for seg in range(SEGMENTS):
        ml = PART_ML + (first + seg) * 2 * PART_M
        w = tl.math.exp2(tl.load(ml + offs_r) - top)
        norm += tl.load(ml + PART_M + offs_r) * w
        part = tl.load(PART_ACC + ((first + seg) * PART_M + offs_r)[:, None] * HEAD_DIM + offs_d[None, :])
        acc += part * w[:, None]
    seen = norm > 0
    merged = tl.where(seen[:, None], acc / tl.where(seen, norm, 1.0)[:, None], 0.0)
    row = tl.load(SPLIT_ROWS + i) * PART_M + offs_r
    ok = row < MQ  # the last block may be short
    dst = row
    if ROW_MAPS:
        dst = tl.load(ROWMAP + row, mask=ok, other=0)
    tl.store(O + b.to(tl.int64) * stride_ob + dst.to(tl.int64)[:, None] * stride_om + h * stride_oh + offs_d[None, :],
             merged.to(O.dtype.element_ty), mask=ok[:, None])
    if WRITE_LSE:
        lse = tl.where(seen, (top + tl.math.log2(tl.where(seen, norm, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(LSE + (b * H + h).to(tl.int64) * MQ + dst, lse, mask=ok)


def _merge_segments(part_acc: torch.Tensor, part_ml: torch.Tensor, split: list[int], block_m: int,
                    out: torch.Tensor, lse: torch.Tensor | None, rows: torch.Tensor | None = None,
                    heads: torch.Tensor | None = None) -> None:
    """Combine the split rows' partial tiles ([B*Hq, R, S, BM, D], max and normaliser [.., 2, BM],
    maxima in log2 units) into ``out`` [B, Mq, Hq, D] (and ``lse`` [B, Hq, Mq]): one launch over
    every split row and head (a dozen tensor ops before: ~70 us a merge on an H200). ``rows``:
    the launch's row map (split row i is written to row ``rows[i]``). ``heads`` (device int32):
    the tiles are of these query heads only, ``B * len(heads)`` of them."""
    bsz, mq, hq, d = out.shape
    tiles, count, segments = part_acc.shape[:3]
    chunk = min(block_m, 32)
    while out.is_cuda and chunk > 8 and tiles * count * (block_m // chunk) < _sm_count(out.device):
        chunk //= 2  # few split rows (one grid head's question): smaller chunks, more programs
    split_rows = to_device(split, out.device, torch.int32)
    row_map = rows.to(torch.int32).contiguous() if rows is not None else split_rows
    with on_device(out):
        _merge_segments_fwd[(tiles, count * (block_m // chunk))](
            part_acc, part_ml, split_rows, out, lse if lse is not None else part_ml, row_map,
            heads if heads is not None else split_rows, hq, mq, segments, count, tiles // bsz,
            out.stride(0), out.stride(1), out.stride(2),
            PART_M=block_m, CHUNK=chunk, HEAD_DIM=d, WRITE_LSE=lse is not None, ROW_MAPS=rows is not None,
            HAS_HEADS=heads is not None,
            num_warps=4,
        )
