"""Compile the text model's attention modules, so that their rotary embedding is one fused pass.

transformers applies RoPE in eager PyTorch inside each attention module's forward, on a
transposed [B, H, L, D] view of the projections: rotate_half's slices and concatenation, a
negation, two broadcasting products and a sum, each a full pass over Q and K. At 128K tokens
(Qwen2.5-VL-7B shapes, H200) that is 0.28 s of every prefill, dense or sparse: 3% of the dense
time but 8% of the sparse one. ``torch.compile`` of each attention module traces the stock
forward (nothing is replaced or copied) and Inductor fuses RoPE into one kernel (16 ms).

The attention function itself stays eager: ``register`` puts ``torch.compiler.disable`` around
it, so inside a compiled module it is a graph break, and plan building and the Triton launches
run exactly as they do uncompiled. Compiling costs seconds on the first prompt (every layer
is its own entry: Dynamo guards on ``layer_idx``, and again for decode steps and for each
attention implementation), hence opt-in: ``PrefillConfig(compile_attention=True)``.
"""

from __future__ import annotations

import weakref

import torch

from .chunking import decoder_stacks

_COMPILED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
ENTRIES_PER_LAYER = 4  # prefill and decode, under SDPA and under the sparse function


def compile_attention(model: torch.nn.Module, *, dynamic: bool = True) -> int:
    """``torch.compile`` (in place, ``nn.Module.compile``) every decoder layer's ``self_attn`` of
    the model's decoder stacks (the vision tower is not one); modules compiled before are left
    as they are. Returns how many were compiled now."""
    from .attention import register

    register()  # the sparse function is a graph break from the start, whichever order things run in
    modules = [layer.self_attn for _, blocks in decoder_stacks(model) for layer in blocks]
    import torch._dynamo

    # One cache entry per layer and case (see the module docstring); the default limit is 8.
    limit = ENTRIES_PER_LAYER * len(modules) + 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, limit)
    fresh = [m for m in modules if m not in _COMPILED]
    for module in fresh:
        module.compile(dynamic=dynamic)
        _COMPILED.add(module)
    return len(fresh)
