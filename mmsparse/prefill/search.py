"""Offline pattern search: which candidate each (layer, head) should use, measured on videos.

``mmsparse search --model M --videos a.mp4 b.mp4 --out plan.json`` runs the model's exact
forward on each video and, in every layer, scores every candidate pattern (A-shape, vertical-
slash, block, permuted grid at budgets relative to the length) against the exact attention of
sampled video rows: kept mass (recall), relative output error and cost. Per head it keeps the
candidate of least time whose mean recall reaches ``gamma`` (or whose mean error is at most
``max_error``), else dense. The JSON's ``layers`` maps layer -> one label per head; the prefill
stage uses it through ``PrefillConfig(plan=PATH)``, or automatically when a model directory
holds ``PLAN_FILE``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import PrefillConfig
from ..errors import InvalidInputError

PLAN_FILE = "mmsparse-prefill-plan.json"


def choose(table: dict[str, dict[str, list[float]]], heads: int, cfg: PrefillConfig) -> list[str]:
    """Per head, the label of least time (cost x ``pair_time`` of its kind) meeting the budget
    rule (mean over videos), else "dense": the prefill stage's own rule."""
    from .selection import pair_time

    labels = []
    for h in range(heads):
        best, best_time = "dense", float("inf")
        for label, row in table.items():
            good = row["recall"][h] >= cfg.gamma or (cfg.max_error is not None and row["error"][h] <= cfg.max_error)
            time = row["cost"][h] * pair_time(label.split(":")[0])
            if good and row["cost"][h] <= cfg.max_density and time < best_time:
                best, best_time = label, time
        labels.append(best)
    return labels


def _mean_tables(tables: Sequence[dict]) -> dict[str, dict[str, list[float]]]:
    """Average candidate tables over videos (labels present in every video)."""
    common = set.intersection(*(set(t) for t in tables))
    out = {}
    for label in sorted(common):
        out[label] = {key: torch.tensor([t[label][key] for t in tables]).mean(0).tolist() for key in ("recall", "error", "cost")}
    return out


def search_patterns(
    adapter: Any,
    videos: Sequence[Any],
    *,
    question: str = "Describe the video.",
    config: PrefillConfig | None = None,
    sampling: dict[str, Any] | None = None,
    sample_queries: int = 256,
) -> dict[str, Any]:
    """Measure every candidate on ``videos`` with ``adapter``'s model and return the plan JSON."""
    from ..video import SamplingOptions, load_video
    from .attention import enable_sparse_prefill, sparse_prefill

    if not videos:
        raise InvalidInputError("give at least one video to search on (--videos PATH ...)")
    config = config or PrefillConfig(min_length=0)
    model = adapter.model
    enable_sparse_prefill(model)
    options = SamplingOptions(**{**adapter.sampling_defaults(), **(sampling or {})})
    per_video: dict[int, list[dict]] = {}
    started = time.perf_counter()
    lengths = []
    for source in videos:
        video = load_video(source, options, frame_factor=adapter.frame_factor, size_factor=adapter.size_factor)
        inputs, layout = adapter.prepare(video, question)
        inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.inference_mode(), sparse_prefill(layout, config, collect=True, sample_queries=sample_queries) as request:
            model(**inputs, logits_to_keep=1, use_cache=False)
        lengths.append(layout.seq_len)
        for layer, tables in request.collect.items():
            per_video.setdefault(layer, []).extend(tables)
    if not per_video:
        raise InvalidInputError("no layer ran the search: the prompts are shorter than the config's min_length")
    heads = len(next(iter(next(iter(per_video.values()))[0].values()))["recall"])
    tables = {layer: _mean_tables(t) for layer, t in sorted(per_video.items())}
    layers = {str(layer): choose(table, heads, config) for layer, table in tables.items()}
    return {
        "model": str(getattr(model, "name_or_path", "")),
        "videos": [str(v) for v in videos],
        "prompt_tokens": lengths,
        "question": question,
        "rule": {"gamma": config.gamma, "max_error": config.max_error, "max_density": config.max_density,
                 "block_size": config.block_size, "sample_queries": sample_queries},
        "seconds": time.perf_counter() - started,
        "layers": layers,
        "candidates": {str(layer): table for layer, table in tables.items()},
    }


def load_plan(path: str | Path) -> dict[int, tuple[str, ...]]:
    """Per-layer labels from a search JSON."""
    try:
        data = json.loads(Path(path).read_text())
        return {int(layer): tuple(labels) for layer, labels in data["layers"].items()}
    except FileNotFoundError:
        raise InvalidInputError(f"prefill plan {path} not found; run `mmsparse search` to make one") from None
    except (KeyError, ValueError, TypeError) as err:
        raise InvalidInputError(f"prefill plan {path} is not a search result ({type(err).__name__}); "
                                "make it with `mmsparse search`") from None
