"""Fused RMSNorm and SwiGLU product against their PyTorch references (Triton interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

from mmsparse.kernels.pointwise import add_rms_norm, rms_norm, silu_mul
from mmsparse.kernels.reference import rms_norm_reference, silu_mul_reference
from mmsparse.prefill.chunking import FusedResidualBlock, FusedRMSNorm, FusedSwiGLU, decoder_stacks, fused, fused_block

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
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 37, 96), (3, 7, 11, 48)])
def test_add_rms_norm_is_the_add_then_the_norm(shape, dtype):
    gen = torch.Generator().manual_seed(7 + len(shape))
    residual = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    update = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(DEVICE, dtype)
    total, normed = add_rms_norm(residual, update, weight, 1e-6)
    assert torch.equal(total, residual + update)  # rounded as the tensor add rounds
    assert normed.shape == residual.shape and normed.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(normed, rms_norm_reference(residual + update, weight, 1e-6), atol=tol, rtol=tol)


def test_add_rms_norm_reads_strided_rows_and_refuses_mismatches():
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(2, 9, 64, generator=gen).to(DEVICE)
    residual, update = wide[:, 1:6], torch.randn(2, 5, 64, generator=gen).to(DEVICE)
    weight = torch.rand(64, generator=gen).to(DEVICE)
    total, normed = add_rms_norm(residual, update, weight, 1e-5)
    torch.testing.assert_close(total, residual + update, atol=0, rtol=0)
    torch.testing.assert_close(normed, rms_norm_reference(residual + update, weight, 1e-5), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one shape and dtype"):
        add_rms_norm(residual, update[:, :4], weight, 1e-5)
    with pytest.raises(ValueError, match="one shape and dtype"):
        add_rms_norm(residual, update.half(), weight, 1e-5)
    with pytest.raises(ValueError, match="does not match"):
        add_rms_norm(residual, update, weight[:32], 1e-5)


def _qwen2_layer(act: str = "silu"):
    """A two-head Qwen2 decoder layer (SDPA) with the inputs a text model gives it."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    cfg = Qwen2Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                      hidden_act=act, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(4)
    layer = Qwen2DecoderLayer(cfg, 0).to(DEVICE).eval()
    with torch.no_grad():
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 11, 32, device=DEVICE)
    pos = torch.arange(11, device=DEVICE)[None]
    kwargs = dict(attention_mask=None, position_ids=pos, position_embeddings=Qwen2RotaryEmbedding(cfg).to(DEVICE)(x, pos))
    return layer, x, kwargs


def test_fused_residual_block_matches_the_layer():
    """Both residual adds fused away (into the second norm and the down projection, 4-token MLP
    chunks): the layer's output up to the down projection's single rounding."""
    layer, x, kwargs = _qwen2_layer()
    block = fused_block(layer, chunk=4)
    assert isinstance(block, FusedResidualBlock) and block.self_attn is layer.self_attn  # attributes read through
    block.cpu_kernels = True
    calls = []
    with torch.no_grad():
        expected = layer(x, **kwargs)
        torch.testing.assert_close(block(x, **kwargs), expected, atol=1e-5, rtol=1e-5)
        layer.mlp.register_forward_hook(lambda *_: calls.append("mlp"))
        block(x, **kwargs)
        assert calls == []  # the fused path computes the MLP from its projections
        seen = []
        hook = layer.register_forward_hook(lambda module, args, out: seen.append((module, args[0], out)) or out * 2)
        doubled = block(x, **kwargs)  # the layer's hooks see its input and the fused output, as they would
        assert calls == [] and len(seen) == 1 and seen[0][0] is layer and seen[0][1] is x
        torch.testing.assert_close(seen[0][2], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(doubled, 2 * seen[0][2])  # what a hook returns replaces the output
        hook.remove()
        pre = layer.register_forward_pre_hook(lambda *_: calls.append("pre"))
        assert torch.equal(block(x, **kwargs), expected) and calls == ["pre", "mlp"]  # pre-hooks: the layer itself
        pre.remove()
    calls.clear()
    assert torch.equal(block(x, **kwargs), expected) and calls == ["mlp"]  # autograd recording: the layer itself


def test_fused_block_wraps_only_known_layers_and_stacks_see_through_it():
    layer, _, _ = _qwen2_layer(act="gelu")
    assert fused_block(layer, chunk=4) is layer  # its MLP is not SwiGLU
    assert fused_block(torch.nn.Linear(4, 4), chunk=4).__class__ is torch.nn.Linear
    silu, _, _ = _qwen2_layer()
    stack = torch.nn.Module()
    stack.layers, stack.norm = torch.nn.ModuleList([fused_block(silu, chunk=4)]), torch.nn.Identity()
    assert decoder_stacks(stack) == [(stack, [silu])]


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
