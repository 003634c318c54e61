"""Launch a Triton kernel on the GPU that holds its tensors.

Triton launches on the *current* CUDA device, not on the device of its arguments: in a model
split over several GPUs (``device_map="auto"``) a layer on ``cuda:1`` would hand ``cuda:0``'s
stream pointers it cannot read. Every launch sits inside ``on_device(tensor)``.
"""

from __future__ import annotations

import contextlib

import torch


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The tensor's CUDA device as the current one for the block (nothing off CUDA)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
