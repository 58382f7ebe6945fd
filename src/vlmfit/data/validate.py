"""Row validation: every way an input row can be unusable, each with a clear reason, and the image fixes that
are safe to make (mode conversion to RGB, EXIF rotation), which are counted but never drop a row."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000; larger images are decompression bombs for a fine-tuning set


class RowProblem(Exception):
    """A row that cannot be used as given: the column at fault and why."""

    def __init__(self, column: str, reason: str):
        self.column, self.reason = column, reason
        super().__init__(f"{column}: {reason}")


@dataclass
class LoadedImage:
    data: bytes  # encoded image, ready for a datasets Image column
    size: tuple[int, int]
    fixes: list[str] = field(default_factory=list)  # e.g. "converted CMYK to RGB", "applied EXIF rotation"


def _open_bytes(value, base_dir: Path, root: Path, column: str) -> tuple[bytes, str]:
    """Raw bytes of an image given as a path (relative to the source file), a {bytes, path} dict, bytes, or a
    decoded PIL image (encoded losslessly as PNG)."""
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue(), "<decoded image>"
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], value.get("path") or "<embedded>"
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "<embedded>"
    if not isinstance(value, str) or not value.strip():
        raise RowProblem(column, "no image (empty value)")
    path = (base_dir / value).resolve()
    if not path.is_relative_to(root.resolve()):
        raise RowProblem(column, f"path '{value}' escapes the dataset root {root}")
    if not path.is_file():
        raise RowProblem(column, f"image file not found: {value}")
    try:
        return path.read_bytes(), value
    except OSError as e:
        raise RowProblem(column, f"unreadable image file {value}: {e.strerror}") from None


def _to_rgb(img: Image.Image, fixes: list[str]) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: PIL's convert("RGB") clips at 255, turning most images white; rescale instead.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img8 = Image.fromarray((arr * (255.0 / hi)).astype("uint8"), mode="L")
        fixes.append(f"rescaled {img.mode} to 8-bit RGB")
        return img8.convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: dropping alpha would expose whatever colour the transparent pixels happen to hold.
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        fixes.append(f"flattened {img.mode} alpha onto white")
        return bg
    fixes.append(f"converted {img.mode} to RGB")
    return img.convert("RGB")


def load_image(value, base_dir: Path, root: Path, column: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read, fully decode and normalise one image; raise RowProblem with the reason if it cannot be used."""
    raw, name = _open_bytes(value, base_dir, root, column)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            w, h = img.size
            if w * h > max_pixels:
                raise RowProblem(column, f"{name} is {w}x{h} = {w * h:,} pixels, over the {max_pixels:,} limit "
                                 "(decompression bomb guard; raise data.max_image_pixels if intended)")
            img.load()  # decode now: truncated or corrupt files fail here, not in the middle of training
    except RowProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RowProblem(column, f"{name} is a decompression bomb (too many pixels)") from None
    except UnidentifiedImageError:
        raise RowProblem(column, f"{name} is not an image file PIL can read (corrupt or unsupported)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RowProblem(column, f"{name} is corrupt or truncated ({e})") from None
    fixes: list[str] = []
    rotated = ImageOps.exif_transpose(img)
    if rotated is not img and rotated.size != img.size or _has_orientation(img):
        fixes.append("applied EXIF rotation")
    rgb = _to_rgb(rotated, fixes)
    if not fixes and img.format in ("PNG", "JPEG"):
        return LoadedImage(raw, rgb.size)  # already fine: keep the original bytes (no re-encoding loss)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return LoadedImage(buf.getvalue(), rgb.size, fixes)


def _has_orientation(img: Image.Image) -> bool:
    try:
        return img.getexif().get(0x0112, 1) not in (1, None)
    except Exception:  # malformed EXIF is not a reason to lose the row
        return False


def require_text(row: dict, column: str | None, what: str) -> str:
    if column is None:
        raise RowProblem(what, f"no {what} column")
    if column not in row:
        raise RowProblem(column, f"missing column '{column}'")
    value = row[column]
    if value is None or (isinstance(value, float) and value != value):
        raise RowProblem(column, f"empty {what}")
    text = str(value).strip()
    if not text:
        raise RowProblem(column, f"empty {what}")
    return text
