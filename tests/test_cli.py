"""The mmsparse command: answers on a real clip, one-line errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmsparse.cli import main
from mmsparse.media import sample_video

TINY = ["--model", "mmsparse/tiny-qwen2.5-vl", "--device", "cpu"]


def test_console_script_answers_about_a_real_clip():
    """The installed entry point, in a fresh process, on a real clip (Big Buck Bunny)."""
    proc = subprocess.run(
        ["mmsparse", "qa", str(sample_video("bigbuckbunny")), "What happens in the video?", "--json",
         "--max-new-tokens", "4", "--fps", "2", *TINY],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["question"] == "What happens in the video?"
    assert out["stats"]["video_tokens"] > 0 and out["stats"]["new_tokens"] >= 1
    assert "Traceback" not in proc.stderr


def test_text_output_and_default_model_warning(capsys):
    code = main(["qa", str(sample_video("bikes")), "Describe it.", "--nframes", "4", "--max-new-tokens", "2", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.splitlines()[1].startswith("stats: prompt_tokens=")
    assert "toy model" in captured.err and "not a general VLM" in captured.err  # labelled for what it is


@pytest.mark.parametrize(
    "argv,code,needle",
    [
        (["qa", "/no/such/video.mp4", "What?"], 2, "not found"),
        (["qa", "{clip}", "   "], 2, "question is empty"),
        (["qa", "{clip}", "What?", "--fps", "2", "--nframes", "8"], 2, "nframes"),
        (["qa", "{clip}", "What?", "--start", "3", "--end", "1"], 2, "--end"),
        (["qa", "{clip}", "What?", "--sparse", "fast"], 3, "encode stage"),
        (["qa", "{clip}", "What?", "--sparse", "turbo"], 2, "unknown sparse preset"),
        (["qa", "{corrupt}", "What?"], 2, "decode"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(argv, code, needle, capsys, tmp_path):
    corrupt = tmp_path / "broken.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    argv = [a.format(clip=sample_video("bikes"), corrupt=corrupt) for a in argv] + TINY
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]
    assert not any("Traceback" in line for line in err)


def test_python_module_entry_point_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "mmsparse.cli", "qa", "/no/such.mp4", "What?", *TINY],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: video file not found")
    assert "Traceback" not in proc.stderr
