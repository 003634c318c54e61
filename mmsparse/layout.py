"""The token layout: which LLM positions are text, video or image, and where each frame lies.

Built once per request by the model adapter and handed to every stage:
encode reads the video grid, prefill reads frame boundaries / modality spans / where the
trailing question starts, decode reads which cached positions are text and which are vision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from .kernels.launch import to_device

Modality = Literal["text", "video", "image"]
MODALITY_CODES: dict[str, int] = {"text": 0, "video": 1, "image": 2}


@dataclass(frozen=True)
class Span:
    """A contiguous run of LLM positions of one modality, ``[start, end)``.

    For a visual span, ``grid`` is (t, h, w) in LLM tokens: t frames (temporal groups after
    the encoder's temporal patching), each an h x w grid of tokens stored row-major.
    ``frame_starts[i]`` is the absolute position of frame i's first token and
    ``frame_lengths[i]`` its token count (uniform h*w unless the encode stage reduced it).
    Positions of the span outside every frame are model-specific extras (LLaVA-OneVision's
    trailing newline token). ``timestamps[i]`` is frame i's time in the source, in seconds.
    """

    modality: Modality
    start: int
    end: int
    grid: tuple[int, int, int] | None = None
    frame_starts: tuple[int, ...] = ()
    frame_lengths: tuple[int, ...] = ()
    timestamps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"span [{self.start}, {self.end}) is empty or negative")
        if len(self.frame_starts) != len(self.frame_lengths):
            raise ValueError("frame_starts and frame_lengths differ in length")
        for s, n in zip(self.frame_starts, self.frame_lengths):
            if s < self.start or s + n > self.end:
                raise ValueError(f"frame [{s}, {s + n}) lies outside span [{self.start}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def is_visual(self) -> bool:
        return self.modality != "text"

    @property
    def num_frames(self) -> int:
        return len(self.frame_starts)

    @property
    def tokens_per_frame(self) -> int | None:
        """Tokens in every frame when uniform, else None."""
        lengths = set(self.frame_lengths)
        return lengths.pop() if len(lengths) == 1 else None


@dataclass(frozen=True)
class TokenLayout:
    """Spans covering ``[0, seq_len)`` in order, and where the trailing question starts.

    ``question_start`` is the first position after the last visual span: the trailing text
    (closing markers, the question, the assistant header) whose queries estimate sparse indices.
    """

    seq_len: int
    spans: tuple[Span, ...]
    question_start: int

    def __post_init__(self) -> None:
        pos = 0
        for span in self.spans:
            if span.start != pos:
                raise ValueError(f"spans leave a gap or overlap at position {pos}")
            pos = span.end
        if pos != self.seq_len:
            raise ValueError(f"spans cover {pos} positions, sequence has {self.seq_len}")
        if not 0 <= self.question_start <= self.seq_len:
            raise ValueError(f"question_start {self.question_start} outside [0, {self.seq_len}]")

    @classmethod
    def from_spans(cls, seq_len: int, visual: list[Span]) -> TokenLayout:
        """Fill the gaps between sorted visual spans with text spans."""
        spans: list[Span] = []
        pos = 0
        for span in sorted(visual, key=lambda s: s.start):
            if span.start > pos:
                spans.append(Span("text", pos, span.start))
            spans.append(span)
            pos = span.end
        if pos < seq_len:
            spans.append(Span("text", pos, seq_len))
        question_start = max((s.end for s in visual), default=0)
        return cls(seq_len=seq_len, spans=tuple(spans), question_start=question_start)

    @property
    def visual_spans(self) -> tuple[Span, ...]:
        return tuple(s for s in self.spans if s.is_visual)

    @property
    def video_spans(self) -> tuple[Span, ...]:
        return tuple(s for s in self.spans if s.modality == "video")

    def visual_tail(self, count: int) -> range:
        """Positions of the last ``count`` (at most) visual tokens that run consecutively up to the
        last visual token (empty without visual tokens). From the spans: no device work."""
        stop = start = None
        for span in reversed(self.spans):
            if not span.is_visual:
                if stop is None:
                    continue
                break
            stop = span.end if stop is None else stop
            start = max(span.start, stop - count)
            if start > span.start:
                break
        return range(0) if stop is None else range(start, stop)

    def num_tokens(self, modality: Modality) -> int:
        return sum(s.length for s in self.spans if s.modality == modality)

    def modality_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [seq_len]: 0 text, 1 video, 2 image (``MODALITY_CODES``)."""
        lengths = torch.tensor([s.length for s in self.spans])
        codes = torch.tensor([MODALITY_CODES[s.modality] for s in self.spans])
        return to_device(torch.repeat_interleave(codes, lengths), device)  # no stream sync: read per layer

    def frame_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [seq_len]: frame number (counted across all visual spans), -1 elsewhere."""
        out = torch.full((self.seq_len,), -1, dtype=torch.long)
        starts = [s for span in self.visual_spans for s in span.frame_starts]
        lengths = [n for span in self.visual_spans for n in span.frame_lengths]
        if starts:
            lengths_t = torch.tensor(lengths)
            frame = torch.repeat_interleave(torch.arange(len(starts)), lengths_t)
            offset = torch.arange(int(lengths_t.sum())) - torch.repeat_interleave(
                torch.cumsum(lengths_t, 0) - lengths_t, lengths_t
            )
            out[torch.repeat_interleave(torch.tensor(starts), lengths_t) + offset] = frame
        return out.to(device)

    def to_dict(self) -> dict:
        """JSON-friendly summary (spans without per-frame lists)."""
        spans = []
        for s in self.spans:
            d = asdict(s)
            d["num_frames"] = s.num_frames
            d["tokens_per_frame"] = s.tokens_per_frame
            for key in ("frame_starts", "frame_lengths", "timestamps"):
                d.pop(key)
            spans.append(d)
        return {"seq_len": self.seq_len, "question_start": self.question_start, "spans": spans}


def token_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of True in a 1-D bool tensor."""
    padded = torch.cat([mask.new_zeros(1), mask.bool(), mask.new_zeros(1)]).to(torch.int8)
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends))
