"""mmsparse: modality-aware sparse encode, prefill and decode for long-video VLMs.

Imports are lazy: ``import mmsparse`` loads neither torch nor transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "pipeline": ("mmsparse.pipelines", "pipeline"),
    "VideoQAPipeline": ("mmsparse.pipelines", "VideoQAPipeline"),
    "SparseConfig": ("mmsparse.config", "SparseConfig"),
    "EncodeConfig": ("mmsparse.config", "EncodeConfig"),
    "PrefillConfig": ("mmsparse.config", "PrefillConfig"),
    "DecodeConfig": ("mmsparse.config", "DecodeConfig"),
    "PRESETS": ("mmsparse.config", "PRESETS"),
    "TokenLayout": ("mmsparse.layout", "TokenLayout"),
    "SamplingOptions": ("mmsparse.video", "SamplingOptions"),
    "load_video": ("mmsparse.video", "load_video"),
    "load": ("mmsparse.loading", "load"),
    "MMSparseError": ("mmsparse.errors", "MMSparseError"),
}

_SUBMODULES = frozenset({"config", "errors", "layout", "loading", "media", "models", "testing", "video", "pipelines", "kernels", "eval"})

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = import_module(f"mmsparse.{name}")
    elif name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module), attr)
    else:
        raise AttributeError(f"module 'mmsparse' has no attribute {name!r}")
    globals()[name] = value
    return value
