"""Shared fixtures: tiny offline models (built once per session) and synthetic frames."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run under the interpreter on a machine without CUDA; set before anything imports
# triton, and never on a real GPU run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_qwen():
    from mmsparse.testing import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl()


@pytest.fixture(scope="session")
def tiny_llava():
    from mmsparse.testing import tiny_llava_onevision

    return tiny_llava_onevision()


@pytest.fixture(params=["qwen", "llava"])
def tiny_model(request, tiny_qwen, tiny_llava):
    return {"qwen": tiny_qwen, "llava": tiny_llava}[request.param]

