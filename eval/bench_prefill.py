"""Prefill benchmark: dense vs sparse time to first token on a Qwen2.5-VL-7B-shaped LLM (GPU).

    python -m mmsparse.eval.bench_prefill                         # 32K..512K video prompts
    python -m mmsparse.eval.bench_prefill --mix-from eval/results/vniah-toy-qwen2.5-vl-summary.json

Times the language model's prefill of a video prompt (embeddings in, KV cache and last-token
logits out; the vision tower is not part of it) in one process: dense SDPA as torch dispatches
it, then the sparse prefill stage. Random weights give flat attention, so the per-head pattern
mix is fixed (``--mix``, or the mix the toy model chose at its longest VisionNIAH length; scaled
to all heads of the model by default, ``--mix-scope``) and
every layer still runs the stage's own estimation and index build. The MLPs and norms run in
chunks (``mmsparse.prefill.chunking``) in both runs, so long prompts fit (1M tokens on an H200),
and through the fused RMSNorm / SwiGLU kernels unless ``--pointwise stock``; with ``--compile-attention``
both runs compile the attention modules (``mmsparse.prefill.compiled``: RoPE as one fused pass).
The ceiling beside each speed-up is the speed-up free attention would give: dense time over the
sparse run's time outside its attention calls and index builds (CUDA events in the run; the rest
of the prefill is the same work in both runs). Also times attention alone (dense vs sparse at one
layer's shapes, over the layers' plans) for an estimate from isolated layers, 1 / (1 - a + a / s)
for attention share ``a`` of dense prefill and attention speed-up ``s`` (``speedup_isolated_estimate``;
isolated layers run at other clocks than a whole prefill, so it is no bound).
Lengths up to ``--repeat-up-to`` (128K) are timed as ``--repeat`` (3) alternating dense/sparse
pairs after an untimed pair at that length, and the medians reported (every run is in the JSON);
longer ones once. Writes ``eval/results/prefill.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mmsparse.eval.dense_smoke import environment
from mmsparse.layout import Span, TokenLayout

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS_PER_FRAME = 256  # 448x448 frames: a 16 x 16 grid of LLM tokens per temporal group
TEXT_BEFORE, TEXT_AFTER = 64, 64
DEFAULT_MIX = "a_shape:1024=10,grid:2F=8,vertical_slash:1000/2048=6,dense=4"


def video_prompt(n: int) -> tuple[TokenLayout, torch.Tensor]:
    """Layout and M-RoPE positions [3, 1, n] of a prompt: text, one video of whole frames, text."""
    frames = (n - TEXT_BEFORE - TEXT_AFTER) // TOKENS_PER_FRAME
    video = frames * TOKENS_PER_FRAME
    n = TEXT_BEFORE + video + TEXT_AFTER
    starts = tuple(TEXT_BEFORE + i * TOKENS_PER_FRAME for i in range(frames))
    span = Span("video", TEXT_BEFORE, TEXT_BEFORE + video, grid=(frames, 16, 16), frame_starts=starts,
                frame_lengths=(TOKENS_PER_FRAME,) * frames)
    layout = TokenLayout.from_spans(n, [span])
    pos = torch.empty(3, n, dtype=torch.long)
    pos[:, :TEXT_BEFORE] = torch.arange(TEXT_BEFORE)
    idx = torch.arange(video)
    pos[0, TEXT_BEFORE:TEXT_BEFORE + video] = TEXT_BEFORE + idx // TOKENS_PER_FRAME
    pos[1, TEXT_BEFORE:TEXT_BEFORE + video] = TEXT_BEFORE + (idx % TOKENS_PER_FRAME) // 16
    pos[2, TEXT_BEFORE:TEXT_BEFORE + video] = TEXT_BEFORE + idx % 16
    after = int(pos[:, :TEXT_BEFORE + video].max()) + 1
    pos[:, TEXT_BEFORE + video:] = after + torch.arange(TEXT_AFTER)
    return layout, pos[:, None, :]


def parse_mix(text: str, heads: int) -> tuple[str, ...]:
    """"label=count,..." (counts scaled to ``heads`` by largest remainder) -> one label per head."""
    pairs = [(lab.strip(), float(c)) for lab, c in (item.split("=") for item in text.split(",") if item.strip())]
    total = sum(c for _, c in pairs)
    raw = [(lab, c * heads / total) for lab, c in pairs]
    counts = {lab: int(x) for lab, x in raw}
    for lab, x in sorted(raw, key=lambda r: r[1] - int(r[1]), reverse=True)[: heads - sum(counts.values())]:
        counts[lab] += 1
    return tuple(lab for lab, c in counts.items() for _ in range(c))


def model_plans(text: str, layers: int, heads: int, scope: str = "model") -> dict[int, tuple[str, ...]]:
    """Per-layer fixed plans from a mix. ``model``: the counts are scaled to all ``layers x heads``
    heads and dealt round-robin, so every kind keeps its share (a kind at 2.5% of the toy's heads
    is 20 of 784, not one per layer, 3.6%); ``layer``: every layer gets the mix scaled to ``heads``."""
    if scope == "layer":
        labels = parse_mix(text, heads)
        return {layer: labels for layer in range(layers)}
    labels = parse_mix(text, heads * layers)
    return {layer: labels[layer::layers] for layer in range(layers)}


def mix_from_summary(path: Path, config: str | None = None) -> str:
    summary = json.loads(path.read_text())
    for row in summary["configs"]:
        if row.get("label_counts_at_longest") and config in (None, row["config"]):
            return ",".join(f"{k}={v}" for k, v in row["label_counts_at_longest"].items())
    raise SystemExit(f"{path} has no sparse config with a pattern mix at its longest length")


def prefill_once(model, embeds: torch.Tensor, pos: torch.Tensor) -> tuple[float, float]:
    """Seconds and peak GB of one prefill (text model forward with a fresh cache + last logits)."""
    from transformers import DynamicCache

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.model.language_model(inputs_embeds=embeds, position_ids=pos, past_key_values=DynamicCache(),
                                         use_cache=True)
        model.lm_head(out.last_hidden_state[:, -1:])
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 1e9


def attention_only(n: int, layout: TokenLayout, plans: dict[int, tuple[str, ...]], cfg, reps: int = 2) -> tuple[float, float]:
    """Dense SDPA vs the sparse stage for one layer's attention at 7B shapes, the sparse time
    averaged over the layers' plans (each distinct plan timed once): (dense s, sparse s)."""
    import torch.nn.functional as F

    from mmsparse.eval.bench_kernels import cuda_ms
    from mmsparse.prefill.attention import PrefillRequest, sparse_prefill_attention

    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, 28, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)

    def timed(fn):  # seconds, median of reps
        return cuda_ms(fn, reps) / 1e3

    dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    layers_of = collections.Counter(plans.values())
    sparse = 0.0
    for labels, count in layers_of.items():
        request = PrefillRequest(layout, cfg, plans={0: labels})
        sparse += count * timed(lambda: sparse_prefill_attention(q, k, v, request, 0, None))
    return dense, sparse / len(plans)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[32768, 65536, 131072, 262144, 524288])
    parser.add_argument("--mix", default=DEFAULT_MIX, help="fixed per-head pattern mix, 'label=count,...'")
    parser.add_argument("--mix-from", type=Path, help="take the mix from a vniah summary JSON instead")
    parser.add_argument("--mix-config", help="which config of that summary (default: the first sparse one)")
    parser.add_argument("--mix-scope", choices=("model", "layer"), default="model",
                        help="scale the mix to all heads of the model (dealt across layers) or to each layer")
    parser.add_argument("--chunk", type=int, default=32768, help="MLP and norm chunk (tokens)")
    parser.add_argument("--pointwise", choices=("fused", "stock"), default="fused",
                        help="norms and SwiGLU through the fused kernels or the stock modules (both runs alike)")
    parser.add_argument("--compile-attention", action="store_true",
                        help="torch.compile the attention modules in both runs (RoPE as one fused pass)")
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--sparse-only-above", type=int, default=None,
                        help="lengths above this run the sparse prefill only (dense would take too long)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed dense/sparse pairs per length up to --repeat-up-to (alternating, after an "
                             "untimed pair at that length; the medians are reported)")
    parser.add_argument("--repeat-up-to", type=int, default=131072,
                        help="longer prompts are timed once, with no untimed pair first")
    parser.add_argument("--out", type=Path, default=RESULTS / "prefill.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_prefill needs a CUDA GPU")
    from mmsparse.config import PrefillConfig
    from mmsparse.eval.shapes import qwen2_5_vl_7b
    from mmsparse.prefill.attention import enable_sparse_prefill, sparse_prefill
    from mmsparse.prefill.chunking import chunked_pointwise

    env = environment()
    mix_text = mix_from_summary(args.mix_from, args.mix_config) if args.mix_from else args.mix
    model, _ = qwen2_5_vl_7b("cuda")
    if args.compile_attention:  # compiled during the warm-up below
        from mmsparse.prefill.compiled import compile_attention

        compile_attention(model)
    layers = model.config.text_config.num_hidden_layers
    heads = model.config.text_config.num_attention_heads
    plans = model_plans(mix_text, layers, heads, args.mix_scope)
    cfg = PrefillConfig(gamma=args.gamma, min_length=0)
    totals = collections.Counter(label for labels in plans.values() for label in labels)
    print(json.dumps({**env, "mix": mix_text, "mix_scope": args.mix_scope, "heads_per_label": totals}), flush=True)
    records = []
    # Compile every kernel variant before timing: at 16K the question's rows are long enough to
    # be split in both orders.
    warm_layout, warm_pos = video_prompt(16384)
    warm = torch.randn(1, warm_layout.seq_len, model.config.text_config.hidden_size, device="cuda", dtype=torch.bfloat16)
    fused_kernels = args.pointwise == "fused"
    with chunked_pointwise(model, args.chunk, fused_kernels=fused_kernels):
        prefill_once(model, warm, warm_pos.cuda())
        enable_sparse_prefill(model)
        with sparse_prefill(warm_layout, cfg, plans=plans):
            prefill_once(model, warm, warm_pos.cuda())
        model.set_attn_implementation({"text_config": "sdpa"})
    for n in args.n:
        layout, pos = video_prompt(n)
        n = layout.seq_len
        embeds = torch.randn(1, n, model.config.text_config.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02
        pos = pos.cuda()
        rec = {"gpu": env["gpu"], "torch": env["torch"], "n": n, "config": f"fixed mix {mix_text}",
               "mix_scope": args.mix_scope, "heads_per_label": dict(totals), "chunk": args.chunk,
               "pointwise": args.pointwise, "compile_attention": args.compile_attention}
        with_dense = args.sparse_only_above is None or n <= args.sparse_only_above
        repeats = max(1, args.repeat) if n <= args.repeat_up_to else 1

        def dense_run() -> tuple[float, float]:
            model.set_attn_implementation({"text_config": "sdpa"})
            return prefill_once(model, embeds, pos)

        def sparse_run():
            enable_sparse_prefill(model)
            with sparse_prefill(layout, cfg, plans=plans) as req:
                return (*prefill_once(model, embeds, pos), req)

        try:
            with chunked_pointwise(model, args.chunk, fused_kernels=fused_kernels):
                # Alternating pairs after an untimed one: both runs see the same allocator state
                # (blocks sized for this length) and, in turn, the same clocks and temperature.
                dense_runs, sparse_runs = [], []
                for rep in range(repeats + (repeats > 1)):
                    if with_dense:
                        dense_s, dense_peak = dense_run()
                    sparse_s, sparse_peak, request = sparse_run()
                    if repeats > 1 and rep == 0:
                        continue
                    if with_dense:
                        dense_runs.append(dense_s * 1e3)
                        rec.setdefault("dense_peak_gb", dense_peak)
                    sparse_runs.append(sparse_s * 1e3)
                    rec.setdefault("peak_gb", sparse_peak)
            rec["dense_ms"] = statistics.median(dense_runs) if with_dense else None
            rec["sparse_ms"] = statistics.median(sparse_runs)
            if repeats > 1:
                rec["dense_ms_runs"], rec["sparse_ms_runs"] = dense_runs, sparse_runs
            summary = request.stats.summary()
            rec["density"] = summary["density_mean"]
            rec["index_ms"] = sum(layer["index_s"] for layer in request.stats.layers) * 1e3
            rec["attention_ms"] = sum(layer["attention_s"] for layer in request.stats.layers) * 1e3
            rec["pattern_counts"] = summary["pattern_counts"]
            if not with_dense:
                continue
            rec["speedup"] = rec["dense_ms"] / rec["sparse_ms"]
            rec["speedup_ceiling"] = rec["dense_ms"] / (rec["sparse_ms"] - rec["attention_ms"] - rec["index_ms"])
            dense_attn, sparse_attn = attention_only(n, layout, plans, cfg)
            share = min(1.0, dense_attn * layers * 1e3 / rec["dense_ms"])
            speed = dense_attn / sparse_attn
            rec.update({"attention_share_dense": share, "attention_speedup": speed,
                        "speedup_isolated_estimate": 1 / (1 - share + share / speed)})
        except torch.OutOfMemoryError as err:
            rec["error"] = f"out of memory: {err}"[:200]
        finally:
            model.set_attn_implementation({"text_config": "sdpa"})
            torch.cuda.empty_cache()
            records.append(rec)
            print(json.dumps(rec), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\n{'n':>7} {'dense ms':>9} {'sparse ms':>9} {'x':>5} {'ceiling':>7} {'density':>7} {'index ms':>8} {'peak GB':>7}")
    for r in records:
        if "error" in r:
            print(f"{r['n']:>7} {r['error']}")
            continue
        if r["dense_ms"] is None:
            print(f"{r['n']:>7} {'-':>9} {r['sparse_ms']:9.0f} {'-':>5} {'-':>7} {r['density']:7.3f} {r['index_ms']:8.0f} "
                  f"{r['peak_gb']:7.1f}")
            continue
        print(f"{r['n']:>7} {r['dense_ms']:9.0f} {r['sparse_ms']:9.0f} {r['speedup']:5.2f} {r['speedup_ceiling']:7.2f} "
              f"{r['density']:7.3f} {r['index_ms']:8.0f} {r['peak_gb']:7.1f}")
    return records


if __name__ == "__main__":
    main()
