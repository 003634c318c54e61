"""Index builders: each sparse pattern as a ``SparseIndex`` (vectorised torch, no loops over heads
or blocks). Budgets are whole blocks: a band of ``local`` tokens covers every block it touches.

* ``a_shape``: sink blocks + a local band (in the rows' current order, so after a permutation it
  is a band in the permuted order: that is how the grid pattern is computed, see ``permute.py``).
* ``vertical_slash``: top-k key columns and top-k diagonals from the last queries' attention,
  the diagonals as the aligned key blocks they touch (a superset of MInference's ranges; the
  prefill stage runs the exact ranges, ``vertical_slash.py``).
* ``block_topk``: top-k (or cumulative mass ``gamma``) key blocks per query block from
  mean-pooled Q and K.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .index import KEY_PAD, SparseIndex, TokenOrder, compile_block_mask
from .launch import to_device


def _block_rows(n_rows: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    first = torch.arange(0, n_rows, block, device=device)
    return first, (first + block - 1).clamp(max=n_rows - 1)


def band_mask(order: TokenOrder, *, sink: int, local: int | Sequence[int], shifts: tuple[int, ...] = (0,)) -> torch.Tensor:
    """[B, L, NQ, NK] blocks touching the first ``sink`` rows of K or a band of ``local`` rows of
    K ending ``shift`` rows before each query row (row indices in the current order; each
    sequence's valid queries end at its last valid key, so a padded chunked batch aligns per
    sequence). ``local`` may list several widths: one mask each (L of them, 1 for an int), built
    by the same few tensor ops."""
    widths = (local,) if isinstance(local, int) else tuple(local)
    mq, mk = order.q_pos.shape[1], order.k_pos.shape[1]
    dev = order.q_pos.device
    q_first, q_last = _block_rows(mq, order.block_m, dev)
    k_first, k_last = _block_rows(mk, order.block_n, dev)
    offset = ((order.k_pos != KEY_PAD).sum(1) - (order.q_pos >= 0).sum(1))[:, None, None, None]  # [B, 1, 1, 1]
    width = to_device(widths, dev, torch.long)[None, :, None, None]  # [1, L, 1, 1]
    mask = (k_first < sink)[None, None, None, :].expand(len(offset), len(widths), len(q_first), -1).clone()
    for shift in shifts:  # a handful of bands, not a loop over blocks
        lo = q_first[None, None, :, None] + offset - shift - width + 1
        hi = q_last[None, None, :, None] + offset - shift
        mask |= (k_last[None, None, None, :] >= lo) & (k_first[None, None, None, :] <= hi)
    return mask


def a_shape(order: TokenOrder, *, sink: int = 128, local: int = 4096, heads: int = 1) -> SparseIndex:
    """Sink + local window ("streaming" heads)."""
    return compile_block_mask(band_mask(order, sink=sink, local=local).expand(-1, heads, -1, -1), order)


def last_query_scores(q: torch.Tensor, k: torch.Tensor, order: TokenOrder, last_q: int, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each sequence's last ``last_q`` valid queries over all keys:
    ([B, Hq, last_q, Mk] float32, their positions [B, last_q]). GQA by reshaping, not copying."""
    bsz, hq, mq, d = q.shape
    hkv = k.shape[1]
    n = min(last_q, mq)
    q_len = (order.q_pos >= 0).sum(1)  # valid rows come first (right padding)
    rows = (q_len[:, None] - n + torch.arange(n, device=q.device)[None]).clamp(min=0)  # [B, n]
    q_last = q.gather(2, rows[:, None, :, None].expand(bsz, hq, n, d))
    pos = order.q_pos.gather(1, rows)
    s = torch.einsum("bgrqd,bgkd->bgrqk", q_last.view(bsz, hkv, hq // hkv, n, d).float(), k.float())
    s = s.reshape(bsz, hq, n, -1) * (scale or 1.0 / math.sqrt(d))
    s = s.masked_fill(order.k_pos[:, None, None, :] > pos[:, None, :, None], float("-inf"))
    return s.softmax(-1), pos


def diagonal_sums(p: torch.Tensor, pos: torch.Tensor, first: Sequence[int] | None = None) -> torch.Tensor:
    """Sum of scores along each diagonal: out[..., d] = sum_i p[..., i, pos_i - d], for queries at
    consecutive positions ``pos`` [B, n] and keys in natural order. Skews the rows with one
    strided view per batch element instead of an index tensor as large as the scores. ``first``
    (``pos[:, 0]`` known on the host) spares reading it back from the device."""
    bsz, h, n, mk = p.shape
    out = p.new_zeros((bsz, h, mk))
    for b in range(bsz):  # batch elements may end at different positions
        p0 = int(pos[b, 0]) if first is None else int(first[b])
        span = min(mk, p0 + n)  # larger offsets reach before key 0 for every query
        flip = torch.nn.functional.pad(p[b].flip(-1), (n, n))  # [h, n, mk + 2n]; flip[i, n + u] = p[i, mk-1-u]
        width = mk + 2 * n
        c = mk - 1 - p0  # p[i, p0 + i - d] = flip[i, n + c - i + d]; out-of-range keys land in the zero pads
        skew = flip.as_strided((h, n, span), (n * width, width - 1, 1), flip.storage_offset() + n + c)
        out[b, :, :span] = skew.sum(1)
    return out


def vertical_slash(
    q: torch.Tensor,
    k: torch.Tensor,
    order: TokenOrder,
    *,
    vertical: int = 1000,
    slash: int = 2048,
    last_q: int = 64,
    sink_columns: int = 30,
    near_diagonals: int = 100,
) -> SparseIndex:
    """MInference-style vertical-slash index from the last queries, per query head. Natural token
    order only. Diagonals become block runs; columns stay single columns."""
    p, pos = last_query_scores(q, k, order, last_q)
    hq, mk = p.shape[1], p.shape[-1]
    v_score = p.sum(2)
    v_score = v_score.masked_fill(order.k_pos[:, None, :] < sink_columns, float("inf"))
    columns = v_score.topk(min(vertical, mk), -1).indices.sort(-1).values.to(torch.int32)
    column_count = torch.searchsorted(columns, order.q_max[:, None, :].expand(-1, hq, -1).contiguous(), right=True)

    s_score = diagonal_sums(p, pos)
    s_score[..., : min(near_diagonals, mk)] = float("inf")
    diags = s_score.topk(min(slash, mk), -1).indices  # [B, H, S] diagonal offsets d = q_pos - k_pos
    mask = slash_block_mask(diags, order)
    return compile_block_mask(mask, order, columns, column_count.to(torch.int32))


def slash_block_mask(diags: torch.Tensor, order: TokenOrder) -> torch.Tensor:
    """[B, H, NQ, NK] key blocks covered by the diagonals ``diags`` [B, H, S] (offsets
    d = q_pos - k_pos >= 0), natural order. A diagonal covers, for the query block starting at
    position qlo, keys [qlo - d, qlo - d + BM - 1]; with qlo = a * BN + r + qb * BM those blocks sit
    at fixed offsets from qb, so one [B, H, offsets] table, gathered on (qb, kb), gives the mask."""
    bsz, hq, _ = diags.shape
    dev = diags.device
    bm, bn = order.block_m, order.block_n
    if bm % bn:
        raise ValueError(f"slash patterns need block_m ({bm}) to be a multiple of block_n ({bn})")
    nq, nk = order.num_q_blocks, order.num_k_blocks
    start = order.q_pos[:, 0].clamp(min=0)  # position of query row 0 [B]
    a, r = start // bn, start % bn
    span = bm // bn + 2
    lo = torch.div(r[:, None, None] - diags, bn, rounding_mode="floor")  # first covered block - (qb * BM / BN + a)
    cover = lo[..., None] + torch.arange(span, device=dev)  # [B, H, S, span]
    ok = cover * bn <= (r[:, None, None] - diags)[..., None] + bm - 1
    shift = nk + span  # offsets lie in [-nk, span): shift them to be non-negative; slot shift + span is a bin
    table = torch.zeros((bsz, hq, shift + span + 1), dtype=torch.bool, device=dev)
    table.scatter_(-1, torch.where(ok, cover + shift, shift + span).flatten(2), True)
    table[..., shift + span] = False
    qb = torch.arange(nq, device=dev)
    kb = torch.arange(nk, device=dev)
    offset = kb[None, None, :] - a[:, None, None] - (qb * (bm // bn))[None, :, None]  # [B, NQ, NK]
    offset = (offset + shift).clamp(0, shift + span)
    return table.gather(-1, offset.flatten(1)[:, None, :].expand(bsz, hq, -1)).view(bsz, hq, nq, nk)


def _block_sum(x: torch.Tensor, valid: torch.Tensor, block: int, blocks: int, padded: bool | None = None
               ) -> torch.Tensor:
    """Sum of the valid rows of x [B, H, M, D] per block of rows, in float32: [B, H, blocks, D].
    No float copy of x, and no masked copy unless some row is padding (``padded``: known on the
    host; None: looked up, a read-back)."""
    bsz, h, m, d = x.shape
    if padded is None:
        padded = not bool(valid.all())
    if padded:
        x = x * valid[:, None, :, None].to(x.dtype)
    x = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - m)) if blocks * block != m else x
    return x.reshape(bsz, h, blocks, block, d).sum(3, dtype=torch.float32)


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, order: TokenOrder) -> torch.Tensor:
    """[B, Hq, NQ, NK] scores of mean-pooled query blocks against mean-pooled key blocks (padding
    excluded), -inf where no query of the block sees any key of it."""
    bsz, hq, mq, d = q.shape
    hkv, mk = k.shape[1], k.shape[2]
    bm, bn = order.block_m, order.block_n
    nq, nk = order.num_q_blocks, order.num_k_blocks
    qv, kv = order.q_pos >= 0, order.k_pos != KEY_PAD
    qp = _block_sum(q, qv, bm, nq, order.padded)
    kp = _block_sum(k, kv, bn, nk, order.padded)
    qn = torch.nn.functional.pad(qv, (0, nq * bm - mq)).view(bsz, nq, bm).sum(-1).clamp(min=1)
    kn = torch.nn.functional.pad(kv, (0, nk * bn - mk)).view(bsz, nk, bn).sum(-1).clamp(min=1)
    qp, kp = qp / qn[:, None, :, None], kp / kn[:, None, :, None]
    s = torch.einsum("bgrqd,bgkd->bgrqk", qp.view(bsz, hkv, hq // hkv, nq, d), kp).reshape(bsz, hq, nq, nk)
    visible, _ = order.block_visibility()
    return (s / math.sqrt(d)).masked_fill(~visible[:, None], float("-inf"))


def block_topk_mask(scores: torch.Tensor, order: TokenOrder, *, top_k: int | None = None, gamma: float | None = None,
                    sink_blocks: int = 1) -> torch.Tensor:
    """Block mask from block scores [B, H, NQ, NK]: the ``top_k`` best per query block, or the
    fewest whose softmax mass reaches ``gamma``; sink blocks and blocks crossing the causal
    boundary always."""
    if (top_k is None) == (gamma is None):
        raise ValueError("give exactly one of top_k and gamma")
    nk = scores.shape[-1]
    visible, full = order.block_visibility()
    keep = (visible & ~full)[:, None] | (torch.arange(nk, device=scores.device) < sink_blocks)
    if top_k is not None:
        chosen = scores.masked_fill(keep, float("inf")).topk(min(top_k, nk), -1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)
    else:
        prob = scores.softmax(-1).nan_to_num(0.0)
        sorted_p, order_idx = prob.sort(-1, descending=True)
        take = (sorted_p.cumsum(-1) - sorted_p) < gamma  # mass of the better blocks is still short of gamma
        take |= gamma >= 1.0  # rounding must not drop blocks when everything is asked for
        mask = torch.zeros_like(take).scatter_(-1, order_idx, take)
    return (mask | keep) & visible[:, None]


def block_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    order: TokenOrder,
    *,
    top_k: int | None = None,
    gamma: float | None = None,
    sink_blocks: int = 1,
) -> SparseIndex:
    """Key blocks per query block by mean-pooled scores: the ``top_k`` best, or the fewest whose
    estimated softmax mass reaches ``gamma``. The first ``sink_blocks`` and every block crossing
    the causal boundary are always kept."""
    mask = block_topk_mask(pooled_block_scores(q, k, order), order, top_k=top_k, gamma=gamma, sink_blocks=sink_blocks)
    return compile_block_mask(mask, order)
