"""Chunked non-attention work for very long prefills.

At 512K tokens a 7B model's MLP intermediate alone is ~20 GB per tensor (gate, up, product), and
an RMSNorm upcasts its whole input to float32 (15 GB at 1M tokens). ``chunked_pointwise(model,
chunk)`` swaps each decoder layer's ``mlp``, ``input_layernorm`` and ``post_attention_layernorm``
submodules, and the text model's final ``norm``, for a wrapper that runs the same module over
``chunk`` tokens at a time. They act on each token alone, so the result is identical. The
originals are put back on exit; ``wrap_pointwise`` (what a sparse pipeline calls once) leaves
the wrappers in place. Composition, not patching: no method of any transformers class is
replaced. Logits for the last token only come from ``logits_to_keep=1``.

With ``fused_kernels=True`` the norms and MLPs of the known Qwen2/Llama classes
(``FUSABLE_NORMS``, ``FUSABLE_MLPS``) also run, on CUDA, through ``mmsparse.kernels.pointwise``:
one Triton pass per RMSNorm instead of ~6 kernels over float32 copies, and SwiGLU's
``silu(gate) * up`` in one pass written over the gate, each chunk's result written straight into
its slice of the output. They use the modules' own weights; other classes and other devices run
the modules as they are.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Iterator

import torch

LAYER_PARTS = ("mlp", "input_layernorm", "post_attention_layernorm")
# Classes whose forward is exactly ``weight * round(x * rsqrt(mean(x^2) + variance_epsilon))``
# and ``down_proj(silu(gate_proj(x)) * up_proj(x))``; a class is added only after reading its code.
FUSABLE_NORMS = ("Qwen2RMSNorm", "Qwen2_5_VLRMSNorm", "Qwen2VLRMSNorm", "LlamaRMSNorm", "Qwen3RMSNorm")
FUSABLE_MLPS = ("Qwen2MLP", "Qwen2_5_VLMLP", "Qwen2VLMLP", "LlamaMLP", "Qwen3MLP")


class ChunkedAlongSequence(torch.nn.Module):
    """Runs a per-token ``module`` on slices of the sequence axis (dim -2) of at most ``chunk``
    tokens, writing into one output tensor."""

    def __init__(self, module: torch.nn.Module, chunk: int) -> None:
        super().__init__()
        self.module = module
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-2] <= self.chunk:
            return self.module(hidden)
        out = torch.empty_like(hidden)
        writes_into = isinstance(self.module, _FusedRunner)  # no copy of each chunk's result
        for start in range(0, hidden.shape[-2], self.chunk):  # a few dozen slices of a long prompt
            part = hidden[..., start:start + self.chunk, :]
            if writes_into:
                self.module(part, out=out[..., start:start + self.chunk, :])
            else:
                out[..., start:start + self.chunk, :] = self.module(part)
        return out


class _FusedRunner(torch.nn.Module, abc.ABC):
    """Runs ``inner`` through a fused kernel on CUDA (and on the CPU with ``cpu_kernels``: the
    Triton interpreter, for tests); elsewhere the module itself. ``out``, when given, receives
    the result (a chunk's slice of the whole output)."""

    def __init__(self, inner: torch.nn.Module, cpu_kernels: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.cpu_kernels = cpu_kernels

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if hidden.is_cuda or self.cpu_kernels:
            return self.fused_forward(hidden, out)
        return self.inner(hidden) if out is None else out.copy_(self.inner(hidden))

    @abc.abstractmethod
    def fused_forward(self, hidden: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """The fused kernel's path (each runner its own)."""


class FusedRMSNorm(_FusedRunner):
    """An RMSNorm of ``FUSABLE_NORMS`` in one Triton pass, with the module's weight and eps."""

    def fused_forward(self, hidden: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        from mmsparse.kernels.pointwise import rms_norm

        return rms_norm(hidden, self.inner.weight, self.inner.variance_epsilon, out=out)


class FusedSwiGLU(_FusedRunner):
    """An MLP of ``FUSABLE_MLPS`` whose ``silu(gate) * up`` is one pass written over the gate."""

    def fused_forward(self, hidden: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        from mmsparse.kernels.pointwise import silu_mul

        mlp = self.inner
        act = silu_mul(mlp.gate_proj(hidden), mlp.up_proj(hidden), inplace=True)
        down = mlp.down_proj
        if out is None:
            return down(act)
        if type(down) is torch.nn.Linear and down.bias is None and out.is_contiguous():  # the GEMM writes the slice
            torch.mm(act.reshape(-1, act.shape[-1]), down.weight.t(), out=out.view(-1, out.shape[-1]))
            return out
        return out.copy_(down(act))


def fused(module: torch.nn.Module, cpu_kernels: bool = False) -> torch.nn.Module:
    """``module`` behind its fused runner when its class is a known one (and, for an MLP, its
    activation is SiLU); else ``module`` itself."""
    name = type(module).__name__
    if name in FUSABLE_NORMS and getattr(module, "weight", None) is not None and hasattr(module, "variance_epsilon"):
        return FusedRMSNorm(module, cpu_kernels)
    act = getattr(module, "act_fn", None)
    if name in FUSABLE_MLPS and type(act).__name__ in ("SiLU", "SiLUActivation"):
        return FusedSwiGLU(module, cpu_kernels)
    return module


def decoder_stacks(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]]:
    """(stack, its attention + MLP blocks) of every decoder stack of ``model``: modules with a
    ``layers`` list of such blocks and a final ``norm`` (a vision encoder has no ``norm`` there
    and is left alone)."""
    stacks = []
    for stack in model.modules():
        layers = getattr(stack, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not isinstance(getattr(stack, "norm", None), torch.nn.Module):
            continue
        blocks = [layer for layer in layers if hasattr(layer, "mlp") and hasattr(layer, "self_attn")]
        if blocks:
            stacks.append((stack, blocks))
    return stacks


def _pointwise_parts(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of every per-token submodule of the decoder stacks."""
    parts = []
    for stack, blocks in decoder_stacks(model):
        parts += [(layer, name) for layer in blocks for name in LAYER_PARTS
                  if isinstance(getattr(layer, name, None), torch.nn.Module)]
        parts.append((stack, "norm"))
    return parts


def wrap_pointwise(model: torch.nn.Module, chunk: int = 32768, *, fused_kernels: bool = False
                   ) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Put every decoder stack's MLPs and norms behind ``ChunkedAlongSequence`` (and, with
    ``fused_kernels``, the fused runners where the class is known); parts already wrapped are left
    as they are. Returns (parent, attribute, original) of each part wrapped now."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    wrapped = []
    for parent, name in _pointwise_parts(model):
        module = getattr(parent, name)
        if isinstance(module, ChunkedAlongSequence):
            continue
        setattr(parent, name, ChunkedAlongSequence(fused(module) if fused_kernels else module, chunk))
        wrapped.append((parent, name, module))
    return wrapped


@contextlib.contextmanager
def chunked_pointwise(model: torch.nn.Module, chunk: int = 32768, *, fused_kernels: bool = False) -> Iterator[int]:
    """Within the context, the MLPs and norms of every decoder stack run ``chunk`` tokens at a
    time (and, with ``fused_kernels``, through the fused kernels where their class is known);
    yields the number of submodules wrapped."""
    wrapped = wrap_pointwise(model, chunk, fused_kernels=fused_kernels)
    try:
        yield len(wrapped)
    finally:
        for parent, name, module in wrapped:
            setattr(parent, name, module)
