"""Configuration of the three stages, and the named presets.

A ``SparseConfig`` holds one optional dataclass per stage; ``None`` means the stage is off.
``resolve_sparse`` turns what users pass as ``sparse=`` (bool, preset name or config) into a
``SparseConfig`` and refuses stages this version does not implement, so a request for sparsity
is never silently served dense.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from .errors import ConfigError, StageNotBuiltError

MergeMode = Literal["average", "pivotal", "weighted"]


def _check_fraction(owner: object, name: str, low_open: bool = True) -> None:
    value = getattr(owner, name)
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        bound = "(0, 1]" if low_open else "[0, 1]"
        raise ConfigError(f"{type(owner).__name__}.{name}={value!r} is out of range; use a value in {bound}")


@dataclass(frozen=True)
class EncodeConfig:
    """Token reduction after the vision encoder (MustDrop-style)."""

    merge_threshold: float = 0.8  # mean pairwise cosine in a 3x3 window that collapses it
    key_token_ratio: float = 0.08  # share of most salient tokens never merged or dropped

    def __post_init__(self) -> None:
        _check_fraction(self, "merge_threshold")
        _check_fraction(self, "key_token_ratio", low_open=False)


@dataclass(frozen=True)
class PrefillConfig:
    """Per-head sparse attention during prefill (MMInference-style)."""

    gamma: float = 0.95  # estimated attention mass each head must keep
    min_length: int = 8192  # prompts shorter than this run dense
    dense_layers: int = 0  # the first N layers always run dense
    block_size: int = 128  # query and key block of the sparse index
    max_density: float = 0.6  # a head that needs more than this share of the blocks runs dense
    # Also accept a pattern whose estimated relative output error on the sampled rows is at most
    # this (None: attention mass alone decides). Flat heads over redundant video keep little mass
    # in any small pattern yet lose almost nothing in their output.
    max_error: float | None = None
    plan: str | None = None  # per-head labels from `mmsparse search` (JSON path); None: choose from each input
    # The text model's MLPs and norms run this many tokens at a time (a 512K prompt's MLP
    # intermediate is 20 GB per tensor), through fused kernels on CUDA; None leaves them as they are.
    pointwise_chunk: int | None = 32768
    # torch.compile the text model's attention modules (their RoPE becomes one fused pass: 128K
    # tokens, H200, 0.28 s -> 16 ms per prefill). Costs seconds of compiling on the first prompt.
    compile_attention: bool = False

    def __post_init__(self) -> None:
        _check_fraction(self, "gamma")
        _check_fraction(self, "max_density")
        if self.max_error is not None and not 0.0 < self.max_error < 1.0:
            raise ConfigError(f"PrefillConfig.max_error={self.max_error!r} is out of range; use None or a value in (0, 1)")
        if self.block_size not in (16, 32, 64, 128):
            raise ConfigError(f"PrefillConfig.block_size={self.block_size} is not supported; use 16, 32, 64 or 128")
        for name in ("min_length", "dense_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"PrefillConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.pointwise_chunk is not None and self.pointwise_chunk < 1:
            raise ConfigError(f"PrefillConfig.pointwise_chunk must be >= 1 or None, got {self.pointwise_chunk}")


@dataclass(frozen=True)
class DecodeConfig:
    """KV cache compression during decoding (LOOK-M eviction, ZipVL quantization)."""

    heavy_ratio: float = 0.1  # vision KV kept by accumulated attention
    recent_ratio: float = 0.1  # vision KV kept as the most recent window
    merge: MergeMode = "pivotal"  # how evicted entries fold into kept ones
    quantize: bool = False  # mixed-precision KV (important tokens high-bit)

    def __post_init__(self) -> None:
        _check_fraction(self, "heavy_ratio", low_open=False)
        _check_fraction(self, "recent_ratio", low_open=False)
        if self.merge not in ("average", "pivotal", "weighted"):
            raise ConfigError(f"DecodeConfig.merge={self.merge!r} is unknown; use 'average', 'pivotal' or 'weighted'")


@dataclass(frozen=True)
class SparseConfig:
    """Which stages run, and how. All ``None`` is the dense (stock) model."""

    encode: EncodeConfig | None = None
    prefill: PrefillConfig | None = None
    decode: DecodeConfig | None = None

    @property
    def stages(self) -> tuple[str, ...]:
        """Names of the stages switched on, in pipeline order."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is not None)

    @property
    def is_dense(self) -> bool:
        return not self.stages


PRESETS: dict[str, SparseConfig] = {
    "dense": SparseConfig(),
    # A head goes sparse when its pattern keeps 95% of the sampled rows' attention mass or changes
    # their attention output by at most 20% (flat heads over redundant video frames). On the toy
    # model's VisionNIAH this kept dense accuracy at 8K and 16K video tokens (eval/results).
    "balanced": SparseConfig(prefill=PrefillConfig(gamma=0.95, max_error=0.2)),
    "fast": SparseConfig(encode=EncodeConfig(), prefill=PrefillConfig(gamma=0.9, max_error=0.3), decode=DecodeConfig()),
}
DEFAULT_SPARSE_PRESET = "balanced"

# Stages this version implements. A stage is added here in the same change that builds it.
BUILT_STAGES: frozenset[str] = frozenset({"prefill"})

_STAGE_WHAT = {
    "encode": "token reduction after the vision encoder",
    "prefill": "sparse prefill attention",
    "decode": "KV cache compression",
}


def resolve_sparse(sparse: bool | str | SparseConfig | None) -> SparseConfig:
    """Turn a ``sparse=`` argument into a SparseConfig, refusing stages that are not built."""
    if sparse is None or sparse is False:
        config = PRESETS["dense"]
    elif sparse is True:
        config = PRESETS[DEFAULT_SPARSE_PRESET]
    elif isinstance(sparse, str):
        try:
            config = PRESETS[sparse]
        except KeyError:
            raise ConfigError(f"unknown sparse preset {sparse!r}; use one of {', '.join(PRESETS)}") from None
    elif isinstance(sparse, SparseConfig):
        config = sparse
    else:
        raise ConfigError(f"sparse= takes a bool, a preset name or a SparseConfig, not {type(sparse).__name__}")
    missing = [stage for stage in config.stages if stage not in BUILT_STAGES]
    if missing:
        stage = missing[0]
        raise StageNotBuiltError(
            f"the {stage} stage ({_STAGE_WHAT[stage]}) is not built in this version of mmsparse; "
            f"run with sparse=False (CLI: --sparse dense) or switch the {stage} stage off"
        )
    return config
