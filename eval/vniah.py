"""VisionNIAH (V-NIAH, after LongVA): find a needle picture in a long haystack video.

    mmsparse vniah [--model M] [--frames 64 128 ...] [--depths 0 0.5 1] [--configs dense ...]

A grid of total frames x needle depths x ``needles_per_cell`` cells. Each cell is rebuilt from
its own seed: haystack frames of real clips (``Haystack.frames(n, seed)``), a needle drawn from
the needle set, its picture rendered with ``random.Random(seed)`` and inserted at the depth so
that it fills one temporal group. The haystack reaches the pipeline as an in-memory video read
at 2 fps with exactly ``n`` frames of ``size x size`` pixels, so nothing is resampled or resized
and every configuration sees the same inputs. All configurations run in one process on one
loaded model, cell by cell (so drift of the machine hits them alike).

Per cell and configuration: the greedy answer (exact match after normalisation), the
teacher-forced log-likelihood of the reference answer, TTFT and peak memory. Writes, under
``out_dir`` (default ``eval/results/``), ``vniah-<model>-<config>.json`` and ``.png`` (a depth x
length heatmap of accuracy) per configuration and ``vniah-<model>-summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import platform
import random
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmsparse.config import BUILT_STAGES, PRESETS, SparseConfig, resolve_sparse
from mmsparse.errors import ConfigError, ContextLengthError, InvalidInputError
from mmsparse.layout import TokenLayout
from mmsparse.eval.haystack import TEMPORAL_GROUP, Haystack, insert_needle
from mmsparse.eval.needles import Needle, load_needles

if TYPE_CHECKING:
    from mmsparse.models import ModelAdapter
    from mmsparse.pipelines import VideoQAPipeline

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_FRAMES: tuple[int, ...] = (64, 128, 256, 512, 1024)  # 512 to 8192 video tokens for the toy model; minutes on a 2-core CPU
DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_NEEDLES_PER_CELL = 2
DEFAULT_SIZE = 112
SOURCE_FPS = 2.0  # the haystack is read as a 2 fps video: one sampled frame per array frame
END_OF_TURN = "<|im_end|>"


# --------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Cell:
    """One grid point and sample: everything needed to rebuild its input."""

    frames: int
    depth: float
    sample: int  # 0 .. needles_per_cell-1
    seed: int


@dataclass(frozen=True)
class GridSpec:
    """Total frames x depths x needles per cell, the frame size and the master seed."""

    frames: tuple[int, ...]
    depths: tuple[float, ...]
    needles_per_cell: int
    size: int
    seed: int

    @classmethod
    def build(cls, frames: Sequence[int], depths: Sequence[float], needles_per_cell: int, size: int, seed: int) -> GridSpec:
        """Validated and normalised (ints, floats); refuses a grid that cannot be built, before any work."""
        frames = [frames] if _is_int(frames) else list(frames)
        depths = [depths] if isinstance(depths, numbers.Real) else list(depths)
        if not frames or not depths:
            raise InvalidInputError("the grid needs at least one frame count and one depth")
        for n in frames:
            if not _is_int(n) or n < TEMPORAL_GROUP or n % TEMPORAL_GROUP:
                raise InvalidInputError(
                    f"frames {n!r} is not allowed; use even whole numbers >= {TEMPORAL_GROUP} "
                    f"(the needle fills one group of {TEMPORAL_GROUP} frames)"
                )
        for d in depths:
            if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0.0 <= d <= 1.0:
                raise InvalidInputError(f"depth {d!r} is outside [0, 1]; use 0 (first frames) to 1 (last frames)")
        if len(set(frames)) != len(frames) or len(set(map(float, depths))) != len(depths):
            raise InvalidInputError("frames and depths must not repeat; pass each value once")
        if not _is_int(needles_per_cell) or needles_per_cell < 1:
            raise InvalidInputError(f"needles_per_cell must be a whole number >= 1, got {needles_per_cell!r}")
        if not _is_int(size) or size < 28:
            raise InvalidInputError(f"size must be a whole number of pixels >= 28, got {size!r}")
        if not _is_int(seed):
            raise InvalidInputError(f"seed must be a whole number, got {seed!r}")
        return cls(tuple(map(int, frames)), tuple(map(float, depths)), int(needles_per_cell), int(size), int(seed))

    def cells(self) -> list[Cell]:
        return [
            Cell(n, d, k, cell_seed(self.seed, n, d, k))
            for n in self.frames
            for d in self.depths
            for k in range(self.needles_per_cell)
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": list(self.frames),
            "depths": list(self.depths),
            "needles_per_cell": self.needles_per_cell,
            "size": self.size,
            "seed": self.seed,
            "source_fps": SOURCE_FPS,
        }


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def cell_seed(seed: int, frames: int, depth: float, sample: int) -> int:
    """A stable 31-bit seed per cell (a hash, so neighbouring cells are unrelated)."""
    digest = hashlib.sha256(f"vniah:{seed}:{frames}:{float(depth)!r}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


@dataclass(frozen=True)
class CellInput:
    """What every configuration is shown for one cell."""

    cell: Cell
    needle: Needle
    video: torch.Tensor  # uint8 [frames, size, size, 3]
    needle_frames: slice


def build_cell_input(cell: Cell, haystack: Haystack, needles: Sequence[Needle], root: Path | None) -> CellInput:
    """Haystack, needle and picture all follow from ``cell.seed``."""
    frames = haystack.frames(cell.frames, seed=cell.seed)
    needle = needles[random.Random(cell.seed).randrange(len(needles))]
    picture = needle.picture(haystack.size, random.Random(cell.seed), root=root)
    video, where = insert_needle(frames, picture, cell.depth)
    return CellInput(cell, needle, video, where)


# --------------------------------------------------------------------------- configs and model


def default_configs() -> list[str]:
    """Presets whose stages are all built (just "dense" until a stage lands)."""
    return [name for name, cfg in PRESETS.items() if set(cfg.stages) <= BUILT_STAGES]


def resolve_configs(configs: Sequence[str] | Mapping[str, str | SparseConfig] | None) -> dict[str, SparseConfig]:
    """Name -> SparseConfig; unknown presets raise ConfigError, unbuilt stages StageNotBuiltError."""
    if configs is None:
        configs = default_configs()
    if isinstance(configs, str):
        configs = [configs]
    items = configs.items() if isinstance(configs, Mapping) else [(name, name) for name in configs]
    resolved: dict[str, SparseConfig] = {}
    for name, cfg in items:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ConfigError(f"config name {name!r} must be a plain name (letters, digits, . _ -): it names output files")
        if isinstance(cfg, str) and cfg not in PRESETS:
            raise ConfigError(f"unknown config {cfg!r}; use one of {', '.join(PRESETS)}")
        resolved[name] = resolve_sparse(cfg)
    if not resolved:
        raise ConfigError("no configuration to run; pass at least one, e.g. dense")
    return resolved


def model_slug(name: str | os.PathLike) -> str:
    """Filesystem-safe short name: the last path component ("mmsparse/toy-qwen2.5-vl" -> "toy-qwen2.5-vl")."""
    last = str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.")
    return slug or "model"


def _load_adapter(model: Any, device: str | None, dtype: Any) -> tuple[ModelAdapter, str]:
    """The adapter and the model's display name; a loaded adapter is used as is."""
    from mmsparse.loading import DEFAULT_MODEL, load
    from mmsparse.models import ModelAdapter

    if isinstance(model, ModelAdapter):
        return model, str(getattr(model.model, "name_or_path", "") or model.model.config.model_type)
    name = DEFAULT_MODEL if model is None else model
    return load(name, device=device, dtype=dtype), str(name)


def _options(frames: int, size: int) -> dict[str, Any]:
    """Pipeline sampling kwargs that keep every array frame at its size."""
    return {"nframes": frames, "source_fps": SOURCE_FPS, "min_pixels": size * size, "max_pixels": size * size}


def check_fits(adapter: ModelAdapter, grid: GridSpec, needles: Sequence[Needle], max_new_tokens: int) -> None:
    """Refuse, before the first cell, a size the model would resize or a length over its context."""
    from mmsparse.video import MEMORY_BACKEND, SamplingOptions, VideoInfo, plan_sampling

    question = max((n.question for n in needles), key=len)
    answer_tokens = max(len(adapter.processor.tokenizer(n.answer, add_special_tokens=False)["input_ids"]) for n in needles) + 1
    for n in sorted(grid.frames):
        opts = _options(n, grid.size)
        plan = plan_sampling(
            VideoInfo(n, SOURCE_FPS, grid.size, grid.size, MEMORY_BACKEND),
            SamplingOptions(nframes=n, min_pixels=opts["min_pixels"], max_pixels=opts["max_pixels"]),
            frame_factor=adapter.frame_factor,
            size_factor=adapter.size_factor,
        )
        if (plan.height, plan.width) != (grid.size, grid.size):
            raise InvalidInputError(
                f"size {grid.size} would be resized to {plan.width}x{plan.height} for this model; "
                f"use a multiple of {adapter.size_factor}"
            )
        needed = adapter.count_prompt_tokens(plan, question) + max(max_new_tokens, answer_tokens)
        if needed > adapter.context_length:
            raise ContextLengthError(
                f"{n} frames need {needed} tokens but the model's context is {adapter.context_length}; "
                f"use fewer frames or a smaller size"
            )


def _make_haystack(haystack: Haystack | Sequence[str | os.PathLike] | str | os.PathLike | None, size: int) -> Haystack:
    if isinstance(haystack, Haystack):
        if haystack.size != size:
            raise InvalidInputError(f"the haystack makes {haystack.size}px frames but size={size}; build it with Haystack({size})")
        return haystack
    if isinstance(haystack, (str, os.PathLike)):
        haystack = [haystack]
    return Haystack(size, sources=haystack, crop="center")


def _haystack_label(haystack: Any) -> str | list[str]:
    if haystack is None:
        return "bundled"
    if isinstance(haystack, Haystack):
        return "custom"
    return [str(haystack)] if isinstance(haystack, (str, os.PathLike)) else [str(p) for p in haystack]


def _check_needle_images(needles: Sequence[Needle], root: Path | None, size: int) -> None:
    """Read every user image once now, so a bad path fails before the model loads."""
    for needle in needles:
        if needle.image is not None:
            needle.picture(size, root=root)


# --------------------------------------------------------------------------- scoring


def answer_ids(tokenizer: Any, answer: str, end_id: int | None) -> list[int]:
    """Token ids of the reference answer, then the end-of-turn token if the tokenizer has one."""
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return ids + ([end_id] if end_id is not None else [])


def end_of_turn_id(tokenizer: Any) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return token_id if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else None


def append_answer(inputs: Mapping[str, Any], ids: Sequence[int]) -> dict[str, Any]:
    """Model inputs with the answer appended as plain text tokens (batch of one).

    Qwen2.5-VL's forward recomputes M-RoPE positions from input_ids, the grid and
    mm_token_type_ids, so appended text tokens get the right positions; mm_token_type_ids must
    grow with zeros (text) to stay aligned.
    """
    out = dict(inputs)
    tail = torch.tensor([list(ids)], dtype=out["input_ids"].dtype)
    out["input_ids"] = torch.cat([out["input_ids"], tail], dim=1)
    for key, fill in (("attention_mask", 1), ("mm_token_type_ids", 0)):
        if key in out and out[key] is not None:
            out[key] = torch.cat([out[key], torch.full_like(tail, fill, dtype=out[key].dtype)], dim=1)
    return out


def answer_loglik(pipe: VideoQAPipeline, video: Any, question: str, ids: Sequence[int]) -> tuple[float, float]:
    """Sum and mean log-prob of ``ids`` after the prompt, from one teacher-forced forward.

    This is the model's plain forward: the sparse stages act inside the pipeline's ``generate``,
    so once a stage lands, this forward must run under that stage's context as well.
    """
    inputs, layout = pipe.adapter.prepare(video, question)
    inputs = append_answer(inputs, ids)
    model = pipe.model
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    # The sparse prefill acts on this forward too, over a layout that includes the answer tokens.
    layout = TokenLayout.from_spans(int(inputs["input_ids"].shape[1]), list(layout.visual_spans))
    with torch.inference_mode(), pipe._sparse_request(layout):
        # Only the logits that predict the answer: the last len(ids)+1 positions, minus the last.
        logits = model(**inputs, logits_to_keep=len(ids) + 1, use_cache=False).logits[0, :-1].float()
    targets = torch.tensor(list(ids), device=logits.device)
    logp = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return float(logp.sum()), float(logp.mean())


def score_cell(pipe: VideoQAPipeline, inp: CellInput, max_new_tokens: int, end_id: int | None) -> dict[str, Any]:
    """Greedy answer + exact match, log-likelihood of the reference, and the pipeline's stats."""
    cell, needle, size = inp.cell, inp.needle, inp.video.shape[1]
    opts = _options(cell.frames, size)
    out = pipe(inp.video, needle.question, max_new_tokens=max_new_tokens, **opts)
    # The same sampling options and decode path as the call above, so the forward sees the same pixels.
    sampling = replace(pipe.sampling, **{k: v for k, v in opts.items() if k != "source_fps"})
    video = pipe.load_video(
        inp.video,
        sampling,
        [needle.question],
        max_new_tokens=max_new_tokens,
        source_fps=SOURCE_FPS,
    )
    ids = answer_ids(pipe.adapter.processor.tokenizer, needle.answer, end_id)
    ll_sum, ll_mean = answer_loglik(pipe, video, needle.question, ids)
    stats = out["stats"]
    return {
        "frames": cell.frames,
        "video_tokens": stats["video_tokens"],
        "prompt_tokens": stats["prompt_tokens"],
        "depth": cell.depth,
        "sample": cell.sample,
        "cell_seed": cell.seed,
        "needle_frames": [inp.needle_frames.start, inp.needle_frames.stop],
        "needle": needle.name,
        "question": needle.question,
        "reference": needle.answer,
        "aliases": list(needle.aliases),
        "generated": out["answer"],
        "correct": needle.accepts(out["answer"]),
        "loglik_sum": _finite(ll_sum),
        "loglik_mean": _finite(ll_mean),
        "answer_tokens": len(ids),
        "ttft_s": stats.get("ttft_s"),
        "peak_memory_gb": stats.get("peak_memory_gb"),
        "memory_kind": stats.get("memory_kind"),
        "prefill": stats.get("prefill"),
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN/inf


# --------------------------------------------------------------------------- aggregation


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def aggregate(records: Sequence[Mapping[str, Any]], grid: GridSpec) -> dict[str, Any]:
    """Accuracy overall, by depth, by length and per (depth, length) cell; speed and memory."""
    correct = np.array([r["correct"] for r in records], dtype=float)
    d_idx = np.array([grid.depths.index(r["depth"]) for r in records])
    n_idx = np.array([grid.frames.index(r["frames"]) for r in records])
    nd, nn = len(grid.depths), len(grid.frames)
    hits = np.zeros((nd, nn))
    counts = np.zeros((nd, nn))
    np.add.at(hits, (d_idx, n_idx), correct)
    np.add.at(counts, (d_idx, n_idx), 1)
    cell_acc = np.divide(hits, counts, out=np.full_like(hits, np.nan), where=counts > 0)
    by_depth = hits.sum(1) / np.maximum(counts.sum(1), 1)
    by_length = hits.sum(0) / np.maximum(counts.sum(0), 1)
    tokens = {r["frames"]: r["video_tokens"] for r in records}
    peaks = [r["peak_memory_gb"] for r in records if r["peak_memory_gb"] is not None]
    return {
        "cells": len(records),
        "accuracy": float(correct.mean()) if len(records) else None,
        "by_depth": [{"depth": d, "accuracy": float(a)} for d, a in zip(grid.depths, by_depth)],
        "by_length": [
            {"frames": n, "video_tokens": tokens.get(n), "accuracy": float(a)} for n, a in zip(grid.frames, by_length)
        ],
        "grid_accuracy": [[None if math.isnan(a) else float(a) for a in row] for row in cell_acc],  # [depth][frames]
        "mean_loglik_sum": _mean([r["loglik_sum"] for r in records]),
        "mean_loglik_mean": _mean([r["loglik_mean"] for r in records]),
        "mean_ttft_s": _mean([r["ttft_s"] for r in records]),
        "max_peak_memory_gb": max(peaks) if peaks else None,
        "memory_kind": records[0]["memory_kind"] if records else None,
    }


def agreement(records: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]) -> float | None:
    """Share of cells whose generated answer equals the reference config's (sparse vs dense)."""
    if not records:
        return None
    return float(np.mean([a["generated"] == b["generated"] for a, b in zip(records, reference)]))


# --------------------------------------------------------------------------- outputs


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    import mmsparse

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mmsparse": mmsparse.__version__,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:  # Linux names the CPU model here; platform.processor() is often empty or just "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def plot_heatmap(result: Mapping[str, Any], path: Path) -> None:
    """Depth (rows) x length (columns) accuracy heatmap, PNG through the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    agg = result["aggregate"]
    grid = np.array([[np.nan if a is None else a for a in row] for row in agg["grid_accuracy"]], dtype=float)
    depths = result["grid"]["depths"]
    cols = [f"{c['frames']} fr\n{c['video_tokens']} tok" for c in agg["by_length"]]
    fig = Figure(figsize=(1.3 * len(cols) + 2.2, 0.6 * len(depths) + 1.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
    ax.set_xlabel("haystack length (frames, video tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), value in np.ndenumerate(grid):
        dark = not np.isnan(value) and (value < 0.2 or value > 0.85)  # ends of RdYlGn are dark
        ax.text(j, i, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    acc = agg["accuracy"]
    ax.set_title(f"V-NIAH {result['model_slug']} / {result['config']}: accuracy {acc:.2f}", fontsize=9)
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def format_table(summary: Mapping[str, Any]) -> str:
    """One row per configuration: accuracy, mean TTFT, peak memory (and agreement with dense)."""
    header = ["config", "accuracy", "mean TTFT (s)", "peak memory (GB)", "loglik/token", "same answer as dense"]
    rows = []
    for c in summary["configs"]:
        rows.append([
            c["config"],
            _fmt(c["accuracy"], ".3f"),
            _fmt(c["mean_ttft_s"], ".3f"),
            _fmt(c["max_peak_memory_gb"], ".2f"),
            _fmt(c["mean_loglik_mean"], ".3f"),
            _fmt(c.get("agreement_with_dense"), ".3f"),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    title = f"V-NIAH {summary['model']} on {summary['environment']['device_name']} ({summary['cells']} cells per config)"
    return "\n".join([title, *lines])


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# --------------------------------------------------------------------------- run


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm switches itself off when stderr is not a terminal.
    return tqdm(total=total, desc="V-NIAH", unit="run", file=sys.stderr, disable=None if enabled else True)


def run_vniah(
    model: str | os.PathLike | ModelAdapter | None = None,
    frames: Sequence[int] = DEFAULT_FRAMES,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    needles_per_cell: int = DEFAULT_NEEDLES_PER_CELL,
    configs: Sequence[str] | Mapping[str, str | SparseConfig] | None = None,
    needles: str | os.PathLike | None = None,
    haystack: Haystack | Sequence[str | os.PathLike] | None = None,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    out_dir: str | os.PathLike = RESULTS_DIR,
    max_new_tokens: int = 8,
    progress: bool = True,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> dict[str, Any]:
    """Run the V-NIAH grid for every configuration on the same inputs; return the summary.

    ``model``: hub id, local path, tiny test model name or a loaded ``ModelAdapter``; default
    ``mmsparse.loading.DEFAULT_MODEL`` (the toy model). ``configs``: preset names (default: the
    presets whose stages are all built), or a mapping name -> preset name / SparseConfig.
    ``needles``: a needle-set JSON (see ``mmsparse.eval.needles``) or None for the built-in set.
    ``haystack``: video paths, a ``Haystack``, or None for the bundled clips.
    Bad input raises an ``MMSparseError`` before the first cell runs.
    """
    from mmsparse.pipelines import VideoQAPipeline

    started = time.perf_counter()
    named = resolve_configs(configs)
    grid = GridSpec.build(frames, depths, needles_per_cell, size, seed)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    needle_set, root = load_needles(needles)
    _check_needle_images(needle_set, root, size)
    hay = _make_haystack(haystack, size)
    adapter, name = _load_adapter(model, device, dtype)
    check_fits(adapter, grid, needle_set, max_new_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    pipes = {
        cfg_name: VideoQAPipeline(adapter.model, adapter.processor, adapter=adapter, sparse=cfg, device=adapter.model.device)
        for cfg_name, cfg in named.items()
    }
    _warm_up(pipes, hay, needle_set, root, grid, max_new_tokens)
    records = _run_grid(pipes, grid.cells(), hay, needle_set, root, max_new_tokens, progress)

    slug = model_slug(name)
    base = {
        "benchmark": "vniah",
        "model": name,
        "model_slug": slug,
        "environment": environment(adapter.model.device),
        "grid": grid.as_dict(),
        "seed": grid.seed,
        "needle_set": str(needles) if needles is not None else "builtin",
        "haystack": _haystack_label(haystack),
        "max_new_tokens": max_new_tokens,
    }
    rows = _write_results(records, named, base, grid, out)
    summary = {**base, "cells": len(grid.cells()), "configs": rows, "wall_s": time.perf_counter() - started}
    _write_json(out / f"vniah-{slug}-summary.json", summary)
    return {**summary, "out_dir": str(out.resolve())}


def _run_grid(pipes: Mapping[str, VideoQAPipeline], cells: Sequence[Cell], hay: Haystack, needles: Sequence[Needle],
              root: Path | None, max_new_tokens: int, progress: bool) -> dict[str, list[dict[str, Any]]]:
    """Cell by cell, every config in turn on the same input; records per config."""
    tokenizer = next(iter(pipes.values())).adapter.processor.tokenizer
    end_id = end_of_turn_id(tokenizer)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in pipes}
    with _progress(len(cells) * len(pipes), progress) as bar:
        for cell in cells:
            inp = build_cell_input(cell, hay, needles, root)  # built once: every config sees it
            for name, pipe in pipes.items():
                records[name].append(score_cell(pipe, inp, max_new_tokens, end_id))
                bar.update(1)
    return records


def _write_results(records: Mapping[str, list[dict[str, Any]]], named: Mapping[str, SparseConfig], base: Mapping[str, Any],
                   grid: GridSpec, out: Path) -> list[dict[str, Any]]:
    """Per config: JSON with every record and the aggregates, and the heatmap; returns summary rows."""
    dense = next((records[n] for n, cfg in named.items() if cfg.is_dense), None)  # reference for agreement
    rows = []
    for name, recs in records.items():
        agg = aggregate(recs, grid)
        result = {**base, "config": name, "stages": list(named[name].stages), "aggregate": agg, "records": recs}
        stem = f"vniah-{base['model_slug']}-{name}"
        _write_json(out / f"{stem}.json", result)
        plot_heatmap(result, out / f"{stem}.png")
        rows.append({
            "config": name,
            "stages": result["stages"],
            **{k: agg[k] for k in ("accuracy", "mean_ttft_s", "max_peak_memory_gb", "memory_kind", "mean_loglik_mean")},
            "agreement_with_dense": agreement(recs, dense) if dense is not None else None,
            **prefill_summary(recs),
            "json": f"{stem}.json",
            "png": f"{stem}.png",
        })
    return rows


def prefill_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Attention density and pattern mix of the sparse prefill at the longest length (empty when
    the config has no prefill stage or no cell was long enough to run sparse)."""
    longest = max((r["frames"] for r in records), default=0)
    stats = [r["prefill"] for r in records if r["frames"] == longest and (r.get("prefill") or {}).get("sparse_layers")]
    if not stats:
        return {}
    labels: dict[str, int] = {}
    for st in stats:
        for label, count in st.get("label_counts", {}).items():
            labels[label] = labels.get(label, 0) + count
    density = sum(st["density_mean"] for st in stats) / len(stats)
    return {"longest_frames": longest, "attention_density_at_longest": density,
            "attention_skipped_at_longest": 1 - density, "label_counts_at_longest": labels}


def _warm_up(pipes: Mapping[str, VideoQAPipeline], hay: Haystack, needles: Sequence[Needle], root: Path | None,
             grid: GridSpec, max_new_tokens: int) -> None:
    """One unrecorded call per config, so one-time costs do not land in the first cell's TTFT."""
    cell = Cell(min(grid.frames), grid.depths[0], 0, cell_seed(grid.seed, -1, 0.0, 0))
    inp = build_cell_input(cell, hay, needles, root)
    for pipe in pipes.values():
        pipe(inp.video, inp.needle.question, max_new_tokens=max_new_tokens, **_options(cell.frames, grid.size))


if __name__ == "__main__":
    from mmsparse.cli import main

    sys.exit(main(["vniah", *sys.argv[1:]]))
