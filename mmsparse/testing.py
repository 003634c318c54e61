"""Tiny random models with an offline processor, for tests and CI (no hub, no network).

``tiny_qwen2_5_vl()`` and ``tiny_llava_onevision()`` build a real
``Qwen2_5_VLForConditionalGeneration`` / ``LlavaOnevisionForConditionalGeneration`` from a
small config, with a real processor whose byte-level BPE tokenizer is trained locally in
milliseconds. Their weights are random: answers are arbitrary tokens, but every code path
(processor, vision tower, M-RoPE, generate) is the stock one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

TINY_MODELS = ("mmsparse/tiny-qwen2.5-vl", "mmsparse/tiny-llava-onevision")

# Words the tokenizer learns merges for: enough for prompts of tests and demos.
_CORPUS = (
    "You are a helpful assistant. What is happening in the video? Describe the video. "
    "What colour is the square? What number is shown on the card? Which animal appears? "
    "the a an of in on at to is are was were and or with what which where when who how why "
    "red green blue yellow white black orange purple circle square triangle star card word "
    "number zero one two three four five six seven eight nine ten rabbit bird bike car person "
    "frame frames second seconds first last start end scene camera moves left right up down"
)

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)
LLAVA_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(special_tokens: tuple[str, ...], vocab_size: int = 512, corpus: str = ""):
    """A Qwen2 byte-level BPE tokenizer trained on a fixed small corpus (deterministic)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS + " " + corpus] * 4, trainer=trainer)
    vocab = bpe.get_vocab()
    merges = _merges_of(bpe)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in special_tokens if t not in ("<|endoftext|>", "<|im_end|>")],
    )


def _merges_of(bpe) -> list[tuple[str, str]]:
    import json

    data = json.loads(bpe.to_str())
    merges = data["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _generation_config(tokenizer) -> Any:
    from transformers import GenerationConfig

    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return GenerationConfig(eos_token_id=eos, pad_token_id=eos[1], do_sample=False)


def qwen2_5_vl_config(tokenizer, text: dict[str, Any], vision: dict[str, Any]):
    """A ``Qwen2_5_VLConfig`` of the given shapes whose special-token ids are ``tokenizer``'s."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            **text,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def qwen2_5_vl_processor(tokenizer, frame_pixels: int | None = None):
    """The offline Qwen2.5-VL processor; ``frame_pixels`` pins every frame to that many pixels."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if frame_pixels is None:
        image, video = Qwen2VLImageProcessor(), Qwen2VLVideoProcessor()
    else:
        image = Qwen2VLImageProcessor(min_pixels=frame_pixels, max_pixels=frame_pixels)
        video = Qwen2VLVideoProcessor(size={"shortest_edge": frame_pixels, "longest_edge": frame_pixels})
    return Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=QWEN_CHAT_TEMPLATE)


def build_qwen2_5_vl(tokenizer, text: dict[str, Any], vision: dict[str, Any], seed: int = 0, frame_pixels: int | None = None):
    """A randomly initialised Qwen2.5-VL of the given shapes and its offline processor."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tokenizer, text, vision)).eval()
    model.generation_config = _generation_config(tokenizer)
    return model, qwen2_5_vl_processor(tokenizer, frame_pixels)


def tiny_qwen2_5_vl(seed: int = 0, max_position_embeddings: int = 8192) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A 2-layer Qwen2.5-VL with a 2-block vision tower and its offline processor."""
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    )
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
    return build_qwen2_5_vl(build_tokenizer(QWEN_SPECIAL_TOKENS), text, vision, seed=seed)


def tiny_llava_onevision(seed: int = 0, max_position_embeddings: int = 8192) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A 2-layer LLaVA-OneVision (SigLIP + Qwen2, the LLaVA-Video architecture) and its processor."""
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    image_size, patch = 112, 14
    tokenizer = build_tokenizer(LLAVA_SPECIAL_TOKENS)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS}
    config = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]],
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tokenizer)
    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=config.image_grid_pinpoints),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(image_size // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def synthetic_frames(t: int, h: int, w: int, seed: int = 0):
    """uint8 frames [T, H, W, 3]: noise with a bright square that moves from frame to frame."""
    import torch

    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 80, (t, h, w, 3), generator=g, dtype=torch.uint8)
    for i in range(t):
        y, x = (i * 3) % max(1, h - 8), (i * 5) % max(1, w - 8)
        frames[i, y : y + 8, x : x + 8] = 250
    return frames


_BUILDERS = {
    "mmsparse/tiny-qwen2.5-vl": tiny_qwen2_5_vl,
    "mmsparse/tiny-llava-onevision": tiny_llava_onevision,
}


def build_tiny(name: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a tiny model by its name in ``TINY_MODELS``."""
    return _BUILDERS[name](seed=seed)
