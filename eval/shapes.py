"""Full-size model shapes with random weights, for speed and memory benchmarks.

Random weights time exactly like trained ones (same shapes, same kernels); the processor is
mmsparse's offline one, so nothing is downloaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, ProcessorMixin

# Qwen2.5-VL-7B-Instruct's published config (text and vision towers).
QWEN2_5_VL_7B_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)
QWEN2_5_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)


def qwen2_5_vl_7b(device: str | torch.device = "cuda", dtype: torch.dtype | None = None, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A Qwen2.5-VL-7B-shaped model (random weights) built on ``device``, with the offline processor."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mmsparse.testing import qwen2_5_vl_config, tiny_qwen2_5_vl

    _, processor = tiny_qwen2_5_vl()  # only its processor: tokenizer ids index into the full vocab
    config = qwen2_5_vl_config(processor.tokenizer, QWEN2_5_VL_7B_TEXT, QWEN2_5_VL_7B_VISION)
    dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    tok = processor.tokenizer
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.pad_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.do_sample = False
    return model.eval(), processor
