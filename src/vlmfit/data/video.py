"""Video inputs: sample frames from a video file with PyAV and build canonical chat examples from them.

A video example is the canonical chat example (see ``schema``) with a ``{"type": "video"}`` content part in the
user turn and the sampled frames under ``"videos"`` (one list of RGB PIL frames per video part, in order), plus
``"video_timestamps"``. ``split_frames`` turns one such example into several image examples of k frames each
(seed 002: one frame per step keeps a multi-frame video inside a small memory budget).

Sampling is that of qwen-vl-utils in spirit: frames at ``fps`` (2 by default) over the whole clip, or ``num_frames``
uniformly, with the count a multiple of the temporal patch (2 for Qwen) so that the processor need not pad. Each
target time takes the nearest decoded frame, on a grid centred in the clip (qwen-vl-utils includes both ends).
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass

from PIL import Image

from vlmfit.chat.schema import image_part, stored_video_metadata, text_part
from vlmfit.errors import UserError

@dataclass
class SampledVideo:
    frames: list[Image.Image]  # RGB
    timestamps: list[float]  # seconds, presentation time of each returned frame
    source_fps: float
    duration: float  # seconds
    path: str


def _open(path: pathlib.Path):
    import av  # imported here so that image-only users do not need PyAV

    if not path.is_file():
        what = "is a directory, not a video file" if path.is_dir() else "video file not found"
        raise UserError(what, where=str(path), hint="check the path (relative paths are from the cwd)")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise UserError(f"cannot open the video: {e}", where=str(path),
                        hint="is it a video file? PyAV/ffmpeg reads mp4, mkv, webm, avi, mov ...") from None
    if not container.streams.video:
        container.close()
        raise UserError("the file has no video stream", where=str(path), hint="give a file with a video track")
    return container


def _probe(container) -> tuple[float, float, float]:
    """(source fps, duration, start time) in seconds from the headers; duration is 0 when the headers lack it."""
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    start = float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000  # the container's duration is in AV_TIME_BASE (microseconds)
    elif stream.frames and fps:
        duration = stream.frames / fps
    else:
        duration = 0.0
    return fps, duration, start


def _targets(duration: float, fps: float | None, num_frames: int | None, max_frames: int | None,
             multiple_of: int) -> list[float]:
    """Sorted target times (from the video's start); each will take the decoded frame nearest to it."""
    by_fps = num_frames is None
    n = max(1, math.floor(duration * fps + 1e-6)) if by_fps else num_frames
    capped = max_frames is not None and n > max_frames
    if capped:
        n = max_frames
    # Trim the count before choosing times (rather than dropping the last frames after) so coverage stays uniform.
    if n >= multiple_of:
        n -= n % multiple_of
    # fps mode keeps the requested spacing; num_frames or a max_frames cap spread the frames over the whole clip.
    step = 1.0 / fps if by_fps and not capped else duration / n
    offset = (duration - n * step) / 2  # centre the grid: both ends of the clip are covered alike
    return [offset + (i + 0.5) * step for i in range(n)]


def sample_frames(path, *, fps: float | None = 2.0, num_frames: int | None = None, max_frames: int | None = None,
                  multiple_of: int = 1, max_side: int | None = None) -> SampledVideo:
    """Decode `path` with PyAV and keep only the frames nearest to the target times.

    ``num_frames`` (uniform over the duration) wins over ``fps`` (one frame per 1/fps seconds); ``max_frames`` caps
    the count, spreading the frames over the whole clip; the count is a multiple of ``multiple_of`` (Qwen: 2).
    Timestamps are presentation times in seconds from the start of the video stream.
    """
    path = pathlib.Path(path)
    if num_frames is None and not fps:
        raise UserError("give fps or num_frames", where="sample_frames")
    for name, value in (("fps", fps), ("num_frames", num_frames), ("max_frames", max_frames),
                        ("multiple_of", multiple_of), ("max_side", max_side)):
        if value is not None and value <= 0:
            raise UserError(f"{name} must be positive, got {value}", where="sample_frames")
    container = _open(path)
    try:
        source_fps, duration, start = _probe(container)
        if duration <= 0:  # no duration in the headers (some webm / raw streams): time one full decode pass
            duration = _scan_duration(container, source_fps, start)
            container.close()
            container = _open(path)
        targets = _targets(duration, fps, num_frames, max_frames, multiple_of)
        picked = _pick_nearest(container, targets, start, source_fps, duration, path)
    finally:
        container.close()
    if len(picked) < multiple_of:
        # Fewer frames than one temporal patch (a 1-frame request or clip, with Qwen's pairs of frames): repeat the
        # last frame to reach it rather than return an unusable count; the Qwen processor pads the same way.
        picked += [picked[-1]] * (multiple_of - len(picked))
    frames, converted = [], {}
    for _, frame in picked:
        if id(frame) not in converted:  # a frame chosen for two targets is converted once and shared
            converted[id(frame)] = _to_pil(frame, max_side)
        frames.append(converted[id(frame)])
    return SampledVideo(frames=frames, timestamps=[t for t, _ in picked], source_fps=source_fps,
                        duration=duration, path=str(path))


def _pick_nearest(container, targets: list[float], start: float, source_fps: float, duration: float,
                  path) -> list[tuple]:
    """Stream the decoded frames, keeping for each target the nearest one; nothing else is held.

    Decoders return frames in presentation order, so one pass with the previous frame in hand decides each target
    as soon as a frame at or after it arrives. When targets are closer than a frame apart (num_frames above the
    frame count) neighbouring targets share a frame: the caller still gets the count asked for.
    """
    import av

    container.streams.video[0].thread_type = "AUTO"  # frame/slice threads: decoding dominates the cost
    picked: list[tuple[float, object]] = []
    prev, error = None, None
    try:
        for i, frame in enumerate(container.decode(video=0)):
            # Frames without a timestamp (rare raw streams) are placed by their index at the nominal rate.
            t = frame.time - start if frame.time is not None else i / (source_fps or 25.0)
            while len(picked) < len(targets) and t >= targets[len(picked)]:
                target = targets[len(picked)]
                picked.append(prev if prev is not None and target - prev[0] <= t - target else (t, frame))
            if len(picked) == len(targets):
                break  # every target decided: do not decode the rest of the file
            prev = (t, frame)
    except av.error.FFmpegError as e:  # corrupt part-way: judged below by how much decoded before it
        error = e
    if prev is None and not picked:
        raise UserError("no frames could be decoded" + (f": {error}" if error else ""), where=str(path),
                        hint="is the file empty, truncated or in a codec this ffmpeg build lacks?")
    if missing := len(targets) - len(picked):
        # The frames ran out before the last targets. A little (the header duration rounds up, or counts a longer
        # audio track) is fine: the last frame is the nearest. Much more is a truncated or corrupt file, and
        # padding it with its last frame would silently teach on a frozen video.
        if targets[-1] - prev[0] > max(0.5, 2 / (source_fps or 25.0)):
            raise UserError(f"the video frames stop at {prev[0]:.2f} s but the file says it lasts {duration:.2f} s"
                            + (f" ({error})" if error else ""), where=str(path),
                            hint="the file is probably truncated or corrupt: re-encode or drop it")
        picked += [prev] * missing
    return picked


def _scan_duration(container, source_fps: float, start: float) -> float:
    last = 0.0
    for frame in container.decode(video=0):
        last = frame.time - start if frame.time is not None else last
    return last + (1.0 / source_fps if source_fps else 0.0)


def _to_pil(frame, max_side: int | None) -> Image.Image:
    img = frame.to_image()  # PyAV converts to RGB24
    if img.mode != "RGB":
        img = img.convert("RGB")
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    return img


def video_metadata(video: SampledVideo) -> dict:
    """What transformers' video processors call `video_metadata`, for frames we sampled ourselves.

    Without it the processor assumes the frames are the whole video at an unknown rate: Qwen2.5-VL then times its
    mRoPE with a default fps and Qwen3-VL writes made-up timestamps into the prompt.
    """
    return stored_video_metadata(video.frames, video.timestamps, video.source_fps, video.duration)


def video_part() -> dict:
    return {"type": "video", "text": None}


def video_example(question: str, answer: str, video: SampledVideo, system: str | None = None, **extra) -> dict:
    """A one-turn example about one video: [system], user (video, then the question), assistant answer."""
    messages = []
    if system:
        messages.append({"role": "system", "content": [text_part(system)]})
    messages.append({"role": "user", "content": [video_part(), text_part(question)]})
    messages.append({"role": "assistant", "content": [text_part(answer)]})
    return {"messages": messages, "images": [], "videos": [list(video.frames)],
            "video_timestamps": [list(video.timestamps)], **extra}


def split_frames(example: dict, frames_per_example: int = 1) -> list[dict]:
    """Split a one-video example into examples of `frames_per_example` frames each, given as images.

    The video part is replaced by one image part per frame; question, answer and any extra keys are kept, and
    "frame_timestamps" records which frames each example holds. A last short chunk is kept with its real frames.
    """
    if frames_per_example < 1:
        raise UserError("frames_per_example must be >= 1", where="split_frames")
    videos = example.get("videos") or []
    n_parts = sum(1 for m in example["messages"] for p in _content(m) if p.get("type") == "video")
    if len(videos) != 1 or n_parts != 1:
        raise UserError(f"split_frames needs exactly one video (found {len(videos)} videos, {n_parts} video parts)",
                        where="split_frames", hint="split each video into its own example first")
    n_images = sum(1 for m in example["messages"] for p in _content(m) if p.get("type") == "image")
    if n_images != len(example.get("images") or []):
        raise UserError(f"{n_images} image parts but {len(example.get('images') or [])} images", where="split_frames")
    frames = list(videos[0])
    stamps = list((example.get("video_timestamps") or [[None] * len(frames)])[0])
    extra = {k: v for k, v in example.items() if k not in ("messages", "images", "videos", "video_timestamps")}
    out = []
    for start in range(0, len(frames), frames_per_example):
        chunk = frames[start:start + frames_per_example]
        messages = []
        for m in example["messages"]:
            parts = []
            for p in _content(m):
                # The video part becomes this chunk's image parts, in place (images keep the position of the video).
                parts.extend([image_part() for _ in chunk] if p.get("type") == "video" else [dict(p)])
            messages.append({**m, "content": parts})
        # Any images the example already had keep their places around the frames.
        images = _merge_images(example["messages"], list(example.get("images") or []), chunk)
        out.append({"messages": messages, "images": images,
                    "frame_timestamps": stamps[start:start + frames_per_example], **extra})
    return out


def _content(message: dict) -> list[dict]:
    c = message.get("content")
    return [text_part(c)] if isinstance(c, str) else list(c or [])


def _merge_images(messages: list[dict], images: list, chunk: list) -> list:
    """Images in the order their parts appear once the video part is replaced by the chunk's frames."""
    merged, it = [], iter(images)
    for m in messages:
        for p in _content(m):
            if p.get("type") == "image":
                merged.append(next(it))
            elif p.get("type") == "video":
                merged.extend(chunk)
    return merged
