"""The dense video-qa pipeline: stock output, call forms, loading, stats and bad input."""

from __future__ import annotations

import pytest
import torch
import transformers

import mmsparse
from mmsparse.errors import (
    ContextLengthError,
    EmptyQuestionError,
    InvalidInputError,
    SamplingOptionsError,
    StageNotBuiltError,
    UnsupportedModelError,
)
from mmsparse.pipelines import VideoQAPipeline
from mmsparse.testing import synthetic_frames
from mmsparse.video import SamplingOptions, load_video

QUESTION = "What colour is the square?"


@pytest.fixture()
def pipe(tiny_model):
    model, processor = tiny_model
    return mmsparse.pipeline("video-qa", model=model, processor=processor, device="cpu")


def _stock_answer(model, processor, frames, max_new_tokens: int) -> tuple[str, int]:
    """What stock greedy generate answers, with inputs built by the processor directly."""
    adapter = mmsparse.models.adapter_class(model.config.model_type)(model, processor)
    video = load_video(frames, SamplingOptions(), frame_factor=adapter.frame_factor, size_factor=adapter.size_factor)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    extra = {"do_resize": False, "cap_pixels_per_frame": False} if model.config.model_type == "qwen2_5_vl" else {}
    inputs = processor(
        text=[text], videos=[video.frames], video_metadata=[video.metadata()], do_sample_frames=False,
        return_tensors="pt", **extra,
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip(), inputs["input_ids"].shape[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_equals_stock_generate(tiny_model, pipe, seed):
    model, processor = tiny_model
    frames = synthetic_frames(12, 84, 112, seed=seed)
    expected, prompt_len = _stock_answer(model, processor, frames, max_new_tokens=12)
    out = pipe(frames, QUESTION, max_new_tokens=12)
    assert out["answer"] == expected
    assert out["stats"]["prompt_tokens"] == prompt_len
    assert out["answer"]  # a random model still emits tokens; an empty answer would hide a bug


def test_stats_are_measured(pipe):
    out = pipe(synthetic_frames(8, 56, 56), QUESTION, max_new_tokens=6, return_layout=True)
    stats = out["stats"]
    layout = out["layout"]
    assert stats["video_tokens"] == layout.num_tokens("video") > 0
    assert stats["prompt_tokens"] == layout.seq_len
    assert 0 < stats["new_tokens"] <= 6
    assert stats["ttft_s"] > 0 and stats["video_decode_s"] >= 0 and stats["preprocess_s"] > 0
    assert stats["peak_memory_gb"] > 0
    if stats["new_tokens"] > 1:
        assert stats["decode_tokens_per_s"] > 0
    assert stats["sparse_stages"] == []


def test_many_questions_decode_once_and_match_single_calls(pipe):
    frames = synthetic_frames(8, 56, 56)
    qs = ["What happens?", "Which colour?"]
    many = pipe(frames, questions=qs, max_new_tokens=5)
    assert [o["question"] for o in many] == qs
    for q, o in zip(qs, many):
        assert pipe(frames, q, max_new_tokens=5)["answer"] == o["answer"]


def test_pipeline_level_sampling_options(tiny_qwen):
    model, processor = tiny_qwen
    pipe = VideoQAPipeline(model, processor, nframes=4, max_new_tokens=3)
    out = pipe(synthetic_frames(16, 56, 56), QUESTION, return_layout=True)
    assert out["layout"].video_spans[0].num_frames == 2  # 4 frames, 2 per temporal patch
    assert out["stats"]["new_tokens"] <= 3
    out = pipe(synthetic_frames(16, 56, 56), QUESTION, nframes=8, return_layout=True)
    assert out["layout"].video_spans[0].num_frames == 4


def test_local_path_and_transformers_pipeline(tiny_qwen, tmp_path):
    model, processor = tiny_qwen
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    frames = synthetic_frames(8, 56, 56)
    expected = mmsparse.pipeline(model=model, processor=processor, device="cpu")(frames, QUESTION, max_new_tokens=6)
    from_path = mmsparse.pipeline("video-qa", model=str(tmp_path), device="cpu")
    assert from_path(frames, QUESTION, max_new_tokens=6)["answer"] == expected["answer"]
    hf = transformers.pipeline("video-qa", model=str(tmp_path), device="cpu")
    assert isinstance(hf, VideoQAPipeline)
    assert hf(frames, QUESTION, max_new_tokens=6)["answer"] == expected["answer"]


def test_tiny_model_by_name():
    pipe = mmsparse.pipeline(model="mmsparse/tiny-llava-onevision", device="cpu")
    assert pipe(synthetic_frames(4, 64, 64), QUESTION, max_new_tokens=2)["stats"]["video_tokens"] > 0


@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_question(pipe, question):
    with pytest.raises(EmptyQuestionError):
        pipe(synthetic_frames(4, 56, 56), question)


def test_bad_question_forms(pipe):
    frames = synthetic_frames(4, 56, 56)
    with pytest.raises(EmptyQuestionError):
        pipe(frames, questions=[])
    with pytest.raises(InvalidInputError):
        pipe(frames, "a", questions=["b"])
    with pytest.raises(InvalidInputError):
        pipe(frames)


def test_context_overflow_says_how_many_frames_fit():
    from mmsparse.testing import tiny_qwen2_5_vl

    model, processor = tiny_qwen2_5_vl(max_position_embeddings=1024)
    pipe = mmsparse.pipeline(model=model, processor=processor, device="cpu")
    frames = synthetic_frames(64, 168, 168)  # 32 groups x 36 tokens = 1152 video tokens > 1024
    size = {"min_pixels": 28 * 28 * 4, "max_pixels": 168 * 168}
    with pytest.raises(ContextLengthError) as err:
        pipe(frames, QUESTION, nframes=64, **size)
    msg = str(err.value)
    assert "1024" in msg and "sample at most" in msg and "\n" not in msg
    fit = int(msg.split("sample at most ")[1].split()[0])
    assert 16 < fit < 64
    assert fit % 2 == 0
    out = pipe(frames, QUESTION, nframes=fit, max_new_tokens=1, **size)
    assert out["stats"]["prompt_tokens"] + 128 <= 1024  # the default max_new_tokens is reserved
    with pytest.raises(ContextLengthError):
        pipe(frames, QUESTION, nframes=fit + 2, **size)


def test_contradictory_sampling(pipe):
    with pytest.raises(SamplingOptionsError):
        pipe(synthetic_frames(8, 56, 56), QUESTION, fps=2.0, nframes=4)


def test_sparse_stage_not_built(tiny_qwen):
    model, processor = tiny_qwen
    for sparse in ("fast", mmsparse.SparseConfig(decode=mmsparse.DecodeConfig())):
        with pytest.raises(StageNotBuiltError, match="stage"):
            mmsparse.pipeline(model=model, processor=processor, sparse=sparse, device="cpu")


def test_unsupported_model_type_from_path(tmp_path):
    transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        mmsparse.pipeline(model=str(tmp_path), device="cpu")


def test_missing_model_path_is_a_load_error(tmp_path):
    from mmsparse.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot read a model config"):
        mmsparse.pipeline(model=str(tmp_path / "nothing-here"), device="cpu")


def test_zero_frames(pipe):
    from mmsparse.errors import EmptyVideoError

    with pytest.raises(EmptyVideoError):
        pipe(torch.zeros((0, 56, 56, 3), dtype=torch.uint8), QUESTION)


def test_unsupported_model_type():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(UnsupportedModelError, match="not supported"):
        mmsparse.pipeline(model=model, processor=object(), device="cpu")
