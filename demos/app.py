"""Gradio long-video QA demo.

    pip install -e ".[demo]"
    python demos/app.py [--model M] [--port 7860]

Upload a video (or pick a bundled real clip), ask a question, get the answer and the stats
(prompt and video tokens, time to first token, decode speed, peak memory). Without --model it
serves the bundled toy model, which only knows cards with shapes, colours and digits: it is for
trying the app offline, not a general VLM. One model is shared by all sessions; each request
runs the pipeline with its own state.
"""

from __future__ import annotations

import argparse
from typing import Any

from mmsparse.errors import MMSparseError
from mmsparse.loading import DEFAULT_MODEL, describe
from mmsparse.media import SAMPLE_VIDEOS, sample_video


def answer(pipe: Any, video: str | None, sample: str | None, question: str, fps: float, max_frames: int) -> tuple[str, str]:
    """One request: (answer, stats as Markdown). Bad input comes back as a one-line message."""
    source = video or (str(sample_video(sample)) if sample else None)
    if source is None:
        return "", "**error:** upload a video or pick a sample clip"
    try:
        out = pipe(source, question, fps=float(fps), max_frames=int(max_frames), max_new_tokens=64)
    except MMSparseError as err:
        return "", f"**error:** {err}"
    stats = out["stats"]
    rows = [
        ("prompt tokens", stats["prompt_tokens"]),
        ("video tokens", stats["video_tokens"]),
        ("time to first token", f"{stats['ttft_s']:.2f} s"),
        ("decode speed", f"{stats['decode_tokens_per_s']:.1f} tok/s" if stats["decode_tokens_per_s"] else "-"),
        ("peak memory", f"{stats['peak_memory_gb']:.2f} GB ({stats['memory_kind']})"),
    ]
    return out["answer"], "\n".join(["| stat | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def build_app(pipe: Any, model_name: str):
    import gradio as gr

    with gr.Blocks(title="mmsparse long-video QA") as app:
        gr.Markdown(f"# mmsparse long-video QA\nModel: {describe(model_name)}")
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="video", sources=["upload"])
                sample = gr.Dropdown(choices=list(SAMPLE_VIDEOS), value=SAMPLE_VIDEOS[0], label="or a bundled clip")
                question = gr.Textbox(label="question", value="What colour is the shape on the card?")
                with gr.Row():
                    fps = gr.Slider(0.5, 8.0, value=2.0, step=0.5, label="sampled fps")
                    max_frames = gr.Slider(4, 768, value=256, step=2, label="max frames")
                ask = gr.Button("Ask", variant="primary")
            with gr.Column():
                reply = gr.Textbox(label="answer")
                stats = gr.Markdown()
        ask.click(lambda *a: answer(pipe, *a), [video, sample, question, fps, max_frames], [reply, stats], api_name="answer")
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="mmsparse long-video QA demo")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)

    import mmsparse

    pipe = mmsparse.pipeline("video-qa", model=args.model, device=args.device)
    build_app(pipe, args.model).queue().launch(server_port=args.port)


if __name__ == "__main__":
    main()
