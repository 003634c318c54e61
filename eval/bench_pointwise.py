"""Benchmark the fused per-token kernels against the stock modules they stand in for (GPU).

    python -m mmsparse.eval.bench_pointwise            # one 32K-token chunk at Qwen2.5-VL-7B widths

Times, in one process, a stock ``Qwen2RMSNorm`` against ``kernels.pointwise.rms_norm`` on
[tokens, 3584], a residual add and that norm against ``add_rms_norm`` (a decoder layer's second
norm, as ``FusedResidualBlock`` runs it), and a stock ``Qwen2MLP``'s ``silu(gate) * up`` against ``silu_mul`` on
[tokens, 18944] (the GEMMs around it are the same in both and are left out), plus the whole MLP
both ways. Reports milliseconds and the bytes each moves per second (the fused kernels read and
write each element once). Writes ``eval/results/pointwise.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mmsparse.eval.bench_kernels import cuda_ms
from mmsparse.eval.dense_smoke import environment

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, INTERMEDIATE = 3584, 18944


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "pointwise.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_pointwise needs a CUDA GPU")
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

    from mmsparse.kernels.pointwise import add_rms_norm, rms_norm, silu_mul
    from mmsparse.prefill.chunking import fused

    env = environment()
    cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, hidden_act="silu")
    norm = Qwen2RMSNorm(HIDDEN, eps=1e-6).to("cuda", torch.bfloat16)
    mlp = Qwen2MLP(cfg).to("cuda", torch.bfloat16)
    fused_mlp = fused(mlp)
    records = []
    for tokens in args.tokens:
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
        y = torch.randn_like(x)
        gate = torch.randn(tokens, INTERMEDIATE, device="cuda", dtype=torch.bfloat16)
        up = torch.randn_like(gate)
        act = mlp.act_fn
        cases = {
            "rms_norm": (lambda: norm(x), lambda: rms_norm(x, norm.weight, norm.variance_epsilon), 2 * x.nbytes),
            "add_rms_norm": (lambda: norm(x + y), lambda: add_rms_norm(x, y, norm.weight, norm.variance_epsilon),
                             4 * x.nbytes),
            "silu_mul": (lambda: act(gate) * up, lambda: silu_mul(gate, up), 3 * gate.nbytes),
            "mlp": (lambda: mlp(x), lambda: fused_mlp(x), None),
        }
        with torch.inference_mode():
            for name, (stock, fast, moved) in cases.items():
                stock_ms, fused_ms = cuda_ms(stock, args.reps), cuda_ms(fast, args.reps)
                rec = {**env, "op": name, "tokens": tokens, "stock_ms": stock_ms, "fused_ms": fused_ms,
                       "speedup": stock_ms / fused_ms}
                if moved is not None:
                    rec["fused_gb_per_s"] = moved / fused_ms / 1e6
                records.append(rec)
                print(json.dumps(rec), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\n{'op':>12} {'tokens':>7} {'stock ms':>9} {'fused ms':>9} {'x':>5} {'GB/s':>6}")
    for r in records:
        rate = f"{r['fused_gb_per_s']:6.0f}" if "fused_gb_per_s" in r else f"{'-':>6}"
        print(f"{r['op']:>12} {r['tokens']:>7} {r['stock_ms']:9.2f} {r['fused_ms']:9.2f} {r['speedup']:5.2f} {rate}")
    return records


if __name__ == "__main__":
    main()
