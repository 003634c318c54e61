"""VisionNIAH: grid mechanics, scoring, outputs, needle insertion and bad input (tiny random model:
accuracy is ~0, so these test the machinery, not the score)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmsparse.cli import main
from mmsparse.config import SparseConfig
from mmsparse.errors import ConfigError, InvalidInputError, StageNotBuiltError, VideoDecodeError, VideoNotFoundError
from mmsparse.eval.haystack import TEMPORAL_GROUP, Haystack, insert_needle
from mmsparse.eval.needles import Needle, builtin_needles, normalize_answer
from mmsparse.eval.vniah import (
    Cell,
    GridSpec,
    answer_loglik,
    append_answer,
    build_cell_input,
    cell_seed,
    model_slug,
    run_vniah,
)
from mmsparse.media import sample_video

SIZE = 112
GRID = {"frames": [4, 8], "depths": [0.0, 1.0], "needles_per_cell": 1, "size": SIZE}
TINY = ["--model", "mmsparse/tiny-qwen2.5-vl", "--device", "cpu"]


@pytest.fixture(scope="module")
def adapter(tiny_qwen):
    from mmsparse.loading import load

    model, processor = tiny_qwen
    return load(model, processor, device="cpu")


@pytest.fixture(scope="module")
def haystack():
    return Haystack(SIZE, sources=[sample_video("carphone_pristine")])  # the shortest clip: fast to decode


@pytest.fixture(scope="module")
def two_configs(adapter, haystack, tmp_path_factory):
    """One run, two configurations under different names (both dense: the only built stage set)."""
    out = tmp_path_factory.mktemp("vniah")
    summary = run_vniah(
        adapter, **GRID, configs={"dense": "dense", "dense-copy": SparseConfig()}, haystack=haystack,
        seed=3, out_dir=out, progress=False,
    )
    return summary, out


def _result(summary, out, config):
    return json.loads((out / f"vniah-{summary['model_slug']}-{config}.json").read_text())


# --------------------------------------------------------------------------- needle insertion


@pytest.mark.parametrize("depth,start", [(0.0, 0), (1.0, 8), (0.5, 4), (0.25, 2)])
def test_needle_fills_one_temporal_group_at_its_depth(depth, start):
    frames = torch.zeros(10, 6, 6, 3, dtype=torch.uint8)
    picture = np.full((6, 6, 3), 200, dtype=np.uint8)  # numpy, as Needle.picture returns
    out, where = insert_needle(frames, picture, depth)
    assert (where.start, where.stop) == (start, start + TEMPORAL_GROUP)
    hit = (out == 200).flatten(1).all(1)
    assert hit.tolist() == [start <= i < start + TEMPORAL_GROUP for i in range(10)]
    assert frames.eq(0).all()  # the input is left untouched


def test_needle_picture_size_must_match_frames():
    with pytest.raises(InvalidInputError, match="does not fit"):
        insert_needle(torch.zeros(4, 6, 6, 3, dtype=torch.uint8), np.zeros((5, 5, 3), np.uint8), 0.5)


# --------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    "text,expected", [("The Red.", "red"), ("  a  STAR! ", "star"), ("an apple, please", "apple please"), ("", "")]
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_accepts_answer_and_aliases_only():
    digit = next(n for n in builtin_needles() if n.name.startswith("digit-3-"))
    assert digit.accepts("3") and digit.accepts("Three.") and digit.accepts(" the three")
    assert not digit.accepts("33") and not digit.accepts("3 4")


# --------------------------------------------------------------------------- grid and inputs


def test_cell_inputs_are_reproducible_from_the_seed(haystack):
    needles = builtin_needles()
    cell = Cell(8, 0.5, 0, cell_seed(0, 8, 0.5, 0))
    a, b = build_cell_input(cell, haystack, needles, None), build_cell_input(cell, haystack, needles, None)
    assert a.needle == b.needle and torch.equal(a.video, b.video) and a.needle_frames == b.needle_frames
    assert a.video.shape == (8, SIZE, SIZE, 3) and a.video.dtype == torch.uint8
    other = build_cell_input(Cell(8, 0.5, 0, cell_seed(1, 8, 0.5, 0)), haystack, needles, None)
    assert not torch.equal(a.video, other.video)
    cells = GridSpec.build([4, 8], [0, 1], 2, SIZE, 0).cells()
    assert len(cells) == 8 and len({c.seed for c in cells}) == 8


def test_model_slug():
    assert model_slug("mmsparse/toy-qwen2.5-vl") == "toy-qwen2.5-vl"
    assert model_slug("/models/Qwen2.5-VL-7B-Instruct/") == "Qwen2.5-VL-7B-Instruct"
    assert model_slug("odd name:v1") == "odd-name-v1"


# --------------------------------------------------------------------------- scoring


def test_teacher_forced_loglik_matches_generate_scores(adapter, haystack):
    """Appended answer tokens get the positions generate gives them: same log-probs."""
    from mmsparse.pipelines import VideoQAPipeline
    from mmsparse.video import SamplingOptions

    pipe = VideoQAPipeline(adapter.model, adapter.processor, adapter=adapter, device=adapter.model.device)
    inp = build_cell_input(Cell(8, 0.5, 0, 7), haystack, builtin_needles(), None)
    video = pipe.load_video(inp.video, SamplingOptions(nframes=8, min_pixels=SIZE**2, max_pixels=SIZE**2),
                            [inp.needle.question], source_fps=2.0)
    inputs, _ = adapter.prepare(video, inp.needle.question)
    gen = adapter.model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ids = gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()  # raw logits of each decode step, below
    expected = sum(s[0].float().log_softmax(-1)[t].item() for s, t in zip(gen.logits, ids))
    total, mean = answer_loglik(pipe, video, inp.needle.question, ids)
    assert total == pytest.approx(expected, abs=1e-4) and mean == pytest.approx(total / len(ids))
    grown = append_answer(inputs, ids)
    assert grown["mm_token_type_ids"][0, -len(ids):].eq(0).all() and grown["attention_mask"][0, -len(ids):].eq(1).all()


# --------------------------------------------------------------------------- outputs


def test_json_schema_and_aggregates(two_configs):
    summary, out = two_configs
    res = _result(summary, out, "dense")
    assert {"model", "config", "environment", "grid", "seed", "records", "aggregate"} <= res.keys()
    assert {"device", "device_name", "torch", "transformers"} <= res["environment"].keys()
    assert res["grid"]["frames"] == [4, 8] and res["grid"]["depths"] == [0.0, 1.0] and res["seed"] == 3
    recs = res["records"]
    assert len(recs) == 4
    keys = {"frames", "video_tokens", "depth", "needle", "question", "reference", "generated", "correct",
            "loglik_sum", "loglik_mean", "ttft_s", "peak_memory_gb"}
    assert all(keys <= r.keys() for r in recs)
    agg = res["aggregate"]
    assert agg["accuracy"] == pytest.approx(np.mean([r["correct"] for r in recs]))
    for row in agg["by_depth"]:
        assert row["accuracy"] == pytest.approx(np.mean([r["correct"] for r in recs if r["depth"] == row["depth"]]))
    for col in agg["by_length"]:
        sel = [r for r in recs if r["frames"] == col["frames"]]
        assert col["accuracy"] == pytest.approx(np.mean([r["correct"] for r in sel]))
        assert col["video_tokens"] == sel[0]["video_tokens"] == col["frames"] // 2 * (SIZE // 28) ** 2
    assert np.array(agg["grid_accuracy"]).shape == (2, 2)
    assert agg["mean_ttft_s"] == pytest.approx(np.mean([r["ttft_s"] for r in recs]))
    assert agg["max_peak_memory_gb"] == max(r["peak_memory_gb"] for r in recs) > 0
    for r in recs:
        assert r["correct"] == Needle(r["needle"], r["question"], r["reference"], {"kind": "shape"},
                                      aliases=tuple(r["aliases"])).accepts(r["generated"])
        assert math.isfinite(r["loglik_sum"]) and r["loglik_sum"] <= 0 and r["loglik_mean"] <= 0
        assert r["loglik_mean"] * r["answer_tokens"] == pytest.approx(r["loglik_sum"], rel=1e-5)
        assert r["needle_frames"][1] - r["needle_frames"][0] == TEMPORAL_GROUP
        assert r["needle_frames"][0] == (0 if r["depth"] == 0 else r["frames"] - TEMPORAL_GROUP)


def test_heatmaps_and_summary_written(two_configs):
    summary, out = two_configs
    for config in ("dense", "dense-copy"):
        png = out / f"vniah-{summary['model_slug']}-{config}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    on_disk = json.loads((out / f"vniah-{summary['model_slug']}-summary.json").read_text())
    assert [c["config"] for c in on_disk["configs"]] == ["dense", "dense-copy"]
    assert on_disk["configs"] == summary["configs"]
    assert {"accuracy", "mean_ttft_s", "max_peak_memory_gb"} <= on_disk["configs"][0].keys()


def test_configs_see_identical_inputs(two_configs):
    summary, out = two_configs
    a, b = (_result(summary, out, c)["records"] for c in ("dense", "dense-copy"))
    same = ("frames", "depth", "cell_seed", "needle", "question", "reference", "prompt_tokens", "video_tokens", "needle_frames")
    assert [[r[k] for k in same] for r in a] == [[r[k] for k in same] for r in b]
    # Both are dense: same inputs must give the same answers and likelihoods.
    assert [r["generated"] for r in a] == [r["generated"] for r in b]
    assert [r["loglik_sum"] for r in a] == pytest.approx([r["loglik_sum"] for r in b])
    assert summary["configs"][1]["agreement_with_dense"] == 1.0


def test_user_needle_set_with_own_image(adapter, haystack, tmp_path):
    from PIL import Image

    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)
    Image.fromarray(pixels).save(tmp_path / "half.png")
    (tmp_path / "set.json").write_text(json.dumps({"needles": [
        {"name": "half-red", "image": "half.png", "question": "What colour is the card?", "answer": "red", "aliases": ["Red card"]},
    ]}))
    summary = run_vniah(adapter, frames=[4], depths=[0.5], needles_per_cell=1, needles=tmp_path / "set.json", haystack=haystack,
                        out_dir=tmp_path / "out", progress=False)
    recs = _result(summary, tmp_path / "out", "dense")["records"]
    assert [r["needle"] for r in recs] == ["half-red"] and recs[0]["aliases"] == ["Red card"]
    from mmsparse.eval.needles import load_needles

    needles, root = load_needles(tmp_path / "set.json")
    inp = build_cell_input(Cell(4, 0.5, 0, recs[0]["cell_seed"]), haystack, needles, root)
    shown = inp.video[inp.needle_frames]
    assert shown[:, :, :50, 0].float().mean() > 240 and shown[:, :, 60:].float().mean() < 15  # the user's picture


# --------------------------------------------------------------------------- bad input

BOGUS = "/no/such/model"  # any of these checks must fail before a model is loaded


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"configs": ["turbo"]}, ConfigError, "unknown config"),
        ({"configs": ["dense", "fast"]}, StageNotBuiltError, "encode stage"),
        ({"depths": [0.5, 1.5]}, InvalidInputError, r"outside \[0, 1\]"),
        ({"depths": [-0.1]}, InvalidInputError, r"outside \[0, 1\]"),
        ({"frames": [1]}, InvalidInputError, "even whole numbers"),
        ({"frames": [8, 3]}, InvalidInputError, "even whole numbers"),
        ({"needles": "/no/such/needles.json"}, InvalidInputError, "not found"),
        ({"haystack": ["/no/such/video.mp4"]}, VideoNotFoundError, "not found"),
        ({"haystack": "{corrupt}"}, VideoDecodeError, "decode"),
    ],
)
def test_bad_input_raises_before_work(kwargs, error, match, tmp_path):
    corrupt = tmp_path / "broken.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    if kwargs.get("haystack") == "{corrupt}":
        kwargs = {**kwargs, "haystack": [corrupt]}
    with pytest.raises(error, match=match) as info:
        run_vniah(BOGUS, **{**GRID, **kwargs}, out_dir=tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_grid_too_long_for_the_context(adapter, haystack, tmp_path):
    from mmsparse.errors import ContextLengthError

    with pytest.raises(ContextLengthError, match="fewer frames"):
        run_vniah(adapter, frames=[1100], depths=[0], haystack=haystack, out_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------- CLI


def test_cli_runs_and_prints_the_table_last(tmp_path, capsys):
    clip = str(sample_video("carphone_pristine"))
    code = main(["vniah", *TINY, "--frames", "4", "--depths", "0", "1", "--haystack", clip, "--out-dir", str(tmp_path), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    # Every built preset runs by default: dense, then balanced (the sparse prefill).
    assert lines[-4].startswith("config") and "accuracy" in lines[-4] and "TTFT" in lines[-4]
    assert lines[-2].startswith("dense ") and lines[-1].startswith("balanced ")
    assert (tmp_path / "vniah-tiny-qwen2.5-vl-balanced.json").is_file()
    assert (tmp_path / "vniah-tiny-qwen2.5-vl-dense.json").is_file()
    assert (tmp_path / "vniah-tiny-qwen2.5-vl-dense.png").is_file()
    assert (tmp_path / "vniah-tiny-qwen2.5-vl-summary.json").is_file()


@pytest.mark.parametrize(
    "argv,code,needle",
    [
        (["--configs", "turbo"], 2, "unknown config"),
        (["--configs", "fast"], 3, "stage"),
        (["--depths", "0", "1.5"], 2, "outside [0, 1]"),
        (["--frames", "0"], 2, "even whole numbers"),
        (["--frames", "7"], 2, "even whole numbers"),
        (["--needle-set", "/no/such/set.json"], 2, "not found"),
        (["--haystack", "/no/such/video.mp4"], 2, "not found"),
        (["--haystack", "{corrupt}"], 2, "decode"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(argv, code, needle, tmp_path, capsys):
    corrupt = tmp_path / "broken.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    argv = ["vniah", *[a.format(corrupt=corrupt) for a in argv], "--model", BOGUS, "--out-dir", str(tmp_path / "out")]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cli_exit_code_in_a_fresh_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mmsparse.cli", "vniah", "--depths", "2", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: depth 2.0 is outside [0, 1]")
    assert "Traceback" not in proc.stderr


def test_cli_help_states_the_library_defaults(capsys):
    from mmsparse.eval import vniah

    with pytest.raises(SystemExit):
        main(["vniah", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert f"(default: {' '.join(map(str, vniah.DEFAULT_FRAMES))})" in text
    assert f"(default: {' '.join(f'{d:g}' for d in vniah.DEFAULT_DEPTHS)})" in text
    assert f"cell (default: {vniah.DEFAULT_NEEDLES_PER_CELL})" in text
    assert f"(default: {vniah.DEFAULT_SIZE})" in text
