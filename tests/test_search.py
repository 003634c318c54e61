"""Offline pattern search (`mmsparse search`) and the stage using its plan."""

from __future__ import annotations

import json

import pytest

import mmsparse
from mmsparse.cli import main
from mmsparse.config import PrefillConfig, SparseConfig
from mmsparse.errors import InvalidInputError
from mmsparse.media import sample_video
from mmsparse.prefill.search import choose, load_plan
from mmsparse.testing import synthetic_frames

TINY = ["--model", "mmsparse/tiny-qwen2.5-vl", "--device", "cpu"]


def test_choose_takes_the_cheapest_candidate_that_meets_the_rule():
    table = {
        "a_shape:512": {"recall": [0.99, 0.5], "error": [0.01, 0.5], "cost": [0.1, 0.1]},
        "block:0.95": {"recall": [0.99, 0.96], "error": [0.0, 0.0], "cost": [0.5, 0.5]},
        "grid:2F": {"recall": [0.2, 0.2], "error": [0.9, 0.9], "cost": [0.05, 0.05]},
    }
    cfg = PrefillConfig(gamma=0.95, max_error=None, max_density=0.6)
    assert choose(table, 2, cfg) == ["a_shape:512", "block:0.95"]
    assert choose(table, 2, PrefillConfig(gamma=0.95, max_density=0.3)) == ["a_shape:512", "dense"]
    assert choose(table, 2, PrefillConfig(gamma=0.999, max_error=0.95, max_density=0.6)) == ["grid:2F", "grid:2F"]


def test_choose_weighs_pairs_by_the_time_its_kernel_takes_per_pair():
    """A vertical-slash pair costs PAIR_TIME times a block-sparse one: fewer pairs is not less time."""
    from mmsparse.prefill.selection import pair_time

    w = pair_time("vertical_slash")
    assert w > 1 and pair_time("a_shape") == 1.0
    table = {
        "vertical_slash:250/512": {"recall": [0.97, 0.97], "error": [0.1, 0.1], "cost": [0.10, 0.10]},
        "a_shape:1024": {"recall": [0.96, 0.96], "error": [0.1, 0.1], "cost": [0.10 * w * 0.9, 0.10 * w * 1.1]},
    }
    assert choose(table, 2, PrefillConfig(gamma=0.95)) == ["a_shape:1024", "vertical_slash:250/512"]


def test_cli_search_writes_a_plan_the_pipeline_uses(tmp_path):
    out = tmp_path / "plan.json"
    code = main(["search", "--videos", str(sample_video("bikes")), "--nframes", "8", "--sample-queries", "16",
                 "--preset", "balanced", "--out", str(out), *TINY])
    assert code == 0
    plan = json.loads(out.read_text())
    assert sorted(plan["layers"]) == ["0", "1"] and all(len(labels) == 4 for labels in plan["layers"].values())
    assert "a_shape:512" in plan["candidates"]["0"]
    assert plan["rule"]["gamma"] == 0.95 and plan["prompt_tokens"][0] > 0
    layers = load_plan(out)
    assert layers == {int(k): tuple(v) for k, v in plan["layers"].items()}

    # A fixed plan file drives the stage: each head runs the label it names.
    forced = {"layers": {"0": ["a_shape:512"] * 4, "1": ["dense"] * 4}}
    path = tmp_path / "forced.json"
    path.write_text(json.dumps(forced))
    pipe = mmsparse.pipeline(model="mmsparse/tiny-qwen2.5-vl", device="cpu",
                             sparse=SparseConfig(prefill=PrefillConfig(min_length=0, block_size=16, plan=str(path))))
    stats = pipe(synthetic_frames(8, 56, 56), "What is it?", max_new_tokens=1)["stats"]["prefill"]
    assert stats["label_counts"] == {"a_shape:512": 4, "dense": 4}


def test_bad_plan_and_preset_are_one_line_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="not found"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="not a search result"):
        load_plan(tmp_path / "bad.json")
    assert main(["search", "--videos", str(sample_video("bikes")), "--preset", "dense", *TINY]) == 2
