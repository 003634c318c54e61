"""User-facing tasks. Importing this package registers ``video-qa`` with transformers,
so ``transformers.pipeline("video-qa", model=...)`` builds a ``VideoQAPipeline``."""

from transformers import AutoModelForImageTextToText
from transformers.pipelines import PIPELINE_REGISTRY

from .factory import TASKS, pipeline
from .video_qa import VideoQAPipeline

PIPELINE_REGISTRY.register_pipeline(
    "video-qa", pipeline_class=VideoQAPipeline, pt_model=AutoModelForImageTextToText, type="multimodal"
)

__all__ = ["TASKS", "VideoQAPipeline", "pipeline"]
