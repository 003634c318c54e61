"""Fused RMSNorm and SwiGLU product against their PyTorch references (Triton interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

from mmsparse.kernels.pointwise import rms_norm, silu_mul
from mmsparse.kernels.reference import rms_norm_reference, silu_mul_reference
from mmsparse.prefill.chunking import FusedRMSNorm, FusedSwiGLU, fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 37, 96), (5, 200), (3, 7, 11, 48)])
def test_rms_norm_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(DEVICE, dtype)
    got = rms_norm(x, weight, 1e-6)
    expected = rms_norm_reference(x, weight, 1e-6)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # one rounding step of the input dtype
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_rms_norm_reads_strided_rows_and_promotes_like_the_module():
    """A row slice of a wider tensor (what chunking passes) and a float32 weight on float16 rows."""
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 9, 64, generator=gen).to(DEVICE, torch.float16)
    rows = wide[:, 2:7]
    weight = torch.rand(64, generator=gen).to(DEVICE)
    got = rms_norm(rows, weight, 1e-5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rms_norm_reference(rows, weight, 1e-5), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        rms_norm(rows, weight[:32], 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3), (2, 33, 70), (4097,)])
def test_silu_mul_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(len(shape))
    gate = (torch.randn(shape, generator=gen) * 4).to(DEVICE, dtype)
    up = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    expected = silu_mul_reference(gate, up)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(silu_mul(gate, up), expected, atol=tol, rtol=tol)
    kept = gate.clone()
    out = silu_mul(kept, up, inplace=True)
    assert out.data_ptr() == kept.data_ptr()
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def test_silu_mul_in_place_on_a_strided_gate_and_bad_shapes():
    gen = torch.Generator().manual_seed(3)
    both = torch.randn(6, 2 * 40, generator=gen).to(DEVICE)
    gate, up = both[:, :40], both[:, 40:].contiguous()  # gate not contiguous
    expected = silu_mul_reference(gate, up)
    out = silu_mul(gate, up, inplace=True)
    assert out.data_ptr() == gate.data_ptr()
    torch.testing.assert_close(both[:, :40], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one shape and dtype"):
        silu_mul(up, up[:, :3])


def test_fused_wraps_only_known_classes():
    """Known Qwen2 classes get their fused runner (same output); anything else is left as it is."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

    cfg = Qwen2Config(hidden_size=32, intermediate_size=48, hidden_act="silu")
    torch.manual_seed(0)
    mlp, norm = Qwen2MLP(cfg).to(DEVICE), Qwen2RMSNorm(32, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32, device=DEVICE)
    for module, runner in ((mlp, FusedSwiGLU), (norm, FusedRMSNorm)):
        wrapped = fused(module, cpu_kernels=True)
        assert isinstance(wrapped, runner)
        with torch.no_grad():
            torch.testing.assert_close(wrapped(x), module(x), atol=1e-5, rtol=1e-5)
    other = torch.nn.LayerNorm(32)
    assert fused(other) is other
    gelu = Qwen2MLP(Qwen2Config(hidden_size=32, intermediate_size=48, hidden_act="gelu"))
    assert fused(gelu) is gelu


def test_fused_runners_write_into_a_slice_of_the_output():
    """Chunked prefill hands each chunk a slice of one output tensor: both runners fill it."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

    torch.manual_seed(1)
    mlp = Qwen2MLP(Qwen2Config(hidden_size=32, intermediate_size=48, hidden_act="silu")).to(DEVICE)
    norm = Qwen2RMSNorm(32, eps=1e-6).to(DEVICE)
    x = torch.randn(1, 9, 32, device=DEVICE)
    for module in (mlp, norm):
        out = torch.full((1, 12, 32), float("nan"), device=DEVICE)
        with torch.no_grad():
            fused(module, cpu_kernels=True)(x, out=out[:, 2:11])
            torch.testing.assert_close(out[:, 2:11], module(x), atol=1e-5, rtol=1e-5)
        assert out[:, :2].isnan().all() and out[:, 11:].isnan().all()
    with pytest.raises(ValueError, match="must be"):
        rms_norm(x, norm.weight, 1e-6, out=torch.empty(1, 8, 32, device=DEVICE))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_the_gpu_that_holds_the_tensors():
    """A model split over GPUs: tensors on cuda:1 while cuda:0 is current."""
    from mmsparse.kernels.index import TokenOrder
    from mmsparse.kernels.patterns import a_shape
    from mmsparse.kernels.reference import reference_sparse_attention
    from mmsparse.kernels.sparse_attention import sparse_attention

    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, h, 512, 64, device=dev, dtype=torch.float16, generator=gen) for h in (4, 2, 2))
        order = TokenOrder.causal(512, 512, 64, 64, device=dev)
        index = a_shape(order, sink=64, local=128)
        ref, _ = reference_sparse_attention(q.float(), k.float(), v.float(), index, order)
        torch.testing.assert_close(sparse_attention(q, k, v, index, order).float(), ref, atol=2e-3, rtol=2e-3)
        x = torch.randn(3, 96, device=dev, dtype=torch.float16, generator=gen)
        weight = torch.rand(96, device=dev, dtype=torch.float16, generator=gen)
        torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(silu_mul(x, x), silu_mul_reference(x, x), atol=1e-2, rtol=1e-2)
