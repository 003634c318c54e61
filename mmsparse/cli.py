"""Command line: ``mmsparse qa VIDEO "question" [--model M] [--sparse PRESET] [--fps ...]``,
``mmsparse vniah [--model M] [--frames N ...] [--depths D ...] [--configs dense ...]`` and
``mmsparse search --videos V ... [--model M]`` (offline sparse-prefill pattern search).

Answers and stats go to stdout (``--json`` for machine output); logs go to stderr. Bad input
prints one line ``error: ...`` and exits non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from .errors import MMSparseError

log = logging.getLogger("mmsparse")


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("video sampling (qwen-vl-utils semantics)")
    g.add_argument("--fps", type=float, help="frames per second to sample (default 2; not with --nframes)")
    g.add_argument("--nframes", type=int, help="exact number of frames to sample (not with --fps)")
    g.add_argument("--min-frames", type=int, help="lower bound on sampled frames (default 4)")
    g.add_argument("--max-frames", type=int, help="upper bound on sampled frames (default 768)")
    g.add_argument("--min-pixels", type=int, help="lower bound on pixels per frame")
    g.add_argument("--max-pixels", type=int, help="upper bound on pixels per frame")
    g.add_argument("--total-pixels", type=int, help="pixel budget over all frames")
    g.add_argument("--start", type=float, help="start of the window, seconds")
    g.add_argument("--end", type=float, help="end of the window, seconds")
    g.add_argument("--video-backend", choices=["decord", "torchcodec", "av", "cv2"], help="force a decoder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmsparse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    qa = sub.add_parser("qa", help="answer a question about a video")
    qa.add_argument("video", help="path of a video file, or sample:NAME for a bundled clip (sample:bigbuckbunny)")
    qa.add_argument("question", help="the question to ask")
    qa.add_argument("--model", help="hub id, local path, or mmsparse/toy-qwen2.5-vl (default: that toy model, offline demos only)")
    qa.add_argument("--sparse", default="dense", help="preset: dense, balanced, fast (default: dense)")
    qa.add_argument("--max-new-tokens", type=int, default=64)
    qa.add_argument("--system-prompt")
    qa.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    qa.add_argument("--dtype", help="bfloat16, float16, float32 (default: bf16 on cuda, fp32 on cpu)")
    qa.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    qa.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    _add_sampling(qa)
    _add_vniah(sub)
    return parser


def _add_vniah(sub: argparse._SubParsersAction) -> None:
    # Unset options fall through to run_vniah's defaults (the help repeats them; importing
    # mmsparse.eval.vniah here would load torch for every command).
    v = sub.add_parser(
        "vniah",
        help="VisionNIAH: needle-in-a-video-haystack accuracy grid, several configs on the same inputs",
        description="Needle picture at depth d in a haystack of N frames; exact match, log-likelihood, TTFT, "
        "peak memory per config; JSON + heatmap PNG per config and a summary under --out-dir.",
    )
    v.add_argument("--model", help="hub id, local path, or mmsparse/toy-qwen2.5-vl (the default)")
    v.add_argument("--frames", type=int, nargs="+", metavar="N",
                   help="haystack lengths in frames, even, >= 2 (default: 64 128 256 512 1024)")
    v.add_argument("--depths", type=float, nargs="+", metavar="D",
                   help="needle depths in [0, 1] (default: 0 0.25 0.5 0.75 1)")
    v.add_argument("--needles-per-cell", type=int, metavar="K", help="needles per (frames, depth) cell (default: 2)")
    v.add_argument("--configs", nargs="+", metavar="PRESET",
                   help="presets to compare on the same inputs (default: every preset whose stages are built)")
    v.add_argument("--needle-set", metavar="FILE", help="needle-set JSON (format: mmsparse.eval.needles; default: built-in cards)")
    v.add_argument("--haystack", nargs="+", metavar="VIDEO", help="haystack source videos (default: the bundled real clips)")
    v.add_argument("--size", type=int, help="frame side in pixels (default: 112)")
    v.add_argument("--seed", type=int, help="master seed: every cell is rebuilt from it (default: 0)")
    v.add_argument("--max-new-tokens", type=int, help="greedy answer length cap (default: 8)")
    v.add_argument("--out-dir", help="where JSON and PNG files go (default: eval/results/ of the package)")
    v.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    v.add_argument("--dtype", help="bfloat16, float16, float32 (default: bf16 on cuda, fp32 on cpu)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    v.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of the table")
    v.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")

    s = sub.add_parser(
        "search",
        help="offline sparse-prefill pattern search: per layer and head, the cheapest pattern that keeps the attention",
        description="Runs the model's exact forward on each video and scores every candidate pattern against the "
        "exact attention of sampled video rows; writes a JSON plan the prefill stage uses (PrefillConfig(plan=...)).",
    )
    s.add_argument("--model", help="hub id, local path, or mmsparse/toy-qwen2.5-vl (the default)")
    s.add_argument("--videos", nargs="+", required=True, metavar="VIDEO", help="videos to search on (sample:NAME works)")
    s.add_argument("--question", default="Describe the video.", help="question of the prompt")
    s.add_argument("--preset", default="balanced", help="preset whose prefill rule (gamma, max_error) decides")
    s.add_argument("--sample-queries", type=int, default=256, help="video rows whose exact attention is measured")
    s.add_argument("--out", help="plan JSON (default: eval/results/search-<model>.json)")
    s.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    s.add_argument("--dtype", help="bfloat16, float16, float32")
    s.add_argument("--json", action="store_true", help="print the plan JSON instead of the per-layer summary")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    _add_sampling(s)

_SAMPLING_ARGS = ("fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels", "start", "end")


def _model_or_default(model: str | None) -> str:
    """The model to load; without --model, the toy model, labelled as such on stderr."""
    from .loading import DEFAULT_MODEL, describe

    if model is None:
        model = DEFAULT_MODEL
        log.warning("no --model given: using %s", describe(model))
    return model


def _resolve_video(video: str) -> str:
    """``sample:NAME`` -> the bundled clip's path; anything else unchanged."""
    if video.startswith("sample:"):
        from .media import sample_video

        return str(sample_video(video.removeprefix("sample:")))
    return video


def run_qa(args: argparse.Namespace) -> dict[str, Any]:
    from .pipelines import pipeline

    model = _model_or_default(args.model)
    video = _resolve_video(args.video)
    sampling = {k: getattr(args, k) for k in _SAMPLING_ARGS if getattr(args, k) is not None}
    log.info("loading %s", model)
    pipe = pipeline("video-qa", model=model, sparse=args.sparse, device=args.device, dtype=args.dtype)
    log.info("answering")
    out = pipe(
        video,
        args.question,
        max_new_tokens=args.max_new_tokens,
        system_prompt=args.system_prompt,
        video_backend=args.video_backend,
        **sampling,
    )
    out["model"] = str(model)
    return out


def run_vniah(args: argparse.Namespace) -> dict[str, Any]:
    from .eval.vniah import RESULTS_DIR
    from .eval.vniah import run_vniah as run

    _model_or_default(args.model)
    given = {
        "frames": args.frames,
        "depths": args.depths,
        "needles_per_cell": args.needles_per_cell,
        "size": args.size,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
    }
    return run(
        model=args.model,
        configs=args.configs,
        needles=args.needle_set,
        haystack=args.haystack,
        out_dir=args.out_dir or RESULTS_DIR,
        progress=not args.no_progress,
        device=args.device,
        dtype=args.dtype,
        **{k: v for k, v in given.items() if v is not None},
    )


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace
    from pathlib import Path

    from .config import PRESETS
    from .errors import ConfigError
    from .eval.vniah import RESULTS_DIR, model_slug
    from .loading import load
    from .prefill.search import search_patterns

    preset = PRESETS.get(args.preset)
    if preset is None or preset.prefill is None:
        raise ConfigError(f"--preset {args.preset!r} has no prefill stage; use one of "
                          f"{', '.join(n for n, c in PRESETS.items() if c.prefill is not None)}")
    model = _model_or_default(args.model)
    videos = [_resolve_video(video) for video in args.videos]
    adapter = load(model, device=args.device, dtype=args.dtype)
    sampling = {k: getattr(args, k) for k in _SAMPLING_ARGS if getattr(args, k) is not None}
    plan = search_patterns(adapter, videos, question=args.question, config=replace(preset.prefill, min_length=0),
                           sampling=sampling, sample_queries=args.sample_queries)
    out = Path(args.out) if args.out else Path(RESULTS_DIR) / f"search-{model_slug(str(model))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plan, indent=1) + "\n")
    plan["out"] = str(out)
    return plan


def _print_search(plan: dict[str, Any]) -> None:
    log.info("wrote %s", plan["out"])
    for layer, labels in plan["layers"].items():
        print(f"layer {layer}: " + " ".join(labels))


def _print_vniah(summary: dict[str, Any]) -> None:
    from .eval.vniah import format_table

    log.info("wrote %s", ", ".join(f"{c['json']}, {c['png']}" for c in summary["configs"]) + f" under {summary['out_dir']}")
    print(format_table(summary))  # last thing on stdout


def _print_text(out: dict[str, Any]) -> None:
    print(out["answer"])
    stats = out["stats"]
    parts = []
    for key, value in stats.items():
        if isinstance(value, float):
            value = f"{value:.3f}"
        parts.append(f"{key}={value}")
    print("stats: " + " ".join(parts))


def _log_to_stderr(level: int) -> None:
    """mmsparse's own logs go to stderr, whatever the root logger does."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[mmsparse] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    run, show = {"qa": (run_qa, _print_text), "vniah": (run_vniah, _print_vniah),
                 "search": (run_search, _print_search)}[args.command]
    try:
        out = run(args)
    except MMSparseError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if args.json:
        print(json.dumps(out, default=str))
    else:
        show(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
