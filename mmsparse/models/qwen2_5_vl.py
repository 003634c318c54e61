"""Qwen2.5-VL: 14 px patches, 2x2 spatial merge, 2 frames per temporal patch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..layout import Span
from .base import ModelAdapter
from .registry import register_adapter

if TYPE_CHECKING:
    import torch
    from transformers import BatchFeature

    from ..video import SamplingPlan, Video


@register_adapter
class Qwen2_5_VLAdapter(ModelAdapter):
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"

    @property
    def _vision(self):
        return self.model.config.vision_config

    @property
    def frame_factor(self) -> int:  # type: ignore[override]
        return int(self._vision.temporal_patch_size)

    @property
    def size_factor(self) -> int:  # type: ignore[override]
        return int(self._vision.patch_size * self._vision.spatial_merge_size)

    def count_video_tokens(self, plan: SamplingPlan) -> int:
        groups = -(-plan.nframes // self.frame_factor)
        return groups * (plan.height // self.size_factor) * (plan.width // self.size_factor)

    def sampling_defaults(self) -> dict[str, Any]:
        # qwen-vl-utils' per-frame pixel defaults, clamped into the range the checkpoint's video
        # processor allows: real checkpoints keep qwen-vl-utils' values, a small model that was
        # trained at one frame size (the toy model) gets that size.
        from ..video import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

        size = getattr(self.processor.video_processor, "size", None) or {}
        low, high = size.get("shortest_edge"), size.get("longest_edge")
        if not low or not high:
            return {}
        clamp = lambda x: int(min(max(x, low), high))  # noqa: E731
        return {"min_pixels": clamp(DEFAULT_MIN_PIXELS), "max_pixels": clamp(DEFAULT_MAX_PIXELS)}

    def processor_kwargs(self) -> dict[str, Any]:
        # Frames arrive sampled and sized by mmsparse.video (qwen-vl-utils rules, total_pixels
        # included); the processor must not resample or resize them again.
        return {"do_sample_frames": False, "do_resize": False, "cap_pixels_per_frame": False}

    def video_spans(self, input_ids: torch.Tensor, inputs: BatchFeature, videos: list[Video]) -> list[Span]:
        grids = inputs["video_grid_thw"].tolist()
        merge = int(self._vision.spatial_merge_size)
        spans = []
        for (start, end), (t, h, w), video in zip(self._runs_of(input_ids, self.model.config.video_token_id, len(grids)), grids, videos):
            rows, cols = h // merge, w // merge
            per_frame = rows * cols
            if t * per_frame != end - start:
                raise RuntimeError(f"video span has {end - start} tokens, grid {t}x{rows}x{cols} expects {t * per_frame}")
            spans.append(
                Span(
                    "video",
                    start,
                    end,
                    grid=(t, rows, cols),
                    frame_starts=tuple(range(start, end, per_frame)),
                    frame_lengths=(per_frame,) * t,
                    timestamps=tuple(video.plan.timestamps[:: self.frame_factor][:t]),
                )
            )
        return spans
