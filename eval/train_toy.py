"""Train the toy VLM: a small Qwen2.5-VL that finds needles in long haystacks of real clips.

    python -m mmsparse.eval.train_toy --out mmsparse/toy_model --minutes 7 --seed 0
    python -m mmsparse.eval.train_toy --out DIR --steps 1800 --seed 0     # reproduce a run exactly
    python -m mmsparse.eval.train_toy --out DIR --init mmsparse/toy_model --curriculum-start 1 --lr 3e-4  # fine-tune

The model is a stock ``Qwen2_5_VLForConditionalGeneration`` (4 LLM layers, hidden 256, GQA 4/2,
a 4-block vision tower) with an offline BPE tokenizer; frames are 112x112, so one temporal
group of 2 frames is 16 LLM tokens. Tasks: questions about a card (shape colour, shape, digit,
word) inserted as one temporal group at a random depth in a haystack of real clips, and short
captions of the card. A length curriculum grows haystacks from 1 to 512 groups (16 to 8192
video tokens); the sampled-fps of each video varies so M-RoPE temporal positions seen in
training cover those of longer videos. Batches are built on the device (no processor in the
loop); ``patchify`` reproduces the processor's pixel layout exactly (tested).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mmsparse.vision_attention import use_packed_vision_attention

from .haystack import Haystack
from .needles import Needle, builtin_needles, caption_needles, card_key

FRAME = 112
TOKENS_PER_GROUP = (FRAME // 28) ** 2
TOY_NAME = "mmsparse/toy-qwen2.5-vl"
TOY_TEXT = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=65536,
    rope_theta=10000.0,
    rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
)
TOY_VISION = dict(
    depth=4,
    hidden_size=128,
    intermediate_size=256,
    num_heads=4,
    out_hidden_size=256,
    window_size=112,
    fullatt_block_indexes=[1, 3],
    tokens_per_second=2,
)


def build_toy(seed: int = 0):
    """Fresh (untrained) toy model and its processor."""
    from mmsparse.testing import QWEN_SPECIAL_TOKENS, build_qwen2_5_vl, build_tokenizer

    corpus = " ".join(f"{n.question} {n.answer} {' '.join(n.aliases)}" for n in builtin_needles() + caption_needles())
    tokenizer = build_tokenizer(QWEN_SPECIAL_TOKENS, vocab_size=640, corpus=corpus)
    model, processor = build_qwen2_5_vl(tokenizer, TOY_TEXT, TOY_VISION, seed=seed, frame_pixels=FRAME * FRAME)
    return model.train(), processor


def patchify(frames: torch.Tensor, mean: list[float], std: list[float], patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> the processor's ``pixel_values_videos`` [T/2 * H/14 * W/14, 3*2*14*14]."""
    t, h, w, c = frames.shape
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean, device=x.device).view(1, c, 1, 1)) / torch.tensor(std, device=x.device).view(1, c, 1, 1)
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = x.view(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch)


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    answer_mask: torch.Tensor  # [B, L] True where a label token sits


class TaskSampler:
    """Builds training and validation batches on the device."""

    def __init__(self, processor, device: torch.device, crop: str = "random", variants: int = 64, seed: int = 0,
                 digit_share: float | None = None) -> None:
        self.device = device
        self.digit_share = digit_share
        self.tok = processor.tokenizer
        vp = processor.video_processor
        self.mean, self.std = list(vp.image_mean), list(vp.image_std)
        self.haystack = Haystack(FRAME, fps=25.0, crop=crop)
        self.haystack.clips = [clip.to(device) for clip in self.haystack.clips]
        self.tasks: list[Needle] = builtin_needles() + caption_needles()
        cards = {card_key(n.render) for n in self.tasks}
        self.card_keys = sorted(cards)
        rng = random.Random(seed)
        pictures = [
            torch.from_numpy(Needle("c", "q", "a", render=json.loads(key)).picture(FRAME, rng).copy())
            for key in self.card_keys
            for _ in range(variants)
        ]
        self.cards = torch.stack(pictures).to(device).view(len(self.card_keys), variants, FRAME, FRAME, 3)
        self.card_of_task = [self.card_keys.index(card_key(n.render)) for n in self.tasks]
        self.video_pad = self.tok.convert_tokens_to_ids("<|video_pad|>")
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.pad = self.tok.convert_tokens_to_ids("<|endoftext|>")
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "{Q}"}]}],
            add_generation_prompt=True, tokenize=False,
        )
        self.before_video, rest = prompt.split("<|video_pad|>")
        self.prefix = self.tok(self.before_video)["input_ids"]
        self.encoded = [
            (self.tok(rest.replace("{Q}", n.question))["input_ids"], self.tok(n.answer)["input_ids"] + [self.im_end])
            for n in self.tasks
        ]

    def batch(self, groups: int, size: int, rng: random.Random) -> Batch:
        frames, ids, masks = [], [], []
        spgs = []
        digits = [i for i, n in enumerate(self.tasks) if n.render["kind"] == "digit"]
        for _ in range(size):
            if self.digit_share is not None and rng.random() < self.digit_share:
                task = rng.choice(digits)
            else:
                task = rng.randrange(len(self.tasks))
            card = self.cards[self.card_of_task[task], rng.randrange(self.cards.shape[1])]
            hay = self.haystack.frames(groups * 2, seed=rng.randrange(2**31))
            where = rng.randrange(groups)
            hay[2 * where : 2 * where + 2] = card
            frames.append(patchify(hay, self.mean, self.std))
            suffix, answer = self.encoded[task]
            seq = self.prefix + [self.video_pad] * (groups * TOKENS_PER_GROUP) + suffix + answer
            ids.append(seq)
            masks.append([False] * (len(seq) - len(answer)) + [True] * len(answer))
            spgs.append(rng.choice((0.5, 1.0, 2.0, 4.0)))
        length = max(len(s) for s in ids)
        input_ids = torch.full((size, length), self.pad, dtype=torch.long)
        answer_mask = torch.zeros((size, length), dtype=torch.bool)
        for i, (seq, mask) in enumerate(zip(ids, masks)):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            answer_mask[i, : len(mask)] = torch.tensor(mask)
        input_ids = input_ids.to(self.device)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),  # padding sits after the answers: causal attention never sees it
            "mm_token_type_ids": (input_ids == self.video_pad).int() * 2,
            "pixel_values_videos": torch.cat(frames),
            "video_grid_thw": torch.tensor([[groups, FRAME // 14, FRAME // 14]] * size, device=self.device),
            "second_per_grid_ts": torch.tensor(spgs, device=self.device),
        }
        return Batch(inputs, answer_mask.to(self.device))


def answer_loss(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over answer tokens, and per-sample exact match of greedy answers."""
    logits = model(**batch.inputs).logits[:, :-1].float()
    target = batch.inputs["input_ids"][:, 1:]
    mask = batch.answer_mask[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    loss = (ce * mask).sum() / mask.sum()
    correct = ((logits.argmax(-1) == target) | ~mask).all(dim=1)
    return loss, correct


def groups_at(progress: float, rng: random.Random, longest: int) -> int:
    """Length curriculum. Retrieval is only learnable from short videos first: with one or two
    groups the card's features reach the answer by plain averaging, and attention then sharpens
    as haystacks grow. The cap grows geometrically from 1 to ``longest`` by 75% of training;
    lengths are log-uniform in [cap / 8, cap], so short videos keep being seen."""
    cap = longest ** min(1.0, progress / 0.75)
    low = max(1.0, cap / 8)
    return max(1, round(math.exp(rng.uniform(math.log(low), math.log(max(cap, low))))))


@torch.no_grad()
def validate(model, sampler: TaskSampler, groups_list: list[int], samples: int, seed: int = 1234) -> dict[int, float]:
    model.eval()
    out = {}
    for groups in groups_list:
        rng = random.Random(seed + groups)
        correct = 0
        per = max(1, min(samples, 16384 // (groups * TOKENS_PER_GROUP)))
        done = 0
        while done < samples:
            n = min(per, samples - done)
            with torch.autocast(sampler.device.type, dtype=torch.bfloat16):
                _, ok = answer_loss(model, sampler.batch(groups, n, rng))
            correct += int(ok.sum())
            done += n
        out[groups * TOKENS_PER_GROUP] = correct / samples
    model.train()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=7.0, help="train for this long (ignored with --steps)")
    parser.add_argument("--steps", type=int, help="exact number of steps (reproduces a run)")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--longest", type=int, default=512, help="longest haystack in temporal groups (16 tokens each)")
    parser.add_argument("--val-samples", type=int, default=48)
    parser.add_argument("--init", type=Path, help="start from this saved toy model (fine-tuning)")
    parser.add_argument("--digit-share", type=float, help="share of samples that ask about digit cards")
    parser.add_argument("--variants", type=int, default=64, help="jittered renderings of each card in training")
    parser.add_argument("--curriculum-start", type=float, default=0.0,
                        help="length-curriculum progress at step 0, in [0, 1]; 1 samples the full range from the start "
                             "(fine-tuning with --init)")
    parser.add_argument("--val-groups", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    args = parser.parse_args(argv)
    if not 0.0 <= args.curriculum_start <= 1.0:
        parser.error("--curriculum-start must be in [0, 1]")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    random.seed(args.seed)
    rng = random.Random(args.seed)
    model, processor = build_toy(args.seed)
    if args.init is not None:
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    use_packed_vision_attention(model)  # one SDPA call per layer instead of one per frame pair
    model.to(device).train()
    sampler = TaskSampler(processor, device, crop="random", variants=args.variants, seed=args.seed,
                          digit_share=args.digit_share)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    planned = args.steps or 10**9
    budget = args.minutes * 60
    start, step, log = time.perf_counter(), 0, []
    while step < planned:
        elapsed = time.perf_counter() - start
        progress = step / planned if args.steps else elapsed / budget
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        groups = groups_at(args.curriculum_start + (1.0 - args.curriculum_start) * progress, rng, args.longest)
        size = max(1, min(64, args.tokens_per_step // (groups * TOKENS_PER_GROUP)))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, correct = answer_loss(model, sampler.batch(groups, size, rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            entry = {"step": step, "s": round(time.perf_counter() - start, 1), "groups": groups, "batch": size,
                     "loss": round(float(loss), 4), "acc": round(float(correct.float().mean()), 3), "lr": round(lr, 6)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    train_s = time.perf_counter() - start
    val = validate(model, TaskSampler(processor, device, crop="center", seed=args.seed + 1),
                   args.val_groups, args.val_samples)
    print("validation exact match by video tokens:", json.dumps(val), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.vision_config._attn_implementation = "sdpa"  # the shipped model uses stock attention
    model.to(torch.bfloat16).save_pretrained(args.out)
    processor.save_pretrained(args.out)
    record = {
        "name": TOY_NAME,
        "note": "toy model for offline demos and tests, not a general VLM",
        "seed": args.seed,
        "steps": step,
        "train_seconds": round(train_s, 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "init": str(args.init) if args.init else None,
        "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "validation_exact_match": val,
        "args": {k: str(v) for k, v in vars(args).items()},
        "log": log,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
