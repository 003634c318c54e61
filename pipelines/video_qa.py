"""The ``video-qa`` pipeline: ask questions about a long video."""

from __future__ import annotations

import contextlib
import time
from dataclasses import fields, replace
from typing import Any

import torch
from transformers import Pipeline

from ..config import SparseConfig, resolve_sparse
from ..errors import ContextLengthError, EmptyQuestionError, InvalidInputError
from ..models import ModelAdapter, adapter_class
from ..video import SamplingOptions, Video, decode, plan_sampling, probe_video
from .stats import GenerationClock, peak_memory, reset_peak_memory

SAMPLING_KEYS = frozenset(f.name for f in fields(SamplingOptions))
VIDEO_KEYS = frozenset({"source_fps", "video_backend"})
DEFAULT_GENERATION = {"max_new_tokens": 128, "do_sample": False}


class VideoQAPipeline(Pipeline):
    """Answer questions about a video with a supported VLM.

    ``pipe(video, "question")`` returns ``{"answer", "question", "stats"}``;
    ``pipe(video, questions=[...])`` returns a list of those, decoding the video once.
    ``video`` is a path, an array/tensor of frames or a list of frames. Sampling options
    (``fps``, ``nframes``, ``max_frames``, ``min_pixels``, ``max_pixels``, ``total_pixels``,
    ``start``, ``end``) and generation kwargs (``max_new_tokens``, ...) can be given at
    construction or per call. With a dense config the answer is exactly what stock greedy
    ``model.generate`` returns on the same inputs.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        *,
        adapter: ModelAdapter | None = None,
        sparse: bool | str | SparseConfig | None = False,
        **kwargs: Any,
    ) -> None:
        if processor is None:
            raise InvalidInputError("the video-qa pipeline needs a processor; pass processor= or load with mmsparse.pipeline")
        self.adapter = adapter or adapter_class(model.config.model_type)(model, processor)
        self.sparse_config = resolve_sparse(sparse)
        if self.sparse_config.prefill is not None:
            from ..prefill.attention import enable_sparse_prefill

            enable_sparse_prefill(model)  # the text model's attention; SDPA outside sparse requests
            chunk = self.sparse_config.prefill.pointwise_chunk
            if chunk is not None:  # exact per-token work, so it stays for every request
                from ..prefill.chunking import wrap_pointwise

                wrap_pointwise(model, chunk, fused_kernels=True)
            if self.sparse_config.prefill.compile_attention:
                from ..prefill.compiled import compile_attention

                compile_attention(model)
        given = _take(kwargs, SAMPLING_KEYS)
        self.sampling = SamplingOptions(**{**self.adapter.sampling_defaults(), **given})
        self.video_kwargs = _take(kwargs, VIDEO_KEYS)
        kwargs.pop("tokenizer", None)
        super().__init__(model=model, processor=processor, tokenizer=processor.tokenizer, **kwargs)

    # -- call -----------------------------------------------------------------------------
    def __call__(self, video: Any, question: str | None = None, *, questions: list[str] | None = None, **kwargs: Any):
        asked = _questions(question, questions)
        options = replace(self.sampling, **_take(kwargs, SAMPLING_KEYS))  # validated on construction
        video_kwargs = {**self.video_kwargs, **_take(kwargs, VIDEO_KEYS)}
        system_prompt = kwargs.get("system_prompt", self._preprocess_params.get("system_prompt"))
        new_tokens = kwargs.get("max_new_tokens", self._forward_params["generate_kwargs"].get("max_new_tokens"))
        started = time.perf_counter()
        clip = self.load_video(
            video,
            options,
            asked,
            system_prompt=system_prompt,
            max_new_tokens=new_tokens or DEFAULT_GENERATION["max_new_tokens"],
            source_fps=video_kwargs.get("source_fps"),
            backend=video_kwargs.get("video_backend"),
        )
        decode_s = time.perf_counter() - started
        outputs = []
        for q in asked:
            out = super().__call__({"video": clip, "question": q}, **kwargs)
            out["stats"]["video_decode_s"] = decode_s
            outputs.append(out)
        return outputs if questions is not None else outputs[0]

    def load_video(
        self,
        video: Any,
        options: SamplingOptions,
        questions: list[str],
        *,
        system_prompt: str | None = None,
        max_new_tokens: int = DEFAULT_GENERATION["max_new_tokens"],
        source_fps: float | None = None,
        backend: str | None = None,
    ) -> Video:
        """Probe, plan the sampling, refuse prompts over the context, then decode once."""
        info = probe_video(video, source_fps=source_fps, backend=backend)
        plan = plan_sampling(info, options, frame_factor=self.adapter.frame_factor, size_factor=self.adapter.size_factor)
        longest = max(questions, key=len)
        needed = self.adapter.count_prompt_tokens(plan, longest, system_prompt) + max_new_tokens
        limit = self.adapter.context_length
        if needed > limit:
            video_tokens = self.adapter.count_video_tokens(plan)
            per_frame = video_tokens / plan.nframes
            fit = max(0, int((limit - (needed - video_tokens)) / per_frame))
            fit -= fit % self.adapter.frame_factor
            raise ContextLengthError(
                f"the prompt needs {needed} tokens ({plan.nframes} frames at {plan.width}x{plan.height} give "
                f"{video_tokens} video tokens, plus text and {max_new_tokens} new tokens) but the model's context is "
                f"{limit}; sample at most {fit} frames (lower fps / max_frames / nframes) or lower max_pixels"
            )
        return decode(video, plan)

    # -- Pipeline protocol -----------------------------------------------------------------
    def _sanitize_parameters(self, **kwargs: Any):
        preprocess: dict[str, Any] = {}
        postprocess: dict[str, Any] = {}
        if "system_prompt" in kwargs:
            preprocess["system_prompt"] = kwargs.pop("system_prompt")
        if "return_layout" in kwargs:
            postprocess["return_layout"] = kwargs.pop("return_layout")
        # Call-time generation kwargs update (not replace) those given at construction.
        initial = getattr(self, "_forward_params", {}).get("generate_kwargs", {})
        generate_kwargs = {**initial, **kwargs.pop("generate_kwargs", {}), **kwargs}
        return preprocess, {"generate_kwargs": generate_kwargs}, postprocess

    def preprocess(self, item: dict[str, Any], system_prompt: str | None = None):
        started = time.perf_counter()
        inputs, layout = self.adapter.prepare(item["video"], item["question"], system_prompt)
        return {
            "inputs": dict(inputs),
            "layout": layout,
            "question": item["question"],
            "preprocess_s": time.perf_counter() - started,
        }

    def _forward(self, model_inputs: dict[str, Any], generate_kwargs: dict[str, Any] | None = None):
        # The model may sit on another device than the pipeline's (device_map, offloading).
        inputs = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs["inputs"].items()}
        kwargs = {**DEFAULT_GENERATION, **(generate_kwargs or {})}
        device = self.model.device
        clock = GenerationClock(device, inner=kwargs.pop("streamer", None))
        reset_peak_memory(device)
        with self._sparse_request(model_inputs["layout"]) as request:
            clock.start()
            sequences = self.model.generate(**inputs, streamer=clock, **kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        new_ids = sequences[0, prompt_len:]
        stats = {
            "prompt_tokens": int(prompt_len),
            "video_tokens": model_inputs["layout"].num_tokens("video"),
            "new_tokens": int(new_ids.numel()),
            "preprocess_s": model_inputs["preprocess_s"],
            **clock.summary(),
            **peak_memory(device),
            "sparse_stages": list(self.sparse_config.stages),
        }
        if request is not None:
            stats["prefill"] = request.stats.summary()
        return {"new_ids": new_ids, "stats": stats, "layout": model_inputs["layout"], "question": model_inputs["question"]}

    def _sparse_request(self, layout):
        """Context of one generate call: the prefill request when that stage is on."""
        if self.sparse_config.prefill is None:
            return contextlib.nullcontext()
        from ..prefill.attention import sparse_prefill

        return sparse_prefill(layout, self.sparse_config.prefill, plans=self._prefill_plan())

    def _prefill_plan(self):
        """Per-layer labels from an offline search: the config's ``plan``, else a plan file stored
        in the model's directory, else None (choose from each input)."""
        if not hasattr(self, "_plan_cache"):
            from pathlib import Path

            from ..prefill.search import PLAN_FILE, load_plan

            path = self.sparse_config.prefill.plan
            local = Path(str(getattr(self.model, "name_or_path", ""))) / PLAN_FILE
            if path is None and local.is_file():
                path = local
            self._plan_cache = load_plan(path) if path is not None else None
        return self._plan_cache

    def postprocess(self, model_outputs: dict[str, Any], return_layout: bool = False):
        answer = self.processor.tokenizer.decode(model_outputs["new_ids"], skip_special_tokens=True).strip()
        out = {"answer": answer, "question": model_outputs["question"], "stats": model_outputs["stats"]}
        if return_layout:
            out["layout"] = model_outputs["layout"]
        return out


def _take(kwargs: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    """Remove and return the entries of ``kwargs`` named in ``keys``."""
    return {k: kwargs.pop(k) for k in list(kwargs) if k in keys}


def _questions(question: str | None, questions: list[str] | None) -> list[str]:
    if (question is None) == (questions is None):
        raise InvalidInputError("pass exactly one of question= or questions=[...]")
    asked = [question] if questions is None else list(questions)
    if not asked:
        raise EmptyQuestionError("questions=[] is empty; pass at least one question")
    for q in asked:
        if not isinstance(q, str):
            raise InvalidInputError(f"a question must be a string, not {type(q).__name__}")
        if not q.strip():
            raise EmptyQuestionError("the question is empty; ask something about the video")
    return asked
