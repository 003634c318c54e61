"""Packed vision attention equals transformers' per-chunk loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmsparse.testing import synthetic_frames, tiny_qwen2_5_vl
from mmsparse.vision_attention import packed_chunk_attention, use_packed_vision_attention


@pytest.mark.parametrize("lengths", [[16, 16, 16], [5, 16, 1, 9], [7]])
def test_matches_per_chunk_sdpa(lengths):
    heads, dim = 3, 8
    total = sum(lengths)
    q, k, v = (torch.randn(1, heads, total, dim) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out, _ = packed_chunk_attention(None, q, k, v, scaling=0.3, cu_seq_lens_q=cu)
    expected = torch.cat(
        [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=0.3) for a, b in zip(cu[:-1], cu[1:])],
        dim=2,
    ).transpose(1, 2)
    assert out.shape == (1, total, heads, dim)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_vision_tower_output_unchanged_with_partial_windows():
    """196x224 frames: 7 merged rows leave partial 2x2 windows, so chunks differ in length."""
    model, processor = tiny_qwen2_5_vl()
    frames = synthetic_frames(4, 196, 224).permute(0, 3, 1, 2)
    inputs = processor.video_processor(videos=[frames], do_resize=False, return_tensors="pt")
    with torch.no_grad():
        stock = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        use_packed_vision_attention(model)
        packed = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    stock = stock.pooler_output if hasattr(stock, "pooler_output") else stock
    packed = packed.pooler_output if hasattr(packed, "pooler_output") else packed
    stock, packed = torch.cat(list(stock)), torch.cat(list(packed))
    torch.testing.assert_close(packed, stock, atol=1e-5, rtol=1e-4)
