"""Vertical-slash heads as diagonal key ranges (``mmsparse.kernels.vertical_slash``): the index
against a brute-force reading of its definition, the kernel against masked attention.

On a machine without CUDA the kernel runs under the Triton interpreter (float32 and float16:
the interpreter's bfloat16 ``tl.dot`` is wrong); on a GPU the same cases run in bfloat16 too.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmsparse.kernels.index import TokenOrder  # noqa: E402
from mmsparse.kernels.reference import masked_attention  # noqa: E402
from mmsparse.kernels.vertical_slash import (  # noqa: E402
    concat_heads,
    slash_attention,
    slash_index,
    slash_token_mask,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {
    torch.float32: dict(atol=5e-3, rtol=5e-3) if DEVICE == "cuda" else dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def brute_force(diags: list[list[int]], cols: list[list[int]], order: TokenOrder, skip: torch.Tensor) -> torch.Tensor:
    """[B, H, Mq, Mk] from the definition: a query of block qb (first position qlo) reads keys
    [qlo - d, qlo - d + block_m) of every diagonal d and every column, causally; nothing in a
    skipped block."""
    bsz, mq = order.q_pos.shape
    mk = order.k_pos.shape[1]
    bm = order.block_m
    q_pos, k_pos, q_min = order.q_pos.cpu(), order.k_pos.cpu(), order.q_min.cpu()
    out = torch.zeros(bsz, len(diags), mq, mk, dtype=torch.bool)
    for b in range(bsz):
        for h, (ds, cs) in enumerate(zip(diags, cols)):
            for i in range(mq):
                qb = i // bm
                if skip[b, qb] or q_pos[b, i] < 0:
                    continue
                qlo = int(q_min[b, qb])
                keys = {kk for d in ds for kk in range(qlo - d, qlo - d + bm)} | set(cs)
                for kk in keys:
                    if 0 <= kk < mk and k_pos[b, kk] <= q_pos[b, i]:
                        out[b, h, i, kk] = True
    return out


def case(seed: int, heads: int = 2, n: int = 100, block: int = 16, batch_lens=None):
    """Random diagonals (a near band and scattered ones, some touching) and columns per head."""
    g = torch.Generator().manual_seed(seed)
    if batch_lens is None:
        order = TokenOrder.causal(n, n, block, block, device=DEVICE)
    else:
        lens = torch.tensor(batch_lens, dtype=torch.int32)
        order = TokenOrder.causal(n, n, block, block, q_lens=lens, kv_lens=lens, device=DEVICE)
    diags, cols = [], []
    for _ in range(heads):
        far = torch.randperm(n - 4, generator=g)[:6] + 4
        diags.append(sorted({0, 1, 2, 3, *far.tolist(), int(far[0]) + 1}))  # touching ranges merge
        cols.append(sorted(torch.randperm(n, generator=g)[:5].tolist()))
    width = max(len(d) for d in diags)
    d_t = torch.tensor([d + [d[0]] * (width - len(d)) for d in diags])  # pad by repeating: same ranges
    c_t = torch.tensor(cols)
    bsz = order.q_pos.shape[0]
    skip = torch.zeros(bsz, order.num_q_blocks, dtype=torch.bool)
    skip[:, 1] = True  # a text block: left to another launch
    index = slash_index(d_t.expand(bsz, -1, -1).to(DEVICE), c_t.expand(bsz, -1, -1).to(DEVICE), order,
                        skip.to(DEVICE))
    return order, index, diags, cols, skip


@pytest.mark.parametrize("batch_lens", [None, [100, 61]], ids=["one", "batch-padded"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_index_reads_exactly_the_diagonal_ranges_and_columns(seed, batch_lens):
    order, index, diags, cols, skip = case(seed, batch_lens=batch_lens)
    want = brute_force(diags, cols, order, skip)
    assert torch.equal(slash_token_mask(index, order).cpu(), want)
    starts, widths, count = index.starts.cpu(), index.widths.cpu(), index.count.cpu()
    for b in range(count.shape[0]):
        for h in range(count.shape[1]):
            t = int(count[b, h])
            s, w = starts[b, h, :t], widths[b, h, :t]
            assert (w >= 1).all() and (w <= index.tile).all() and (widths[b, h, t:] == 0).all()
            assert (s[1:] >= s[:-1] + w[:-1]).all(), "tiles must be sorted and disjoint"
            covered = {int(x) for x, y in zip(s, w) for x in range(x, x + int(y))}
            ranges = {r for d in diags[h] for r in range(-d, -d + order.block_m)}
            assert covered == ranges, "tiles cover the merged ranges, nothing else"
    # A block's first tile is the first that reaches key 0 (earlier ones are never read).
    ends = (index.starts + index.widths).cpu()
    qlo = order.q_min.cpu()
    for b, h, qb in [(0, 0, 0), (0, 1, 3), (0, 0, order.num_q_blocks - 1)]:
        f = int(index.first[b, h, qb])
        assert (ends[b, h, :f] <= -qlo[b, qb]).all() and (f == index.count[b, h] or ends[b, h, f] > -qlo[b, qb])
    assert float(index.pairs()) == float(index.keys_per_block().sum()) * order.block_m


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_masked_attention_and_leaves_skipped_rows(dtype):
    """Query heads of two KV heads (grouped, and through head_map), columns that tiles already
    cover (read once), a padded batch; written into a poisoned strided view: skipped blocks keep
    what was there, every other row is the masked attention of the index's tokens."""
    hq, d = 4, 32
    order, index, diags, cols, skip = case(3, heads=hq, batch_lens=[100, 61])
    covered_col = index.cover[0, 0, order.k_pos.shape[1] + int(cols[0][0]) - int(order.q_min[0, -1])]
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, 100, d, generator=g).to(DEVICE, dtype) for h in (hq, 2, 2))
    want = brute_force(diags, cols, order, skip).to(DEVICE)
    ref, _ = masked_attention(q, k, v, want)
    rows_kept = ~skip.to(DEVICE).repeat_interleave(order.block_m, 1)[:, :100] & (order.q_pos >= 0)
    for head_map in (None, torch.tensor([1, 1, 0, 0], dtype=torch.int32, device=DEVICE)):
        if head_map is not None:
            ref, _ = masked_attention(q, k, v, want, head_map=head_map)
        out = torch.full((2, hq, 100, d), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
        res = slash_attention(q, k, v, index, order, head_map=head_map, out=out)
        assert res is out
        torch.testing.assert_close(out[rows_kept].float(), ref[rows_kept], **TOL[dtype])
        skipped = skip.to(DEVICE).repeat_interleave(order.block_m, 1)[:, :100]
        assert out[skipped].isnan().all(), "skipped blocks belong to another launch"
        assert (out[~skipped & (order.q_pos < 0)] == 0).all(), "padding rows are zero"
    assert covered_col in (0, 1)  # (the case has columns inside tiles for some blocks)


@pytest.mark.parametrize("backend", ["kernel", "cpu"])
def test_heads_are_read_and_written_in_place(monkeypatch, backend):
    """``heads``: the index's heads are query heads [3, 1] of a 4-head layer (KV heads 1 and 0),
    read from q and written into a [B, N, 4, D] output in place; the same as running them
    gathered, and the other heads of the output stay as they were."""
    import mmsparse.kernels.vertical_slash as module

    if backend == "cpu":
        monkeypatch.setattr(module, "runs_triton", lambda t: False)
    order, index, diags, cols, skip = case(3, heads=2, batch_lens=[100, 61])
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, h, 100, 32, generator=g).to(DEVICE) for h in (4, 2, 2))
    picked = torch.tensor([3, 1], device=DEVICE)
    want = slash_attention(q[:, picked], k, v, index, order, head_map=(picked // 2).to(torch.int32))
    out = torch.full((2, 100, 4, 32), float("nan"), device=DEVICE)
    res = slash_attention(q, k, v, index, order, heads=picked, out=out)
    assert res is out
    kept = ~skip.to(DEVICE).repeat_interleave(order.block_m, 1)[:, :100]
    torch.testing.assert_close(out[:, :, [3, 1]][kept], want[kept], **TOL[torch.float32])
    assert out[:, :, [0, 2]].isnan().all(), "other heads are not touched"
    with pytest.raises(ValueError, match="do not fit"):
        slash_attention(q, k, v, index, order, heads=torch.tensor([0, 1, 2], device=DEVICE))


def test_index_parts_with_their_own_strides_are_read_right():
    """The kernel reads tile widths with the tile starts' strides and column counts with the
    first tiles' strides: an index whose parts are laid out apart (views of wider tensors) is
    made contiguous first, so the result is the same."""
    order, index, diags, cols, skip = case(4, heads=2)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 100, 16, generator=g).to(DEVICE) for _ in range(3))
    want = slash_attention(q, k, v, index, order)

    def strided(t: torch.Tensor) -> torch.Tensor:  # same values, another layout
        return torch.cat([t, t], -1)[..., : t.shape[-1]]

    spread = dataclasses.replace(index, widths=strided(index.widths), column_count=strided(index.column_count))
    assert spread.widths.stride() != index.starts.stride()
    torch.testing.assert_close(slash_attention(q, k, v, spread, order), want)


def test_full_budget_is_dense_causal_attention():
    """Every diagonal: the tiles cover every earlier key, so the rows equal causal SDPA."""
    n, bm = 70, 16
    order = TokenOrder.causal(n, n, bm, bm, device=DEVICE)
    index = slash_index(torch.arange(n, device=DEVICE)[None, None], torch.zeros(1, 1, 0, dtype=torch.long,
                        device=DEVICE), order)
    assert int(index.count[0, 0]) == -(-(n - 1 + bm) // bm)  # one merged interval, cut into tiles
    q, k, v = (torch.randn(1, 1, n, 16, device=DEVICE) for _ in range(3))
    out = slash_attention(q, k, v, index, order)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), **TOL[torch.float32])


def test_heads_are_selected_and_joined():
    order, index, _, _, skip = case(4, heads=3)
    other = slash_index(torch.tensor([[[0, 50]]], device=DEVICE), torch.tensor([[[7]]], device=DEVICE), order,
                        skip.to(DEVICE))
    picked = index.select_heads(torch.tensor([2, 0], device=DEVICE))
    joined = concat_heads([picked, other])
    assert joined.heads == 3
    masks = slash_token_mask(joined, order)
    assert torch.equal(masks[:, :2], slash_token_mask(index, order)[:, [2, 0]])
    assert torch.equal(masks[:, 2:], slash_token_mask(other, order))


def test_misfit_inputs_are_refused():
    order, index, _, _, _ = case(5, heads=2)
    q = torch.randn(1, 3, 100, 16, device=DEVICE)
    k = torch.randn(1, 1, 100, 16, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        slash_attention(q, k, k, index, order)
    other = TokenOrder.causal(100, 100, 32, 32, device=DEVICE)
    with pytest.raises(ValueError, match="another token order"):
        slash_attention(q[:, :2], k, k, index, other)
