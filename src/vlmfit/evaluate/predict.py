"""`vlmfit predict`: batched generation (greedy, stops at the end of the turn) with any model vlmfit can load: a hub
id or local directory (an export), `tiny:<family>`, a run directory or one of its checkpoints, on the user's own
images and videos (frames sampled with PyAV as for training) or on a data source's rows, written as JSONL."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from vlmfit.chat.collate import VisionChatCollator
from vlmfit.chat.schema import chat_example, final_answer, message_text, prompt_of
from vlmfit.config import DataConfig
from vlmfit.errors import UserError
from vlmfit.evaluate.classification import eval_mode, generate_answers

DEFAULT_PROMPT = "Describe this image."
DEFAULT_VIDEO_PROMPT = "Describe this video."
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".gif"}


def load_target(target: str):
    """(model, processor, family) of a run directory (its trained weights), a checkpoint, or a model reference."""
    from vlmfit.models.load import check_model, is_dual_encoder, load
    from vlmfit.rundir import CONFIG, RunDir

    path = Path(target)
    if path.is_dir() and (path / CONFIG).is_file():
        trained = RunDir.open(path).load_trained()
        if trained.kind == "prompt":
            raise UserError("a prompt-tuning run tunes a CLIP classifier: it does not generate text", where=target,
                            hint="score it with `vlmfit eval RUN_DIR`")
        return trained.model, trained.processor, trained.family
    _, model_type = check_model(target, chat=False)
    if is_dual_encoder(model_type):
        raise UserError(f"'{target}' is a CLIP dual encoder: it classifies, it does not generate text", where=target,
                        hint="score it with `vlmfit eval`")
    loaded = load(target)
    return loaded.model, loaded.processor, loaded.family


def image_examples(paths: list[Path], prompt: str) -> tuple[list[dict], list[dict]]:
    """One example per image (decoded with vlmfit's validation: pixel cap, modes, EXIF), and what to report of it."""
    from PIL import Image

    from vlmfit.data.validate import RowProblem, load_image

    examples, meta = [], []
    for p in paths:
        p = Path(p).expanduser()
        try:
            img = load_image(p.name, p.parent, p.parent, "image")
        except RowProblem as e:
            raise UserError(e.reason, where=str(p), hint="give image files PIL can read") from None
        import io

        examples.append(chat_example(prompt, "", [Image.open(io.BytesIO(img.data)).convert("RGB")]))
        meta.append({"image": str(p), "prompt": prompt})
    return examples, meta


def is_video(path: Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def video_examples(paths: list[Path], prompt: str, family, fps: float, max_frames: int | None) -> tuple[list[dict], list[dict]]:
    """One example per video: frames sampled at `fps` (at most `max_frames`, an even count for Qwen's temporal
    patch), with their timing, as data/prepare.py samples a training video."""
    from vlmfit.data.video import sample_frames, video_example
    from vlmfit.models.families import video_frame_multiple

    if not family.video_token:
        raise UserError(f"the {family.name} family takes images, not videos", where=str(paths[0]),
                        hint="give images, or a model that reads videos (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, SmolVLM2, Gemma 4)")
    examples, meta = [], []
    for p in paths:
        p = Path(p).expanduser()
        clip = sample_frames(p, fps=fps, max_frames=max_frames, multiple_of=video_frame_multiple())  # as prepare samples
        ex = video_example(prompt, "", clip)
        ex["video_meta"] = [{"fps": clip.source_fps, "duration": clip.duration, "timestamps": list(clip.timestamps)}]
        examples.append(ex)
        meta.append({"video": str(p), "prompt": prompt, "frames": len(clip.frames)})
    return examples, meta


def data_examples(source: str, split: str, limit: int | None, prompt: str | None, task: str | None = None) -> tuple[list[dict], list[dict]]:
    """The rows of a data source's split (prepared on the fly like a recipe's data), with their references."""
    from vlmfit.data.prepare import load_dataset_source

    data = load_dataset_source(DataConfig(source=source, **({"task": task} if task else {})))
    if split not in data:
        raise UserError(f"the data has no '{split}' split (has: {', '.join(data)})", where="--split")
    ds = data[split]
    n = min(limit or len(ds), len(ds))
    examples, meta = [], []
    for i in range(n):
        ex = ds[i]
        messages = prompt_of(ex["messages"])
        if prompt is not None:  # the user's question instead of the row's, on the row's images
            messages = [m for m in messages if m["role"] == "system"] + [
                {"role": "user", "content": [p for p in messages[-1]["content"] if p["type"] in ("image", "video")] + [{"type": "text", "text": prompt}]}]
        examples.append({"messages": messages + [{"role": "assistant", "content": [{"type": "text", "text": ""}]}],
                         "images": list(ex.get("images") or []),
                         **{k: ex[k] for k in ("videos", "video_meta") if ex.get(k)}})
        meta.append({"row": i, "prompt": message_text(messages[-1]), "reference": final_answer(ex["messages"])})
    return examples, meta


def predict(target: str, images: list[Path], data: str | None, prompt: str | None, out: Path | None,
            max_new_tokens: int, batch_size: int, split: str, limit: int | None, console: Console,
            task: str | None = None, fps: float = 2.0, max_frames: int | None = 32) -> list[dict]:
    """`images` may hold videos too (by extension: mp4, mkv, webm, ...); they are answered in separate batches
    (a processor batch cannot mix rows with and without images) and the rows come back in the order given."""
    if bool(images) == bool(data):
        raise UserError("give images or videos, or --data (one of them)", where="vlmfit predict",
                        hint="vlmfit predict MODEL photo.jpg clip.mp4 ... --prompt '...'   or   vlmfit predict MODEL --data SOURCE")
    model, processor, family = load_target(target)
    if images:
        videos = [p for p in images if is_video(p)]
        stills = [p for p in images if not is_video(p)]
        groups = [image_examples(stills, prompt or DEFAULT_PROMPT)] if stills else []
        if videos:
            groups.append(video_examples(videos, prompt or DEFAULT_VIDEO_PROMPT, family, fps, max_frames))
        # where each answer goes back: the stills' positions among the files given, then the videos'
        order = [i for i, p in enumerate(images) if not is_video(p)] + [i for i, p in enumerate(images) if is_video(p)]
    else:
        groups, order = [data_examples(data, split, limit, prompt, task)], None
    collator = VisionChatCollator(processor, family)
    eval_mode(model)
    from rich.progress import Progress

    rows: list[dict] = []
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("generating", total=sum(len(g[0]) for g in groups))
        for examples, meta in groups:
            answers: list[str] = []
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                answers += generate_answers(model, collator, chunk, batch_size, max_new_tokens)
                progress.advance(bar, len(chunk))
            rows += [{**m, "answer": a.strip()} for m, a in zip(meta, answers)]
    if order is not None:
        rows = [row for _, row in sorted(zip(order, rows), key=lambda pair: pair[0])]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
