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


def to_device(values, device: torch.device | str | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list, or a CPU tensor) on ``device`` without waiting for the device. A plain
    host-to-GPU copy synchronises the stream: built per layer, it would drain the GPU's queue and
    leave it idle while the host builds the rest of the index. Staged in pinned memory and copied
    asynchronously instead (the pinned block is kept until the copy is done)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None:
        t = t.to(dtype)
    if device is None or torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
