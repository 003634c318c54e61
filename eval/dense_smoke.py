"""Dense pipeline smoke benchmark on a GPU: a Qwen2.5-VL-7B-shaped model over a long real video.

    python -m mmsparse.eval.dense_smoke [--frames 256 512 768] [--side 448]

Decodes the real Big Buck Bunny clip, loops it (forward, then mirrored) to the frame counts
asked, and runs the dense ``video-qa`` pipeline at side x side pixels. Prints a table and writes
``eval/results/dense_smoke.json`` with the GPU name, versions, TTFT and peak memory.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def long_clip(frames_needed: int, side: int) -> torch.Tensor:
    """uint8 [T, side, side, 3] frames: the real clip, looped forward and mirrored."""
    from mmsparse.media import sample_video
    from mmsparse.video import SamplingOptions, load_video

    clip = load_video(
        sample_video("bigbuckbunny"),
        SamplingOptions(nframes=132, min_pixels=side * side, max_pixels=side * side),
        size_factor=None,
    ).frames  # [T, C, H, W] at the source size
    clip = torch.nn.functional.interpolate(clip.float(), size=(side, side), mode="bilinear", antialias=True)
    clip = clip.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    loop = torch.cat([clip, clip.flip(2)])
    reps = -(-frames_needed // loop.shape[0])
    return loop.repeat(reps, 1, 1, 1)[:frames_needed].contiguous()


def environment() -> dict:
    import transformers
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton.__version__,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[256, 512, 768])
    parser.add_argument("--side", type=int, default=448)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "dense_smoke.json")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: checks the script, not a result")
    args = parser.parse_args(argv)

    from mmsparse.pipelines import VideoQAPipeline

    from .shapes import qwen2_5_vl_7b

    env = environment()
    if args.tiny:
        from mmsparse.testing import tiny_qwen2_5_vl

        model, processor = tiny_qwen2_5_vl(max_position_embeddings=128000)
    else:
        model, processor = qwen2_5_vl_7b("cuda")
    pipe = VideoQAPipeline(model, processor, device=model.device)
    pixels = args.side * args.side
    rows = []
    for n in args.frames:
        frames = long_clip(n, args.side)
        shape = "tiny (random weights, fp32, CPU check)" if args.tiny else "qwen2.5-vl-7b-shape (random weights, bf16)"
        record = {**env, "model": shape, "frames": n, "side": args.side}
        try:
            runs = [
                pipe(frames, "What happens in this video?", nframes=n, min_pixels=pixels, max_pixels=pixels,
                     max_frames=n, source_fps=25.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
                for _ in range(args.repeats + 1)
            ][1:]  # the first run warms up kernels and the allocator
        except torch.OutOfMemoryError as err:
            record["error"] = f"out of memory: {str(err).splitlines()[0]}"
            rows.append(record)
            torch.cuda.empty_cache()
            continue
        best = min(runs, key=lambda r: r["stats"]["ttft_s"])["stats"]
        record.update(
            prompt_tokens=best["prompt_tokens"],
            video_tokens=best["video_tokens"],
            ttft_s=best["ttft_s"],
            ttft_s_runs=[r["stats"]["ttft_s"] for r in runs],
            decode_tokens_per_s=best["decode_tokens_per_s"],
            peak_memory_gb=max(r["stats"]["peak_memory_gb"] for r in runs),
            preprocess_s=best["preprocess_s"],
            video_decode_s=best["video_decode_s"],
        )
        rows.append(record)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{env['gpu']}, torch {env['torch']}, transformers {env['transformers']}")
    print(f"{'frames':>7} {'video tok':>10} {'prompt tok':>11} {'TTFT s':>8} {'decode tok/s':>13} {'peak GB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['frames']:>7} {r['error']}")
        else:
            print(f"{r['frames']:>7} {r['video_tokens']:>10} {r['prompt_tokens']:>11} {r['ttft_s']:>8.2f} "
                  f"{r['decode_tokens_per_s']:>13.1f} {r['peak_memory_gb']:>8.1f}")
    return rows


if __name__ == "__main__":
    main()
