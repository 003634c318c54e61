"""Load a supported model and its processor from a hub id, a local path or objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidInputError, ModelLoadError
from .models import ModelAdapter, adapter_class

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, ProcessorMixin

TOY_MODEL = "mmsparse/toy-qwen2.5-vl"
DEFAULT_MODEL = TOY_MODEL
TOY_LABEL = "a toy model trained on synthetic needle tasks, for offline demos and tests; not a general VLM"


def toy_model_dir() -> Path:
    """Where the toy model ships inside the package."""
    return Path(__file__).resolve().parent / "toy_model"


def describe(model: object) -> str:
    """How logs and UIs name a model, labelling the bundled ones for what they are."""
    from . import testing

    if model == TOY_MODEL:
        return f"{TOY_MODEL} ({TOY_LABEL})"
    if model in testing.TINY_MODELS:
        return f"{model} (untrained tiny test model: answers are arbitrary tokens)"
    return str(model)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype_for(device: str, dtype: str | torch.dtype | None) -> torch.dtype | str:
    import torch

    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str) and dtype != "auto":
        try:
            return getattr(torch, dtype)
        except AttributeError:
            raise InvalidInputError(f"unknown dtype {dtype!r}; use bfloat16, float16, float32 or auto") from None
    return dtype


def load(
    model: str | os.PathLike | PreTrainedModel,
    processor: ProcessorMixin | str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    **from_pretrained_kwargs: Any,
) -> ModelAdapter:
    """Return the adapter (model + processor) for ``model``.

    ``model`` is a hub id, a local directory, the bundled toy model (``TOY_MODEL``), a tiny
    test model name (``mmsparse/tiny-...``), or a loaded ``PreTrainedModel``. ``processor`` defaults to the one stored with the model.
    """
    from . import testing

    device = device or default_device()
    if isinstance(model, str) and model in testing.TINY_MODELS:
        tiny_model, tiny_processor = testing.build_tiny(model)
        model, processor = tiny_model.to(device=device, dtype=_dtype_for(device, dtype)), processor or tiny_processor
    elif isinstance(model, (str, os.PathLike)):
        path = str(toy_model_dir()) if model == TOY_MODEL else str(model)
        model = _from_pretrained(path, device, dtype, from_pretrained_kwargs)
    elif not hasattr(model, "config") or not hasattr(model, "generate"):
        raise InvalidInputError(f"model must be a hub id, a local path or a transformers model, not {type(model).__name__}")

    if processor is None or isinstance(processor, (str, os.PathLike)):
        processor = _load_processor(str(processor or model.name_or_path))
    return adapter_class(model.config.model_type)(model, processor)


def _from_pretrained(name: str, device: str, dtype: Any, kwargs: dict[str, Any]) -> PreTrainedModel:
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read a model config from {name!r} ({_first_line(err)}); pass a local model directory or a reachable hub id") from None
    cls = getattr(transformers, adapter_class(config.model_type).model_class)
    try:
        return cls.from_pretrained(name, dtype=_dtype_for(device, dtype), device_map=device, **kwargs).eval()
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load weights of {name!r} ({_first_line(err)}); check the path or hub id") from None


def _load_processor(name: str) -> ProcessorMixin:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a processor from {name!r} ({_first_line(err)}); pass processor=") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
