"""Cost of the automatic per-head pattern choice on one 7B-shaped layer (GPU).

    python -m mmsparse.eval.bench_select            # 32K..512K video prompts

``bench_prefill`` times fixed plans (the toy model's mix), which skip scoring. Without a plan
from ``mmsparse search`` every layer of a request scores all candidates on sampled rows; this
times one layer's choice (``selection.select`` with a preset's settings, the request's context
built once as in a prefill) on random Q, K, V of
Qwen2.5-VL-7B's attention shapes (28 / 4 heads, d=128, bf16) beside dense SDPA on the same
tensors, and the extra peak memory it needs. Random inputs make every head flat, so the plan
itself (all dense) is not the point here; the cost of reaching it is the same work.
Writes ``eval/results/select.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[32768, 65536, 131072, 262144, 524288])
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "select.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_select needs a CUDA GPU")
    import torch.nn.functional as F

    from mmsparse.config import PRESETS
    from mmsparse.eval.bench_kernels import cuda_ms
    from mmsparse.eval.bench_prefill import video_prompt
    from mmsparse.eval.dense_smoke import environment
    from mmsparse.prefill.attention import _selection_config
    from mmsparse.prefill.selection import layout_blocks, select

    env = environment()
    cfg = _selection_config(PRESETS[args.preset].prefill)
    records = []
    for n in args.n:
        layout, _ = video_prompt(n)
        n = layout.seq_len
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(1, 28, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        dense_ms = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), args.reps)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        # As in a prefill: the request's context is built once, and its prompt-only parts by the
        # first layer (the warm-up call here); each timed call is one more layer's choice.
        context = layout_blocks(layout, n, cfg.block, "cuda")
        select_ms = cuda_ms(lambda: select(q, k, v, layout, cfg, context=context), args.reps)
        extra_gb = (torch.cuda.max_memory_allocated() - held) / 1e9
        plan = select(q, k, v, layout, cfg, context=context)
        rec = {"gpu": env["gpu"], "torch": env["torch"], "n": n, "preset": args.preset, "select_ms": select_ms,
               "dense_attention_ms": dense_ms, "select_over_dense_attention": select_ms / dense_ms,
               "extra_peak_gb": extra_gb, "candidates": len(plan.table),
               "kinds": {kind: plan.kinds.count(kind) for kind in sorted(set(plan.kinds))}}
        records.append(rec)
        print(json.dumps(rec), flush=True)
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\n{'n':>7} {'select ms':>9} {'dense attn ms':>13} {'ratio':>6} {'extra GB':>8}")
    for r in records:
        print(f"{r['n']:>7} {r['select_ms']:9.1f} {r['dense_attention_ms']:13.1f} "
              f"{r['select_over_dense_attention']:6.2f} {r['extra_peak_gb']:8.1f}")
    return records


if __name__ == "__main__":
    main()
