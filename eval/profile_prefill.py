"""Where a prefill's GPU time goes: dense vs sparse at one length (GPU).

    python -m mmsparse.eval.profile_prefill --n 131072

The setup of ``bench_prefill --compile-attention --mix-from <toy summary>`` (a Qwen2.5-VL-7B-shaped
LLM, random weights, the toy model's pattern mix, chunked fused pointwise work), one prefill
each of dense and sparse under the torch profiler after a warm one. Prints and writes: wall
time; GPU busy time (the union of kernel intervals: wall minus busy is time the GPU sat idle,
e.g. waiting on the host after a device sync); kernel time by category; the time of each sparse
attention launch in order; and the host-device syncs of one more sparse prefill (torch's sync
debug mode), which should be none. Writes ``eval/results/prefill-profile-<n>.json``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CATEGORIES = (  # first match wins: (category, substrings of the lower-cased kernel name)
    ("sparse_attn", ("sparse_attention_fwd",)),
    ("sdpa", ("cudnn", "fmha", "flash", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma")),
    ("silu_mul", ("silu",)),
    ("rmsnorm", ("rms",)),
    ("inductor", ("triton_",)),
    ("copy/index", ("copy", "index", "gather", "scatter")),
    ("aten_pointwise", ("elementwise", "vectorized", "reduce")),
)


def category(kernel: str) -> str:
    """The category a CUDA kernel's name falls in (``other`` if none)."""
    name = kernel.lower()
    return next((cat for cat, keys in CATEGORIES if any(key in name for key in keys)), "other")


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals in microseconds, as milliseconds."""
    total, end = 0.0, None
    start = None
    for s, t in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                total += end - start
            start, end = s, t
        else:
            end = max(end, t)
    return (total + (end - start if end is not None else 0.0)) / 1e3


def kernel_table(prof) -> dict:
    """Busy time, category totals, top kernels and the sparse launches of a profiled run."""
    intervals, by_cat, by_name, count, launches = [], collections.Counter(), collections.Counter(), collections.Counter(), []
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        s, t = e.time_range.start, e.time_range.end
        ms = (t - s) / 1e3
        intervals.append((s, t))
        by_cat[category(e.name)] += ms
        by_name[e.name[:100]] += ms
        count[e.name[:100]] += 1
        if "sparse_attention_fwd" in e.name:
            launches.append((s, ms))
    return dict(busy_ms=busy_ms(intervals), span_ms=(max(t for _, t in intervals) - min(s for s, _ in intervals)) / 1e3,
                cats=dict(by_cat.most_common()), top=[(k, v, count[k]) for k, v in by_name.most_common(40)],
                sparse_launch_ms=[ms for _, ms in sorted(launches)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--mix-from", type=Path, default=RESULTS / "vniah-long" / "vniah-toy-qwen2.5-vl-summary.json")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_prefill needs a CUDA GPU")
    from torch.profiler import ProfilerActivity, profile

    from mmsparse.config import PrefillConfig
    from mmsparse.eval.bench_prefill import mix_from_summary, model_plans, prefill_once, video_prompt
    from mmsparse.eval.shapes import qwen2_5_vl_7b
    from mmsparse.prefill.attention import enable_sparse_prefill, sparse_prefill
    from mmsparse.prefill.chunking import chunked_pointwise
    from mmsparse.prefill.compiled import compile_attention

    model, _ = qwen2_5_vl_7b("cuda")
    compile_attention(model)
    text = model.config.text_config
    plans = model_plans(mix_from_summary(args.mix_from), text.num_hidden_layers, text.num_attention_heads, "model")
    cfg = PrefillConfig(gamma=0.95, min_length=0)
    layout, pos = video_prompt(args.n)
    n = layout.seq_len
    embeds = torch.randn(1, n, text.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02
    pos = pos.cuda()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "n": n}

    def request(mode: str) -> contextlib.AbstractContextManager:
        return sparse_prefill(layout, cfg, plans=plans) if mode == "sparse" else contextlib.nullcontext()

    with chunked_pointwise(model, 32768, fused_kernels=True):
        for mode in ("dense", "sparse"):
            model.set_attn_implementation({"text_config": "sdpa"})
            if mode == "sparse":
                enable_sparse_prefill(model)
            with request(mode):
                prefill_once(model, embeds, pos)  # warm (compiles)
            with request(mode):
                wall, _ = prefill_once(model, embeds, pos)
            with request(mode), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                profiled, _ = prefill_once(model, embeds, pos)
            res[mode] = dict(wall_ms=wall * 1e3, prof_wall_ms=profiled * 1e3, **kernel_table(prof))
            row = res[mode]
            print(f"== {mode} n={n}: wall {row['wall_ms']:.0f} ms, GPU busy {row['busy_ms']:.0f} ms", flush=True)
            for cat, ms in row["cats"].items():
                print(f"   {cat:15s} {ms:8.1f} ms")
        with sparse_prefill(layout, cfg, plans=plans):  # enabled above
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    prefill_once(model, embeds, pos)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        model.set_attn_implementation({"text_config": "sdpa"})
    sites = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    res["syncs_during_sparse_prefill"] = dict(sites)
    print(f"syncs during a sparse prefill: {sum(sites.values())}")
    out = args.out or RESULTS / f"prefill-profile-{n}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
