"""Registry from ``config.model_type`` to the adapter class that serves it."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from .base import ModelAdapter

_ADAPTERS: dict[str, type[ModelAdapter]] = {}
A = TypeVar("A", bound="type[ModelAdapter]")


def register_adapter(cls: A) -> A:
    """Class decorator: serve every ``cls.model_types`` with ``cls``."""
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter class for a ``config.model_type``; UnsupportedModelError if there is none."""
    from . import llava_onevision, qwen2_5_vl  # noqa: F401  (registers the built-in adapters)

    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; use a Qwen2.5-VL or LLaVA-Video/OneVision "
            f"model (supported types: {', '.join(sorted(_ADAPTERS))})"
        ) from None
