"""``mmsparse.pipeline(task, model=..., sparse=...)``: load through the adapters, build the task."""

from __future__ import annotations

import os
from typing import Any

from ..config import SparseConfig
from ..errors import InvalidInputError
from ..loading import DEFAULT_MODEL, load
from .video_qa import VideoQAPipeline

TASKS: dict[str, type[VideoQAPipeline]] = {"video-qa": VideoQAPipeline}


def pipeline(
    task: str = "video-qa",
    model: Any = None,
    processor: Any = None,
    *,
    sparse: bool | str | SparseConfig | None = False,
    device: str | None = None,
    dtype: str | Any = None,
    **kwargs: Any,
) -> VideoQAPipeline:
    """Build an mmsparse pipeline.

    ``model``: hub id, local path, loaded model, or a bundled name; default is the toy model
    ``mmsparse/toy-qwen2.5-vl`` (trained on synthetic needle tasks: offline demos and tests only).
    ``sparse``: False (dense, stock output), True (default preset), a preset name or a
    ``SparseConfig``. Other kwargs are sampling options (fps, nframes, max_frames, min_pixels,
    max_pixels, total_pixels, start, end) or generation kwargs used by every call.
    """
    try:
        cls = TASKS[task]
    except KeyError:
        raise InvalidInputError(f"unknown task {task!r}; use one of {', '.join(TASKS)}") from None
    model_kwargs = kwargs.pop("model_kwargs", {})
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, (str, os.PathLike)) or hasattr(model, "generate"):
        adapter = load(model, processor, device=device, dtype=dtype, **model_kwargs)
    else:
        raise InvalidInputError(f"model must be a hub id, a local path or a transformers model, not {type(model).__name__}")
    kwargs.setdefault("device", adapter.model.device)  # never let Pipeline move a loaded model
    return cls(adapter.model, adapter.processor, adapter=adapter, sparse=sparse, task=task, **kwargs)
