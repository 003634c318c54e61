"""The bundled toy model: loads offline, small, and really finds needles (dense)."""

from __future__ import annotations

import random

import pytest

import mmsparse
from mmsparse.eval.haystack import Haystack, insert_needle
from mmsparse.eval.needles import Needle
from mmsparse.eval.vniah import run_vniah
from mmsparse.loading import TOY_MODEL, toy_model_dir


@pytest.fixture(scope="module")
def toy_pipe():
    return mmsparse.pipeline("video-qa", model=TOY_MODEL, device="cpu")


@pytest.fixture(scope="module")
def haystack():
    return Haystack(112)


def test_toy_is_small_and_stock(toy_pipe):
    assert (toy_model_dir() / "model.safetensors").stat().st_size < 16 * 2**20
    assert type(toy_pipe.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert toy_pipe.sampling.min_pixels == toy_pipe.sampling.max_pixels == 112 * 112


@pytest.mark.parametrize(
    "render,question,answer",
    [
        ({"kind": "shape", "shape": "circle", "colour": "red"}, "What colour is the shape on the card?", "red"),
        ({"kind": "shape", "shape": "triangle", "colour": "blue"}, "What shape is on the card?", "triangle"),
        ({"kind": "digit", "digit": 3, "colour": "yellow"}, "What number is on the card?", "3"),
        ({"kind": "shape", "shape": "star", "colour": "yellow"}, "Describe the card.", "a yellow star"),
    ],
)
def test_toy_answers_about_the_needle(toy_pipe, haystack, render, question, answer):
    needle = Needle("n", question, answer, render=render)
    frames, _ = insert_needle(haystack.frames(128, seed=7), needle.picture(112, random.Random(3)), depth=0.6)
    out = toy_pipe(frames, question, nframes=128, source_fps=2.0, max_new_tokens=8)
    assert needle.accepts(out["answer"]), out["answer"]
    assert out["stats"]["video_tokens"] == 64 * 16


def test_vniah_small_grid_dense_accuracy(tmp_path):
    """The CI check of issue 3: a few cells of VisionNIAH on the toy model, dense. The 0.95 target is
    measured on the 50-cell default grid (eval/results, 0.98); on 12 cells one miss is 8 points, so
    this asserts at most one miss (the shipped model reads one digit card at 64 frames, depth 1 as 8)."""
    summary = run_vniah(frames=(64, 256), depths=(0.0, 0.5, 1.0), needles_per_cell=2, configs=["dense"], out_dir=tmp_path,
                        progress=False)
    (dense,) = summary["configs"]
    assert dense["config"] == "dense" and summary["cells"] == 12
    assert dense["accuracy"] >= 11 / 12


def test_training_recipe_rebuilds_the_shipped_architecture(toy_pipe):
    """train_toy.build_toy() makes the same tokenizer, config shapes and processor as shipped."""
    from mmsparse.eval.train_toy import build_toy

    model, processor = build_toy()
    assert processor.tokenizer.get_vocab() == toy_pipe.processor.tokenizer.get_vocab()
    fresh, shipped = model.config.to_diff_dict(), toy_pipe.model.config.to_diff_dict()
    for key in ("text_config", "vision_config"):
        for field in ("hidden_size", "num_hidden_layers", "depth", "num_attention_heads", "num_key_value_heads", "vocab_size"):
            assert fresh[key].get(field) == shipped[key].get(field), (key, field)
    assert processor.video_processor.size["longest_edge"] == toy_pipe.processor.video_processor.size["longest_edge"]
