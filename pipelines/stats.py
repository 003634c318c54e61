"""Timing and memory of one generate call: time to first token, decode speed, peak memory."""

from __future__ import annotations

import resource
import sys
import time

import torch
from transformers.generation.streamers import BaseStreamer


class GenerationClock(BaseStreamer):
    """A streamer that timestamps the prompt and each generated token.

    ``generate`` calls ``put`` once with the prompt before prefill and once per new token, so
    the second call marks the first token. On CUDA each mark synchronises first, so times are
    those of finished device work (a sync per token costs microseconds next to a decode step).
    Chains to a user's streamer.
    """

    def __init__(self, device: torch.device, inner: BaseStreamer | None = None) -> None:
        self.device = device
        self.inner = inner
        self.marks: list[float] = []

    def _mark(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())

    def start(self) -> None:
        self.marks.clear()
        self._mark()

    def put(self, value: torch.Tensor) -> None:
        self._mark()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()

    def summary(self) -> dict[str, float | None]:
        # marks: [start, prompt put, first token, ..., last token]
        if len(self.marks) < 3:
            return {"ttft_s": None, "decode_tokens_per_s": None}
        first, last = self.marks[2], self.marks[-1]
        steps = len(self.marks) - 3
        return {
            "ttft_s": first - self.marks[0],
            "decode_tokens_per_s": steps / (last - first) if steps and last > first else None,
        }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """Peak GPU memory allocated by torch on CUDA; on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30, "memory_kind": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_memory_gb": rss_bytes / 2**30, "memory_kind": "process_peak_rss"}
