"""Launch a Triton kernel on the GPU that holds its tensors.

Triton launches on the *current* CUDA device, not on the device of its arguments: in a model
split over several GPUs (``device_map="auto"``) a layer on ``cuda:1`` would hand ``cuda:0``'s
stream pointers it cannot read. Every launch sits inside ``on_device(tensor)``.
``runs_triton`` says whether a tensor's kernels can launch at all (CUDA, or the interpreter).
"""

from __future__ import annotations

import contextlib
import os

import torch


def runs_triton(tensor: torch.Tensor) -> bool:
    """Whether Triton kernels run on this tensor: on CUDA, or on the CPU under ``TRITON_INTERPRET=1``."""
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The tensor's CUDA device as the current one for the block (nothing off CUDA)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
