"""Sparse-attention kernels (``mmsparse.kernels``) against plain torch.

On a machine without CUDA the Triton kernel runs under the interpreter (``TRITON_INTERPRET=1``,
set here and in conftest.py before triton is first imported), which is slow: every shape below is
tiny. In the interpreter ``tl.dot`` on bfloat16 is wrong, so bfloat16 is only tested on a GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # never turn a real GPU run into an interpreted one
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmsparse.kernels.flex import flex_sparse_attention, to_block_mask  # noqa: E402
from mmsparse.kernels.index import (  # noqa: E402
    KEY_PAD,
    QUERY_PAD,
    TokenOrder,
    compile_block_mask,
    dense_index,
)
from mmsparse.kernels.patterns import a_shape, band_mask, block_topk, diagonal_sums, vertical_slash  # noqa: E402
from mmsparse.kernels.permute import (  # noqa: E402
    grid_index,
    grid_permutation,
    inverse_permutation,
    permuted_attention,
    permuted_order,
)
from mmsparse.kernels.reference import index_token_mask, masked_attention, reference_sparse_attention  # noqa: E402
from mmsparse.kernels.sparse_attention import sparse_attention  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# On the GPU tl.dot rounds float32 inputs to TF32 (a 10-bit mantissa, as in float16).
FP32_TOL = dict(atol=5e-3, rtol=5e-3) if DEVICE == "cuda" else dict(atol=2e-5, rtol=1e-4)
OUT_TOL = {
    torch.float32: FP32_TOL,
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
LSE_TOL = {
    torch.float32: dict(atol=2e-3, rtol=2e-3) if DEVICE == "cuda" else dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}


# ----------------------------------------------------------------------------- helpers


def qkv(b, hq, hkv, mq, mk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, mq, d, generator=g)
    k = torch.randn(b, hkv, mk, d, generator=g)
    v = torch.randn(b, hkv, mk, d, generator=g)
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


def lens(values):
    return torch.tensor(values, dtype=torch.int32)


def causal_order(mq, mk, bm, bn, q_lens=None, kv_lens=None, batch=1, device=DEVICE):
    if q_lens is not None:
        batch = len(q_lens)
        q_lens, kv_lens = lens(q_lens), lens(kv_lens)
    return TokenOrder.causal(mq, mk, bm, bn, q_lens=q_lens, kv_lens=kv_lens, batch=batch, device=device)


def causal_tokens(order):
    """[B, 1, Mq, Mk] exact causal visibility on positions (padding sees / is seen by nothing)."""
    return (order.k_pos[:, None, :] <= order.q_pos[:, :, None])[:, None]


def random_index(order, heads, *, density=0.5, n_cols=0, seed=0):
    """Random block mask (and, with ``n_cols``, per-head unique sorted columns with a random prefix
    length per query block) compiled to a SparseIndex."""
    g = torch.Generator().manual_seed(seed)
    b, nq, nk, mk = order.q_pos.shape[0], order.num_q_blocks, order.num_k_blocks, order.k_pos.shape[1]
    mask = (torch.rand(b, heads, nq, nk, generator=g) < density).to(DEVICE)
    if not n_cols:
        return compile_block_mask(mask, order)
    cols = torch.stack([torch.randperm(mk, generator=g)[:n_cols].sort().values for _ in range(b * heads)])
    counts = torch.randint(0, n_cols + 1, (b, heads, nq), generator=g)
    return compile_block_mask(mask, order, cols.view(b, heads, n_cols).to(DEVICE), counts.to(DEVICE))


def check_kernel(q, k, v, index, order, *, head_map=None, out=None, scale=None, **launch):
    """Kernel (with LSE) vs ``reference_sparse_attention`` on the same inputs; returns (out, lse)."""
    res, lse = sparse_attention(q, k, v, index, order, head_map=head_map, out=out, scale=scale, return_lse=True,
                                **launch)
    ref, ref_lse = reference_sparse_attention(q, k, v, index, order, head_map=head_map, scale=scale)
    b, hq, mq, d = q.shape
    assert res.shape == (b, mq, hq, d) and res.dtype == q.dtype
    assert lse.shape == (b, hq, mq) and lse.dtype == torch.float32
    assert torch.isfinite(res).all()
    torch.testing.assert_close(res.float(), ref, **OUT_TOL[q.dtype])
    pad = order.q_pos < 0
    assert (res[pad] == 0).all(), "padding query rows must be exactly zero"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows that see nothing differ"
    assert (lse[~finite] == float("-inf")).all()
    torch.testing.assert_close(lse[finite], ref_lse[finite], **LSE_TOL[q.dtype])
    return res, lse


# ----------------------------------------------------------------------------- 1. kernel vs reference

# b, hq, hkv, (mq, mk), q_lens, kv_lens, d, (bm, bn), cols, index heads ("H" or 1), head_map, dtype, out=, scale
KERNEL_CASES = [
    pytest.param(1, 2, 2, (100, 100), None, None, 32, (16, 16), 0, "H", None, torch.float32, False, None,
                 id="mha-M100-16x16"),
    pytest.param(1, 4, 2, (70, 150), None, None, 64, (32, 16), 24, "H", None, torch.float32, False, None,
                 id="gqa2-offset-cols-32x16"),
    pytest.param(2, 4, 1, (90, 90), [90, 53], [90, 53], 16, (16, 16), 20, 1, None, torch.float32, True, None,
                 id="gqa4-batch-cols-shared-out"),
    pytest.param(3, 8, 1, (40, 120), [40, 17, 33], [120, 60, 33], 32, (64, 32), 0, "H", None, torch.float16,
                 False, None, id="gqa8-batch-offsets-fp16-64x32"),
    pytest.param(2, 4, 2, (77, 77), None, None, 16, (32, 16), 16, "H", [1, 1, 0, 0], torch.float32, False, None,
                 id="head_map-cols"),
    pytest.param(1, 2, 2, (130, 130), None, None, 64, (64, 32), 12, 1, None, torch.float16, True, None,
                 id="fp16-cols-shared-out-64x32"),
    pytest.param(2, 4, 2, (33, 100), [20, 33], [100, 64], 64, (16, 16), 16, "H", None, torch.float32, False, 0.3,
                 id="gqa2-chunked-padded-cols-scale"),
    pytest.param(1, 4, 1, (200, 200), None, None, 16, (64, 32), 0, 1, None, torch.float16, False, None,
                 id="gqa4-fp16-M200"),
    pytest.param(2, 8, 1, (50, 50), None, None, 16, (16, 16), 10, 1, None, torch.float32, True, None,
                 id="gqa8-cols-shared-out"),
    pytest.param(1, 2, 1, (1, 97), None, None, 32, (16, 16), 8, "H", None, torch.float32, False, None,
                 id="single-query-row"),
    pytest.param(1, 3, 2, (48, 48), None, None, 16, (16, 16), 6, "H", [0, 1, 1], torch.float32, False, None,
                 id="head_map-subset-3-of-2"),
]


@pytest.mark.parametrize("split,half", [(False, False), (True, False), (True, True)],
                         ids=["rows", "split-rows", "split-half-tiles"])
@pytest.mark.parametrize("b,hq,hkv,shape,q_lens,kv_lens,d,blocks,n_cols,index_heads,head_map,dtype,use_out,scale",
                         KERNEL_CASES)
def test_kernel_matches_reference(b, hq, hkv, shape, q_lens, kv_lens, d, blocks, n_cols, index_heads, head_map,
                                  dtype, use_out, scale, split, half):
    """Every case, and again with every other query block's row (the last included) split into
    programs of two key blocks each (``long_rows``): the merged partials are the same attention;
    and again with programs of half a query block and K/V tiles of half a key block
    (``block_rows``, ``key_tile``, where that is >= 16)."""
    mq, mk = shape
    q, k, v = qkv(b, hq, hkv, mq, mk, d, dtype, seed=mq * 7 + mk)
    order = causal_order(mq, mk, *blocks, q_lens, kv_lens, batch=b)
    heads = hq if index_heads == "H" else 1
    index = random_index(order, heads, n_cols=n_cols, seed=3 * d + mq + mk)
    assert index.blocks.shape[1] == heads
    # The case must exercise what it claims: full and partial blocks listed, some columns read.
    assert index.full_count.sum() > 0
    assert (index.block_count - index.full_count).sum() > 0
    if n_cols:
        assert index.column_count.sum() > 0
    hm = torch.tensor(head_map, dtype=torch.int32, device=DEVICE) if head_map is not None else None
    out = None
    if use_out:  # a strided [B, Mq, Hq, D] view, poisoned: every row must be written
        out = torch.full((b, hq, mq, d), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    launch = {}
    if split:
        assert index.blocks.shape[-1] > 2 or mq == 1, "the case must split some row"
        launch = dict(long_rows=range(order.num_q_blocks - 1, -1, -2), segment=2)
    if half:  # and K/V tiles of half an index block
        launch["block_rows"] = max(16, blocks[0] // 2)
        launch["key_tile"] = max(16, blocks[1] // 2)
    res, _ = check_kernel(q, k, v, index, order, head_map=hm, out=out, scale=scale, **launch)
    if use_out:
        assert res is out


@pytest.mark.parametrize("heads", ["all", "some", "mapped", "mha"])
@pytest.mark.parametrize("segments", [1, 3], ids=["one-segment", "three-segments"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_rows_are_exact_whatever_the_index_holds(monkeypatch, dtype, segments, heads):
    """``dense_rows``: query sub-blocks computed over every causal key (split into segments and
    merged), written over what the index gives those rows; other rows follow the index. Equal to
    the reference of the index's mask with those rows made causal-dense (LSE too), on the CPU
    path as on the kernel. Groups of three query heads a KV head: the kernel pairs two heads of a
    group a program and leaves half of the third's program empty. ``dense_row_heads`` (some):
    only those heads' rows are dense, the rest keep the index's. ``head_map`` on the CPU (mapped):
    heads 0, 2, 4 read KV head 1 and are paired by it. One KV head a query head (mha): no pairs,
    a head a program."""
    import mmsparse.kernels.sparse_attention as kernel

    n, hq, d, bm = 150, 6, 32, 32
    hkv = hq if heads == "mha" else 2
    walked = [0, 2, 3, 4] if heads == "some" else list(range(hq))  # some: pairs (0, 2), (3, 4)
    head_map = torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.int32) if heads == "mapped" else None
    monkeypatch.setattr(kernel, "_segment_blocks", lambda width, rows, device: -(-width // segments))
    q, k, v = qkv(1, hq, hkv, n, n, d, dtype, seed=41)
    order = causal_order(n, n, bm, bm, None, None)
    index = random_index(order, hq, n_cols=6, seed=42)
    sub_blocks = (3, 8, 9)  # rows 48-63 (in block 1), 128-149 (the last block, short)
    mask = index_token_mask(index, order).expand(1, hq, n, n).clone()
    rows = torch.tensor([r for b in sub_blocks for r in range(b * 16, min(n, b * 16 + 16))], device=DEVICE)
    causal = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()[rows]
    mask[:, torch.tensor(walked, device=DEVICE)[:, None], rows[None, :]] = causal
    ref, ref_lse = masked_attention(q, k, v, mask, head_map=head_map)
    launch = dict(dense_rows=sub_blocks, dense_block=16, dense_row_heads=walked if heads == "some" else None,
                  head_map=head_map)
    res, lse = sparse_attention(q, k, v, index, order, return_lse=True, **launch)
    torch.testing.assert_close(res.float(), ref.float(), **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL[dtype])
    monkeypatch.setattr(kernel, "runs_triton", lambda t: False)  # the CPU backend's semantics are the same
    cpu = sparse_attention(q, k, v, index, order, **launch)
    torch.testing.assert_close(cpu.float(), ref.float(), **OUT_TOL[dtype])
    with pytest.raises(ValueError, match="dense_row_heads"):
        sparse_attention(q, k, v, index, order, dense_rows=sub_blocks, dense_block=16, dense_row_heads=[hq])
    with pytest.raises(ValueError, match="dense_block"):
        sparse_attention(q, k, v, index, order, dense_rows=sub_blocks, dense_block=24)


@pytest.mark.parametrize("split", [False, True], ids=["rows", "split-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_reads_and_writes_through_a_row_map(split, dtype):
    """``rows``: the index is in a permuted order and the kernel reads Q, K, V and writes O and
    LSE through the permutation. Same result as gathering the permuted rows, running the
    reference on them and putting the rows back; written into a poisoned strided view of a wider
    output (a subset of a layer's heads), leaving its other heads alone."""
    from mmsparse.kernels.permute import permuted_order

    n, hq, hkv, d = 90, 2, 1, 32
    q, k, v = qkv(1, hq, hkv, n, n, d, dtype, seed=21)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    order = permuted_order(perm, 1, 16, 16)
    index = random_index(order, hq, seed=22)
    layer = torch.full((1, n, hq + 2, d), float("nan"), dtype=dtype, device=DEVICE)
    target = layer[:, :, 1:1 + hq]
    launch = dict(long_rows=range(order.num_q_blocks - 1, -1, -2), segment=2) if split else {}
    res, lse = sparse_attention(q, k, v, index, order, rows=perm, out=target, return_lse=True, **launch)
    ref_p, ref_lse_p = reference_sparse_attention(*(t.index_select(2, perm) for t in (q, k, v)), index, order)
    ref = torch.empty_like(ref_p).index_copy_(1, perm, ref_p)
    ref_lse = torch.empty_like(ref_lse_p).index_copy_(2, perm, ref_lse_p)
    assert res is target
    torch.testing.assert_close(target.float(), ref, **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL[dtype])
    assert layer[:, :, 0].isnan().all() and layer[:, :, -1].isnan().all(), "other heads must stay untouched"
    with pytest.raises(ValueError, match="permutation of the 90 rows"):
        sparse_attention(q, k, v, index, order, rows=perm[:-1])


def test_split_rows_are_cut_into_whole_waves_of_programs(monkeypatch):
    """Split rows get segments whose programs fill whole waves on the GPU's SMs (one program per
    SM), never under MIN_SEGMENT_BLOCKS; off CUDA the default stays. (The kernel cases above run
    any segment length.)"""
    import mmsparse.kernels.sparse_attention as kernel

    monkeypatch.setattr(kernel, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")

    def waves(width: int, rows: int) -> float:
        return rows * -(-width // kernel._segment_blocks(width, rows, cuda)) / 132

    assert kernel._segment_blocks(1023, 2, cuda) == 16 and waves(1023, 2) <= 1  # 64 segments a row: one wave
    assert kernel._segment_blocks(1023, 28, cuda) == 74 and waves(1023, 28) == pytest.approx(392 / 132)  # 3 waves, not 3.4
    assert waves(8191, 2) <= 1  # one wave of long segments, not two of 64 blocks
    assert kernel._segment_blocks(50, 2, cuda) == kernel.MIN_SEGMENT_BLOCKS
    assert kernel._segment_blocks(1023, 2, torch.device("cpu")) == kernel.SEGMENT_BLOCKS


def test_head_map_is_used():
    """head_map must change the KV head read (guards the head_map case above against a no-op)."""
    q, k, v = qkv(1, 2, 2, 40, 40, 16, seed=3)
    order = causal_order(40, 40, 16, 16)
    index = dense_index(order)
    swapped = sparse_attention(q, k, v, index, order, head_map=torch.tensor([1, 0], dtype=torch.int32, device=DEVICE))
    plain = sparse_attention(q, k[:, [1, 0]], v[:, [1, 0]], index, order)
    torch.testing.assert_close(swapped, plain, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(swapped, sparse_attention(q, k, v, index, order), atol=1e-3)


def test_heads_fastest_program_order_is_the_same_attention():
    """The heads-first launch order must cover every (query block, head) once, batch included."""
    q, k, v = qkv(2, 4, 2, 70, 70, 16, seed=11)
    order = causal_order(70, 70, 16, 16, [70, 41], [70, 41], batch=2)
    index = random_index(order, 4, n_cols=6, seed=5)
    ref, _ = reference_sparse_attention(q, k, v, index, order)
    out = sparse_attention(q, k, v, index, order, heads_fastest=True)
    torch.testing.assert_close(out.float(), ref, **OUT_TOL[q.dtype])


def test_shared_index_rows_read_through_head_rows():
    """Heads that share a pattern read one index row: the kernel must equal the reference on
    the per-head copy, columns included, and reject a head_rows that names no row."""
    q, k, v = qkv(1, 4, 2, 80, 80, 16, seed=21)
    order = causal_order(80, 80, 16, 16)
    rows = random_index(order, 2, n_cols=5, seed=8)
    head_rows = torch.tensor([1, 0, 1, 1], dtype=torch.int32, device=DEVICE)
    shared = compile_block_mask(rows.block_mask, order, rows.columns, rows.column_count, head_rows=head_rows)
    copied = shared.per_head()
    assert copied.blocks.shape[1] == 4 and torch.equal(copied.block_mask[0, 2], rows.block_mask[0, 1])
    check_kernel(q, k, v, shared, order)
    torch.testing.assert_close(sparse_attention(q, k, v, shared, order).float(),
                               sparse_attention(q, k, v, copied, order).float(), atol=1e-6, rtol=1e-6)
    assert shared.computed_pairs() == copied.computed_pairs()
    from_host = compile_block_mask(rows.block_mask, order, rows.columns, rows.column_count, head_rows=[1, 0, 1, 1])
    assert from_host.head_rows.device == shared.head_rows.device and torch.equal(from_host.head_rows, shared.head_rows)
    for bad in (torch.tensor([0, 2, 1, 1]), [0, -1, 1, 1], torch.tensor([0, 2, 1, 1], device=DEVICE)):
        with pytest.raises(ValueError, match="head_rows"):
            compile_block_mask(rows.block_mask, order, head_rows=bad)
    with pytest.raises(ValueError, match="block_rows"):  # a program's rows must tile the query block
        sparse_attention(q, k, v, shared, order, block_rows=12)
    with pytest.raises(ValueError, match="key_tile"):
        sparse_attention(q, k, v, shared, order, key_tile=24)


# ----------------------------------------------------------------------------- 2. dense == SDPA


@pytest.mark.parametrize("mq,mk", [(96, 96), (40, 136)], ids=["prefill", "query-offset"])
def test_dense_index_equals_sdpa(mq, mk):
    b, hq, hkv, d = 2, 4, 2, 32
    q, k, v = qkv(b, hq, hkv, mq, mk, d, seed=mk)
    order = causal_order(mq, mk, 32, 16, batch=b)
    out = sparse_attention(q, k, v, dense_index(order), order)
    bottom_right = torch.ones(mq, mk, dtype=torch.bool, device=DEVICE).tril(mk - mq)
    g = hq // hkv
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                         attn_mask=bottom_right)
    torch.testing.assert_close(out, ref.transpose(1, 2), **FP32_TOL)


# ----------------------------------------------------------------------------- 3. empty rows


def test_sink_local_only_and_padding_rows():
    """a_shape (sink + local band) on a padded batch: the kernel matches the reference, padding
    query rows are exactly zero even in query blocks with full (unmasked) key blocks."""
    q, k, v = qkv(2, 2, 1, 96, 96, 16, seed=11)
    order = causal_order(96, 96, 32, 16, q_lens=[96, 61], kv_lens=[96, 61])
    index = a_shape(order, sink=16, local=16)
    assert index.density(order) < 0.9
    # The padded rows 61..63 of sequence 1 sit in a query block that lists the full sink block.
    assert int(index.full_count[1, 0, 1]) > 0
    res, lse = check_kernel(q, k, v, index, order)
    assert (res[1, 61:] == 0).all() and (lse[1, :, 61:] == float("-inf")).all()


def test_rows_with_only_the_diagonal_or_nothing():
    """Only the partial (diagonal) blocks: the first row of each query block sees one key; one
    query block lists nothing at all: its rows are zero with LSE -inf. No NaN anywhere."""
    b, mq = 2, 80
    q, k, v = qkv(b, 2, 2, mq, mq, 32, seed=5)
    order = causal_order(mq, mq, 32, 16, q_lens=[80, 70], kv_lens=[80, 70])
    visible, full = order.block_visibility()
    mask = (visible & ~full)[:, None].expand(b, 2, -1, -1).clone()
    mask[:, 1, 1] = False  # head 1, query block 1 (rows 32..63): empty
    index = compile_block_mask(mask, order)
    assert (index.full_count == 0).all() and (index.block_count[:, 1, 1] == 0).all()
    res, lse = check_kernel(q, k, v, index, order)
    assert torch.isfinite(res).all() and not torch.isnan(lse).any()
    assert (res[:, 32:64, 1] == 0).all() and (lse[:, 1, 32:64] == float("-inf")).all()
    # Row 32 (first of its block) sees only key 32: its output is exactly that key's value.
    torch.testing.assert_close(res[:, 32, 0].float(), v[:, 0, 32].float(), atol=5e-3 if DEVICE == "cuda" else 1e-6, rtol=0)
    tokens = index_token_mask(index, order)
    assert torch.equal(tokens[:, 0, 32].sum(-1), torch.ones(b, dtype=torch.long, device=DEVICE))


# ----------------------------------------------------------------------------- 4. compile_block_mask


def brute_visibility(order):
    """Per-block (visible, full) from the token positions, by loops."""
    b, mq = order.q_pos.shape
    mk = order.k_pos.shape[1]
    nq, nk = order.num_q_blocks, order.num_k_blocks
    vis = torch.zeros(b, nq, nk, dtype=torch.bool)
    full = torch.zeros(b, nq, nk, dtype=torch.bool)
    qp, kp = order.q_pos.cpu(), order.k_pos.cpu()
    for bi in range(b):
        for r in range(nq):
            rows = qp[bi, r * order.block_m:(r + 1) * order.block_m]
            rows = rows[rows >= 0]
            for c in range(nk):
                keys = kp[bi, c * order.block_n:(c + 1) * order.block_n]
                sees = keys[None, :] <= rows[:, None]
                vis[bi, r, c] = bool(sees.any())
                whole = (c + 1) * order.block_n <= mk and (keys != KEY_PAD).all()
                full[bi, r, c] = bool(len(rows) and whole and sees.all())
    return vis, full


@pytest.mark.parametrize("permuted", [False, True], ids=["natural", "permuted"])
def test_compile_block_mask(permuted):
    if permuted:  # blocks of positions out of order (shuffled inside): full blocks follow partial ones
        g = torch.Generator().manual_seed(2)
        chunks = [torch.arange(a, b) for a, b in [(32, 48), (0, 16), (64, 75), (48, 64), (16, 32)]]
        perm = torch.cat([c[torch.randperm(len(c), generator=g)] for c in chunks]).to(DEVICE)
        order = permuted_order(perm, 2, 16, 16)
    else:
        order = causal_order(50, 75, 16, 16, q_lens=[50, 31], kv_lens=[75, 40])
    vis, full = brute_visibility(order)
    got_vis, got_full = order.block_visibility()
    assert torch.equal(got_vis.cpu(), vis) and torch.equal(got_full.cpu(), full)

    mask = (torch.rand(2, 3, order.num_q_blocks, order.num_k_blocks, generator=torch.Generator().manual_seed(0))
            < 0.6).to(DEVICE)
    index = compile_block_mask(mask, order)
    used = (mask.cpu() & vis[:, None])
    counts = used.sum(-1)
    assert torch.equal(index.block_mask.cpu(), used)
    assert torch.equal(index.block_count.cpu().long(), counts)
    assert torch.equal(index.full_count.cpu().long(), (used & full[:, None]).sum(-1))
    assert index.blocks.shape[-1] == max(1, int(counts.max()))
    assert index.blocks.dtype == torch.int32
    blocks, fc = index.blocks.cpu(), index.full_count.cpu()
    for bi in range(2):
        for h in range(3):
            for r in range(order.num_q_blocks):
                n, f = int(counts[bi, h, r]), int(fc[bi, h, r])
                listed = blocks[bi, h, r, :n].tolist()
                assert sorted(listed[:f]) == listed[:f] and sorted(listed[f:]) == listed[f:]
                assert all(full[bi, r, c] for c in listed[:f]), "full blocks first"
                assert not any(full[bi, r, c] for c in listed[f:])
                assert set(listed) == set(used[bi, h, r].nonzero().flatten().tolist()), "no invisible block"
    if permuted:  # the case must need the full-first ordering
        assert any(full[0, r, c] and not full[0, r, c2] for r in range(order.num_q_blocks)
                   for c in range(order.num_k_blocks) for c2 in range(c) if vis[0, r, c2])
        q, k, v = qkv(2, 3, 1, 75, 75, 16, seed=21)
        check_kernel(q, k, v, index, order)
    assert index.density(order) == pytest.approx(float(counts.sum()) / (3 * float(vis.sum())))
    wide = compile_block_mask(mask, order, full_width=True)  # NK slots, nothing read back: same listing
    assert wide.blocks.shape[-1] == order.num_k_blocks
    assert torch.equal(wide.blocks[..., : index.blocks.shape[-1]], index.blocks)
    assert torch.equal(wide.block_count, index.block_count) and torch.equal(wide.full_count, index.full_count)
    if permuted:
        check_kernel(q, k, v, wide, order)
    assert dense_index(order).density(order) == 1.0
    assert dense_index(order, heads=3).density(order) == 1.0


# ----------------------------------------------------------------------------- 5. builders


def brute_band(mq, mk, bm, bn, sink, local, shifts):
    tok = torch.zeros(mq, mk, dtype=torch.bool)
    for i in range(mq):
        for j in range(mk):
            near = any(i + mk - mq - s - local + 1 <= j <= i + mk - mq - s for s in shifts)
            tok[i, j] = j < sink or near
    nq, nk = -(-mq // bm), -(-mk // bn)
    return torch.stack([torch.stack([tok[r * bm:(r + 1) * bm, c * bn:(c + 1) * bn].any() for c in range(nk)])
                        for r in range(nq)])


@pytest.mark.parametrize("mq,mk,bm,bn,sink,local,shifts", [
    (100, 100, 16, 16, 20, 24, (0,)),
    (50, 130, 32, 16, 0, 1, (0,)),
    (96, 96, 16, 32, 5, 10, (0, 40)),
])
def test_band_mask_and_a_shape_vs_brute_force(mq, mk, bm, bn, sink, local, shifts):
    order = causal_order(mq, mk, bm, bn)
    want = brute_band(mq, mk, bm, bn, sink, local, shifts)
    got = band_mask(order, sink=sink, local=local, shifts=shifts)
    assert got.shape == (1, 1) + want.shape
    assert torch.equal(got[0, 0].cpu(), want)
    if shifts == (0,):
        index = a_shape(order, sink=sink, local=local, heads=2)
        visible, _ = order.block_visibility()
        assert torch.equal(index.block_mask.cpu(), (want & visible[0].cpu()).expand(1, 2, -1, -1))


def test_band_mask_of_several_widths_stacks_the_single_ones():
    order = causal_order(64, 160, 16, 16, q_lens=[64, 40], kv_lens=[160, 100])
    widths = (1, 16, 40, 300)
    got = band_mask(order, sink=8, local=widths, shifts=(0, 24))
    assert got.shape == (2, len(widths), order.num_q_blocks, order.num_k_blocks)
    for i, width in enumerate(widths):
        assert torch.equal(got[:, i], band_mask(order, sink=8, local=width, shifts=(0, 24))[:, 0])


def test_a_shape_local_window_in_padded_chunked_batch():
    order = causal_order(32, 128, 16, 16, q_lens=[32, 32], kv_lens=[128, 64])
    tokens = index_token_mask(a_shape(order, sink=16, local=16), order)[:, 0]
    sees_itself = (tokens & (order.k_pos[:, None, :] == order.q_pos[:, :, None])).any(-1)
    assert sees_itself.all()


def test_diagonal_sums_vs_brute_force():
    g = torch.Generator().manual_seed(4)
    b, h, n, mk = 3, 2, 5, 40
    p = torch.rand(b, h, n, mk, generator=g).to(DEVICE)
    starts = [35, 2, 20]  # ends at the last key; starts before n; ends mid-sequence
    pos = torch.stack([torch.arange(s, s + n) for s in starts]).to(DEVICE)
    want = torch.zeros(b, h, mk)
    for bi in range(b):
        for i in range(n):
            for d in range(mk):
                key = int(pos[bi, i]) - d
                if 0 <= key < mk:
                    want[bi, :, d] += p[bi, :, i, key].cpu()
    torch.testing.assert_close(diagonal_sums(p, pos).cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", ["vertical", "slash"])
def test_vertical_slash_full_budget_is_dense(budget):
    """vertical >= Mk (every column) or slash >= Mk (every diagonal) covers every causal token."""
    mq, mk = 48, 112
    q, k, v = qkv(1, 2, 1, mq, mk, 32, seed=8)
    order = causal_order(mq, mk, 32, 16)
    if budget == "vertical":
        index = vertical_slash(q, k, order, vertical=mk, slash=1, last_q=16, sink_columns=0, near_diagonals=0)
        assert index.columns.shape[-1] == mk
    else:
        index = vertical_slash(q, k, order, vertical=1, slash=mk, last_q=16, sink_columns=0, near_diagonals=0)
    assert torch.equal(index_token_mask(index, order), causal_tokens(order).expand(-1, 2, -1, -1))
    out = sparse_attention(q, k, v, index, order)
    ref, _ = masked_attention(q, k, v, causal_tokens(order))
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_vertical_slash_small_budget_padded_batch():
    """Small budgets on a padded chunked-prefill batch: each query sees its own key and the sink
    columns, the vertical budget is respected, and the kernel matches the reference."""
    q, k, v = qkv(2, 2, 2, 48, 112, 16, seed=9)
    order = causal_order(48, 112, 32, 16, q_lens=[48, 30], kv_lens=[112, 70])
    index = vertical_slash(q, k, order, vertical=6, slash=3, last_q=8, sink_columns=3, near_diagonals=1)
    assert index.columns.shape[-1] == 6
    assert (index.columns.diff(dim=-1) > 0).all()
    tokens = index_token_mask(index, order)
    causal = causal_tokens(order)
    itself = (order.k_pos[:, None, :] == order.q_pos[:, :, None])[:, None]
    valid = (order.q_pos >= 0)[:, None]
    assert ((tokens & itself).any(-1) == valid).all(), "every query sees its own key"
    sink = causal & (order.k_pos < 3)[:, None, None, :]
    assert (tokens >= sink).all()
    assert index.density(order) < 1.0
    check_kernel(q, k, v, index, order)


@pytest.mark.parametrize("how", ["top_k", "gamma"])
def test_block_topk_everything_is_dense(how):
    q, k, v = qkv(2, 4, 2, 72, 72, 16, seed=10)
    order = causal_order(72, 72, 16, 16, q_lens=[72, 45], kv_lens=[72, 45])
    kw = dict(top_k=order.num_k_blocks) if how == "top_k" else dict(gamma=1.0)
    index = block_topk(q, k, order, **kw)
    assert torch.equal(index_token_mask(index, order), causal_tokens(order).expand(-1, 4, -1, -1))
    out = sparse_attention(q, k, v, index, order)
    ref, _ = masked_attention(q, k, v, causal_tokens(order))
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_block_topk_gamma_one_keeps_negligible_blocks():
    """gamma=1.0 keeps every visible block, also those whose estimated mass rounds to nothing."""
    q = torch.full((1, 1, 128, 16), 3.0, device=DEVICE)
    k = 0.1 * torch.randn(1, 1, 128, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    k[:, :, 16:48] = -3.0  # key blocks 1 and 2: softmax mass ~1e-17 for every query block
    order = causal_order(128, 128, 16, 16)
    index = block_topk(q, k, order, gamma=1.0)
    assert torch.equal(index_token_mask(index, order), causal_tokens(order))


def brute_block_topk(q, k, order, top_k=None, gamma=None, sink_blocks=1):
    """Loop version: scores of the pooled (mean over valid rows) query and key blocks / sqrt(d).
    The diagonal (partial) blocks and the sink blocks are always kept; they take their share of
    top_k first. gamma keeps the fewest best visible blocks whose softmax mass reaches gamma."""
    b, hq, _, d = q.shape
    group = hq // k.shape[1]
    bm, bn, nq, nk = order.block_m, order.block_n, order.num_q_blocks, order.num_k_blocks
    visible, full = (t.cpu() for t in order.block_visibility())
    q, k, qp, kp = q.cpu().float(), k.cpu().float(), order.q_pos.cpu(), order.k_pos.cpu()
    want = torch.zeros(b, hq, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            for r in range(nq):
                rows = [i for i in range(r * bm, min((r + 1) * bm, q.shape[2])) if qp[bi, i] >= 0]
                qm = q[bi, h, rows].mean(0)
                keep = {c for c in range(nk) if (visible[bi, r, c] and not full[bi, r, c]) or c < sink_blocks}
                score = {}
                for c in range(nk):
                    keys = [j for j in range(c * bn, min((c + 1) * bn, k.shape[2])) if kp[bi, j] != KEY_PAD]
                    if visible[bi, r, c]:
                        km = k[bi, h // group, keys].mean(0) if keys else torch.zeros(d)  # as pooled: 0
                        score[c] = float(qm @ km) / math.sqrt(d)
                if top_k is not None:
                    rest = sorted((c for c in score if c not in keep), key=score.get, reverse=True)
                    chosen = keep | set(rest[:max(0, top_k - len(keep))])
                else:
                    z = sum(math.exp(x) for x in score.values())
                    chosen, mass = set(keep), 0.0
                    for c in sorted(score, key=score.get, reverse=True):
                        if mass >= gamma:
                            break
                        chosen.add(c)
                        mass += math.exp(score[c]) / z
                for c in chosen:
                    want[bi, h, r, c] = bool(visible[bi, r, c])
    return want


@pytest.mark.parametrize("kw", [dict(top_k=4), dict(top_k=1), dict(gamma=0.5)], ids=["top4", "top1", "gamma0.5"])
def test_block_topk_vs_brute_force(kw):
    q, k, _ = qkv(2, 4, 2, 128, 128, 16, seed=12)
    bias = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    q = q + 0.5 * bias  # a shared direction: blocks get clear preferences
    order = causal_order(128, 128, 32, 16, q_lens=[128, 100], kv_lens=[128, 100])
    index = block_topk(q, k, order, **kw)
    want = brute_block_topk(q, k, order, **kw)
    assert torch.equal(index.block_mask.cpu(), want)
    visible, full = order.block_visibility()
    diagonal = (visible & ~full)[:, None]
    assert (index.block_mask >= diagonal).all(), "diagonal (partial) blocks are always kept"
    assert index.block_mask[..., 0][visible[:, None, :, 0].expand_as(index.block_mask[..., 0])].all(), "sink kept"
    assert index.density(order) < 0.9


# ----------------------------------------------------------------------------- 6. permutation

SPANS = [(8, 3, 8), (36, 4, 10)]  # (start, frames, tokens_per_frame): rows 8..31 and 36..75 of 80
GRID_M = 80


def test_grid_permutation():
    perm = grid_permutation(GRID_M, SPANS)
    assert torch.equal(perm.sort().values, torch.arange(GRID_M))
    video = torch.zeros(GRID_M, dtype=torch.bool)
    for start, frames, per_frame in SPANS:
        video[start:start + frames * per_frame] = True
        for p in range(per_frame):  # position-major: row start + p * frames + f holds frame f, position p
            for f in range(frames):
                assert int(perm[start + p * frames + f]) == start + f * per_frame + p
    assert torch.equal(perm[~video], torch.arange(GRID_M)[~video])
    assert not torch.equal(perm, torch.arange(GRID_M))
    inv = inverse_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(GRID_M)) and torch.equal(inv[perm], torch.arange(GRID_M))
    x = torch.randn(GRID_M, 3)
    assert torch.equal(x.index_select(0, perm).index_select(0, inv), x)


def test_permuted_attention_dense_is_exact_causal():
    q, k, v = qkv(1, 4, 2, GRID_M, GRID_M, 16, seed=13)
    perm = grid_permutation(GRID_M, SPANS, device=DEVICE)
    out = permuted_attention(q, k, v, perm, dense_index, block_m=16, block_n=16)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), **FP32_TOL)


def test_grid_index_covers_earlier_frames_and_dense_text():
    perm = grid_permutation(GRID_M, SPANS, device=DEVICE)
    order = permuted_order(perm, 1, 16, 16)
    index = grid_index(order, SPANS, sink=0)
    tok_p = index_token_mask(index, order)[0, 0].cpu()
    p = perm.cpu()
    tok = torch.zeros_like(tok_p)
    tok[p[:, None], p[None, :]] = tok_p  # back to the original order
    causal = torch.ones(GRID_M, GRID_M, dtype=torch.bool).tril()
    assert (tok <= causal).all()
    video = torch.zeros(GRID_M, dtype=torch.bool)
    for start, frames, per_frame in SPANS:
        video[start:start + frames * per_frame] = True
        for f in range(frames):
            for pos in range(per_frame):
                i = start + f * per_frame + pos
                earlier = [start + e * per_frame + pos for e in range(f + 1)]
                assert tok[i, earlier].all(), f"frame {f} position {pos} misses its grid keys"
    assert torch.equal(tok[~video], causal[~video]), "text rows are dense"
    assert not torch.equal(tok, causal), "the grid pattern must be sparse somewhere"

    q, k, v = qkv(1, 2, 1, GRID_M, GRID_M, 16, seed=14)
    out = permuted_attention(q, k, v, perm, lambda o: grid_index(o, SPANS, sink=0), block_m=16, block_n=16)
    ref, _ = masked_attention(q, k, v, tok.to(DEVICE)[None, None])
    torch.testing.assert_close(out, ref, **FP32_TOL)


# ----------------------------------------------------------------------------- 7. FlexAttention backend


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("pattern", ["a_shape", "block_topk", "padded-chunked-dense"])
def test_flex_backend_matches_reference(pattern):
    # Compiled FlexAttention on the GPU needs blocks that its tiles divide and head_dim >= 16 in
    # float16: there the same cases run 8x larger (blocks of 128 / 256), in float16.
    gpu = DEVICE == "cuda"
    s, dtype = (8, torch.float16) if gpu else (1, torch.float32)
    b, hq, hkv, d = 2, 4, 2, 64 if gpu else 16
    if pattern == "padded-chunked-dense":
        mq, mk = 24 * s, 64 * s
        order = causal_order(mq, mk, 16 * s, 16 * s, q_lens=[24 * s, 13 * s], kv_lens=[64 * s, 41 * s])
    else:
        mq = mk = 64 * s
        order = causal_order(mq, mk, 32 * s, 16 * s, q_lens=[64 * s, 41 * s], kv_lens=[64 * s, 41 * s])
    q, k, v = qkv(b, hq, hkv, mq, mk, d, dtype=dtype, seed=15)
    if pattern == "a_shape":
        index = a_shape(order, sink=16 * s, local=16 * s)
    elif pattern == "block_topk":
        index = block_topk(q, k, order, top_k=2)
    else:
        index = dense_index(order)
    dense_blocks = to_block_mask(index, order).to_dense().bool()
    assert torch.equal(dense_blocks, index.block_mask.expand_as(dense_blocks))
    out = flex_sparse_attention(q, k, v, index, order)
    ref, _ = reference_sparse_attention(q, k, v, index, order)
    torch.testing.assert_close(out.float(), ref, **OUT_TOL[dtype])


def test_flex_backend_refuses_columns():
    order = causal_order(32, 32, 16, 16)
    index = compile_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE), order,
                               torch.tensor([[[0, 5]]], device=DEVICE), torch.full((1, 1, 2), 2, device=DEVICE))
    q, k, v = qkv(1, 1, 1, 32, 32, 16)
    with pytest.raises(ValueError, match="block patterns only"):
        flex_sparse_attention(q, k, v, index, order)


# ----------------------------------------------------------------------------- 8. bad input


def test_kernel_rejects_bad_input():
    q, k, v = qkv(1, 4, 2, 32, 32, 32)
    order = causal_order(32, 32, 16, 16)
    index = dense_index(order)
    with pytest.raises(ValueError, match=r"expected q \[B, Hq, Mq, D\]"):
        sparse_attention(q[0], k, v, index, order)
    with pytest.raises(ValueError, match="expected q"):
        sparse_attention(q, k, v[:, :, :16], index, order)
    with pytest.raises(ValueError, match="not a multiple of the KV heads"):
        sparse_attention(q[:, :3], k, v, index, order)
    with pytest.raises(ValueError, match="disagree on batch or head_dim"):
        sparse_attention(q, k[..., :16], v[..., :16], index, order)
    q24, k24, v24 = qkv(1, 2, 2, 32, 32, 24)
    with pytest.raises(ValueError, match="head_dim 24 is not supported"):
        sparse_attention(q24, k24, v24, index, order)
    qt = torch.randn(1, 4, 32, 32, device=DEVICE).transpose(2, 3)
    with pytest.raises(ValueError, match="last dimension .* must be contiguous"):
        sparse_attention(qt, k, v, index, order)
    other = causal_order(32, 32, 32, 16)
    with pytest.raises(ValueError, match="index blocks 16x16 differ from the token order's 32x16"):
        sparse_attention(q, k, v, index, other)
    with pytest.raises(ValueError, match="token order covers"):
        sparse_attention(q[:, :, :16], k, v, index, order)
    with pytest.raises(ValueError, match="index has 2 heads; use 1 or the 4 query heads"):
        sparse_attention(q, k, v, dense_index(order, heads=2), order)
    with pytest.raises(ValueError, match=r"head_map must be int32 \[4\]"):
        sparse_attention(q, k, v, index, order, head_map=torch.tensor([0, 0, 1, 1], device=DEVICE))  # int64
    with pytest.raises(ValueError, match=r"head_map must be int32 \[4\]"):
        sparse_attention(q, k, v, index, order, head_map=torch.zeros(3, dtype=torch.int32, device=DEVICE))


def test_builders_reject_bad_input():
    order = causal_order(32, 32, 16, 16)
    with pytest.raises(ValueError, match="same block sizes"):
        compile_block_mask(torch.ones(1, 1, 1, 2, dtype=torch.bool, device=DEVICE), order)
    q, k, v = qkv(1, 2, 1, 64, 64, 16)
    with pytest.raises(ValueError, match=r"block_m \(16\) to be a multiple of block_n \(32\)"):
        vertical_slash(q, k, causal_order(64, 64, 16, 32), vertical=4, slash=4, last_q=8)
    with pytest.raises(ValueError, match="exactly one of top_k and gamma"):
        block_topk(q, k, causal_order(64, 64, 16, 16), top_k=2, gamma=0.9)
    with pytest.raises(ValueError, match="exactly one of top_k and gamma"):
        block_topk(q, k, causal_order(64, 64, 16, 16))
    perm = torch.arange(64, device=DEVICE)
    with pytest.raises(ValueError, match="queries = keys"):
        permuted_attention(q[:, :, :32], k, v, perm, dense_index, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="queries = keys"):
        permuted_attention(q, k, v, perm[:48], dense_index, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="does not fit a sequence of 40 tokens"):
        grid_permutation(40, [(10, 4, 8)])


def test_token_order_padding_positions():
    order = causal_order(4, 6, 16, 16, q_lens=[4, 2], kv_lens=[6, 3])
    assert order.q_pos.tolist() == [[2, 3, 4, 5], [1, 2, QUERY_PAD, QUERY_PAD]]
    assert order.k_pos.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, KEY_PAD, KEY_PAD, KEY_PAD]]


@pytest.mark.parametrize("rows_per_chunk", [16, 48, 4096])
@pytest.mark.parametrize("with_columns", [False, True])
def test_cpu_chunked_backend_matches_reference(rows_per_chunk, with_columns, monkeypatch):
    """Without CUDA and without the interpreter, sparse_attention runs the chunked torch backend."""
    from mmsparse.kernels.reference import chunked_sparse_attention

    g = torch.Generator().manual_seed(11)
    b, hq, hkv, mq, mk, d = 2, 4, 2, 50, 77, 32
    q, k, v = (torch.randn(b, h, m, d, generator=g) for h, m in ((hq, mq), (hkv, mk), (hkv, mk)))
    order = causal_order(mq, mk, 16, 16, q_lens=[50, 30], kv_lens=[77, 60], batch=b, device="cpu")
    mask = torch.rand(b, hq, order.num_q_blocks, order.num_k_blocks, generator=g) < 0.3
    cols = counts = None
    if with_columns:
        cols = torch.stack([torch.randperm(mk, generator=g)[:9].sort().values for _ in range(b * hq)]).view(b, hq, 9)
        counts = torch.randint(0, 10, (b, hq, order.num_q_blocks), generator=g)
    index = compile_block_mask(mask, order, cols, counts)
    want, _ = reference_sparse_attention(q, k, v, index, order)
    got = chunked_sparse_attention(q, k, v, index, order, rows_per_chunk=rows_per_chunk)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.testing.assert_close(sparse_attention(q, k, v, index, order), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="return_lse"):
        sparse_attention(q, k, v, index, order, return_lse=True)


def test_pooled_block_scores_trust_a_host_known_unpadded_order():
    """A whole prompt's causal order says on the host that nothing is padding, so the pooled
    block scores skip the read-back that looks for padding rows, with the same scores; a padded
    batch's order leaves it to the positions, and its padding rows stay out of the means."""
    from dataclasses import replace

    from mmsparse.kernels.patterns import pooled_block_scores

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    whole = TokenOrder.causal(40, 40, 16, 16)
    assert whole.padded is False
    torch.testing.assert_close(pooled_block_scores(q[:1], k[:1], whole),
                               pooled_block_scores(q[:1], k[:1], replace(whole, padded=None)))
    batch = TokenOrder.causal(40, 40, 16, 16, q_lens=torch.tensor([40, 25]), kv_lens=torch.tensor([40, 25]), batch=2)
    assert batch.padded is None
    short = pooled_block_scores(q[1:, :, :25], k[1:, :, :25], TokenOrder.causal(25, 25, 16, 16))
    torch.testing.assert_close(pooled_block_scores(q, k, batch)[1:, :, :2, :2], short)
