"""Model adapters: turn processor output into the token layout, one adapter per model family."""

from .base import ModelAdapter
from .registry import adapter_class, register_adapter

__all__ = ["ModelAdapter", "adapter_class", "register_adapter"]
