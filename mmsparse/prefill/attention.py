"""The prefill stage behind transformers' attention interface (no patching).

``enable_sparse_prefill(model)`` registers ``"mmsparse"`` with ``AttentionInterface`` (and the
SDPA mask function with ``AttentionMaskInterface``) and switches the text model to it; the
vision tower keeps its own attention. The function runs sparse only while a request is active
(``sparse_prefill(...)``, a ``ContextVar``, so concurrent requests never share state) and only
for a prefill of at least ``min_length`` tokens, batch 1, no padding, past ``dense_layers``.
Everything else (decode steps, short prompts) is exactly transformers' SDPA path.
"""

from __future__ import annotations

import contextlib
import functools
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..config import PrefillConfig
from ..layout import TokenLayout
from ..kernels.launch import to_device
from .dense_heads import PendingHeads, head_slices, start_dense_heads, start_dense_heads_aside

ATTENTION_NAME = "mmsparse"


@dataclass
class PrefillStats:
    """Per-layer record of one request's sparse prefill, and why the other attention calls made
    under the request ran dense (so a prompt that never goes sparse says why)."""

    dense_calls: dict[str, int] = field(default_factory=dict)
    _layers: list[dict] = field(default_factory=list)
    _pending: list[tuple[dict, tuple, tuple | None]] = field(default_factory=list)  # GPU timings not read yet

    def add_layer(self, record: dict, marks: tuple, beside: tuple | None = None) -> None:
        """Record a layer; ``marks`` (start, index start, indexed, done) are CUDA events or
        perf_counter seconds: the index is built between the middle two, attention runs in the
        rest. ``beside``: (began, ready) events of dense heads run on a side stream; while they
        hold the SMs the index build's kernels wait, so that overlap counts as attention. A
        tensor ``record["density"]`` is still on the device. All are read when the stats are
        (one sync then, none in the forward)."""
        self._layers.append(record)
        self._pending.append((record, marks, beside))

    @property
    def layers(self) -> list[dict]:
        for record, (start, index_start, indexed, done), beside in self._pending:
            if isinstance(done, torch.cuda.Event):
                done.synchronize()
                index_ms = index_start.elapsed_time(indexed)
                if beside is not None:  # less the index interval's overlap with the dense heads'
                    at = start.elapsed_time  # ms from the layer's start
                    began, ready = beside
                    index_ms -= max(0.0, min(at(indexed), at(ready)) - max(at(index_start), at(began)))
                record["index_s"] = index_ms / 1e3
                record["attention_s"] = start.elapsed_time(done) / 1e3 - record["index_s"]
            else:
                record["index_s"] = indexed - index_start
                record["attention_s"] = (index_start - start) + (done - indexed)
            record["density"] = float(record["density"])
        self._pending.clear()
        return self._layers

    def summary(self) -> dict[str, Any]:
        dense = {"dense_calls": dict(self.dense_calls)} if self.dense_calls else {}
        if not self.layers:
            return {"sparse_layers": 0, **dense}
        kinds: dict[str, int] = {}
        labels: dict[str, int] = {}
        for layer in self.layers:
            for kind in layer["kinds"]:
                kinds[kind] = kinds.get(kind, 0) + 1
            for label in layer["labels"]:
                labels[label] = labels.get(label, 0) + 1
        index_s = sum(layer["index_s"] for layer in self.layers)
        attention_s = sum(layer["attention_s"] for layer in self.layers)
        return {
            "sparse_layers": len(self.layers),
            "density_mean": sum(layer["density"] for layer in self.layers) / len(self.layers),
            "density_per_layer": {layer["layer"]: round(layer["density"], 4) for layer in self.layers},
            "pattern_counts": kinds,
            "label_counts": labels,
            "index_share": index_s / max(index_s + attention_s, 1e-12),
            **dense,
        }


@dataclass
class PrefillRequest:
    layout: TokenLayout
    config: PrefillConfig
    stats: PrefillStats = field(default_factory=PrefillStats)
    plans: dict[int, tuple[str, ...]] | None = None  # fixed candidate labels per layer (offline search)
    plan_cache: dict[tuple, Any] = field(default_factory=dict)  # fixed plans that do not read Q and K
    blocks_cache: dict[tuple, Any] = field(default_factory=dict)  # the prompt's LayoutBlocks, per device
    collect: dict[int, list[dict]] | None = None  # search mode: candidate tables per layer; output stays dense
    sample_queries: int = 64


_REQUEST: ContextVar[PrefillRequest | None] = ContextVar("mmsparse_prefill_request", default=None)


@contextlib.contextmanager
def sparse_prefill(layout: TokenLayout, config: PrefillConfig, plans: dict | None = None, *,
                   collect: bool = False, sample_queries: int = 64) -> Iterator[PrefillRequest]:
    """Make the next prefill(s) in this context sparse; yields the request (its ``stats``). With
    ``collect`` (offline search) the forward stays exact and every layer's candidate table is
    gathered in ``request.collect``."""
    request = PrefillRequest(layout, config, plans=plans, collect={} if collect else None,
                             sample_queries=sample_queries)
    token = _REQUEST.set(request)
    try:
        yield request
    finally:
        _REQUEST.reset(token)


def _dense(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def mmsparse_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Sparse prefill when a request is active and the call qualifies; SDPA otherwise."""
    request = _REQUEST.get()
    layer = getattr(module, "layer_idx", 0)
    reason = None if request is None else _dense_reason(request, module, layer, query, key, attention_mask)
    if request is None or reason is not None:
        if reason is not None:
            request.stats.dense_calls[reason] = request.stats.dense_calls.get(reason, 0) + 1
        return _dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if request.collect is not None:  # offline search: measure every candidate, compute exactly
        from .selection import select

        sel = _selection_config(request.config, max_density=1.0, sample_queries=request.sample_queries)
        request.collect.setdefault(layer, []).append(select(query, key, value, request.layout, sel).table)
        return _dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return sparse_prefill_attention(query, key, value, request, layer, scaling)


def _dense_reason(request: PrefillRequest, module, layer: int, query: torch.Tensor, key: torch.Tensor,
                  attention_mask: torch.Tensor | None) -> str | None:
    """Why this call must run dense under an active request, or None when it can go sparse."""
    n = query.shape[2]
    if n < request.config.min_length:
        return "shorter than min_length"
    if n != key.shape[2]:  # a decode step, a chunk of a chunked prefill, or a static cache's padded keys
        return "queries and keys differ in length (decode step, chunked prefill or static cache)"
    if query.shape[0] != 1:
        return "batch larger than 1"
    if n != request.layout.seq_len:
        return "prompt length differs from the request's token layout"
    if layer < request.config.dense_layers:
        return "one of dense_layers"
    if attention_mask is not None and attention_mask.dtype == torch.bool and not bool(attention_mask.all()):
        return "padding in the attention mask"
    if module.training:
        return "module in training mode"
    return None


def sparse_prefill_attention(query, key, value, request: PrefillRequest, layer: int, scaling: float | None):
    """One layer's sparse attention: [B, N, H, D] and None, as transformers' attention functions
    return. The dense heads (SDPA), the grid heads (permuted rows), the vertical-slash heads'
    video rows (diagonal ranges) and a cached fixed plan's estimated heads are computed apart
    and written over their empty rows of the natural launch."""
    from ..kernels.sparse_attention import sparse_attention
    from ..kernels.vertical_slash import slash_attention

    started = _mark(query.device)
    # A fixed plan names its dense heads: their SDPA is queued before the index is built, on a
    # side stream, so the GPU has that work while the host builds the index (the first layer's
    # build is mostly host time, with little else queued) and the layer's sparse launches fill the
    # SMs its last waves leave idle (H200, 128K, the toy's mix: 3,083 -> 3,039 ms a prefill).
    forced = request.plans.get(layer) if request.plans else None
    early = [h for h, label in enumerate(forced) if label == "dense"] if forced is not None else []
    pending = [start_dense_heads_aside(query, key, value, early, scaling)] if 0 < len(early) < query.shape[1] else []
    index_start = _mark(query.device)
    plan = _layer_plan(query, key, value, request, layer)
    indexed = _mark(query.device)
    dense = plan.dense_heads
    if len(dense) == query.shape[1]:  # nothing sparse in this layer: one GQA call over every head
        out = start_dense_heads(query, key, value, dense, scaling).output  # on this stream: nothing to run beside
    else:
        rest = [h for h in dense if h not in early]  # a fixed head whose pattern could not be built
        if rest:
            pending.append(start_dense_heads_aside(query, key, value, rest, scaling))
        # Heads side by side: a plan's heads share few short rows (A-shape), so the 7 heads of a
        # GQA group read the same key blocks while they are in L2 (H200, 128K, 28 A-shape-128
        # heads: 2.9 ms vs 4.6 ms in query-block order).
        out = sparse_attention(query, key, value, plan.natural, plan.order, scale=scaling, heads_fastest=True,
                               dense_rows=plan.text_rows, dense_block=plan.fine_order.block_m,
                               dense_row_heads=plan.text_row_heads)
        # After the natural launch, which writes their rows as zeros, each in a launch of its own:
        # the grid heads (permuted order), a cached fixed plan's block heads estimated for this
        # layer, and the vertical-slash heads' video blocks (diagonal ranges).
        if plan.grid is not None:  # permuted order: read and written through the permutation
            grid_heads = [h for h, kind in enumerate(plan.kinds) if kind == "grid"]
            pending += _heads_apart(query, key, value, grid_heads, out, lambda q, k, v, head_map, target: sparse_attention(
                q, k, v, plan.grid, plan.grid_order, scale=scaling, head_map=head_map, heads_fastest=True,
                long_rows=plan.grid_long_rows, rows=plan.perm, out=target))
        if plan.estimated is not None:
            pending += _heads_apart(query, key, value, plan.estimated_heads, out, lambda q, k, v, head_map, target:
                                    sparse_attention(q, k, v, plan.estimated, plan.order, scale=scaling,
                                                     head_map=head_map, heads_fastest=True,
                                                     dense_rows=plan.text_rows, dense_block=plan.fine_order.block_m,
                                                     out=target))
        if plan.slash is not None:  # the natural launch wrote their text rows; read and written in place
            slash_attention(query, key, value, plan.slash, plan.fine_order, out=out, scale=scaling,
                            heads=to_device(plan.slash_heads, query.device, torch.int32))
        for heads in pending:  # their natural rows are empty (written as zeros): fill them
            heads.write_into(out)
    beside = (pending[0].began, pending[0].ready) if early and pending and pending[0].began is not None else None
    request.stats.add_layer({
        "layer": layer, "density": plan.density_t, "kinds": plan.kinds, "budgets": plan.budgets, "labels": plan.labels,
        "recall": plan.recall, "error": plan.error}, (started, index_start, indexed, _mark(query.device)), beside)
    return out, None


def _heads_apart(query, key, value, heads: list[int], out: torch.Tensor, launch) -> list[PendingHeads]:
    """Query ``heads`` (a sorted host list) in a launch of their own: ``launch(q, k, v, head_map,
    target)`` computes them into ``target`` [B, N, H_sub, D]. A run of heads is read as a view
    and written straight into ``out`` (nothing returned); another set is gathered, its target
    starting from its rows of ``out``, and returned as pending heads. Only the KV heads they read
    are passed (``head_map`` relative to those)."""
    group = query.shape[1] // key.shape[1]
    kv = slice(heads[0] // group, heads[-1] // group + 1)
    picked = to_device(heads, query.device, torch.long)
    # On the host: the launch copies it over, and its dense rows pair the heads that share a KV head.
    head_map = torch.tensor([h // group - kv.start for h in heads], dtype=torch.int32)
    run = head_slices(heads, group)
    if run is not None:
        launch(query[:, run[0]], key[:, kv], value[:, kv], head_map, out[:, :, run[0]])
        return []
    target = out.index_select(2, picked)
    launch(query.index_select(1, picked), key[:, kv], value[:, kv], head_map, target)
    return [PendingHeads(picked, target)]


def _layer_plan(query, key, value, request: PrefillRequest, layer: int):
    """This layer's plan. Without a fixed plan, chosen from its Q and K. A fixed plan's
    input-free heads (A-shape, grid, dense, and the vertical-slash heads' text rows) are the same
    in every layer that names them: that part is built once per request (block heads standing in
    as "dense"), and only what is estimated from the input (block heads, the vertical-slash heads'
    diagonals and columns) is built per layer, kept apart."""
    from .selection import estimate_slash, select, with_estimated_heads, with_slash

    forced = request.plans.get(layer) if request.plans else None
    context = _layout_blocks(query, request)
    if forced is None:
        return select(query, key, value, request.layout, _selection_config(request.config), context)
    forced = tuple(forced)
    # When the cache is full the base is rebuilt per layer too, a little more than one whole build.
    estimated = [h for h, label in enumerate(forced) if label.split(":")[0] in INPUT_DEPENDENT]
    if len(estimated) == len(forced):
        return select(query, key, value, request.layout, _selection_config(request.config, forced=forced), context)
    # Vertical-slash heads keep their label in the shared part (their text rows; no input read)
    # and get this layer's diagonals and columns; block heads stand in as "dense" there and are
    # built per layer apart.
    blocky = [h for h in estimated if forced[h].startswith("block:")]
    slashy = {h: forced[h] for h in estimated if h not in blocky}
    plan = _input_free_plan(query, key, value, request,
                            tuple("dense" if h in blocky else label for h, label in enumerate(forced)))
    if blocky:
        own = tuple(label if h in blocky else "dense" for h, label in enumerate(forced))
        plan = with_estimated_heads(plan, select(query, key, value, request.layout,
                                                 _selection_config(request.config, forced=own), context), blocky)
    if slashy:
        plan = with_slash(plan, estimate_slash(query, key, request.layout, slashy, context))
    return plan


def _layout_blocks(query: torch.Tensor, request: PrefillRequest):
    """The prompt's ``LayoutBlocks`` on the query's device, built once per request."""
    from .selection import layout_blocks

    block = request.config.block_size
    cache_key = (query.shape[2], block, query.device)
    if cache_key not in request.blocks_cache:
        request.blocks_cache[cache_key] = layout_blocks(request.layout, query.shape[2], block, query.device)
    return request.blocks_cache[cache_key]


def _input_free_plan(query, key, value, request: PrefillRequest, labels: tuple[str, ...]):
    """The plan of labels that do not read the input (vertical-slash heads as placeholders: their
    text rows), from the request's cache (built and cached on first use while the cache has room)."""
    from .selection import select

    cache_key = (labels, tuple(query.shape), query.device)
    plan = request.plan_cache.get(cache_key)
    if plan is None:
        plan = select(query, key, value, request.layout,
                      _selection_config(request.config, forced=labels, estimate=False), _layout_blocks(query, request))
        if sum(p.nbytes() for p in request.plan_cache.values()) + plan.nbytes() <= plan_cache_cap(query.device):
            request.plan_cache[cache_key] = plan
    return plan


INPUT_DEPENDENT = ("vertical_slash", "block")  # pattern kinds whose index is estimated from Q and K
# Cached plans stay on the device for the whole prefill: at 1M tokens a plan's index is about 1 GB
# (text rows are dense, so rows are NK wide), and eight cached plans cost 12 GB of peak memory.
# The cap is a share of the device's memory, at least PLAN_CACHE_BYTES: at 512K every plan of the
# toy's mix fits 4% of an H200 (index 0.42 s -> 0.29 s over 28 layers), and 1M still fits beside it.
PLAN_CACHE_BYTES = 2 << 30
PLAN_CACHE_SHARE = 0.04


def plan_cache_cap(device: torch.device) -> int:
    """Bytes of cached plans one request may hold on ``device``."""
    if device.type != "cuda":
        return PLAN_CACHE_BYTES
    return max(PLAN_CACHE_BYTES, int(PLAN_CACHE_SHARE * torch.cuda.get_device_properties(device).total_memory))


def _mark(device: torch.device) -> torch.cuda.Event | float:
    """A point on the device's timeline: a CUDA event recorded on that device's stream (layers of
    a model split across GPUs time on their own device; no sync), or the CPU clock."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return time.perf_counter()


def _selection_config(cfg: PrefillConfig, **overrides):
    from .selection import SelectionConfig

    base = dict(gamma=cfg.gamma, block=cfg.block_size, max_density=cfg.max_density, max_error=cfg.max_error)
    return SelectionConfig(**{**base, **overrides})


@functools.cache
def _eager_attention():
    """``mmsparse_attention`` behind ``torch.compiler.disable``: an attention module compiled by
    ``compile_attention`` calls it as a graph break, so plan building, its host-side choices and
    the Triton launches run eagerly as they always do."""
    return torch.compiler.disable(mmsparse_attention)


def register() -> str:
    """Register the attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _eager_attention())
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def enable_sparse_prefill(model: torch.nn.Module) -> None:
    """Route the text model's attention through ``mmsparse_attention`` (vision tower untouched).
    Without an active request it computes exactly what SDPA computes."""
    name = register()
    text = getattr(model.config, "text_config", model.config)
    model.set_attn_implementation({"text_config": name}) if hasattr(model.config, "text_config") else \
        model.set_attn_implementation(name)
    text._attn_implementation = name
