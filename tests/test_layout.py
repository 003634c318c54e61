"""Token layout: spans, frame boundaries and grids match the processor's real output."""

from __future__ import annotations

import pytest
import torch

from mmsparse.layout import Span, TokenLayout, token_runs
from mmsparse.models import adapter_class
from mmsparse.video import SamplingOptions, load_video

from mmsparse.testing import synthetic_frames as random_frames


def _prepare(model, processor, frames, options, source_fps):
    adapter = adapter_class(model.config.model_type)(model, processor)
    video = load_video(
        frames, options, frame_factor=adapter.frame_factor, size_factor=adapter.size_factor, source_fps=source_fps
    )
    inputs, layout = adapter.prepare(video, "What is in the video?")
    return adapter, video, inputs, layout


@pytest.mark.parametrize(
    "t,h,w,source_fps,options",
    [
        (8, 56, 56, 2.0, SamplingOptions()),
        (30, 90, 160, 10.0, SamplingOptions(fps=1.0)),
        (17, 120, 64, 4.0, SamplingOptions(nframes=6, min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28)),
        (40, 112, 112, 25.0, SamplingOptions(fps=8.0, start=0.2, end=1.4)),
    ],
)
def test_qwen_layout_matches_processor(tiny_qwen, t, h, w, source_fps, options):
    model, processor = tiny_qwen
    adapter, video, inputs, layout = _prepare(model, processor, random_frames(t, h, w), options, source_fps)
    ids = inputs["input_ids"][0]
    (span,) = layout.video_spans
    grid_t, grid_h, grid_w = inputs["video_grid_thw"][0].tolist()
    rows, cols = grid_h // 2, grid_w // 2
    assert span.grid == (grid_t, rows, cols)
    assert grid_t == -(-video.plan.nframes // 2)
    assert (rows * 28, cols * 28) == (video.plan.height, video.plan.width)
    assert span.length == grid_t * rows * cols == adapter.count_video_tokens(video.plan)
    assert bool((ids[span.start : span.end] == model.config.video_token_id).all())
    assert ids[span.start - 1] == model.config.vision_start_token_id
    assert ids[span.end] == model.config.vision_end_token_id
    assert span.frame_starts == tuple(range(span.start, span.end, rows * cols))
    assert span.tokens_per_frame == rows * cols
    assert span.timestamps == pytest.approx(video.plan.timestamps[::2])
    assert layout.question_start == span.end
    assert layout.seq_len == ids.shape[0]
    assert adapter.count_prompt_tokens(video.plan, "What is in the video?") == ids.shape[0]
    # temporal positions follow the real sampled fps, not transformers' 24 fps fallback
    assert float(inputs["second_per_grid_ts"][0]) == pytest.approx(2 / video.plan.sample_fps)


@pytest.mark.parametrize("t,h,w", [(4, 64, 64), (9, 100, 180)])
def test_llava_layout_matches_processor(tiny_llava, t, h, w):
    model, processor = tiny_llava
    adapter, video, inputs, layout = _prepare(model, processor, random_frames(t, h, w), SamplingOptions(nframes=t), 2.0)
    ids = inputs["input_ids"][0]
    (span,) = layout.video_spans
    side = adapter.pooled_side
    assert span.grid == (video.plan.nframes, side, side)
    assert span.length == video.plan.nframes * side * side + 1 == adapter.count_video_tokens(video.plan)
    assert bool((ids[span.start : span.end] == model.config.video_token_index).all())
    assert span.frame_starts[-1] + side * side == span.end - 1  # the newline token closes the span
    assert adapter.count_prompt_tokens(video.plan, "What is in the video?") == ids.shape[0]


def test_modality_and_frame_ids():
    video = Span("video", 3, 3 + 2 * 4 + 1, grid=(2, 2, 2), frame_starts=(3, 7), frame_lengths=(4, 4))
    layout = TokenLayout.from_spans(15, [video])
    assert [s.modality for s in layout.spans] == ["text", "video", "text"]
    assert layout.modality_ids().tolist() == [0] * 3 + [1] * 9 + [0] * 3
    assert layout.frame_ids().tolist() == [-1] * 3 + [0] * 4 + [1] * 4 + [-1] * 4
    assert layout.num_tokens("video") == 9 and layout.num_tokens("text") == 6
    assert layout.question_start == 12
    assert layout.to_dict()["spans"][1]["tokens_per_frame"] == 4


def test_visual_tail_is_the_last_consecutive_visual_run():
    """The rows a vertical-slash estimate reads, from the spans alone: up to ``count`` visual
    positions running up to the last visual token (an image right before a video joins the run)."""
    def layout(*spans: tuple[str, int, int], n: int) -> TokenLayout:
        return TokenLayout.from_spans(n, [Span(m, a, b) for m, a, b in spans])

    def brute(lay: TokenLayout, count: int) -> list[int]:
        visual = (lay.modality_ids() != 0).tolist()
        rows = []
        for r in range(len(visual) - 1, -1, -1):
            if visual[r] and (not rows or r == rows[0] - 1) and len(rows) < count:
                rows.insert(0, r)
            elif rows:
                break
        return rows

    cases = [layout(("video", 3, 12), n=15), layout(("video", 3, 100), n=110), layout(("video", 0, 40), n=40),
             layout(("image", 5, 20), ("video", 20, 30), n=33), layout(("video", 2, 50), ("image", 60, 70), n=80),
             layout(n=9)]
    for lay in cases:
        for count in (1, 8, 64):
            assert list(lay.visual_tail(count)) == brute(lay, count)


def test_layout_rejects_inconsistent_spans():
    with pytest.raises(ValueError):
        Span("video", 0, 4, frame_starts=(2,), frame_lengths=(4,))
    with pytest.raises(ValueError):
        TokenLayout(seq_len=5, spans=(Span("text", 0, 3),), question_start=0)


def test_token_runs():
    mask = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    assert token_runs(mask) == [(1, 3), (5, 6), (7, 10)]
    assert token_runs(torch.zeros(4, dtype=torch.bool)) == []
