"""Benchmark the sparse prefill kernels against dense SDPA (GPU).

    python -m mmsparse.eval.bench_kernels                      # Qwen2.5-VL-7B shapes, 32K..512K
    python -m mmsparse.eval.bench_kernels --n 131072 --tune    # block-size / warps / stages sweep
    python -m mmsparse.eval.bench_kernels --peer .peer         # also MInference's kernels, if present

Each length runs the dense baselines (SDPA as torch dispatches it, and SDPA's FLASH backend) in
the same process, then every pattern x density x backend. Writes ``eval/results/kernels.json``:
a list of records with the fields named in the issue (``ms`` includes ``index_ms``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mmsparse.eval.dense_smoke import environment
from mmsparse.kernels.flex import flex_sparse_attention
from mmsparse.kernels.index import SparseIndex, TokenOrder
from mmsparse.kernels.patterns import a_shape, block_topk, vertical_slash
from mmsparse.kernels.permute import grid_index, grid_permutation, inverse_permutation, permuted_order
from mmsparse.kernels.sparse_attention import sparse_attention

RESULTS = Path(__file__).resolve().parent / "results"
HQ, HKV, D = 28, 4, 128


def cuda_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def executed_pairs(index: SparseIndex, order: TokenOrder) -> float:
    """Query-key pairs the kernel computes (whole blocks, whole column chunks), over all heads."""
    shared = index.blocks.shape[1] == 1 and index.head_rows is None
    return index.computed_pairs() * (HQ if shared else 1)


def causal_pairs(n: int) -> float:
    return HQ * n * (n + 1) / 2


def dense_baselines(q, k, v, reps: int) -> tuple[float, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    sdpa_ms = cuda_ms(sdpa, reps)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash_ms = cuda_ms(sdpa, reps)
    return sdpa_ms, flash_ms


def check_correctness(device: torch.device) -> list[dict]:
    """bf16 on the GPU: the kernel (dense index) against cuDNN SDPA, and a sparse index against
    the torch reference."""
    from mmsparse.kernels.index import dense_index
    from mmsparse.kernels.reference import reference_sparse_attention

    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for n, hq, hkv, d, offset in [(8192, 28, 4, 128, 0), (3000, 8, 1, 64, 700)]:
        q = torch.randn(1, hq, n - offset, d, device=device, dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, hkv, n, d, device=device, dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, hkv, n, d, device=device, dtype=torch.bfloat16, generator=g)
        order = TokenOrder.causal(n - offset, n, 128, 128, device=device)
        out = sparse_attention(q, k, v, dense_index(order), order)
        mask = torch.ones(n - offset, n, dtype=torch.bool, device=device).tril(offset)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
        rows.append({"check": f"dense index vs SDPA n={n} d={d} offset={offset}", "max_abs": float((out - ref).abs().max())})
    n = 2048
    q = torch.randn(1, 8, n, 128, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 2, n, 128, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 2, n, 128, device=device, dtype=torch.bfloat16, generator=g)
    order = TokenOrder.causal(n, n, 128, 64, device=device)
    for name, index in [("vertical_slash", vertical_slash(q, k, order, vertical=64, slash=64)),
                        ("block_topk", block_topk(q, k, order, top_k=4))]:
        out = sparse_attention(q, k, v, index, order)
        ref, _ = reference_sparse_attention(q, k, v, index, order)
        rows.append({"check": f"{name} vs reference n={n}", "max_abs": float((out.float() - ref).abs().max())})
    return rows


def block_topk_for(density: float, order: TokenOrder):
    """top_k per query block giving about ``density`` of the causal blocks."""
    nq = order.num_q_blocks
    top_k = max(1, round(density * (nq + 1) / 2))
    return lambda q, k: block_topk(q, k, order, top_k=top_k)


def run_length(n: int, args, device, env: dict, peer) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(n)
    q = torch.randn(1, HQ, n, D, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, n, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, n, D, device=device, dtype=torch.bfloat16, generator=g)
    reps = args.reps if n <= 131072 else max(2, args.reps // 2)
    sdpa_ms, flash_ms = dense_baselines(q, k, v, reps)
    dense_flop = 4 * D * causal_pairs(n)
    base = {**{k_: env[k_] for k_ in ("gpu", "torch", "triton")}, "n": n, "sdpa_ms": sdpa_ms, "flash_ms": flash_ms}
    records = [{**base, "pattern": "dense", "backend": "sdpa", "density": 1.0, "ms": sdpa_ms, "index_ms": 0.0,
                "executed_tflops": dense_flop / sdpa_ms / 1e9, "effective_tflops": dense_flop / sdpa_ms / 1e9}]
    bm, bn = args.block

    def record(pattern, backend, density, ms, index_ms, executed):
        rec = {**base, "pattern": pattern, "backend": backend, "density": density, "ms": ms, "index_ms": index_ms,
               "kernel_ms": ms - index_ms, "executed_tflops": 4 * D * executed / max(ms - index_ms, 1e-9) / 1e9,
               "effective_tflops": dense_flop / ms / 1e9, "speedup_vs_sdpa": sdpa_ms / ms}
        records.append(rec)
        print(f"  {pattern:15s} {backend:10s} density {density:6.3f}  {ms:8.2f} ms (index {index_ms:6.2f})  "
              f"x{sdpa_ms / ms:5.1f}  exec {rec['executed_tflops']:5.0f} TF/s", flush=True)

    order = TokenOrder.causal(n, n, bm, bn, device=device)
    cases: list[tuple[str, float | None, Callable]] = []
    for density in args.densities:
        cases.append(("block_topk", density, block_topk_for(density, order)))
    cases.append(("a_shape", None, lambda q, k: a_shape(order, sink=128, local=args.local)))
    # The vertical-slash budget: 1000 top columns + the nearest ``slash`` diagonals (a band).
    cases.append(("vertical_slash", None, lambda q, k: vertical_slash(q, k, order, vertical=1000, slash=args.slash,
                                                                     near_diagonals=args.slash)))
    for pattern, _, build in cases:
        index_ms = cuda_ms(lambda: build(q, k), reps)
        index = build(q, k)
        density = float(executed_pairs(index, order) / causal_pairs(n))
        for backend in args.backends:
            if backend == "flex" and index.columns.shape[-1]:
                continue
            run = (lambda: sparse_attention(q, k, v, index, order)) if backend == "triton" else \
                (lambda: flex_sparse_attention(q, k, v, index, order))
            try:
                ms = cuda_ms(run, reps, warmup=2)
            except Exception as err:  # a backend that cannot run a shape is reported, not fatal
                print(f"  {pattern} {backend}: {type(err).__name__}: {err}"[:300], flush=True)
                continue
            record(pattern, backend, density, ms + index_ms, index_ms, executed_pairs(index, order))
    # Grid: video tokens permuted position-major; 64 tokens per frame, text at both ends.
    per_frame, head = 64, 512
    frames = (n - 2 * head) // per_frame
    spans = [(head, frames, per_frame)]
    perm = grid_permutation(n, spans, device=device)
    porder = permuted_order(perm, 1, bm, bn)
    gindex = grid_index(porder, spans, sink=128, local=2 * frames)
    density = float(executed_pairs(gindex, porder) / causal_pairs(n))
    inverse = inverse_permutation(perm)

    def grid_run():  # permutation and its inverse are part of the attention time
        qp, kp, vp = (t.index_select(2, perm) for t in (q, k, v))
        return sparse_attention(qp, kp, vp, gindex, porder).index_select(1, inverse)

    ms = cuda_ms(grid_run, reps, warmup=2)
    index_ms = cuda_ms(lambda: grid_index(permuted_order(grid_permutation(n, spans, device=device), 1, bm, bn), spans,
                                          sink=128, local=2 * frames), reps)
    record("grid_permuted", "triton", density, ms + index_ms, index_ms, executed_pairs(gindex, porder))
    if peer is not None:
        records += run_peer(peer, q, k, v, n, base, dense_flop, reps, args)
    return records


def run_peer(peer, q, k, v, n: int, base: dict, dense_flop: float, reps: int, args) -> list[dict]:
    """MInference's kernels, run from a folder outside the repository (never committed)."""
    out = []
    nq = -(-n // 64)
    for density in args.densities:
        top_k = max(1, round(density * (nq + 1) / 2))
        try:
            index_ms = cuda_ms(lambda: peer.block_sparse_index(q, k, top_k), reps)
            index = peer.block_sparse_index(q, k, top_k)
            kernel_ms = cuda_ms(lambda: peer.block_sparse_kernel_only(q, k, v, index), reps, warmup=2)
        except Exception as err:
            print(f"  minference block_sparse: {type(err).__name__}: {err}"[:300], flush=True)
            break
        executed = HQ * top_k * nq * 64 * 64
        ms = index_ms + kernel_ms
        out.append({**base, "pattern": "block_topk", "backend": "minference", "density": min(1.0, executed / causal_pairs(n)),
                    "ms": ms, "index_ms": index_ms, "kernel_ms": kernel_ms,
                    "executed_tflops": 4 * D * executed / kernel_ms / 1e9, "effective_tflops": dense_flop / ms / 1e9,
                    "speedup_vs_sdpa": base["sdpa_ms"] / ms})
        print(f"  {'block_topk':15s} {'minference':10s} top_k {top_k:5d}  {ms:8.2f} ms (index {index_ms:6.2f})  "
              f"x{base['sdpa_ms'] / ms:5.1f}", flush=True)
    try:  # the same 1000 columns and diagonal band as ours, through the peer's index conversion and kernel
        order = TokenOrder.causal(n, n, 128, 128, device=q.device)
        ours = vertical_slash(q, k, order, vertical=1000, slash=args.slash, near_diagonals=args.slash)
        v_idx = ours.columns
        s_idx = torch.arange(args.slash - 1, -1, -1, device=q.device, dtype=torch.int32).expand(1, HQ, -1).contiguous()
        seqlens = torch.tensor([n], dtype=torch.int32, device=q.device)
        convert = peer.convert_vertical_slash_indexes
        index_ms = cuda_ms(lambda: convert(seqlens, v_idx, s_idx, n, 64, 64), reps)
        index = convert(seqlens, v_idx, s_idx, n, 64, 64)
        kernel_ms = cuda_ms(lambda: peer.vertical_slash_kernel_only(q, k, v, index), reps, warmup=2)
        ms = index_ms + kernel_ms
        out.append({**base, "pattern": "vertical_slash", "backend": "minference", "density": None, "ms": ms,
                    "index_ms": index_ms, "kernel_ms": kernel_ms, "executed_tflops": None,
                    "effective_tflops": dense_flop / ms / 1e9, "speedup_vs_sdpa": base["sdpa_ms"] / ms})
        print(f"  {'vertical_slash':15s} {'minference':10s}                {ms:8.2f} ms (index {index_ms:6.2f})  "
              f"x{base['sdpa_ms'] / ms:5.1f}", flush=True)
    except Exception as err:
        print(f"  minference vertical_slash: {type(err).__name__}: {err}"[:300], flush=True)
    return out


def tune(n: int, device) -> list[dict]:
    """Sweep block shape, warps, stages, TMA and program order on block_topk at ~5% density."""
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(1, HQ, n, D, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, n, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, n, D, device=device, dtype=torch.bfloat16, generator=g)
    sdpa_ms, _ = dense_baselines(q, k, v, 5)
    dense_tflops = 4 * D * causal_pairs(n) / sdpa_ms / 1e9
    print(f"  n {n}: cuDNN dense {sdpa_ms:.2f} ms = {dense_tflops:.0f} TF/s", flush=True)
    rows = []
    for bm, bn in [(128, 128), (128, 64), (64, 128)]:
        order = TokenOrder.causal(n, n, bm, bn, device=device)
        index = block_topk_for(0.05, order)(q, k)
        per_row = float(index.block_count.float().mean())
        for warps, stages, tma, heads in itertools.product((4, 8), (2, 3, 4), (False, True), (False, True)):
            try:
                ms = cuda_ms(lambda: sparse_attention(q, k, v, index, order, num_warps=warps, num_stages=stages,
                                                      use_tma=tma, heads_fastest=heads), 5, 2)
            except Exception as err:
                print(f"  {bm}x{bn} w{warps} s{stages} tma {tma}: {type(err).__name__}: {err}"[:300], flush=True)
                continue
            tf = 4 * D * executed_pairs(index, order) / ms / 1e9
            rows.append({"n": n, "block": [bm, bn], "warps": warps, "stages": stages, "tma": tma,
                         "heads_fastest": heads, "blocks_per_row": per_row, "ms": ms, "sdpa_ms": sdpa_ms,
                         "executed_tflops": tf, "share_of_cudnn": tf / dense_tflops})
            print(f"  {bm}x{bn} warps {warps} stages {stages} tma {tma:d} heads {heads:d}: {ms:7.2f} ms  {tf:5.0f} TF/s "
                  f"({100 * tf / dense_tflops:4.1f}% of cuDNN dense {dense_tflops:.0f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[32768, 65536, 131072, 262144, 524288])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.015, 0.05, 0.1, 0.2])
    parser.add_argument("--backends", nargs="+", default=["triton", "flex"], choices=["triton", "flex"])
    parser.add_argument("--block", type=int, nargs=2, default=[128, 128], metavar=("BLOCK_M", "BLOCK_N"))
    parser.add_argument("--local", type=int, default=4096, help="A-shape local window")
    parser.add_argument("--slash", type=int, default=6096, help="vertical-slash diagonals")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peer", type=Path, help="folder with MInference's kernels (peer.py), outside git")
    parser.add_argument("--tune", action="store_true", help="only sweep kernel launch parameters")
    parser.add_argument("--check", action="store_true", help="only run the bf16 correctness checks")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU; the CPU tests cover correctness (pytest tests/test_kernels.py)")
    device = torch.device("cuda")
    env = environment()
    print(json.dumps(env), flush=True)
    if args.check:
        rows = check_correctness(device)
        print(json.dumps(rows, indent=1))
        return rows
    if args.tune:
        rows = [{**env, **r} for n in args.n for r in tune(n, device)]
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        for n in args.n:
            best = sorted((r for r in rows if r["n"] == n), key=lambda r: -r["executed_tflops"])[:8]
            for r in best:
                print(f"{n:>7} {r['block'][0]}x{r['block'][1]} w{r['warps']} s{r['stages']} tma {r['tma']:d} "
                      f"heads {r['heads_fastest']:d} {r['blocks_per_row']:5.1f} blocks/row {r['ms']:7.2f} ms "
                      f"{r['executed_tflops']:4.0f} TF/s {100 * r['share_of_cudnn']:4.1f}%")
        return rows
    peer = None
    if args.peer is not None:
        sys.path.insert(0, str(args.peer.resolve()))
        import peer as peer_module  # noqa: PLC0415  (a benchmark-only module outside the repository)

        peer = peer_module
    records: list[dict] = []
    for n in args.n:
        print(f"n = {n}", flush=True)
        try:
            records += run_length(n, args, device, env, peer)
            torch.cuda.empty_cache()
        except torch.OutOfMemoryError as err:
            print(f"  out of memory at n={n}: {err}"[:200], flush=True)
            torch.cuda.empty_cache()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1) + "\n")  # keep what finished
    print_table(records)
    return records


def print_table(records: list[dict]) -> None:
    print(f"\n{'n':>7} {'pattern':15} {'backend':10} {'density':>7} {'ms':>9} {'index':>7} {'x SDPA':>7} {'exec TF/s':>9}")
    for r in records:
        dens = "" if r["density"] is None else f"{r['density']:.3f}"
        idx = "" if r["index_ms"] is None else f"{r['index_ms']:.2f}"
        ex = "" if r["executed_tflops"] is None else f"{r['executed_tflops']:.0f}"
        print(f"{r['n']:>7} {r['pattern']:15} {r['backend']:10} {dens:>7} {r['ms']:9.2f} {idx:>7} "
              f"{r['sdpa_ms'] / r['ms']:7.1f} {ex:>9}")


if __name__ == "__main__":
    main()
