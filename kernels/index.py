"""The block index format every block pattern compiles to, and the token order it is read in.

A-shape, block-sparse, grid (in its permuted order) and dense compile to ``SparseIndex``; so
can vertical-slash, as the aligned key blocks its diagonals touch (``patterns.vertical_slash``).
The prefill stage runs vertical-slash heads in their exact form instead, diagonal ranges
relative to each query block (``vertical_slash.SlashIndex``), on the same ``TokenOrder``.

``TokenOrder`` says where each row of Q and K sits in the original sequence. Causality is
always decided on these positions: key ``j`` is visible to query ``i`` iff
``k_pos[j] <= q_pos[i]``. In the natural order that is the usual bottom-right-aligned causal
mask (a query chunk of ``q_len`` rows ends at the last key); after a permutation (see
``permute.py``) it keeps exact causal semantics in the new order. Padding keys get position
``KEY_PAD`` (never visible), padding queries ``QUERY_PAD`` (their output rows are zero).

``SparseIndex`` lists, per (batch, query head, query block of ``block_m`` rows):

* ``blocks[b, h, r, :block_count]``: key blocks of ``block_n`` keys to compute. The first
  ``full_count`` are fully visible to every row of the query block (computed without any mask);
  the rest are partially visible (masked element-wise on positions). Blocks that no query of
  the block can see are never listed. This is FlexAttention's ``BlockMask`` split
  (full / partial) and converts to it directly (``flex.py``).
* ``columns[b, h, :column_count[b, h, r]]``: extra single key columns (the vertical lines of a
  vertical-slash head), ascending, shared by the head's query blocks; a row reads a prefix of
  it. A column inside a block the row already computes is skipped by the kernel (it looks the
  block up in ``block_mask``), so builders need not deduplicate.
* ``block_mask[b, h, r, c]``: the same block set as a dense boolean map.

The head dimension of every index tensor may be 1 (one pattern for all heads); it is then
broadcast, never copied. Or it holds a few distinct rows and ``head_rows[h]`` names the row
query head ``h`` reads, so heads with the same pattern share one row (a plan of 28 heads with
four patterns compiles four rows, not 28).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .launch import to_device

KEY_PAD = 2**31 - 1
QUERY_PAD = -1


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _block_min_max(pos: torch.Tensor, block: int, valid: torch.Tensor,
                   empty_max: int = KEY_PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block min and max of ``pos`` [B, M] over ``valid`` rows; rows past M count as invalid.
    Invalid rows read as KEY_PAD in the min and as ``empty_max`` in the max."""
    b, m = pos.shape
    nb = _blocks(m, block)
    pad = nb * block - m
    big = torch.full((b, pad), KEY_PAD, dtype=pos.dtype, device=pos.device)
    p = torch.cat([pos, big], 1).view(b, nb, block)
    v = torch.cat([valid, torch.zeros((b, pad), dtype=torch.bool, device=pos.device)], 1).view(b, nb, block)
    lo = torch.where(v, p, KEY_PAD).amin(-1)
    hi = torch.where(v, p, empty_max).amax(-1)
    return lo, hi


@dataclass(frozen=True)
class TokenOrder:
    """Original positions of the Q rows ``q_pos`` [B, Mq] and K rows ``k_pos`` [B, Mk] (int32),
    with per-block minima and maxima used to classify blocks as full / partial / invisible."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    block_m: int
    block_n: int
    q_min: torch.Tensor  # [B, NQ] over valid rows (KEY_PAD when the block is all padding)
    q_max: torch.Tensor  # [B, NQ] over valid rows (QUERY_PAD-free; KEY_PAD when all padding)
    k_min: torch.Tensor  # [B, NK] over valid keys
    k_max: torch.Tensor  # [B, NK] KEY_PAD when the block holds padding
    # Whether some query row or key is padding, when the host knows (None: look at the positions).
    padded: bool | None = None

    @property
    def num_q_blocks(self) -> int:
        return self.q_min.shape[1]

    @property
    def num_k_blocks(self) -> int:
        return self.k_min.shape[1]

    @classmethod
    def from_positions(cls, q_pos: torch.Tensor, k_pos: torch.Tensor, block_m: int, block_n: int,
                       padded: bool | None = None) -> "TokenOrder":
        q_pos, k_pos = q_pos.to(torch.int32).contiguous(), k_pos.to(torch.int32).contiguous()
        q_min, q_max = _block_min_max(q_pos, block_m, q_pos >= 0, empty_max=QUERY_PAD)
        q_max = torch.where(q_min == KEY_PAD, QUERY_PAD, q_max)
        k_min, _ = _block_min_max(k_pos, block_n, k_pos != KEY_PAD)
        _, k_max = _block_min_max(k_pos, block_n, torch.ones_like(k_pos, dtype=torch.bool))
        return cls(q_pos, k_pos, block_m, block_n, q_min, q_max, k_min, k_max, padded)

    @classmethod
    def causal(
        cls,
        q_len: int,
        kv_len: int,
        block_m: int,
        block_n: int,
        *,
        q_lens: torch.Tensor | None = None,
        kv_lens: torch.Tensor | None = None,
        batch: int = 1,
        device: torch.device | str = "cpu",
    ) -> "TokenOrder":
        """Natural order for a padded batch: Q is [B, q_len] rows, K is [B, kv_len] rows; sequence
        ``b`` has ``q_lens[b]`` queries that end at its last key ``kv_lens[b] - 1`` (chunked
        prefill when ``q_lens < kv_lens``); the rest is right padding."""
        lens_given = q_lens is not None or kv_lens is not None
        if q_lens is None:
            q_lens = torch.full((batch,), q_len, dtype=torch.int32, device=device)
        if kv_lens is None:
            kv_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)
        q_lens, kv_lens = q_lens.to(device=device, dtype=torch.int32), kv_lens.to(device=device, dtype=torch.int32)
        rows = torch.arange(q_len, dtype=torch.int32, device=device)[None]
        keys = torch.arange(kv_len, dtype=torch.int32, device=device)[None]
        q_pos = torch.where(rows < q_lens[:, None], rows + (kv_lens - q_lens)[:, None], QUERY_PAD)
        k_pos = torch.where(keys < kv_lens[:, None], keys, KEY_PAD)
        return cls.from_positions(q_pos, k_pos, block_m, block_n, padded=None if lens_given else False)

    def block_visibility(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(visible, full): [B, NQ, NK] booleans. ``visible``: some query of the block may see
        some key of it; ``full``: every valid query sees every key (no mask needed)."""
        visible = self.k_min[:, None, :] <= self.q_max[:, :, None]
        full = self.k_max[:, None, :] <= self.q_min[:, :, None]
        return visible, full & visible


@dataclass(frozen=True)
class SparseIndex:
    """Per (batch, query head, query block) key blocks and key columns; see the module docstring."""

    block_m: int
    block_n: int
    blocks: torch.Tensor  # int32 [B, H, NQ, W]
    block_count: torch.Tensor  # int32 [B, H, NQ]
    full_count: torch.Tensor  # int32 [B, H, NQ]
    block_mask: torch.Tensor  # bool [B, H, NQ, NK]
    columns: torch.Tensor  # int32 [B, H, C]
    column_count: torch.Tensor  # int32 [B, H, NQ]
    head_rows: torch.Tensor | None = None  # int32 [Hq]: the row query head h reads (shared rows)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.head_rows is None else t[:, self.head_rows.long()]

    def per_head(self) -> "SparseIndex":
        """The same index with its rows copied out per query head (for references and Flex)."""
        if self.head_rows is None:
            return self
        return SparseIndex(self.block_m, self.block_n, self._rows(self.blocks), self._rows(self.block_count),
                           self._rows(self.full_count), self._rows(self.block_mask), self._rows(self.columns),
                           self._rows(self.column_count))

    def nbytes(self) -> int:
        """Device memory the index holds."""
        return sum(t.nbytes for t in (self.blocks, self.block_count, self.full_count, self.block_mask,
                                      self.columns, self.column_count))

    def pairs(self) -> torch.Tensor:
        """``computed_pairs`` as a 0-dim float64 tensor on the index's device (not read back)."""
        blocks = self._rows(self.block_count).sum(dtype=torch.float64) * self.block_m * self.block_n
        return blocks + self._rows(self.column_count).sum(dtype=torch.float64) * self.block_m

    def computed_pairs(self) -> float:
        """Query-key pairs the kernel computes: whole blocks plus whole column chunks, over the
        index's heads (a head-free index counts once)."""
        return float(self.pairs())

    def density(self, order: TokenOrder) -> float:
        """Share of the causally visible block area that is computed (columns counted as one
        block_n-th of a block each)."""
        visible, _ = order.block_visibility()
        heads = self.blocks.shape[1] if self.head_rows is None else len(self.head_rows)
        total = visible.sum() * (heads if heads > 1 else 1) * self.block_m * self.block_n
        return float(self.computed_pairs() / total.clamp(min=1))


def compile_block_mask(
    mask: torch.Tensor,
    order: TokenOrder,
    columns: torch.Tensor | None = None,
    column_count: torch.Tensor | None = None,
    head_rows: torch.Tensor | Sequence[int] | None = None,
    *,
    full_width: bool = False,
) -> SparseIndex:
    """Turn a block mask [B, H, NQ, NK] into a ``SparseIndex``: drop invisible blocks, list the
    fully visible ones first. Vectorised (running counts and one scatter); no loops over heads or blocks.
    With ``head_rows`` the H mask rows are distinct patterns and query head h reads row
    ``head_rows[h]`` (a host list is checked on the host; a device tensor costs a sync).
    ``full_width``: ``blocks`` gets NK slots instead of the longest row's count, so nothing is
    read back from the device (built per layer during a prefill, a read-back would stall the GPU's
    queue); the same size when some query block sees every key block, as a trailing question does."""
    b, h, nq, nk = mask.shape
    if (nq, nk) != (order.num_q_blocks, order.num_k_blocks):
        raise ValueError(f"block mask has {nq}x{nk} blocks but the token order has "
                         f"{order.num_q_blocks}x{order.num_k_blocks}; build both with the same block sizes")
    visible, full = order.block_visibility()
    mask = mask & visible[:, None]
    is_full = mask & full[:, None]
    ids = torch.arange(nk, dtype=torch.int32, device=mask.device)
    count = mask.sum(-1, dtype=torch.int32)
    n_full = is_full.sum(-1, dtype=torch.int32)
    width = max(1, nk if full_width else int(count.max()))
    # Slot of each listed block: full blocks first, then partial ones, each ascending. Running
    # counts give it directly (no sort); unlisted blocks go to a spill slot past the end.
    slot = torch.where(is_full, is_full.cumsum(-1, dtype=torch.int32) - 1,
                       (mask & ~is_full).cumsum(-1, dtype=torch.int32) - 1 + n_full[..., None])
    slot = torch.where(mask, slot, width).long()
    blocks = torch.zeros((b, h, nq, width + 1), dtype=torch.int32, device=mask.device)
    blocks.scatter_(-1, slot, ids.expand(b, h, nq, nk))
    blocks = blocks[..., :width].contiguous()
    if columns is None:
        columns = torch.zeros((b, h, 0), dtype=torch.int32, device=mask.device)
        column_count = torch.zeros((b, h, nq), dtype=torch.int32, device=mask.device)
    column_count = column_count.to(torch.int32).expand(b, h, nq).contiguous()  # same strides as the counts
    if head_rows is not None:
        on_host = not isinstance(head_rows, torch.Tensor) or head_rows.device.type == "cpu"
        rows = torch.as_tensor(head_rows, dtype=torch.int32)
        if rows.dim() != 1 or bool(((rows < 0) | (rows >= h)).any()):
            raise ValueError(f"head_rows must be a 1-D list of mask rows in [0, {h}); got {rows.tolist()}")
        head_rows = to_device(rows, mask.device) if on_host else rows.contiguous()
    return SparseIndex(order.block_m, order.block_n, blocks, count, n_full,
                       mask, columns.to(torch.int32).contiguous(), column_count, head_rows)


def dense_index(order: TokenOrder, heads: int = 1) -> SparseIndex:
    """Every visible block: the sparse kernel then computes exact causal attention."""
    b = order.q_pos.shape[0]
    mask = torch.ones((b, heads, order.num_q_blocks, order.num_k_blocks), dtype=torch.bool, device=order.q_pos.device)
    return compile_block_mask(mask, order)
