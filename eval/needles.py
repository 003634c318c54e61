"""Needles for VisionNIAH: images with a clear, checkable content and a question with a short answer.

A needle set is a JSON file::

    {"needles": [
      {"name": "red-circle", "render": {"kind": "shape", "shape": "circle", "colour": "red"},
       "question": "What colour is the shape on the card?", "answer": "red", "aliases": []},
      {"name": "my-photo", "image": "photos/cat.png",
       "question": "Which animal is on the card?", "answer": "cat", "aliases": ["a cat"]}
    ]}

``image`` (relative to the JSON file) is any picture of the user's; ``render`` draws a card
(kinds: ``shape`` with ``shape``/``colour``, ``digit`` with ``digit``/``colour``, ``word`` with
``word``/``colour``). ``answer`` is scored by exact match after normalisation, ``aliases``
count too. ``builtin_needles()`` is the default set the toy model was trained on.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmsparse.errors import InvalidInputError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("apple", "river", "house", "tiger", "cloud", "piano", "lemon", "robot")

QUESTIONS = {
    "colour": "What colour is the shape on the card?",
    "shape": "What shape is on the card?",
    "digit": "What number is on the card?",
    "word": "What word is on the card?",
    "caption": "Describe the card.",
}


@dataclass(frozen=True)
class Needle:
    """One needle: how to get its image, the question and the accepted answers."""

    name: str
    question: str
    answer: str
    render: dict[str, Any] | None = None
    image: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if (self.render is None) == (self.image is None):
            raise InvalidInputError(f"needle {self.name!r} needs exactly one of 'render' or 'image'")
        if not self.question.strip() or not self.answer.strip():
            raise InvalidInputError(f"needle {self.name!r} needs a non-empty question and answer")

    def accepts(self, generated: str) -> bool:
        """Exact match of the normalised answer (or an alias)."""
        got = normalize_answer(generated)
        return any(got == normalize_answer(a) for a in (self.answer, *self.aliases))

    def picture(self, size: int, rng: random.Random | None = None, root: Path | None = None) -> np.ndarray:
        """uint8 [size, size, 3]; ``rng`` jitters a rendered card (position, scale, shade)."""
        if self.image is not None:
            return _load_image(Path(root or ".") / self.image, size)
        return render_card(self.render, size, rng)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces: 'The Red.' -> 'red'."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def card_key(render: dict[str, Any]) -> str:
    """A hashable identity of a rendered card (same drawing instructions, same key)."""
    return json.dumps(render, sort_keys=True)


def caption_of(render: dict[str, Any]) -> str:
    """The short caption a rendered card should get."""
    kind = render["kind"]
    if kind == "shape":
        return f"a {render['colour']} {render['shape']}"
    if kind == "digit":
        return f"the number {render['digit']}"
    return f"the word {render['word']}"


def builtin_needles() -> list[Needle]:
    """Every card the toy model knows, each with each question it can answer."""
    needles: list[Needle] = []
    for colour in COLOURS:
        for shape in SHAPES:
            render = {"kind": "shape", "shape": shape, "colour": colour}
            needles.append(Needle(f"{colour}-{shape}-colour", QUESTIONS["colour"], colour, render))
            needles.append(Needle(f"{colour}-{shape}-shape", QUESTIONS["shape"], shape, render))
    colours = list(COLOURS)
    for digit in range(10):
        # Three colours per digit, each colour shared by several digits: the colour alone
        # cannot tell the digit, so a model must read the glyph.
        for shift in (0, 2, 4):
            colour = colours[(digit + shift) % len(colours)]
            render = {"kind": "digit", "digit": digit, "colour": colour}
            needles.append(Needle(f"digit-{digit}-{colour}", QUESTIONS["digit"], str(digit), render, aliases=(DIGIT_WORDS[digit],)))
    return needles


def word_needles() -> list[Needle]:
    """Word cards: renderable for users' needle sets, but kept out of the toy model's training
    set (shapes, colours and digits fit its few-minute training budget)."""
    return [
        Needle(f"word-{word}", QUESTIONS["word"], word, {"kind": "word", "word": word, "colour": list(COLOURS)[i % len(COLOURS)]})
        for i, word in enumerate(WORDS)
    ]


def caption_needles() -> list[Needle]:
    """One captioning needle per distinct card."""
    seen: dict[str, Needle] = {}
    for n in builtin_needles():
        key = card_key(n.render)
        if key not in seen:
            seen[key] = Needle(f"{n.name}-caption", QUESTIONS["caption"], caption_of(n.render), n.render)
    return list(seen.values())


def load_needles(path: str | Path | None = None) -> tuple[list[Needle], Path | None]:
    """Needles from a JSON needle-set file, or the built-in set; returns them and the file's folder."""
    if path is None:
        return builtin_needles(), None
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"needle set {path} not found; pass a JSON file as documented in mmsparse.eval.needles")
    try:
        data = json.loads(path.read_text())
        items = data["needles"]
        needles = [Needle(**{**item, "aliases": tuple(item.get("aliases", ()))}) for item in items]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InvalidInputError(f"needle set {path} is malformed ({err}); see the format in mmsparse.eval.needles") from None
    if not needles:
        raise InvalidInputError(f"needle set {path} holds no needles; add at least one")
    return needles, path.parent


# --------------------------------------------------------------------------- drawing


def render_card(render: dict[str, Any], size: int, rng: random.Random | None = None) -> np.ndarray:
    """Draw a card: a light background with one coloured shape, digit or word on it."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    shade = 235 + rng.randint(-15, 15)
    img = Image.new("RGB", (size, size), (shade, shade, shade - rng.randint(0, 10)))
    draw = ImageDraw.Draw(img)
    colour = COLOURS.get(render.get("colour", "black"))
    if colour is None:
        raise InvalidInputError(f"unknown colour {render.get('colour')!r}; use one of {', '.join(COLOURS)}")
    scale = rng.uniform(0.55, 0.8)
    half = size * scale / 2
    cx = size / 2 + rng.uniform(-1, 1) * (size / 2 - half) * 0.8
    cy = size / 2 + rng.uniform(-1, 1) * (size / 2 - half) * 0.8
    kind = render.get("kind")
    if kind == "shape":
        _draw_shape(draw, render["shape"], cx, cy, half, colour)
    elif kind in ("digit", "word"):
        text = str(render["digit"] if kind == "digit" else render["word"])
        _draw_text(draw, text, cx, cy, half, size, colour)
    else:
        raise InvalidInputError(f"unknown card kind {kind!r}; use shape, digit or word")
    return np.asarray(img, dtype=np.uint8)


def _draw_shape(draw, shape: str, cx: float, cy: float, half: float, colour) -> None:
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = half if k % 2 == 0 else half * 0.45
            angle = np.pi / 2 + k * np.pi / 5
            points.append((cx + radius * np.cos(angle), cy - radius * np.sin(angle)))
        draw.polygon(points, fill=colour)
    else:
        raise InvalidInputError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def _draw_text(draw, text: str, cx: float, cy: float, half: float, size: int, colour) -> None:
    from PIL import ImageFont

    # Fit the text's width to the card: long words get a smaller font.
    font_size = max(8, int(min(2 * half, 1.8 * size / max(len(text), 1))))
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = min(max(cx - (right - left) / 2, 0), size - (right - left)) - left
    y = min(max(cy - (bottom - top) / 2, 0), size - (bottom - top)) - top
    draw.text((x, y), text, font=font, fill=colour)


def _load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise InvalidInputError(f"needle image {path} cannot be read ({type(err).__name__}); check the path in the needle set") from None
