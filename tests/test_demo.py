"""The Gradio demo's request handler (the app's only logic), on the toy model and bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import mmsparse

APP = Path(__file__).resolve().parents[1] / "demos" / "app.py"


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("mmsparse_demo_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipe():
    return mmsparse.pipeline("video-qa", device="cpu")  # the default: the toy model


def test_answers_a_sample_clip_with_stats(app, pipe):
    reply, stats = app.answer(pipe, None, "bikes", "What colour is the shape on the card?", 2.0, 16)
    assert reply.strip()
    assert "| video tokens |" in stats and "time to first token" in stats


def test_bad_input_is_one_line(app, pipe, tmp_path):
    assert app.answer(pipe, None, None, "What?", 2.0, 16)[1].startswith("**error:** upload")
    reply, stats = app.answer(pipe, None, "bikes", "   ", 2.0, 16)
    assert reply == "" and stats.startswith("**error:**") and "question is empty" in stats
    missing = str(tmp_path / "gone.mp4")
    assert "not found" in app.answer(pipe, missing, None, "What?", 2.0, 16)[1]
