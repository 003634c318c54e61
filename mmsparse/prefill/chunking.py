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
the modules as they are. The decoder layers of ``FUSABLE_LAYERS`` go behind ``FusedResidualBlock``
too, which fuses their two residual adds away (into the second norm and into the MLP's down
projection).
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
# Decoder layers whose forward is exactly ``h = x + self_attn(input_layernorm(x), **kwargs)[0]``
# then ``h + mlp(post_attention_layernorm(h))`` (read in transformers 5.17 and 5.24).
FUSABLE_LAYERS = ("Qwen2_5_VLDecoderLayer", "Qwen2VLDecoderLayer", "Qwen2DecoderLayer")


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

    def after_add(self, residual: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``residual + update``, its norm) in one pass."""
        from mmsparse.kernels.pointwise import add_rms_norm

        return add_rms_norm(residual, update, self.inner.weight, self.inner.variance_epsilon)


class FusedSwiGLU(_FusedRunner):
    """An MLP of ``FUSABLE_MLPS`` whose ``silu(gate) * up`` is one pass written over the gate.
    ``accumulate`` adds the result into ``out`` instead (a residual add inside the down GEMM)."""

    def fused_forward(self, hidden: torch.Tensor, out: torch.Tensor | None, accumulate: bool = False) -> torch.Tensor:
        from mmsparse.kernels.pointwise import silu_mul

        mlp = self.inner
        act = silu_mul(mlp.gate_proj(hidden), mlp.up_proj(hidden), inplace=True)
        down = mlp.down_proj
        if out is None:
            return down(act)
        if self.down_is_plain() and out.is_contiguous():  # the GEMM writes (or adds into) the slice
            rows, target = act.reshape(-1, act.shape[-1]), out.view(-1, out.shape[-1])
            target.addmm_(rows, down.weight.t()) if accumulate else torch.mm(rows, down.weight.t(), out=target)
            return out
        return out.add_(down(act)) if accumulate else out.copy_(down(act))

    def down_is_plain(self) -> bool:
        down = self.inner.down_proj
        return type(down) is torch.nn.Linear and down.bias is None


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


def _base(module: torch.nn.Module) -> torch.nn.Module:
    """The module under this file's wrappers (chunking, fused runner)."""
    while isinstance(module, (ChunkedAlongSequence, _FusedRunner)):
        module = module.module if isinstance(module, ChunkedAlongSequence) else module.inner
    return module


class FusedResidualBlock(torch.nn.Module):
    """A decoder layer of ``FUSABLE_LAYERS`` with its two residual adds fused away: the first into
    the post-attention RMSNorm (``add_rms_norm``: one pass writes the sum and its norm), the
    second into the MLP's down projection (the GEMM adds its product into the sum in place;
    cuBLAS reads it as the C operand at no measurable cost). At 128K tokens on an H200 each add
    is a 0.63 ms pass over the sequence. The down projection's sum is rounded once where the
    layer rounds the product and then the sum, so the result can differ from the layer's in the
    last bit.

    The layer's forward hooks run on the fused output as ``Module.__call__`` would run them
    (transformers keeps its output-recording hooks on every decoder layer once hidden states were
    asked for). The layer itself runs instead off CUDA (unless ``cpu_kernels``), with autograd
    recording, with forward pre-hooks or accelerate's device placement on the layer, or with
    positional arguments beyond the hidden states. Its other attributes read through to it."""

    def __init__(self, layer: torch.nn.Module, norm: FusedRMSNorm, mlp: FusedSwiGLU, chunk: int,
                 cpu_kernels: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self._fused = (norm, mlp)  # runners of the layer's own modules (a tuple: not registered twice)
        self.chunk = chunk
        self.cpu_kernels = cpu_kernels

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def fuses(self, hidden: torch.Tensor, args: tuple) -> bool:
        layer = self.layer
        return ((hidden.is_cuda or self.cpu_kernels) and not args and not torch.is_grad_enabled()
                and not layer._forward_pre_hooks and not hasattr(layer, "_hf_hook"))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        layer = self.layer
        if not self.fuses(hidden_states, args):
            return layer(hidden_states, *args, **kwargs)
        norm, mlp = self._fused
        update, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        total, normed = norm.after_add(hidden_states, update)
        del update
        rows, out = normed.reshape(-1, normed.shape[-1]), total.view(-1, total.shape[-1])
        for start in range(0, rows.shape[0], self.chunk):  # a few dozen slices of a long prompt
            mlp.fused_forward(rows[start:start + self.chunk], out[start:start + self.chunk], accumulate=True)
        for key, hook in layer._forward_hooks.items():
            kept = hook(layer, (hidden_states,), kwargs, total) if key in layer._forward_hooks_with_kwargs \
                else hook(layer, (hidden_states,), total)
            total = total if kept is None else kept
        return total


def fused_block(layer: torch.nn.Module, chunk: int, cpu_kernels: bool = False) -> torch.nn.Module:
    """``layer`` behind ``FusedResidualBlock`` when its class is a known one and its second norm
    and MLP can run fused (the down projection a plain Linear without bias); else ``layer``."""
    if type(layer).__name__ not in FUSABLE_LAYERS:
        return layer
    norm = fused(_base(getattr(layer, "post_attention_layernorm", None)), cpu_kernels)
    mlp = fused(_base(getattr(layer, "mlp", None)), cpu_kernels)
    if not isinstance(norm, FusedRMSNorm) or not isinstance(mlp, FusedSwiGLU) or not mlp.down_is_plain():
        return layer
    return FusedResidualBlock(layer, norm, mlp, chunk, cpu_kernels)


def decoder_stacks(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]]:
    """(stack, its attention + MLP blocks) of every decoder stack of ``model``: modules with a
    ``layers`` list of such blocks and a final ``norm`` (a vision encoder has no ``norm`` there
    and is left alone)."""
    stacks = []
    for stack in model.modules():
        layers = getattr(stack, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not isinstance(getattr(stack, "norm", None), torch.nn.Module):
            continue
        inner = [layer.layer if isinstance(layer, FusedResidualBlock) else layer for layer in layers]
        blocks = [layer for layer in inner if hasattr(layer, "mlp") and hasattr(layer, "self_attn")]
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
    ``fused_kernels``, the fused runners and ``FusedResidualBlock`` where the class is known); parts
    already wrapped are left as they are. Returns (parent, attribute, original) of each part
    wrapped now."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    wrapped = []
    for parent, name in _pointwise_parts(model):
        module = getattr(parent, name)
        if isinstance(module, ChunkedAlongSequence):
            continue
        setattr(parent, name, ChunkedAlongSequence(fused(module) if fused_kernels else module, chunk))
        wrapped.append((parent, name, module))
    for stack, _ in decoder_stacks(model) if fused_kernels else ():
        for i, layer in enumerate(stack.layers):
            block = layer if isinstance(layer, FusedResidualBlock) else fused_block(layer, chunk)
            if block is not layer:
                stack.layers[i] = block
                wrapped.append((stack.layers, str(i), layer))
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
