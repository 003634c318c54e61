"""Typed errors. Each carries a one-line message that says what to change.

The CLI prints ``str(err)`` and exits with ``err.exit_code``; library users catch
``MMSparseError`` (or the specific subclass) and never see a traceback for bad input.
"""

from __future__ import annotations


class MMSparseError(Exception):
    """Base class of every error mmsparse raises for bad input or an unbuilt feature."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: multi-line messages break the CLI's contract.
        super().__init__(" ".join(str(message).split()))


class VideoNotFoundError(MMSparseError, FileNotFoundError):
    """The video path does not exist."""


class VideoDecodeError(MMSparseError, ValueError):
    """The file exists but no backend can decode it (corrupt, not a video, unsupported codec)."""


class EmptyVideoError(MMSparseError, ValueError):
    """The video (or the chosen time window) holds no frames."""


class SamplingOptionsError(MMSparseError, ValueError):
    """Sampling options contradict each other or are out of range."""


class ContextLengthError(MMSparseError, ValueError):
    """The prompt would not fit the model's context at the chosen sampling."""


class UnsupportedModelError(MMSparseError, ValueError):
    """The model type has no mmsparse adapter."""


class EmptyQuestionError(MMSparseError, ValueError):
    """The question is empty or only whitespace."""


class InvalidInputError(MMSparseError, TypeError):
    """An argument has the wrong type or shape."""


class StageNotBuiltError(MMSparseError, NotImplementedError):
    """A sparse stage was asked for that this version of mmsparse does not implement yet."""

    exit_code = 3


class ConfigError(MMSparseError, ValueError):
    """A SparseConfig field or preset name is invalid."""


class ModelLoadError(MMSparseError, OSError):
    """A model or processor could not be loaded from the given id or path."""
