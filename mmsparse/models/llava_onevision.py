"""LLaVA-OneVision / LLaVA-Video: SigLIP frames pooled 2x2, one newline token after each video."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..layout import Span
from .base import ModelAdapter
from .registry import register_adapter

if TYPE_CHECKING:
    import torch
    from transformers import BatchFeature

    from ..video import SamplingPlan, Video


@register_adapter
class LlavaOnevisionAdapter(ModelAdapter):
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    frame_factor = 1
    size_factor = None  # the processor resizes every frame to the vision tower's square

    @property
    def pooled_side(self) -> int:
        """Tokens per side of a frame after the model's 2x2 bilinear pooling."""
        vision = self.model.config.vision_config
        return math.ceil(vision.image_size // vision.patch_size / 2)

    def count_video_tokens(self, plan: SamplingPlan) -> int:
        return plan.nframes * self.pooled_side**2 + 1  # + the newline token after the frames

    def processor_kwargs(self) -> dict[str, Any]:
        return {"do_sample_frames": False}

    def video_spans(self, input_ids: torch.Tensor, inputs: BatchFeature, videos: list[Video]) -> list[Span]:
        token_id = self.model.config.video_token_index
        side = self.pooled_side
        per_frame = side * side
        spans = []
        for (start, end), video in zip(self._runs_of(input_ids, token_id, len(videos)), videos):
            t = video.plan.nframes
            if t * per_frame + 1 != end - start:
                raise RuntimeError(f"video span has {end - start} tokens, {t} frames of {per_frame} + 1 expected")
            spans.append(
                Span(
                    "video",
                    start,
                    end,
                    grid=(t, side, side),
                    frame_starts=tuple(range(start, end - 1, per_frame)),
                    frame_lengths=(per_frame,) * t,
                    timestamps=tuple(video.plan.timestamps),
                )
            )
        return spans
