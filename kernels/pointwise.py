"""Fused per-token kernels for the non-attention part of a long prefill.

Sparse attention makes attention cheap; what is left of a long prefill is the GEMMs and a trail of
elementwise kernels that each read and write the whole sequence. The biggest are pure functions
of one token, so one Triton pass each replaces them:

* ``rms_norm``  -- Qwen2/Llama RMSNorm: upcast, mean of squares, rsqrt, scale, round, times weight.
  Stock PyTorch runs ~6 kernels over float32 copies (~8x the bytes of the input per norm).
* ``silu_mul``  -- SwiGLU's ``silu(gate) * up``: two kernels and a temporary of the MLP width.
* ``add_rms_norm`` -- a decoder layer's first residual add and the RMSNorm after it, in one pass
  (the sum is written and normalised, not read back).

All round where the stock modules round (the normalized row to the input dtype before the weight;
``silu`` to the input dtype before the product), so results match them to the last bit except
where a different summation order moves the mean of squares by an ulp. On a CPU without
``TRITON_INTERPRET=1`` they run the plain PyTorch references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device, runs_triton
from .reference import rms_norm_reference, silu_mul_reference


@triton.jit
def _rms_norm_fwd(x_ptr, y_ptr, w_ptr, sum_ptr, out_ptr, stride_x, stride_y, stride_sum, stride_out, cols, eps,
                  BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if ADD:  # a residual add first: its sum, rounded as a tensor add rounds it, is stored and normalised
        y = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + y.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + offs, x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / cols + eps)
    y = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the module rounds before the weight
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, C] with unit stride along C (a view for the sequence-major tensors of a layer)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, target: torch.Tensor,
                     residual: torch.Tensor | None = None, total: torch.Tensor | None = None) -> None:
    """One program per row of ``x`` [rows, C] into ``target``; with ``residual``, the row is
    ``x + residual``, stored in ``total`` before it is normalised."""
    block = triton.next_power_of_2(x.shape[-1])
    add = residual is not None
    y, s = (residual, total) if add else (x, x)
    with on_device(x):
        _rms_norm_fwd[(x.shape[0],)](x, y, weight, s, target, x.stride(0), y.stride(0), s.stride(0), target.stride(0),
                                     x.shape[-1], eps, BLOCK=block, ADD=add,
                                     num_warps=8 if block >= 2048 and x.is_cuda else 4)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last axis, in float32, rounded to x's dtype
    before the weight (Qwen2RMSNorm's semantics). x [..., C]; ``out`` (x's shape) receives the
    result, e.g. a slice of a longer sequence."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match x's last axis {x.shape[-1]}")
    dtype = torch.promote_types(weight.dtype, x.dtype)
    if out is not None and (out.shape != x.shape or out.dtype != dtype):
        raise ValueError(f"rms_norm: out is {tuple(out.shape)} {out.dtype}; it must be {tuple(x.shape)} {dtype}")
    if not runs_triton(x) or x.numel() == 0:
        result = rms_norm_reference(x, weight, eps)
        return result if out is None else out.copy_(result)
    rows = _rows(x)
    target = torch.empty(rows.shape, dtype=dtype, device=x.device) if out is None or not out.is_contiguous() \
        else out.view(-1, x.shape[-1])
    _launch_rms_norm(rows, weight, eps, target)
    if out is None:
        return target.view(x.shape)
    return out if target.data_ptr() == out.data_ptr() else out.copy_(target.view(x.shape))


def add_rms_norm(residual: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's ``residual + update`` and the RMSNorm of that sum in one pass: (sum, its
    norm). The sum is rounded to the inputs' dtype as a tensor add rounds it, then normalised as
    ``rms_norm`` does, so both match the unfused ops; the add and the norm apart would read the
    sum back."""
    if residual.shape != update.shape or residual.dtype != update.dtype:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} and update "
                         f"{tuple(update.shape)} {update.dtype} must have one shape and dtype")
    if residual.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"add_rms_norm: weight of shape {tuple(weight.shape)} does not match the last axis "
                         f"{residual.shape[-1]}")
    if not runs_triton(residual) or residual.numel() == 0:
        total = residual + update
        return total, rms_norm_reference(total, weight, eps)
    x, y = _rows(residual), _rows(update)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    normed = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch_rms_norm(x, weight, eps, normed, residual=y, total=total)
    return total.view(residual.shape), normed.view(residual.shape)


@triton.jit
def _silu_mul_fwd(g_ptr, u_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu rounds first
    tl.store(out_ptr + offs, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` with silu rounded to the input dtype first (SwiGLU as a stock MLP runs it).
    ``inplace`` writes the result over ``gate`` (a temporary the caller owns): no extra MLP-wide
    buffer."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have one shape and dtype")
    if not runs_triton(gate) or gate.numel() == 0:
        result = silu_mul_reference(gate, up)
        return gate.copy_(result) if inplace else result
    g, u = gate.contiguous(), up.contiguous()
    out = g if inplace and g.data_ptr() == gate.data_ptr() else torch.empty_like(g)
    block = 4096
    with on_device(g):
        _silu_mul_fwd[(triton.cdiv(g.numel(), block),)](g, u, out, g.numel(), BLOCK=block,
                                                        num_warps=8 if g.is_cuda else 4)
    return gate.copy_(out) if inplace and out is not gate else out
