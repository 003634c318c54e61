"""Vertical-slash heads in MInference's form: diagonals as key ranges, not aligned key blocks.

A diagonal at offset ``d`` (query position minus key position) seen from a query block whose
first position is ``qlo`` covers the ``block_m`` keys ``[qlo - d, qlo - d + block_m)``. In aligned
key blocks that range touches two blocks (twice the keys); here the ranges of a head's diagonals
are merged once, relative to ``qlo``, into sorted disjoint intervals cut into tiles of at most
``tile`` keys. Every query block reads the same relative tiles, shifted by its ``qlo``: the index
is per head, not per (head, query block), so it is small at any prompt length (no [NQ, NK] map).
H200, 128K, 256 random diagonals beyond a 256-diagonal band: 62% of the aligned blocks' keys.

``SlashIndex`` per (batch, head):

* ``starts[:count]``, ``widths[:count]``: the tiles, relative to ``qlo``, ascending; a query
  block reads tiles ``first[qb]:count`` (the earlier ones lie wholly before key 0);
* ``columns[:column_count[qb]]``: single key columns (ascending, a prefix per query block), read
  unless a tile of that block already covers them (``cover``: relative offsets in tiles);
* ``skip[b, qb]``: query blocks this launch leaves alone (text blocks, dense in another launch).

Causality is decided on positions (``TokenOrder``, natural order). The kernel writes only the
rows of the blocks it does not skip. Reference: ``slash_token_mask``; CPU fallback: chunked torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .index import KEY_PAD, TokenOrder
from .launch import on_device, runs_triton
from .sparse_attention import LOG2E, _gathered_keys_pv, _softmax_pv


@dataclass(frozen=True)
class SlashIndex:
    """Relative diagonal tiles and columns per (batch, head); see the module docstring."""

    block_m: int
    tile: int
    starts: torch.Tensor  # int32 [B, H, T]
    widths: torch.Tensor  # int32 [B, H, T] (0 past count)
    count: torch.Tensor  # int32 [B, H]
    first: torch.Tensor  # int32 [B, H, NQ]
    columns: torch.Tensor  # int32 [B, H, C]
    column_count: torch.Tensor  # int32 [B, H, NQ]
    cover: torch.Tensor  # int8 [B, H, MK + block_m]: relative offset r is in a tile iff cover[..., MK + r]
    skip: torch.Tensor  # bool [B, NQ]

    @property
    def heads(self) -> int:
        return self.starts.shape[1]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.starts, self.widths, self.count, self.first, self.columns,
                                      self.column_count, self.cover, self.skip))

    def select_heads(self, rows: torch.Tensor) -> "SlashIndex":
        """The index of heads ``rows`` (a device index into this one's heads)."""
        pick = {name: getattr(self, name).index_select(1, rows)
                for name in ("starts", "widths", "count", "first", "columns", "column_count", "cover")}
        return replace(self, **pick)

    def keys_per_block(self) -> torch.Tensor:
        """[B, H, NQ] float64: keys each query block reads (its tiles' keys and its columns; 0 in
        skipped blocks), on the device."""
        ends = torch.nn.functional.pad(self.widths.to(torch.float64).cumsum(-1), (1, 0))  # [B, H, T + 1]
        total = ends.gather(-1, self.count.long()[..., None])  # [B, H, 1]
        keys = total - ends.gather(-1, self.first.long()) + self.column_count.to(torch.float64)
        return keys * ~self.skip[:, None]

    def pairs(self) -> torch.Tensor:
        """Query-key pairs computed (``keys_per_block`` times ``block_m`` rows), a 0-dim float64
        tensor on the device."""
        return self.keys_per_block().sum() * self.block_m


def concat_heads(parts: list[SlashIndex]) -> SlashIndex:
    """Heads of several indices side by side (tiles and columns padded to the widest); they
    share one token order and the same skipped blocks."""
    if len(parts) == 1:
        return parts[0]

    def joined(name: str) -> torch.Tensor:
        ts = [getattr(p, name) for p in parts]
        width = max(t.shape[-1] for t in ts)
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in ts], 1)

    return replace(parts[0], **{name: joined(name) for name in ("starts", "widths", "first", "columns",
                                                                 "column_count", "cover")},
                   count=torch.cat([p.count for p in parts], 1))


def slash_index(diagonals: torch.Tensor, columns: torch.Tensor, order: TokenOrder, skip: torch.Tensor | None = None,
                tile: int | None = None) -> SlashIndex:
    """Build a ``SlashIndex`` from diagonal offsets ``diagonals`` [B, H, S] (query minus key
    position, >= 0; a repeated offset is harmless) and key columns ``columns`` [B, H, C]
    (ascending), for queries in ``order`` (natural order). ``skip`` [B, NQ]: query blocks left to another launch. Vectorised: a running maximum
    merges the diagonals' ranges, a search over running tile counts cuts them; nothing is read
    back from the device."""
    bm = order.block_m
    tile = order.block_n if tile is None else tile
    bsz, h, s = diagonals.shape
    dev = diagonals.device
    mk = order.k_pos.shape[1]
    lo = -diagonals.to(torch.int64).sort(-1, descending=True).values  # range starts, ascending
    hi = lo + bm
    reach = torch.nn.functional.pad(hi.cummax(-1).values[..., :-1], (1, 0), value=torch.iinfo(torch.int64).min)
    new = lo > reach  # starts a new merged interval (touching ranges merge)
    which = new.long().cumsum(-1) - 1  # interval of each range
    iv_lo = torch.zeros_like(lo).scatter_reduce(-1, which, lo, "amin", include_self=False)
    iv_hi = torch.zeros_like(hi).scatter_reduce(-1, which, hi, "amax", include_self=False)
    n_iv = new.sum(-1, keepdim=True)
    slots = torch.arange(s, device=dev)
    tiles = torch.where(slots < n_iv, (iv_hi - iv_lo + tile - 1) // tile, 0)  # per interval
    done = tiles.cumsum(-1)  # tiles up to and including each interval
    width_t = s * -(-bm // tile)  # an interval of m ranges needs at most m * ceil(bm / tile) tiles
    t = torch.arange(width_t, device=dev).expand(bsz, h, -1).contiguous()
    iv = torch.searchsorted(done, t, right=True).clamp(max=s - 1)
    before = done.gather(-1, iv) - tiles.gather(-1, iv)
    starts = iv_lo.gather(-1, iv) + (t - before) * tile
    count = done[..., -1:]
    valid = t < count
    widths = torch.where(valid, torch.minimum(iv_hi.gather(-1, iv) - starts, torch.full_like(starts, tile)), 0)
    starts = torch.where(valid, starts, 0)
    # first[qb]: tiles ending at or before key 0 of that block (end <= -qlo); ends ascend.
    ends = torch.where(valid, starts + widths, torch.iinfo(torch.int64).max)
    qlo = order.q_min.to(torch.int64)[:, None, :].expand(bsz, h, -1).contiguous()
    first = torch.searchsorted(ends, -qlo, right=True).minimum(count)
    if skip is None:
        skip = torch.zeros_like(order.q_min, dtype=torch.bool)
    # Skipped blocks and blocks of padding rows only (q_min = KEY_PAD) read no tile.
    first = torch.where(skip[:, None, :] | (qlo >= KEY_PAD), count, first)
    # Relative offsets in some tile: +1 at each start, -1 at each end, running sum.
    marks = torch.zeros((bsz, h, mk + bm + 1), dtype=torch.int32, device=dev)
    at = (starts + mk).clamp(0, mk + bm)
    end = (starts + widths + mk).clamp(0, mk + bm)
    marks.scatter_add_(-1, at, valid.to(torch.int32))
    marks.scatter_add_(-1, end, -valid.to(torch.int32))
    cover = (marks.cumsum(-1)[..., :-1] > 0).to(torch.int8)
    column_count = torch.searchsorted(columns.to(torch.int64).contiguous(),
                                      order.q_max.to(torch.int64)[:, None, :].expand(bsz, h, -1).contiguous(),
                                      right=True)
    return SlashIndex(bm, tile, starts.to(torch.int32), widths.to(torch.int32), count[..., 0].to(torch.int32),
                      first.to(torch.int32), columns.to(torch.int32).contiguous(), column_count.to(torch.int32),
                      cover, skip.contiguous())


def slash_token_mask(index: SlashIndex, order: TokenOrder, rows: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, R, Mk] booleans: the tokens the index makes query rows ``rows`` (default: all Mq)
    compute, after causality (skipped blocks compute nothing here). For scoring, tests and the
    CPU path; memory O(R x Mk)."""
    bm, mk = index.block_m, order.k_pos.shape[1]
    bsz, h = index.count.shape
    dev = index.starts.device
    if rows is None:
        rows = torch.arange(order.q_pos.shape[1], device=dev)
    qb = rows // bm
    qlo = order.q_min.to(torch.int64)[:, qb]  # [B, R]
    rel = torch.arange(mk, device=dev)[None, None, :] - qlo[:, :, None]  # [B, R, MK]
    inside = (rel >= -mk) & (rel < bm)
    idx = (rel + mk).clamp(0, mk + bm - 1)
    tokens = index.cover.bool()[:, :, None, :].expand(bsz, h, len(rows), -1).gather(
        -1, idx[:, None].expand(bsz, h, -1, -1)) & inside[:, None]
    if index.columns.shape[-1]:
        take = torch.arange(index.columns.shape[-1], device=dev) < index.column_count[:, :, qb, None]  # [B, H, R, C]
        cols = torch.zeros((bsz, h, len(rows), mk + 1), dtype=torch.bool, device=dev)
        cols.scatter_(-1, torch.where(take, index.columns[:, :, None, :].long(), mk), True)
        tokens = tokens | cols[..., :mk]
    causal = order.k_pos[:, None, None, :] <= order.q_pos[:, None, rows, None]
    return tokens & causal & ~index.skip[:, None, qb, None]


@triton.jit(do_not_specialize=["H", "MQ", "MK", "NQ"])
def _slash_attention_fwd(
    Q, K, V, O, QPOS, KPOS, QMIN, STARTS, WIDTHS, FIRST, COUNT, COLUMNS, COLUMN_COUNT, COVER, SKIP, HEAD_MAP, QHEADS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_tb, stride_th, stride_fb, stride_fh, stride_cb, stride_ch, stride_xb, stride_xh,
    H, MQ, MK, NQ, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr, HAS_COLUMNS: tl.constexpr,
    HAS_QHEADS: tl.constexpr,
):
    # One program per (batch x index head, query block), the latest (heaviest) blocks first.
    # Index head h is query head QHEADS[h] of Q and O (with HAS_QHEADS), else h.
    bh = tl.program_id(0)
    qb = NQ - 1 - tl.program_id(1)
    b = bh // H
    h = bh % H
    if tl.load(SKIP + b * NQ + qb) != 0:
        return
    kvh = tl.load(HEAD_MAP + h)
    qh = h
    if HAS_QHEADS:
        qh = tl.load(QHEADS + h)
    b64, h64, kvh64 = b.to(tl.int64), qh.to(tl.int64), kvh.to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < MQ
    rows64 = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows64 * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    q_pos = tl.load(QPOS + b * MQ + offs_m, mask=row_ok, other=-1)
    qlo = tl.load(QMIN + b * NQ + qb)
    k_base = K + b64 * stride_kb + kvh64 * stride_kh + offs_d[None, :]
    v_base = V + b64 * stride_vb + kvh64 * stride_vh + offs_d[None, :]
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    tiles = STARTS + b * stride_tb + h * stride_th
    widths = WIDTHS + b * stride_tb + h * stride_th
    first = tl.load(FIRST + b * stride_fb + h * stride_fh + qb)
    count = tl.load(COUNT + b * H + h)
    for j in range(first, count):
        start = qlo + tl.load(tiles + j)
        width = tl.load(widths + j)
        keys = start + offs_n
        k_ok = (offs_n < width) & (keys >= 0) & (keys < MK)
        k = tl.load(k_base + keys[:, None] * stride_kn, mask=k_ok[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vn, mask=k_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k))
        # Most tiles lie wholly before the block's first query: visible to every row, no mask.
        if (start < 0) | (width < TILE) | (start + TILE > qlo):
            k_pos = tl.load(KPOS + b * MK + keys, mask=k_ok, other=2147483647)
            qk = tl.where(k_pos[None, :] <= q_pos[:, None], qk, float("-inf"))
        acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, qk, v, qk_scale)
    if HAS_COLUMNS:
        n_cols = tl.load(COLUMN_COUNT + b * stride_fb + h * stride_fh + qb)
        col_row = COLUMNS + b * stride_cb + h * stride_ch
        cover = COVER + b * stride_xb + h * stride_xh + MK  # cover[r] for relative offset r
        for c in range(0, n_cols, TILE):
            at = c + offs_n
            listed = at < n_cols
            keys = tl.load(col_row + at, mask=listed, other=0)
            rel = keys - qlo
            covered = tl.load(cover + rel, mask=listed & (rel >= -MK) & (rel < BLOCK_M), other=0)
            k_ok = listed & (keys < MK) & (covered == 0)
            acc, m_i, l_i = _gathered_keys_pv(acc, m_i, l_i, q, q_pos, k_base, v_base, KPOS + b * MK, keys, keys,
                                              k_ok, stride_kn, stride_vn, qk_scale)

    seen = (l_i > 0) & (q_pos >= 0)
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    tl.store(O + b64 * stride_ob + h64 * stride_oh + rows64 * stride_om + offs_d[None, :],
             (acc * inv_l[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])


def slash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SlashIndex, order: TokenOrder, *,
                    head_map: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    scale: float | None = None, heads: torch.Tensor | None = None, num_warps: int | None = None,
                    num_stages: int | None = None) -> torch.Tensor:
    """Attention of q [B, H, Mq, D] over k, v [B, Hkv, Mk, D] (query head ``h`` reads KV head
    ``head_map[h]``, default grouped) for the index's heads, written into ``out`` [B, Mq, H, D]
    (any strides) for the rows of the blocks the index does not skip; other rows of ``out`` are
    left as they are (zeros in a new one). ``heads`` (int [H_index]): the index's head ``i`` is
    query head ``heads[i]`` of q and ``out`` (read and written in place: a few heads of a layer,
    nothing gathered); ``head_map`` is then per index head, default ``heads[i] // group``.
    Triton on CUDA or under the interpreter, chunked torch otherwise."""
    bsz, hq, mq, d = q.shape
    hkv, mk = k.shape[1], k.shape[2]
    if heads is not None:
        heads = heads.to(device=q.device, dtype=torch.int32)
        if heads.dim() != 1:
            raise ValueError(f"heads must be a 1-D list of query heads of q; got shape {tuple(heads.shape)}")
    rows_h = hq if heads is None else len(heads)  # the index's heads
    if index.starts.shape[:2] != (bsz, rows_h) or order.q_pos.shape != (bsz, mq) or order.k_pos.shape != (bsz, mk):
        raise ValueError(f"slash index for {tuple(index.starts.shape[:2])} (batch, heads) and order for "
                         f"{tuple(order.q_pos.shape)} queries, {tuple(order.k_pos.shape)} keys do not fit q "
                         f"{tuple(q.shape)}{'' if heads is None else f' (heads {heads.tolist()})'} and k {tuple(k.shape)}")
    if index.block_m != order.block_m or index.cover.shape[-1] != mk + index.block_m:
        raise ValueError("the slash index was built for another token order; build it with slash_index(..., order)")
    if index.widths.stride() != index.starts.stride() or index.column_count.stride() != index.first.stride():
        # the kernel reads widths with the strides of starts, column counts with those of first
        index = replace(index, **{name: getattr(index, name).contiguous()
                                  for name in ("starts", "widths", "first", "column_count")})
    if head_map is None:
        if hq % hkv:
            raise ValueError(f"{hq} query heads are no multiple of {hkv} KV heads: pass head_map")
        head_map = (torch.arange(hq, device=q.device, dtype=torch.int32) if heads is None else heads) // (hq // hkv)
    if out is None:
        out = torch.zeros((bsz, mq, hq, d), dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if not runs_triton(q):
        if heads is None:
            return _chunked(q, k, v, index, order, head_map, out, scale)
        picked = heads.long()
        part = _chunked(q.index_select(1, picked), k, v, index, order, head_map, out.index_select(2, picked), scale)
        return out.index_copy_(2, picked, part)
    nq = order.num_q_blocks
    with on_device(q):
        _slash_attention_fwd[(bsz * rows_h, nq)](
            q, k, v, out, order.q_pos, order.k_pos, order.q_min, index.starts, index.widths, index.first,
            index.count, index.columns, index.column_count, index.cover, index.skip, head_map,
            heads if heads is not None else head_map,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(2), out.stride(1),
            index.starts.stride(0), index.starts.stride(1), index.first.stride(0), index.first.stride(1),
            index.columns.stride(0), index.columns.stride(1), index.cover.stride(0), index.cover.stride(1),
            rows_h, mq, mk, nq, scale * LOG2E,
            HEAD_DIM=d, BLOCK_M=index.block_m, TILE=index.tile, HAS_COLUMNS=index.columns.shape[-1] > 0,
            HAS_QHEADS=heads is not None,
            num_warps=num_warps or (8 if q.is_cuda and index.block_m >= 128 else 4),
            num_stages=num_stages or (3 if q.is_cuda else 1),
        )
    return out


def _chunked(q, k, v, index: SlashIndex, order: TokenOrder, head_map, out, scale, rows_per_chunk: int = 1024):
    """The kernel's semantics in torch, a chunk of query rows at a time (memory O(chunk x Mk))."""
    mq = q.shape[2]
    kf, vf = k[:, head_map.long()], v[:, head_map.long()]
    step = max(index.block_m, rows_per_chunk // index.block_m * index.block_m)
    for start in range(0, mq, step):
        end = min(mq, start + step)
        mask = slash_token_mask(index, order, torch.arange(start, end, device=q.device))
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, start:end], kf, vf, attn_mask=mask, scale=scale)
        o = torch.where((mask.any(-1) & (order.q_pos[:, None, start:end] >= 0))[..., None], o, 0.0)
        keep = ~index.skip[:, torch.arange(start, end, device=q.device) // index.block_m]  # [B, R]
        current = out[:, start:end]
        out[:, start:end] = torch.where(keep[:, :, None, None], o.transpose(1, 2).to(out.dtype), current)
    return out

