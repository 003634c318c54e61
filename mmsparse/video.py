"""Video input with qwen-vl-utils sampling semantics.

A source is probed (frame count, fps, size), a :class:`SamplingPlan` picks the frames and the
output size, and only those frames are decoded and resized, ~32 at a time, so a long 720p video
never sits in memory at full resolution.

Sources: a file path (decoded with decord, torchcodec, PyAV or OpenCV, whichever is installed, in
that order of preference; ``backend=`` or the ``MMSPARSE_VIDEO_BACKEND`` environment variable forces
one), or frames already in memory: a numpy array / torch tensor ``[T, H, W, C]`` or ``[T, C, H, W]``,
or a list of PIL images / ``H x W x C`` arrays. Frames given in memory are assumed to be sampled at
2 fps unless ``source_fps`` says otherwise.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Union

import numpy as np
import torch

from .errors import (
    EmptyVideoError,
    InvalidInputError,
    MMSparseError,
    SamplingOptionsError,
    VideoDecodeError,
    VideoNotFoundError,
)

if TYPE_CHECKING:
    from transformers.video_utils import VideoMetadata

__all__ = [
    "SamplingOptions",
    "SamplingPlan",
    "Video",
    "VideoInfo",
    "VideoSource",
    "available_backends",
    "decode",
    "load_video",
    "plan_sampling",
    "probe_video",
    "smart_resize",
]

logger = logging.getLogger(__name__)

VideoSource = Union[str, "os.PathLike[str]", np.ndarray, torch.Tensor, Sequence[object]]

BACKEND_ENV = "MMSPARSE_VIDEO_BACKEND"
MEMORY_BACKEND = "memory"
MEMORY_FPS = 2.0  # assumed rate of frames handed over in memory, as in qwen-vl-utils
DEFAULT_FPS = 2.0
DEFAULT_MIN_PIXELS = 128 * 28 * 28
DEFAULT_MAX_PIXELS = 768 * 28 * 28
DEFAULT_TOTAL_PIXELS = 24576 * 28 * 28
MAX_ASPECT_RATIO = 200
_CHUNK = 32  # frames decoded and resized together: bounds peak memory at full resolution
_EPS = 1e-6  # absorbs float error when seconds are turned into frame numbers (0.1 * 30 = 3.0000000000000004)


# --------------------------------------------------------------------------- options and plans


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample frames from a video; ``None`` means the qwen-vl-utils default."""

    fps: float | None = None  # frames per second to sample; 2.0 when nframes is None
    nframes: int | None = None  # exact number of frames (rounded to frame_factor)
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int | None = None  # per frame; default 128*28*28
    max_pixels: int | None = None  # per frame; default 768*28*28
    total_pixels: int | None = None  # budget over all frames; default 24576*28*28
    start: float | None = None  # seconds
    end: float | None = None  # seconds

    def __post_init__(self) -> None:
        self.validate()

    @property
    def effective_fps(self) -> float:
        """The sampling rate used when ``nframes`` is not set."""
        return DEFAULT_FPS if self.fps is None else float(self.fps)

    def pixel_limits(self) -> tuple[int, int, int]:
        """``(min_pixels, max_pixels, total_pixels)`` with defaults filled in."""
        return (
            DEFAULT_MIN_PIXELS if self.min_pixels is None else int(self.min_pixels),
            DEFAULT_MAX_PIXELS if self.max_pixels is None else int(self.max_pixels),
            DEFAULT_TOTAL_PIXELS if self.total_pixels is None else int(self.total_pixels),
        )

    def validate(self) -> None:
        """Raise :class:`SamplingOptionsError` if the options are out of range or contradict each other."""
        if self.fps is not None and self.nframes is not None:
            raise SamplingOptionsError("--fps and --nframes contradict each other; pass only one of them")
        _check_number("--fps", self.fps, integer=False, minimum=0.0, strict=True)
        _check_number("--nframes", self.nframes, integer=True, minimum=1)
        _check_number("--min-frames", self.min_frames, integer=True, minimum=1)
        _check_number("--max-frames", self.max_frames, integer=True, minimum=1)
        for name in ("min_pixels", "max_pixels", "total_pixels"):
            _check_number("--" + name.replace("_", "-"), getattr(self, name), integer=True, minimum=1)
        _check_number("--start", self.start, integer=False, minimum=0.0)
        _check_number("--end", self.end, integer=False, minimum=0.0, strict=True)
        if self.min_frames > self.max_frames:
            raise SamplingOptionsError(
                f"--min-frames {self.min_frames} is above --max-frames {self.max_frames}; lower --min-frames or raise --max-frames"
            )
        min_pixels, max_pixels, _ = self.pixel_limits()
        if min_pixels > max_pixels:
            raise SamplingOptionsError(
                f"--min-pixels {min_pixels} is above --max-pixels {max_pixels}; lower --min-pixels or raise --max-pixels"
            )
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise SamplingOptionsError(f"--end {self.end} must come after --start {self.start}; pass an --end above --start")


def _check_number(name: str, value: object, *, integer: bool, minimum: float, strict: bool = False) -> None:
    """Range/type check of one optional option; bools are rejected although they are ints."""
    if value is None:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "a whole number" if integer else "a number"
        raise SamplingOptionsError(f"{name} must be {what}; got {value!r}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"above {minimum:g}" if strict else f"at least {minimum:g}"
        raise SamplingOptionsError(f"{name} must be {bound}; got {value!r}")


@dataclass(frozen=True)
class VideoInfo:
    """What probing a source tells, before any pixel is decoded."""

    total_frames: int
    fps: float
    height: int
    width: int
    backend: str

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.total_frames / self.fps


@dataclass(frozen=True)
class SamplingPlan:
    """Which source frames to decode, and the size to resize them to."""

    indices: tuple[int, ...]  # source frame index of every sampled frame (sorted)
    height: int  # after resizing (the source size when no resizing is planned)
    width: int
    info: VideoInfo

    @property
    def nframes(self) -> int:
        """Number of sampled frames (repeats included)."""
        return len(self.indices)

    @property
    def sample_fps(self) -> float:
        """Sampled frames per second of the WHOLE source (transformers' ``VideoMetadata.sampled_fps``)."""
        return len(self.indices) / self.info.total_frames * self.info.fps

    @property
    def timestamps(self) -> tuple[float, ...]:
        """Time of every sampled frame, in seconds from the start of the source."""
        return tuple(i / self.info.fps for i in self.indices)


@dataclass
class Video:
    """Decoded frames: uint8 RGB ``[T, C, H, W]`` and the plan that produced them."""

    frames: torch.Tensor
    plan: SamplingPlan

    def metadata(self) -> VideoMetadata:
        """transformers' ``VideoMetadata`` for the processor (its ``sampled_fps`` equals ``plan.sample_fps``)."""
        from transformers.video_utils import VideoMetadata

        info = self.plan.info
        return VideoMetadata(
            total_num_frames=info.total_frames,
            fps=info.fps,
            width=info.width,
            height=info.height,
            duration=info.duration,
            video_backend=info.backend,
            frames_indices=list(self.plan.indices),
        )


# --------------------------------------------------------------------------- planning


def _round_to(x: float, factor: int) -> int:
    return round(x / factor) * factor


def _ceil_to(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def _floor_to(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: float = 56 * 56, max_pixels: float = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of ``factor``, ``min_pixels <= h*w <= max_pixels``, aspect kept.

    Gives the same result as ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize``.
    """
    if height < 1 or width < 1:
        raise InvalidInputError(f"frames of {width}x{height} pixels are empty; pass frames at least 1x1")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise SamplingOptionsError(
            f"frames of {width}x{height} have an aspect ratio above {MAX_ASPECT_RATIO}, which Qwen-style resizing"
            " cannot handle; crop the video or pass size_factor=None"
        )
    h, w = _round_to(height, factor), _round_to(width, factor)
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, _floor_to(height / shrink, factor))
        w = max(factor, _floor_to(width / shrink, factor))
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h, w = _ceil_to(height * grow, factor), _ceil_to(width * grow, factor)
    return h, w


def _window(info: VideoInfo, options: SamplingOptions) -> tuple[int, int]:
    """First and last source frame inside ``[start, end]`` seconds (both inclusive)."""
    first = 0 if options.start is None else math.ceil(options.start * info.fps - _EPS)
    last = info.total_frames - 1
    if options.end is not None:
        last = min(last, math.floor(options.end * info.fps + _EPS))
    if first > last:
        start = 0 if options.start is None else options.start
        end = f"{info.duration:g}" if options.end is None else f"{options.end:g}"
        raise EmptyVideoError(
            f"the window --start {start:g} --end {end} selects no frames of a {info.duration:.2f}s video;"
            f" choose a window inside 0-{info.duration:.2f}s"
        )
    return first, last


def _frame_count(available: int, fps: float, options: SamplingOptions, frame_factor: int) -> int:
    """How many frames to sample from a window of ``available`` frames at source rate ``fps``."""
    if options.nframes is not None:
        if options.nframes > available:
            raise SamplingOptionsError(
                f"--nframes {options.nframes} asks for more frames than the {available} in the window;"
                f" use --nframes <= {available} or widen the window"
            )
        n = _round_to(options.nframes, frame_factor)
        if n > available:  # rounding up overshot the window: round down instead
            n = _floor_to(available, frame_factor)
    else:
        low = _ceil_to(options.min_frames, frame_factor)
        high = _floor_to(min(options.max_frames, available), frame_factor)
        wanted = available / fps * options.effective_fps
        n = _floor_to(min(max(wanted, low), high), frame_factor)
    # A window shorter than frame_factor (e.g. a 1-frame clip) repeats its frames rather than failing.
    return max(n, frame_factor)


def _check_factor(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise SamplingOptionsError(f"{name} must be a whole number of at least 1; got {value!r}")


def plan_sampling(info: VideoInfo, options: SamplingOptions, *, frame_factor: int = 2, size_factor: int | None = 28) -> SamplingPlan:
    """Pick the frames (qwen-vl-utils rules) and, unless ``size_factor`` is None, the Qwen smart-resize size."""
    options.validate()
    if info.total_frames < 1 or not info.fps > 0:
        raise InvalidInputError(
            f"cannot plan for a video of {info.total_frames} frames at {info.fps} fps; describe the source with probe_video()"
        )
    _check_factor("frame_factor", frame_factor)
    if size_factor is not None:
        _check_factor("size_factor", size_factor)
    first, last = _window(info, options)
    n = _frame_count(last - first + 1, info.fps, options, frame_factor)
    indices = tuple(int(i) for i in np.linspace(first, last, n).round())
    height, width = info.height, info.width
    if size_factor is not None:
        min_pixels, max_pixels, total_pixels = options.pixel_limits()
        # Share the total budget between frames, but never drop below min_pixels (qwen-vl-utils).
        max_pixels = max(min(max_pixels, total_pixels / n * frame_factor), int(min_pixels * 1.05))
        height, width = smart_resize(info.height, info.width, size_factor, min_pixels, max_pixels)
    return SamplingPlan(indices=indices, height=height, width=width, info=info)


# --------------------------------------------------------------------------- file backends
# Each backend is a probe (path -> frame count, fps, height, width) and a reader (path, sorted unique
# indices -> chunks of uint8 [t, 3, H, W] tensors in that order). A reader whose stream ends before
# the last index raises _StreamEnded after yielding what it found; decode() decides what that means.

Probe = Callable[[str], tuple[int, float, int, int]]
Reader = Callable[[str, Sequence[int]], Iterator[torch.Tensor]]


class _Backend(NamedTuple):
    module: str
    pip_name: str
    probe: Probe
    read: Reader


class _StreamEnded(Exception):
    """The stream held only ``length`` frames, fewer than the indices asked for."""

    def __init__(self, length: int) -> None:
        super().__init__(f"stream ended after {length} frames")
        self.length = length


def _batched(items: Sequence[int], size: int = _CHUNK) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _hwc_to_tensor(frames: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(frames))).permute(0, 3, 1, 2)


def _pick_random_access(get_batch: Callable[[list[int]], torch.Tensor], length: int, indices: Sequence[int]) -> Iterator[torch.Tensor]:
    """Reader core for seeking decoders (decord, torchcodec): one batch call per chunk."""
    for chunk in _batched([i for i in indices if i < length]):
        yield get_batch(list(chunk))
    if indices[-1] >= length:
        raise _StreamEnded(length)


def _pick_sequential(frames: Iterator[Callable[[], np.ndarray]], indices: Sequence[int]) -> Iterator[torch.Tensor]:
    """Reader core for decoders read front to back (PyAV, OpenCV).

    ``frames`` yields one callable per decoded frame that returns its RGB pixels, so frames that are
    not wanted never pay for the colour conversion. Counting frames gives exact frame numbers, where
    seeking by timestamp would not on variable-frame-rate or edit-listed files.
    """
    wanted = iter(indices)
    target = next(wanted)
    chunk: list[np.ndarray] = []
    seen = 0
    for number, pixels in enumerate(frames):
        seen = number + 1
        if number != target:
            continue
        chunk.append(pixels())
        target = next(wanted, None)
        if len(chunk) == _CHUNK or target is None:
            yield _hwc_to_tensor(chunk)
            chunk = []
        if target is None:
            return  # stop decoding after the last wanted frame
    if chunk:
        yield _hwc_to_tensor(chunk)
    raise _StreamEnded(seen)


def _decord_probe(path: str) -> tuple[int, float, int, int]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0))
    count = len(reader)
    if count == 0:
        return 0, 0.0, 0, 0
    height, width = reader[0].shape[:2]  # decord exposes no frame size without decoding a frame
    return count, float(reader.get_avg_fps()), int(height), int(width)


def _decord_read(path: str, indices: Sequence[int]) -> Iterator[torch.Tensor]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0))

    def get_batch(chunk: list[int]) -> torch.Tensor:
        batch = reader.get_batch(chunk)
        # decord.bridge.set_bridge("torch") elsewhere in the process makes get_batch return tensors.
        return _hwc_to_tensor(batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy())

    return _pick_random_access(get_batch, len(reader), indices)


def _torchcodec_probe(path: str) -> tuple[int, float, int, int]:
    from torchcodec.decoders import VideoDecoder

    meta = VideoDecoder(path).metadata
    return int(meta.num_frames or 0), float(meta.average_fps or 0.0), int(meta.height), int(meta.width)


def _torchcodec_read(path: str, indices: Sequence[int]) -> Iterator[torch.Tensor]:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path)
    return _pick_random_access(lambda chunk: decoder.get_frames_at(indices=chunk).data, len(decoder), indices)


def _av_probe(path: str) -> tuple[int, float, int, int]:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        count = stream.frames
        if count == 0:  # Matroska/WebM headers carry no frame count: count packets (no decoding)
            count = sum(1 for packet in container.demux(stream) if packet.size > 0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return int(count), float(rate or 0.0), int(stream.codec_context.height), int(stream.codec_context.width)


def _av_read(path: str, indices: Sequence[int]) -> Iterator[torch.Tensor]:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = ((lambda frame=frame: frame.to_ndarray(format="rgb24")) for frame in container.decode(stream))
        yield from _pick_sequential(frames, indices)


def _cv2_probe(path: str) -> tuple[int, float, int, int]:
    import cv2

    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise ValueError("OpenCV cannot open the file")
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        height, width = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        if count <= 0:  # some containers report no count: count by grabbing
            count = 0
            while capture.grab():
                count += 1
        return count, fps, height, width
    finally:
        capture.release()


def _cv2_read(path: str, indices: Sequence[int]) -> Iterator[torch.Tensor]:
    import cv2

    capture = cv2.VideoCapture(path)

    def pixels() -> np.ndarray:
        ok, frame = capture.retrieve()
        if not ok:
            raise ValueError("OpenCV could not retrieve a grabbed frame")
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    try:
        # grab() decodes without the BGR conversion; retrieve() only for wanted frames.
        yield from _pick_sequential((pixels for _ in iter(capture.grab, False)), indices)
    finally:
        capture.release()


# Order of preference. decord first: it seeks to the wanted frames instead of decoding all of them.
_BACKENDS: dict[str, _Backend] = {
    "decord": _Backend("decord", "decord", _decord_probe, _decord_read),
    "torchcodec": _Backend("torchcodec", "torchcodec", _torchcodec_probe, _torchcodec_read),
    "av": _Backend("av", "av", _av_probe, _av_read),
    "cv2": _Backend("cv2", "opencv-python-headless", _cv2_probe, _cv2_read),
}
_ALIASES = {"pyav": "av", "opencv": "cv2"}  # the names transformers uses


@functools.cache
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - e.g. torchcodec raises RuntimeError when FFmpeg libraries are missing
        return False
    return True


def available_backends() -> list[str]:
    """Installed video backends, most preferred first."""
    return [name for name, backend in _BACKENDS.items() if _importable(backend.module)]


def _resolve_backend(requested: object, origin: str) -> str:
    installed = ", ".join(available_backends()) or "none"
    name = requested.strip().lower() if isinstance(requested, str) else ""
    name = _ALIASES.get(name, name)
    if name not in _BACKENDS:
        raise InvalidInputError(f"unknown video backend {requested!r}{origin}; choose one of: {installed}")
    if not _importable(_BACKENDS[name].module):
        raise InvalidInputError(
            f"video backend {name!r}{origin} is not installed (installed: {installed}); pip install {_BACKENDS[name].pip_name} or pick an installed one"
        )
    return name


def _backend_order(backend: str | None) -> list[str]:
    """Backends to try, in order: the forced one only, else every installed one."""
    if backend is not None:
        return [_resolve_backend(backend, "")]
    if os.environ.get(BACKEND_ENV):
        return [_resolve_backend(os.environ[BACKEND_ENV], f" (from {BACKEND_ENV})")]
    names = available_backends()
    if not names:
        raise MMSparseError("no video backend is installed; pip install av (or decord, torchcodec, opencv-python-headless)")
    return names


def _reason(err: Exception) -> str:
    """First line of a backend's error, shortened: decord's messages span many lines."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------- in-memory frames


def _as_path(source: object) -> str | None:
    """The file path of a path-like source (checked to exist), or None for in-memory frames."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    path = path.removeprefix("file://")  # qwen-vl-utils style local URLs
    if path.startswith(("http://", "https://")):
        raise InvalidInputError(f"video URLs are not supported: {path}; download the file and pass its path")
    if not os.path.exists(path):
        raise VideoNotFoundError(f"video file not found: {path}; check the path")
    if not os.path.isfile(path):
        raise VideoNotFoundError(f"video path is a directory, not a file: {path}; pass the path of a video file")
    return path


def _frame_to_hwc(frame: object, position: int) -> np.ndarray:
    """One list item (PIL image, HxW or HxWxC array/tensor) as an HxWxC array."""
    from PIL import Image

    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    if not isinstance(frame, np.ndarray):
        raise InvalidInputError(
            f"frame {position} of the list is a {type(frame).__name__}; pass PIL images or HxWxC arrays"
        )
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[-1] not in (1, 3, 4):
        raise InvalidInputError(
            f"frame {position} of the list has shape {tuple(frame.shape)}; pass HxWxC arrays with C = 1, 3 or 4"
        )
    return frame


def _stack_frames(frames: Sequence[object]) -> torch.Tensor:
    if len(frames) == 0:
        raise EmptyVideoError("the list of frames is empty; pass at least one frame")
    arrays = [_frame_to_hwc(frame, i) for i, frame in enumerate(frames)]
    sizes = sorted({f"{a.shape[1]}x{a.shape[0]}" for a in arrays})
    if len(sizes) > 1:
        raise InvalidInputError(f"the frames in the list differ in size ({', '.join(sizes[:4])}); resize them to one size first")
    return torch.from_numpy(np.stack(arrays))


def _to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """uint8 as is; floats in [0, 1] scaled to 0-255; other integers if they fit 0-255."""
    if frames.dtype == torch.uint8:
        return frames
    if frames.dtype == torch.bool or frames.is_complex():
        raise InvalidInputError(f"frames of dtype {frames.dtype} are not pixels; pass uint8 or float frames")
    if frames.is_floating_point():
        frames = frames.float()
        low, high = (frames.min().item(), frames.max().item())
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0.0 or high > 1.0:
            raise InvalidInputError(
                f"float frames must lie in [0, 1]; got values in [{low:g}, {high:g}]; scale them or pass uint8"
            )
        return (frames * 255.0).round_().to(torch.uint8)
    low, high = frames.min().item(), frames.max().item()
    if low < 0 or high > 255:
        raise InvalidInputError(f"integer frames must lie in 0-255; got values in [{low}, {high}]; pass uint8 frames")
    return frames.to(torch.uint8)


def _memory_frames(source: object) -> torch.Tensor:
    """In-memory frames as uint8 RGB [T, 3, H, W] (a view where possible)."""
    if isinstance(source, (list, tuple)):
        frames = _stack_frames(source)
    elif isinstance(source, torch.Tensor):
        frames = source.detach().cpu()
    elif isinstance(source, np.ndarray):
        try:
            frames = torch.from_numpy(np.ascontiguousarray(source))  # torch refuses negative strides
        except TypeError as err:
            raise InvalidInputError(f"frames of dtype {source.dtype} are not pixels; pass uint8 or float frames") from err
    else:
        raise InvalidInputError(
            f"cannot read a video from a {type(source).__name__}; pass a file path, a [T,H,W,C] array or tensor, or a list of frames"
        )
    if frames.ndim != 4:
        raise InvalidInputError(
            f"frames must form a 4-D array [T,H,W,C] or [T,C,H,W]; got shape {tuple(frames.shape)}"
        )
    if frames.shape[0] == 0:
        raise EmptyVideoError("the frame array holds no frames; pass at least one frame")
    # Channels-last wins when both readings fit: a 1, 3 or 4 pixel wide frame is unlikely.
    if frames.shape[-1] in (1, 3, 4):
        frames = frames.permute(0, 3, 1, 2)
    elif frames.shape[1] not in (1, 3, 4):
        raise InvalidInputError(
            f"frames of shape {tuple(frames.shape)} have no channel axis of size 1, 3 or 4; pass [T,H,W,C] or [T,C,H,W]"
        )
    if frames.shape[2] == 0 or frames.shape[3] == 0:
        raise InvalidInputError(f"frames of shape {tuple(frames.shape)} have no pixels; pass frames at least 1x1")
    frames = _to_uint8(frames)
    if frames.shape[1] == 1:
        return frames.expand(-1, 3, -1, -1)
    return frames[:, :3]  # drops alpha


def _memory_read(frames: torch.Tensor, indices: Sequence[int]) -> Iterator[torch.Tensor]:
    return _pick_random_access(lambda chunk: frames[chunk], len(frames), indices)


# --------------------------------------------------------------------------- public entry points


def _check_source_fps(source_fps: float | None) -> None:
    _check_number("source_fps", source_fps, integer=False, minimum=0.0, strict=True)


def probe_video(source: VideoSource, *, source_fps: float | None = None, backend: str | None = None) -> VideoInfo:
    """Frame count, fps and size of ``source``, without decoding its pixels.

    Files are probed with ``backend`` (or ``$MMSPARSE_VIDEO_BACKEND``), else with each installed
    backend in turn until one can read the file. ``source_fps`` overrides the rate a file reports;
    in-memory frames need no backend and are taken to be at ``source_fps`` or 2 fps.
    """
    _check_source_fps(source_fps)
    path = _as_path(source)
    if path is None:
        frames = _memory_frames(source)
        fps = MEMORY_FPS if source_fps is None else float(source_fps)
        return VideoInfo(int(frames.shape[0]), fps, int(frames.shape[2]), int(frames.shape[3]), MEMORY_BACKEND)
    names = _backend_order(backend)
    failures: list[str] = []
    for name in names:
        try:
            count, fps, height, width = _BACKENDS[name].probe(path)
        except Exception as err:  # noqa: BLE001 - backends raise anything (DECORDError, av.error.*, ...)
            failures.append(f"{name}: {_reason(err)}")
            continue
        if count <= 0:
            failures.append(f"{name}: no frames")
            continue
        fps = float(source_fps) if source_fps is not None else fps
        if not (math.isfinite(fps) and fps > 0):
            raise VideoDecodeError(f"cannot tell the frame rate of {path} ({name} reports {fps:g}); pass source_fps")
        return VideoInfo(int(count), fps, int(height), int(width), name)
    if all(failure.endswith(": no frames") for failure in failures):
        raise EmptyVideoError(f"video {path} holds no frames; check that the file is complete")
    raise VideoDecodeError(
        f"cannot decode {path} with {', '.join(names)} ({'; '.join(failures)}); check that it is a playable video"
        " or re-encode it: ffmpeg -i IN -c:v libx264 OUT.mp4"
    )


def _check_plan(plan: SamplingPlan) -> None:
    if not plan.indices:
        raise InvalidInputError("the sampling plan selects no frames; pass a plan with at least one index")
    if min(plan.indices) < 0 or max(plan.indices) >= plan.info.total_frames:
        raise InvalidInputError(
            f"the sampling plan asks for frames outside 0-{plan.info.total_frames - 1}; make the plan with plan_sampling() for this source"
        )
    if plan.height < 1 or plan.width < 1:
        raise InvalidInputError(f"the sampling plan resizes to {plan.width}x{plan.height}; pass a plan with a positive size")


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    # Float in, so bicubic overshoot is rounded and clamped once instead of wrapping around in uint8.
    resized = F.resize(frames.float(), [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def _short_read_slack(total_frames: int) -> int:
    """How many trailing frames a stream may lack before we call the file truncated."""
    return max(8, total_frames // 100)


def _collect(chunks: Iterator[torch.Tensor], plan: SamplingPlan, unique: Sequence[int], label: str) -> torch.Tensor:
    """Resize the chunks as they come into one [len(unique), 3, h, w] tensor."""
    out = torch.empty((len(unique), 3, plan.height, plan.width), dtype=torch.uint8)
    filled = 0
    try:
        for chunk in chunks:
            take = min(len(chunk), len(unique) - filled)
            out[filled : filled + take] = _resize(chunk[:take, :3], plan.height, plan.width)
            filled += take
    except _StreamEnded as end:
        _pad_short_stream(out, filled, end.length, plan, label)
    return out


def _pad_short_stream(out: torch.Tensor, filled: int, length: int, plan: SamplingPlan, label: str) -> None:
    """Container headers often announce a few frames more than the stream holds: repeat the last
    frame then. A stream that ends well before its announced length is a truncated file."""
    total = plan.info.total_frames
    if filled == 0 or length < total - _short_read_slack(total):
        raise VideoDecodeError(
            f"{plan.info.backend} found only {length} of the {total} frames that {label} announces;"
            " the file may be truncated or corrupt: re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)"
        )
    logger.warning("%s holds %d of the %d frames it announces; repeating its last frame", label, length, total)
    out[filled:] = out[filled - 1]


def decode(source: VideoSource, plan: SamplingPlan) -> Video:
    """Decode and resize the frames ``plan`` selects, with the backend that probed the source."""
    _check_plan(plan)
    path = _as_path(source)
    unique = sorted(set(plan.indices))
    if path is None:
        frames = _memory_frames(source)
        if unique[-1] >= frames.shape[0]:
            raise InvalidInputError(
                f"the sampling plan asks for frame {unique[-1]} of {frames.shape[0]} frames; make the plan with plan_sampling() for this source"
            )
        decoded = _collect(_memory_read(frames, unique), plan, unique, "the frames")
    else:
        name = plan.info.backend
        if name == MEMORY_BACKEND:
            raise InvalidInputError("this sampling plan was made for in-memory frames; probe the file with probe_video() first")
        name = _resolve_backend(name, " (from the sampling plan)")
        try:
            decoded = _collect(_BACKENDS[name].read(path, unique), plan, unique, path)
        except MMSparseError:
            raise
        except Exception as err:  # noqa: BLE001 - never let a raw backend exception escape
            others = ", ".join(b for b in available_backends() if b != name)
            hint = f" or try another backend ({others})" if others else ""
            raise VideoDecodeError(
                f"{name} failed to decode {path} ({_reason(err)}); the file may be truncated or corrupt:"
                f" re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4){hint}"
            ) from err
    if len(unique) != len(plan.indices):  # repeated indices (tiny clips): expand the decoded frames
        position = {index: i for i, index in enumerate(unique)}
        decoded = decoded[[position[i] for i in plan.indices]]
    return Video(frames=decoded, plan=plan)


def load_video(
    source: VideoSource,
    options: SamplingOptions | None = None,
    *,
    frame_factor: int = 2,
    size_factor: int | None = 28,
    source_fps: float | None = None,
    backend: str | None = None,
) -> Video:
    """Probe, plan and decode in one call."""
    info = probe_video(source, source_fps=source_fps, backend=backend)
    plan = plan_sampling(info, options or SamplingOptions(), frame_factor=frame_factor, size_factor=size_factor)
    return decode(source, plan)
