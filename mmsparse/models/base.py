"""What every model adapter provides: prompt building, processing, token counting, layout."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from ..layout import Span, TokenLayout, token_runs

if TYPE_CHECKING:
    import torch
    from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

    from ..video import SamplingPlan, Video


class ModelAdapter(ABC):
    """Knows one model family's processor and token layout; never changes the model.

    Subclasses set ``model_types`` (the ``config.model_type`` values they serve),
    ``model_class`` (the transformers class that loads them), and how the video must be
    sampled for the processor: ``frame_factor`` (frames come in groups of this many) and
    ``size_factor`` (frame sides are multiples of it; None lets the processor resize).
    """

    model_types: ClassVar[tuple[str, ...]]
    model_class: ClassVar[str]
    frame_factor: ClassVar[int] = 1
    size_factor: ClassVar[int | None] = None

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin) -> None:
        self.model = model
        self.processor = processor

    # -- prompt ---------------------------------------------------------------------------
    def messages(self, question: str, system_prompt: str | None = None) -> list[dict[str, Any]]:
        """Chat messages: optional system prompt, then the video and the question."""
        msgs: list[dict[str, Any]] = []
        if system_prompt:
            msgs.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        msgs.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]})
        return msgs

    def prompt(self, question: str, system_prompt: str | None = None) -> str:
        return self.processor.apply_chat_template(
            self.messages(question, system_prompt), add_generation_prompt=True, tokenize=False
        )

    @property
    def context_length(self) -> int:
        """Positions the language model was built for."""
        text_config = self.model.config.get_text_config()
        return int(text_config.max_position_embeddings)

    def count_prompt_tokens(self, plan: SamplingPlan, question: str, system_prompt: str | None = None) -> int:
        """Prompt length for a video sampled by ``plan``, computed before decoding any pixel."""
        text_ids = self.processor.tokenizer(self.prompt(question, system_prompt))["input_ids"]
        return len(text_ids) - 1 + self.count_video_tokens(plan)

    def sampling_defaults(self) -> dict[str, Any]:
        """SamplingOptions fields this model's processor implies when the user leaves them unset."""
        return {}

    # -- per family -----------------------------------------------------------------------
    @abstractmethod
    def count_video_tokens(self, plan: SamplingPlan) -> int:
        """LLM tokens the video sampled by ``plan`` becomes."""

    @abstractmethod
    def processor_kwargs(self) -> dict[str, Any]:
        """Extra processor arguments for frames that mmsparse has already sampled (and sized)."""

    @abstractmethod
    def video_spans(self, input_ids: torch.Tensor, inputs: BatchFeature, videos: list[Video]) -> list[Span]:
        """The video spans of one sequence (``input_ids`` 1-D), in order."""

    # -- shared ---------------------------------------------------------------------------
    def prepare(
        self, video: Video, question: str, system_prompt: str | None = None
    ) -> tuple[BatchFeature, TokenLayout]:
        """Model inputs for one (video, question) and their token layout."""
        inputs = self.processor(
            text=[self.prompt(question, system_prompt)],
            videos=[video.frames],
            video_metadata=[video.metadata()],
            return_tensors="pt",
            **self.processor_kwargs(),
        )
        return inputs, self.layout(inputs, [video])

    def layout(self, inputs: BatchFeature, videos: list[Video], index: int = 0) -> TokenLayout:
        ids = inputs["input_ids"][index]
        return TokenLayout.from_spans(int(ids.shape[0]), self.video_spans(ids, inputs, videos))

    def _runs_of(self, input_ids: torch.Tensor, token_id: int, count: int) -> list[tuple[int, int]]:
        runs = token_runs(input_ids == token_id)
        if len(runs) != count:
            raise RuntimeError(f"found {len(runs)} runs of video tokens for {count} videos")
        return runs
