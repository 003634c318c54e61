"""Per-head pattern choice from the input (MMInference-style, with a cumulative-mass budget).

For one layer's Q and K: sample video query rows, compute their exact attention over all keys,
and score every candidate pattern by the attention mass it keeps on those rows (recall) and the
share of the causal video x all block area it computes (cost). Each head takes the candidate of
least time (cost x ``PAIR_TIME`` of its kind) whose recall reaches ``gamma``; a head no
candidate serves goes dense. Text rows
(system prompt, question) are always dense: few rows, and the answer reads from them.

Candidates: A-shape (sink + local band), vertical-slash (top columns + top diagonals),
block-sparse (pooled-score blocks up to a mass threshold), and the video grid (a band in the
position-major permuted order, ``mmsparse.kernels.permute``). Budgets come in small ladders of
absolute sizes (tokens, or frames for the grid: locality does not grow with the prompt), so the
choice is a handful of tensor ops per candidate, not a loop over heads or blocks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..layout import TokenLayout
from ..kernels.index import SparseIndex, TokenOrder, compile_block_mask
from ..kernels.launch import to_device
from ..kernels.patterns import band_mask, block_topk_mask, diagonal_sums, pooled_block_scores
from ..kernels.vertical_slash import SlashIndex, concat_heads, slash_index
from ..kernels.permute import grid_permutation, inverse_permutation, permuted_order

KINDS = ("a_shape", "vertical_slash", "block", "grid", "dense")


@dataclass(frozen=True)
class SelectionConfig:
    gamma: float = 0.95  # attention mass each head must keep on the sampled rows
    block: int = 128
    sample_queries: int = 64
    sink: int = 128
    max_density: float = 0.6  # a head needing more than this goes dense
    max_error: float | None = None  # also accept a candidate whose estimated output error is this low
    forced: tuple[str, ...] | None = None  # a fixed plan: one candidate label (or "dense") per query head
    # False: vertical-slash heads of a fixed plan are input-free placeholders (their text rows only);
    # the layer's own estimate comes from ``estimate_slash`` (how a cached fixed plan is completed).
    estimate: bool = True
    kinds: tuple[str, ...] = ("a_shape", "vertical_slash", "block", "grid")


@dataclass
class Candidate:
    kind: str
    budget: str
    label: str  # kind and budget relative to the input ("a_shape:1/64", "grid:2F"): what a fixed plan names
    mask: torch.Tensor  # [H or 1, NQ, NK] in its own order
    recall: torch.Tensor  # [H] kept attention mass on the sampled rows
    error: torch.Tensor  # [H] relative output error on the sampled rows
    cost: torch.Tensor  # [H]
    heads: tuple[int, ...] | None = None  # the query heads of the per-head rows (a fixed plan builds only those)
    slash: SlashIndex | None = None  # vertical-slash: diagonal tiles and columns per head (rows as ``heads``)


@dataclass
class LayerPlan:
    """What one layer computes: per-head kinds, the natural-order index for the sparse heads,
    the permuted index for the grid heads (if any), and the dense heads, which run through
    dense causal SDPA (cuDNN on Hopper: faster on full rows than any block-sparse kernel);
    grid and dense heads have empty rows in the natural index. Building a fixed plan reads
    nothing back from the device (``density_t`` stays there until ``density`` is read)."""

    kinds: list[str]
    budgets: list[str]
    recall: list[float]  # estimated kept mass per head (sampled rows)
    error: list[float]  # estimated relative output error per head (sampled rows)
    natural: SparseIndex
    order: TokenOrder
    grid_heads: torch.Tensor | None = None
    grid: SparseIndex | None = None
    grid_order: TokenOrder | None = None
    perm: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    dense_heads: list[int] = field(default_factory=list)  # host list: SDPA reads them as views or gathers them
    labels: list[str] = field(default_factory=list)
    table: dict = field(default_factory=dict)  # every candidate's per-head recall, error and cost
    density_t: torch.Tensor | None = None  # 0-dim, on the device: see ``density``
    # Fine blocks (``fine_order``) of a long question's text, dense in every sparse head: the kernel
    # computes them over every key (``dense_rows``), written over the natural index's rows.
    text_rows: tuple[int, ...] = ()
    grid_long_rows: tuple[int, ...] = ()  # permuted text blocks the kernel splits (see ``long_text_rows``)
    # A cached fixed plan's heads estimated per layer (``with_estimated_heads``): their index, its
    # head_rows naming the rows of these heads only (natural order). Run in a launch of their own;
    # their rows in ``natural`` are empty.
    estimated_heads: list[int] = field(default_factory=list)
    estimated: SparseIndex | None = None
    # The vertical-slash heads (their diagonal tiles and columns, MInference's exact ranges) in a
    # launch of their own over the video query blocks; their text rows are in ``natural``.
    slash_heads: list[int] = field(default_factory=list)
    slash: SlashIndex | None = None
    fine_order: TokenOrder | None = None  # the token order ``slash`` is in (blocks of FINE_BLOCK rows)

    @property
    def density(self) -> float:
        """Query-key pairs computed (whole blocks, columns) / causal pairs, all heads."""
        return float(self.density_t)

    @property
    def text_row_heads(self) -> list[int] | None:
        """The heads whose ``text_rows`` the natural launch computes: not the dense, grid or
        estimated heads, whose launches write those rows over it (None: every head)."""
        apart = set(self.dense_heads) | set(self.estimated_heads)
        heads = [h for h, kind in enumerate(self.kinds) if kind != "grid" and h not in apart]
        return None if len(heads) == len(self.kinds) else heads

    def nbytes(self) -> int:
        """Device memory the plan's indices and permutation hold."""
        extra = sum(t.nbytes for t in (self.perm, self.inverse) if t is not None)
        apart = sum(index.nbytes() for index in (self.grid, self.estimated, self.slash) if index is not None)
        return self.natural.nbytes() + apart + extra


def _sample_rows(positions: torch.Tensor, count: int, device) -> torch.Tensor:
    """``count`` evenly spread rows of the visual ``positions`` (host), on ``device``."""
    if len(positions) > count:
        positions = positions[torch.linspace(0, len(positions) - 1, count).round().long()]
    return to_device(positions, device)


def _sampled_attention(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, first: int | None = None,
                       heads: tuple[int, ...] | None = None) -> torch.Tensor:
    """[Hq, S, N] float32 exact causal attention of the sampled rows (batch 1, GQA by reshape).
    On CUDA, half-precision Q and K are multiplied as they are, into float32 scores (the GEMM
    accumulates in float32 either way; converting K first wrote a float32 copy of it). ``first``:
    the smallest of ``rows``, known on the host; only keys from there on can lie past a row.
    ``heads`` (a host tuple): only these query heads ([len(heads), S, N]); only their sampled rows
    are gathered, and their KV heads are read as a view when they share one."""
    hq, d = q.shape[1], q.shape[-1]
    hkv, n = k.shape[1], k.shape[2]
    if heads is None:
        qs, ks = q[0, :, rows].reshape(hkv, hq // hkv * len(rows), d), k[0]
    else:
        group = hq // hkv
        heads_t = to_device(heads, q.device, torch.long)
        qs = q[0][heads_t[:, None], rows[None, :]]  # [H', S, D]: the sampled rows only
        hq = len(heads)
        kv = heads[0] // group
        if all(h // group == kv for h in heads):  # one KV head: a view, the rows of every head in one GEMM
            qs, ks = qs.reshape(1, hq * len(rows), d), k[0, kv:kv + 1]
        else:
            ks = k[0].index_select(0, heads_t // group)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype:
        s = torch.bmm(qs, ks.transpose(1, 2), out_dtype=torch.float32)
    else:
        s = torch.bmm(qs.float(), ks.float().transpose(1, 2))
    s = s.view(hq, len(rows), n).mul_(1 / math.sqrt(d))
    lo = 0 if first is None else min(first, n)
    keys = torch.arange(lo, n, device=q.device)
    s[..., lo:].masked_fill_(keys[None, None, :] > rows[None, :, None], float("-inf"))
    return s.softmax(-1)


@dataclass
class RowStats:
    """Exact attention of the sampled rows, summed per key block, in one key order: the mass
    [H, S, NK] and the value-weighted sums [H, S, NK, D], so any block mask's kept mass (recall)
    and its output error (keys outside the mask dropped, softmax renormalised) are a few sums."""

    mass: torch.Tensor
    pv: torch.Tensor
    row_blocks: torch.Tensor  # [S] query block of each sampled row
    p_rows: torch.Tensor | None  # [H, S, N] the sampled rows' attention (for single columns), if kept
    dense: torch.Tensor  # [H, S, D] the exact attention output of the sampled rows
    dense_norm: torch.Tensor  # [H, S]

    @classmethod
    def build(cls, p: torch.Tensor, v: torch.Tensor, row_blocks: torch.Tensor, block: int,
              keep_rows: bool = True) -> "RowStats":
        h, s, n = p.shape
        hkv, d = v.shape[0], v.shape[-1]
        nk = -(-n // block)
        pad = nk * block - n  # no copy of the [H, S, N] scores when the prompt fills whole blocks
        pb = (torch.nn.functional.pad(p, (0, pad)) if pad else p).view(hkv, h // hkv, s, nk, block)
        vb = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(hkv, nk, block, d)
        pv = torch.einsum("grsjb,gjbd->grsjd", pb, vb).reshape(h, s, nk, d)
        dense = pv.sum(2)
        return cls(pb.sum(-1).reshape(h, s, nk), pv, row_blocks, p if keep_rows else None, dense,
                   dense.norm(dim=-1).clamp(min=1e-20))

    def evaluate(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(recall [H], relative output error [H]) of a block mask [H|1, NQ, NK], averaged over
        the sampled rows (single keys: ``_evaluate_tokens``)."""
        rows_mask = mask[:, self.row_blocks].to(self.mass.dtype)  # [H|1, S, NK]
        kept = (rows_mask * self.mass).sum(-1)
        out = torch.einsum("hsj,hsjd->hsd", rows_mask.expand(self.mass.shape[0], -1, -1), self.pv)
        dense = self.dense
        approx = out / kept.clamp(min=1e-20)[..., None]
        error = (approx - dense).norm(dim=-1) / self.dense_norm
        return kept.mean(-1), error.mean(-1)


def _evaluate_tokens(stats: "RowStats", keep: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(recall [H], relative output error [H]) of the keys ``keep`` [H, S, N] of each sampled row
    (``v`` [Hkv, N, D]), from the rows' exact attention (``stats.p_rows``). The product with V
    reduces over the whole prompt into a few small output tiles, so the key axis is cut into
    chunks that are multiplied as a batch and summed after (split-K by hand: as one product it
    ran on a handful of SMs)."""
    h, s, n = keep.shape
    hkv, d = v.shape[0], v.shape[-1]
    chunks = math.gcd(n, 64)
    size = n // chunks
    # p * keep written straight into [Hkv, chunks, group x S, size] (one pass, batch-major)
    p = stats.p_rows.view(hkv, h // hkv * s, chunks, size).transpose(1, 2)
    kept_p = torch.empty((hkv, chunks, h // hkv * s, size), dtype=p.dtype, device=p.device)
    torch.mul(p, keep.view(hkv, h // hkv * s, chunks, size).transpose(1, 2), out=kept_p)
    kept = kept_p.sum((1, 3)).view(h, s)
    out = torch.matmul(kept_p, v.float().view(hkv, chunks, size, d)).sum(1).view(h, s, d)
    error = (out / kept.clamp(min=1e-20)[..., None] - stats.dense).norm(dim=-1) / stats.dense_norm
    return kept.mean(-1), error.mean(-1)


def _cost(mask: torch.Tensor, video_visible: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Blocks of ``mask`` [H|1, NQ, NK] computed in the visible blocks of video query blocks
    (``video_visible`` [NQ, NK], of the mask's order) over ``area``, the causal block area of
    the video rows in the natural order: [H|1]. A permuted order has more partially visible
    blocks than the natural one, so its own visible area is not the yardstick. Masks, not
    boolean indexing: that would read the device back for every candidate."""
    return (mask & video_visible).sum((-1, -2)).float() / area.clamp(min=1)


def _with_costs(masks: torch.Tensor, video_visible: torch.Tensor, area: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(head-free masks [C, NQ, NK], their costs [C])."""
    return masks, _cost(masks, video_visible, area)


@dataclass
class GridParts:
    """The grid candidates of a prompt: its position-major permutation and token order, the
    visible blocks there [1, NQ, NK], one band mask per width [C, NQ, NK] and its cost [C]."""

    perm: torch.Tensor
    inverse: torch.Tensor
    order: TokenOrder
    visible: torch.Tensor
    frames: int
    bands: torch.Tensor
    costs: torch.Tensor


def _grid_parts(spans: list[tuple[int, int, int]], visual: torch.Tensor, block: int, sink: int, mults: list[int],
                video_area: torch.Tensor) -> GridParts:
    """The ``GridParts`` of a prompt whose visual rows are ``visual`` [N] (``spans``: the videos'
    (start, frames, tokens per frame) with more than one frame)."""
    n = visual.shape[0]
    perm = grid_permutation(n, spans, device=visual.device)
    order = permuted_order(perm, 1, block, block)
    visible, _ = order.block_visibility()
    nq = visible.shape[1]
    pvideo = torch.nn.functional.pad(visual[perm], (0, nq * block - n)).view(nq, block).all(-1)
    frames = max(f for _, f, _ in spans)
    bands = band_mask(order, sink=sink, local=[mult * frames for mult in mults])[0] & visible[0]
    costs = _cost(bands, visible[0] & pvideo[:, None], video_area)
    return GridParts(perm, inverse_permutation(perm), order, visible, frames, bands, costs)


def _forced(candidates: list[Candidate], labels: tuple[str, ...], heads: int) -> list[int]:
    """Candidate number per head for a fixed plan (-1: dense)."""
    if len(labels) != heads:
        raise ValueError(f"a fixed plan names {len(labels)} heads but the layer has {heads}")
    by_label = {c.label: i for i, c in enumerate(candidates)}
    unknown = sorted({lab for lab in labels if lab != "dense" and lab not in by_label})
    if unknown:
        raise ValueError(f"fixed plan labels {unknown} are not candidates here; known: {sorted(by_label)}")
    return [-1 if lab == "dense" else by_label[lab] for lab in labels]


# Time per computed query-key pair of a kind's launch against the block-sparse natural launch's:
# a head takes the candidate of least time, not of fewest pairs (both must meet the rule). H200,
# 128K, one launch alone: vertical-slash heads' 64-row tiles over scattered diagonals ran ~0.62
# Gpairs/ms, long A-shape rows ~1.0 (`eval/results/vertical-slash-blocks-h200.json`,
# `ashape-configs-h200.json`); other kinds run in that launch or its permuted twin.
PAIR_TIME = {"vertical_slash": 1.6}


def pair_time(kind: str) -> float:
    """Relative time of one computed pair of ``kind`` (see ``PAIR_TIME``)."""
    return PAIR_TIME.get(kind, 1.0)


A_SHAPE_LOCAL = (128, 256, 512, 1024, 2048, 4096, 8192)  # tokens: locality is absolute, not a share of the prompt
VERTICAL_SLASH = ((250, 512), (500, 1024), (1000, 2048), (1000, 4096))  # (columns, nearest-first diagonals)
GRID_BANDS = (2, 4, 8)  # band width in the permuted order, in multiples of the frame count
# Query rows per block where the plan's blocks are too coarse (capped at the plan's block):
# * vertical-slash heads' video rows: a diagonal read by a block of m rows is a range of m keys, so
#   scattered diagonals cost in proportion to m; at 64 rows the keys computed halve against 128
#   and the launch ran 40% / 26% faster (H200, 128K, random Q/K, budgets 250/512 and 1000/2048:
#   2.88 -> 1.74 ms, 7.96 -> 5.86 ms; 32 rows was slower);
# * a long question's text rows, dense in every sparse head: only the fine blocks holding text
#   are (a 64-token question in a 128-row block took the whole block).
FINE_BLOCK = 64


@dataclass(frozen=True)
class LayoutBlocks:
    """What every layer of one prompt shares: the natural token order in blocks, the causally
    visible blocks [NQ, NK], the video rows [N] and the query blocks with no text row [NQ]."""

    order: TokenOrder
    visible: torch.Tensor
    visual: torch.Tensor
    video_blocks: torch.Tensor
    # Fine blocks (FINE_BLOCK rows, natural order): vertical-slash heads run their rows in them,
    # leaving alone (``slash_skip``) those in a text block filled dense in the natural index
    # (``text_fill``) or holding text; a long text block is not filled: its fine blocks that hold
    # text (``text_rows``, host ints) are dense in another launch, its others follow the pattern.
    fine_order: TokenOrder
    slash_skip: torch.Tensor  # bool [1, N / FINE_BLOCK]
    text_fill: torch.Tensor  # bool [NQ]
    text_rows: tuple[int, ...]
    # The visual rows' positions (int64, host): sampled rows are picked here and copied over, so
    # the choice starts without reading the device back.
    visual_positions: torch.Tensor
    # The costs' yardstick: the visible blocks of video query blocks [NQ, NK] and their count.
    video_visible: torch.Tensor
    video_area: torch.Tensor
    # The choice's pieces that depend on the prompt only (A-shape masks and costs, the grid's
    # permuted order and bands), built by the first layer that asks: every layer needs the same.
    memo: dict = field(default_factory=dict, repr=False)

    def memoized(self, key: tuple, build):
        """``build()``, once per ``key`` for this prompt."""
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]


def layout_blocks(layout: TokenLayout, n: int, block: int, device) -> LayoutBlocks:
    """The ``LayoutBlocks`` of a prompt of ``n`` tokens (a request builds it once for its layers)."""
    order = TokenOrder.causal(n, n, block, block, device=device)
    visible = order.block_visibility()[0][0]
    nq = visible.shape[0]
    fine = min(block, FINE_BLOCK)
    fine_order = TokenOrder.causal(n, n, fine, fine, device=device)
    per = block // fine
    nf = fine_order.num_q_blocks
    # On the host, once per request: the visual rows, blocks of them only, the long text blocks,
    # the fine blocks holding text.
    ids = layout.modality_ids()[:n]
    visual = ids != 0  # video (and image) rows
    video = torch.nn.functional.pad(visual, (0, nq * block - n)).view(nq, block).all(-1)
    long = torch.zeros(nq, dtype=torch.bool)
    long[list(long_text_rows(layout, n, block))] = True
    text = torch.nn.functional.pad(ids == 0, (0, nf * fine - n)).view(nf, fine).any(-1)
    fill = ~video & ~long
    text_rows = tuple(torch.nonzero(text & long.repeat_interleave(per)[:nf]).flatten().tolist())
    skip = (fill.repeat_interleave(per)[:nf] | text)[None]
    video_blocks = to_device(video, device)
    video_visible = visible & video_blocks[:, None]
    return LayoutBlocks(order, visible, to_device(visual, device), video_blocks, fine_order,
                        to_device(skip, device), to_device(fill, device), text_rows,
                        torch.nonzero(visual).flatten(), video_visible, video_visible.sum())


def select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, cfg: SelectionConfig,
           context: LayoutBlocks | None = None) -> LayerPlan:
    """Choose a pattern per query head for one layer's prefill (batch 1, queries = keys).

    With ``cfg.forced`` (a fixed plan) only the named candidates are built and nothing is
    scored: the index build is then a few tensor ops per pattern. ``context``: the prompt's
    ``layout_blocks`` when the caller keeps them (else built here)."""
    _, hq, n, _ = q.shape
    dev = q.device
    bs = cfg.block
    blocks = context if context is not None else layout_blocks(layout, n, bs, dev)
    if blocks.order.block_m != bs or blocks.visual.shape[0] != n:
        raise ValueError(f"context is for {blocks.visual.shape[0]} tokens in blocks of {blocks.order.block_m}; "
                         f"this layer has {n} in blocks of {bs}: build it with layout_blocks(layout, {n}, {bs}, device)")
    order, visible, visual = blocks.order, blocks.visible, blocks.visual
    nq, nk = visible.shape
    text_blocks = ~blocks.video_blocks
    video_visible, video_area = blocks.video_visible, blocks.video_area
    wanted = None if cfg.forced is None else set(cfg.forced)
    stats = None
    if wanted is None:
        rows = _sample_rows(blocks.visual_positions, cfg.sample_queries, dev)
        p = _sampled_attention(q, k, rows)
        stats = RowStats.build(p, v[0], rows // bs, bs)
    candidates: list[Candidate] = []

    def want(label: str) -> bool:
        return wanted is None or label in wanted

    unscored = torch.full((hq,), float("nan"), device=dev)

    def add(kind: str, budget: str, label: str, mask: torch.Tensor, row_stats=None, cost=None,
            heads=None, slash=None, scored=None):
        if wanted is not None:  # a fixed plan: built, never scored or costed
            candidates.append(Candidate(kind, budget, f"{kind}:{label}", mask, unscored, unscored, unscored,
                                        heads, slash))
            return
        if scored is not None:  # (recall, error, cost) worked out by the caller
            rec, err, cost = scored
        else:
            rec, err = (row_stats or stats).evaluate(mask)
            cost = _cost(mask, video_visible, video_area) if cost is None else cost
        candidates.append(Candidate(kind, budget, f"{kind}:{label}", mask, rec.expand(hq), err.expand(hq),
                                    cost.expand(hq), heads, slash))

    if "a_shape" in cfg.kinds:
        locals_ = [w for w in A_SHAPE_LOCAL if (w < n or w == A_SHAPE_LOCAL[0]) and want(f"a_shape:{w}")]
        if locals_:
            masks, costs = blocks.memoized(("a_shape", cfg.sink, tuple(locals_)), lambda: _with_costs(
                band_mask(order, sink=cfg.sink, local=locals_)[0], video_visible, video_area))  # all widths at once
            for i, local in enumerate(locals_):
                add("a_shape", f"sink={cfg.sink},local={local}", f"{local}", masks[i:i + 1], cost=costs[i:i + 1])
    if "block" in cfg.kinds:
        gammas = [g for g in sorted({cfg.gamma, min(0.99, 1 - (1 - cfg.gamma) / 2)}) if want(f"block:{g}")]
        if gammas:
            scores = pooled_block_scores(q, k, order)
            for g in gammas:
                add("block", f"gamma={g}", f"{g}", block_topk_mask(scores, order, gamma=g)[0])
    if "vertical_slash" in cfg.kinds:
        budgets = [(c, d) for c, d in VERTICAL_SLASH if want(f"vertical_slash:{c}/{d}")]
        if budgets:
            heads = None if wanted is None else tuple(
                h for h, lab in enumerate(cfg.forced) if lab.startswith("vertical_slash:"))
            # No blocks of their own in the natural index (only the text rows, filled there).
            empty = torch.zeros((1, 1, 1), dtype=torch.bool, device=dev).expand(1, nq, nk)
            slashes = _slash_indices(q, k, layout, blocks, budgets, heads, cfg.sink) if cfg.estimate else \
                [None] * len(budgets)
            for (n_cols, n_diag), slash in zip(budgets, slashes):
                scored = None if stats is None else _score_slash(stats, slash, video_area, rows, v[0], bs)
                add("vertical_slash", f"columns={n_cols},diagonals={n_diag}", f"{n_cols}/{n_diag}", empty,
                    heads=heads, slash=slash, scored=scored)
    spans = [(s.start, s.num_frames, s.tokens_per_frame) for s in layout.video_spans if s.tokens_per_frame and s.num_frames > 1]
    grid = None
    mults = [m for m in GRID_BANDS if want(f"grid:{m}F")]
    if "grid" in cfg.kinds and spans and mults:
        grid = blocks.memoized(("grid", cfg.sink, tuple(mults)), lambda: _grid_parts(
            spans, visual, bs, cfg.sink, mults, video_area))
        pstats = None if stats is None else RowStats.build(p[:, :, grid.perm], v[0][:, grid.perm],
                                                            grid.inverse[rows] // bs, bs, keep_rows=False)
        for i, mult in enumerate(mults):
            add("grid", f"band={mult * grid.frames}", f"{mult}F", grid.bands[i:i + 1], row_stats=pstats,
                cost=grid.costs[i:i + 1])
    plan = _assemble(candidates, hq, order, visible, text_blocks, grid, cfg, blocks.text_fill)
    plan.fine_order, plan.text_rows = blocks.fine_order, blocks.text_rows
    plan.density_t = _density(plan)
    if plan.grid is not None:
        plan.grid_long_rows = long_text_rows(layout, n, bs, permuted=True)
    return plan


def long_text_rows(layout: TokenLayout, n: int, block: int, permuted: bool = False) -> tuple[int, ...]:
    """Query blocks holding text whose causal row may be longer than the kernel's segment:
    every sparse head computes text rows densely, so a trailing question's block would be one
    program walking every key block. In the natural order row r sees r + 1 key blocks: these
    blocks are not filled dense in the index; their fine blocks holding text are computed apart,
    split across programs (``LayerPlan.text_rows``, the kernel's ``dense_rows``). In the grid's
    permuted order a text block also holds video rows of many frames (block 0: the first spatial
    position of the first frames), which see far more, so every text block is split there (the
    kernel's ``long_rows``). From the spans: no device work."""
    from ..kernels.sparse_attention import SEGMENT_BLOCKS

    rows = set()
    for span in layout.spans:
        if span.modality == "text" and span.start < n:
            rows.update(range(span.start // block, (min(span.end, n) - 1) // block + 1))
    return tuple(sorted(r for r in rows if permuted or r + 1 > SEGMENT_BLOCKS))


def _slash_indices(q, k, layout: TokenLayout, blocks: LayoutBlocks, budgets, heads: tuple[int, ...] | None,
                   sink: int) -> list[SlashIndex]:
    """MInference's estimate, one ``SlashIndex`` per budget (rows: ``heads``, or every query
    head); see ``_slash_scores`` and ``_slash_from_scores``."""
    return _slash_from_scores(*_slash_scores(q, k, layout, heads, sink), budgets, blocks)


def _slash_scores(q, k, layout: TokenLayout, heads: tuple[int, ...] | None, sink: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The vertical-slash estimate's scores [H, N] of query ``heads`` (or every head): columns
    by the attention summed over the trailing question rows (the keys the answer reads) and the
    last video rows (up to 64 consecutive ones, ending at the last visual token), the sink
    columns first always; diagonals by those rows' attention summed along each diagonal
    (consecutive rows, so one strided view). With ``heads`` (a fixed plan) only those query
    heads are estimated: at 512K tokens the estimate of all 28 heads holds several GB of float32
    scores. Rows come from the layout: nothing here reads the device back."""
    n = q.shape[2]
    tail = layout.visual_tail(64)
    tail = range(tail.start, min(tail.stop, n))
    if not len(tail):
        raise ValueError("vertical-slash patterns estimate from video rows and this prompt has none; "
                         "name another pattern for it")
    dev = q.device
    asked = max(layout.question_start, n - 64)
    last = torch.arange(tail.start, tail.stop, device=dev)
    question = torch.arange(asked, n, device=dev)
    # The tail and question rows in one pass (K multiplied once).
    p = _sampled_attention(q, k, torch.cat([last, question]) if len(question) else last, first=min(tail.start, asked),
                          heads=heads)
    v_score = p.sum(1)
    v_score[:, : min(sink, n)] = float("inf")  # the sink columns always
    s_score = diagonal_sums(p[None, :, : len(last)], last[None].to(torch.int32), first=(tail.start,))[0]
    return v_score, s_score


def _slash_from_scores(v_score: torch.Tensor, s_score: torch.Tensor, budgets, blocks: LayoutBlocks) -> list[SlashIndex]:
    """One ``SlashIndex`` per (columns, diagonals) budget from the scores: the top columns, and
    the top diagonals with the nearest half of the budget always. Blocks holding text are left
    to the other launches (``LayoutBlocks.slash_skip``)."""
    n = v_score.shape[-1]
    top_cols = v_score.topk(min(max(c for c, _ in budgets), n), -1).indices  # best first: each budget is a prefix
    widest = max(min(d, n) for _, d in budgets)
    diags, cols = [], []
    for n_cols, n_diag in budgets:
        c = top_cols[:, :n_cols].sort(-1).values  # [H, C]
        if c.shape[-1] < top_cols.shape[-1]:  # padded past every key (n): never in a block's column prefix
            c = torch.nn.functional.pad(c, (0, top_cols.shape[-1] - c.shape[-1]), value=n)
        s = s_score.clone()
        s[:, : min(n_diag // 2, n)] = float("inf")  # half the diagonals: the nearest band
        d = s.topk(min(n_diag, n), -1).indices
        if d.shape[-1] < widest:  # a repeated offset is harmless
            d = torch.cat([d, d[:, :1].expand(-1, widest - d.shape[-1])], -1)
        diags.append(d[None])
        cols.append(c[None])
    if len(budgets) == 1:
        return [slash_index(diags[0], cols[0], blocks.fine_order, skip=blocks.slash_skip)]
    # Every budget's index in one build (the budgets as its batch): one set of small kernels.
    both = slash_index(torch.cat(diags), torch.cat(cols), blocks.fine_order, skip=blocks.slash_skip)
    return [_budget_of(both, b, min(c, n)) for b, (c, _) in enumerate(budgets)]


def _budget_of(index: SlashIndex, b: int, n_cols: int) -> SlashIndex:
    """Batch entry ``b`` of a budgets-as-batch ``SlashIndex`` (views; its ``n_cols`` real columns)."""
    pick = {name: getattr(index, name)[b:b + 1] for name in ("starts", "widths", "count", "first", "column_count",
                                                               "cover")}
    return dataclasses.replace(index, columns=index.columns[b:b + 1, :, :n_cols].contiguous(), **pick)


def _score_slash(stats: RowStats, slash: SlashIndex, video_area: torch.Tensor, rows: torch.Tensor, v: torch.Tensor,
                 block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(recall, error, cost) [H] of a vertical-slash candidate on the sampled rows, on the exact
    keys its tiles and columns compute (a sampled row in a block its launch leaves alone is dense
    there: text). Cost: query-key pairs computed in the video query blocks, in blocks, over their
    causal block area (``video_area``, in blocks)."""
    keep = slash_rows_keep(slash, rows)
    keep.masked_fill_(slash.skip[0, rows // slash.block_m][None, :, None], 1)  # a mask: no read-back
    rec, err = _evaluate_tokens(stats, keep, v)
    pairs = slash.keys_per_block()[0].sum(-1) * slash.block_m  # skipped (text) blocks read nothing
    cost = (pairs / (block * block) / video_area.clamp(min=1)).float()
    return rec, err, cost


def slash_rows_keep(slash: SlashIndex, rows: torch.Tensor) -> torch.Tensor:
    """[H, R, N] int8 (batch 1): 1 at the keys a vertical-slash index reads for query ``rows``
    (their blocks' tiles and the columns), before causality (scores past a row are 0 anyway).
    A row's tile keys are a window of the relative ``cover``, one strided view for all rows (no
    [R, N] index tensor); the columns are one scatter."""
    bm, n = slash.block_m, slash.cover.shape[-1] - slash.block_m
    front = (-n) % bm  # so that every row's window starts at a multiple of bm
    padded = torch.nn.functional.pad(slash.cover[0], (front, n))
    windows = padded.unfold(-1, n, bm)  # window w reads relative offsets from w * bm - front - n
    keep = windows.index_select(1, (front + n) // bm - rows // bm)
    return keep.scatter_(-1, slash.columns[0].long()[:, None, :].expand(-1, len(rows), -1), 1)


def estimate_slash(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, labels: dict[int, str],
                   context: LayoutBlocks, sink: int = SelectionConfig.sink) -> SlashIndex:
    """The ``SlashIndex`` of query heads ``labels`` (head -> "vertical_slash:C/D") of one layer,
    rows in ascending head order: how a cached fixed plan (``estimate=False``) is completed."""
    heads = sorted(labels)
    v_score, s_score = _slash_scores(q, k, layout, tuple(heads), sink)  # one pass for every budget
    by_budget: dict[tuple[int, int], list[int]] = {}
    for i, h in enumerate(heads):
        n_cols, n_diag = (int(x) for x in labels[h].split(":", 1)[1].split("/"))
        by_budget.setdefault((n_cols, n_diag), []).append(i)
    if len(by_budget) == 1:
        return _slash_from_scores(v_score, s_score, list(by_budget), context)[0]
    parts, order = [], []
    for budget, rows in by_budget.items():
        at = to_device(rows, q.device, torch.long)
        parts += _slash_from_scores(v_score.index_select(0, at), s_score.index_select(0, at), [budget], context)
        order += [heads[i] for i in rows]
    return _in_head_order(parts, order, q.device)


def _shared_rows(candidates: list[Candidate], chosen: list[int], visible: torch.Tensor, text_blocks: torch.Tensor,
                 order: TokenOrder) -> SparseIndex:
    """The natural-order index of a layer with one row per distinct pattern: a head-free
    candidate (A-shape, vertical-slash: only its text rows here), "dense" and "grid" (both empty
    here: those heads run through SDPA and in the permuted order) take one row for all their
    heads; per-head candidates (block) one row per head. Text query blocks are dense in every
    other row. Which head reads which row is worked out on the host (``chosen`` is a host list)."""
    dev = visible.device
    masks, filled = [], []
    head_rows = [0] * len(chosen)
    for c in sorted(set(chosen)):  # a few distinct candidates, each handled for all its heads at once
        heads = [h for h, x in enumerate(chosen) if x == c]
        first = len(filled)  # this candidate's first row
        cand = candidates[c] if c >= 0 else None
        per_head = cand is not None and cand.mask.shape[0] > 1
        if cand is None or cand.kind == "grid":
            m = torch.zeros_like(visible)[None]
        elif per_head:
            rows = to_device(heads if cand.heads is None else [cand.heads.index(h) for h in heads], dev, torch.long)
            m = cand.mask[rows]
        else:
            m = cand.mask[:1]
        for i, h in enumerate(heads):
            head_rows[h] = first + i if per_head else first
        masks.append(m)
        filled += [cand is not None and cand.kind != "grid"] * len(m)  # empty rows stay empty
    mask = torch.cat(masks)
    dense_text = text_blocks[:, None] & visible
    mask = mask | (dense_text[None] & to_device(filled, dev, torch.bool)[:, None, None])
    return compile_block_mask(mask[None], order, head_rows=head_rows, full_width=True)


def _assemble(candidates, hq, order, visible, text_blocks, grid: GridParts | None, cfg, text_fill) -> LayerPlan:
    dev = visible.device
    chosen = [-1] * hq
    table = {"recall": [], "error": [], "cost": []}
    if candidates and cfg.forced is None:
        recall = torch.stack([c.recall for c in candidates])  # [C, H]
        error = torch.stack([c.error for c in candidates])
        cost = torch.stack([c.cost for c in candidates])
        good = recall >= cfg.gamma
        if cfg.max_error is not None:
            good |= error <= cfg.max_error
        ok = good & (cost <= cfg.max_density)
        time = cost * to_device([pair_time(c.kind) for c in candidates], cost.device, cost.dtype)[:, None]
        best = torch.where(ok, time, float("inf")).argmin(0)  # [H]: least time among those meeting the rule
        chosen_t = torch.where(ok.gather(0, best[None])[0], best, -1)
        # One read-back for all of it (the choice's only one before the index is built).
        host = torch.cat([chosen_t.to(recall.dtype)[None], recall, error, cost]).tolist()
        c = len(candidates)
        chosen = [int(x) for x in host[0]]
        table = {"recall": host[1:1 + c], "error": host[1 + c:1 + 2 * c], "cost": host[1 + 2 * c:]}
    if cfg.forced is not None:  # built, not scored: nothing to read back from the device
        chosen = _forced(candidates, cfg.forced, hq)
        table = {name: [[math.nan] * hq for _ in candidates] for name in table}
    kinds = [candidates[c].kind if c >= 0 else "dense" for c in chosen]
    budgets = [candidates[c].budget if c >= 0 else "" for c in chosen]
    labels = [candidates[c].label if c >= 0 else "dense" for c in chosen]
    recalls = [table["recall"][c][h] if c >= 0 else 1.0 for h, c in enumerate(chosen)]
    errors = [table["error"][c][h] if c >= 0 else 0.0 for h, c in enumerate(chosen)]
    grid_heads = [h for h, kind in enumerate(kinds) if kind == "grid"]
    # Plans are built per layer during the prefill: full-width rows need no read-back (and are as
    # wide as a trailing question's row anyway; the kernels walk each row's count, not the width).
    natural = _shared_rows(candidates, chosen, visible, text_fill, order)
    plan = LayerPlan(kinds, budgets, recalls, errors, natural, order, labels=labels)
    plan.table = {c.label: {name: values[i] for name, values in table.items()} for i, c in enumerate(candidates)}
    plan.dense_heads = [h for h, c in enumerate(chosen) if c < 0]
    plan.slash_heads = [h for h, kind in enumerate(kinds) if kind == "vertical_slash"]
    if plan.slash_heads and candidates[chosen[plan.slash_heads[0]]].slash is not None:
        plan.slash = _slash_rows(candidates, chosen, plan.slash_heads, dev)
    if grid_heads and grid is not None:
        perm, porder, inverse, pvisible = grid.perm, grid.order, grid.inverse, grid.visible
        grid_chosen = sorted({chosen[h] for h in grid_heads})
        # Grid masks are head-free: one row per band. The permutation moves video rows only, so
        # a permuted query block holds text iff the natural block with the same number does:
        # those rows stay dense.
        masks = torch.stack([candidates[c].mask[0] for c in grid_chosen])[None]
        masks = masks | (text_blocks[:, None] & pvisible[0])[None, None]
        rows = [grid_chosen.index(chosen[h]) for h in grid_heads]
        plan.grid = compile_block_mask(masks, porder, head_rows=rows, full_width=True)
        plan.grid_heads = to_device(grid_heads, dev, torch.long)
        plan.grid_order, plan.perm, plan.inverse = porder, perm, inverse
    return plan


def _slash_rows(candidates: list[Candidate], chosen: list[int], heads: list[int], device) -> SlashIndex:
    """The ``SlashIndex`` of the vertical-slash ``heads`` (ascending), from their candidates'."""
    parts, order = [], []
    for c in sorted({chosen[h] for h in heads}):
        cand = candidates[c]
        mine = [h for h in heads if chosen[h] == c]
        parts.append(cand.slash.select_heads(to_device(
            mine if cand.heads is None else [cand.heads.index(h) for h in mine], device, torch.long)))
        order += mine
    return _in_head_order(parts, order, device)


def _in_head_order(parts: list[SlashIndex], order: list[int], device) -> SlashIndex:
    """The parts' heads side by side (their rows belong to query heads ``order``), reordered to
    ascending query heads."""
    index = concat_heads(parts)
    if order != sorted(order):
        index = index.select_heads(to_device(sorted(range(len(order)), key=order.__getitem__), device, torch.long))
    return index


def _density(plan: LayerPlan) -> torch.Tensor:
    """Query-key pairs the plan computes (sparse rows, dense heads, grid rows, estimated and
    vertical-slash heads) /
    causal pairs, as a 0-dim tensor on the device (read when the stats are)."""
    n = plan.order.q_pos.shape[1]
    causal_pairs = n * (n + 1) / 2
    computed = plan.natural.pairs() + len(plan.dense_heads) * causal_pairs
    if plan.text_rows:  # every head's dense text rows (written over what the natural index gave them)
        fine = plan.fine_order.block_m
        rows = [r for b in plan.text_rows for r in range(b * fine, min(n, (b + 1) * fine))]
        computed = computed + len(plan.kinds) * (sum(rows) + len(rows))
    for apart in (plan.grid, plan.estimated, plan.slash):
        if apart is not None:
            computed = computed + apart.pairs()
    return computed / (len(plan.kinds) * causal_pairs)


def with_estimated_heads(base: LayerPlan, estimated: LayerPlan, heads: list[int]) -> LayerPlan:
    """A fixed plan whose input-dependent heads (``heads``) were built as "dense" placeholders
    (``base``, shared by every layer with the same plan; their natural rows are empty), completed
    by ``estimated``: a plan of this layer where only those heads are estimated from its Q and K.
    Their index is kept apart (``LayerPlan.estimated``, run in its own launch), so nothing of the
    base is copied: at 1M tokens its index is about a GB."""
    plan = copy.copy(base)
    rows = estimated.natural.head_rows
    picked = to_device(heads, estimated.natural.blocks.device, torch.long)
    head_rows = rows.index_select(0, picked) if rows is not None else \
        (picked if estimated.natural.blocks.shape[1] > 1 else torch.zeros_like(picked)).to(torch.int32)
    plan.estimated = dataclasses.replace(estimated.natural, head_rows=head_rows.to(torch.int32))
    plan.estimated_heads = list(heads)
    for name in ("kinds", "budgets", "labels", "recall", "error"):
        values = list(getattr(base, name))
        for h in heads:
            values[h] = getattr(estimated, name)[h]
        setattr(plan, name, values)
    plan.dense_heads = [h for h, kind in enumerate(plan.kinds) if kind == "dense"]
    plan.table = {**base.table, **estimated.table}
    plan.density_t = _density(plan)
    return plan


def with_slash(base: LayerPlan, slash: SlashIndex) -> LayerPlan:
    """A fixed plan built with vertical-slash placeholders (``estimate=False``: their text rows),
    completed by this layer's estimate for them (``estimate_slash``)."""
    plan = copy.copy(base)
    plan.slash = slash
    plan.density_t = _density(plan)
    return plan
