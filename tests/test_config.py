from __future__ import annotations

import pytest

from mmsparse.config import PRESETS, DecodeConfig, EncodeConfig, PrefillConfig, SparseConfig, resolve_sparse
from mmsparse.errors import ConfigError, StageNotBuiltError


def test_dense_resolves():
    assert resolve_sparse(False).is_dense
    assert resolve_sparse(None).is_dense
    assert resolve_sparse("dense") == SparseConfig()


@pytest.mark.parametrize("sparse", ["fast", SparseConfig(decode=DecodeConfig())])
def test_unbuilt_stage_is_refused_by_name(sparse):
    with pytest.raises(StageNotBuiltError) as err:
        resolve_sparse(sparse)
    msg = str(err.value)
    assert "stage" in msg and "sparse=False" in msg and "\n" not in msg
    assert any(stage in msg for stage in ("encode", "prefill", "decode"))


def test_built_prefill_stage_resolves():
    assert resolve_sparse(True).stages == ("prefill",)
    assert resolve_sparse("balanced") == PRESETS["balanced"]


def test_presets_name_their_stages():
    assert PRESETS["balanced"].stages == ("prefill",)
    assert PRESETS["fast"].stages == ("encode", "prefill", "decode")


@pytest.mark.parametrize(
    "make",
    [
        lambda: PrefillConfig(gamma=0.0),
        lambda: PrefillConfig(gamma=1.5),
        lambda: PrefillConfig(min_length=-1),
        lambda: PrefillConfig(pointwise_chunk=0),
        lambda: EncodeConfig(merge_threshold=2.0),
        lambda: DecodeConfig(merge="median"),
        lambda: resolve_sparse("turbo"),
        lambda: resolve_sparse(3),
    ],
)
def test_bad_config_is_a_config_error(make):
    with pytest.raises(ConfigError):
        make()
