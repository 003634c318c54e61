"""Per-head attention structure of a model on VisionNIAH inputs.

    python -m mmsparse.eval.attention_stats [--model M] [--frames 256] [--cells 6]

For the trailing question's queries (``TokenLayout.question_start`` onward), the share of each
head's softmax mass that lands on the needle's tokens, on the attention sinks (the first
``SINK`` positions), on the local band (the ``LOCAL`` keys just before each query), and on the
rest of the video. Heads with a large needle share are retrieval heads; the sparse prefill
stage must keep their needle columns. Averaged over several cells; writes
``eval/results/attention-<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmsparse.loading import DEFAULT_MODEL, load
from mmsparse.video import SamplingOptions, load_video

from .haystack import Haystack
from .needles import builtin_needles
from .vniah import RESULTS_DIR, Cell, build_cell_input, model_slug

SINK = 4
LOCAL = 64


def region_masks(layout, needle_group: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Boolean [q, k] masks of the regions, for queries from ``layout.question_start``."""
    span = layout.video_spans[0]
    start = span.frame_starts[needle_group]
    needle = torch.zeros(seq_len, dtype=torch.bool)
    needle[start : start + span.frame_lengths[needle_group]] = True
    video = torch.zeros(seq_len, dtype=torch.bool)
    video[span.start : span.end] = True
    q = torch.arange(layout.question_start, seq_len)[:, None]
    k = torch.arange(seq_len)[None, :]
    causal = k <= q
    sink = (k < SINK) & causal
    local = (q - k < LOCAL) & causal & ~sink
    return {
        "needle": needle[None, :] & causal & ~local,
        "sink": sink,
        "local": local,
        "other_video": video[None, :] & causal & ~needle[None, :] & ~local,
    }


@torch.no_grad()
def head_shares(model, inputs, masks: dict[str, torch.Tensor], question_start: int) -> dict[str, torch.Tensor]:
    """Region -> [layers, heads] mean attention share of the question queries."""
    out = model(**inputs, output_attentions=True)
    probs = torch.stack([a[0, :, question_start:, :].float() for a in out.attentions])  # [L, H, q, k]
    return {name: (probs * m).sum(-1).mean(-1) for name, m in masks.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--cells", type=int, default=6)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    adapter = load(args.model, device="cpu", attn_implementation="eager")
    hay = Haystack(args.size)
    needles = builtin_needles()
    totals: dict[str, torch.Tensor] = {}
    for i in range(args.cells):
        depth = i / max(1, args.cells - 1)
        cell = Cell(frames=args.frames, depth=depth, sample=0, seed=args.seed * 1000 + i)
        inp = build_cell_input(cell, hay, needles, None)
        pixels = args.size * args.size
        video = load_video(inp.video, SamplingOptions(nframes=args.frames, min_pixels=pixels, max_pixels=pixels),
                           frame_factor=adapter.frame_factor, size_factor=adapter.size_factor, source_fps=2.0)
        inputs, layout = adapter.prepare(video, inp.needle.question)
        masks = region_masks(layout, inp.needle_frames.start // 2, layout.seq_len)
        for name, share in head_shares(adapter.model, dict(inputs), masks, layout.question_start).items():
            totals[name] = totals.get(name, 0) + share / args.cells
    record = {
        "model": str(args.model),
        "frames": args.frames,
        "video_tokens": int(layout.num_tokens("video")),
        "cells": args.cells,
        "sink_tokens": SINK,
        "local_band": LOCAL,
        "shares": {name: [[round(float(x), 4) for x in row] for row in t] for name, t in totals.items()},
    }
    out = args.out or RESULTS_DIR / f"attention-{model_slug(args.model)}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    layers, heads = totals["needle"].shape
    print(f"attention share of the question's queries, {args.frames} frames ({record['video_tokens']} video tokens), {args.cells} cells")
    print(f"{'layer':>5} {'head':>4} {'needle':>7} {'sink':>6} {'local':>6} {'video':>6}")
    for layer in range(layers):
        for head in range(heads):
            row = [totals[n][layer, head] for n in ("needle", "sink", "local", "other_video")]
            print(f"{layer:>5} {head:>4} " + " ".join(f"{float(x):>6.3f}" for x in row))
    return record


if __name__ == "__main__":
    main()
