"""Canonical examples: a chat example is {"messages": [...typed content...], "images": [PIL images]}.

Content is always a list of {"type": "image"} / {"type": "text", "text": ...} parts, so a dataset column has one
schema; each {"type": "image"} part consumes the next image of "images", in order.
"""

from __future__ import annotations

from typing import Any

from vlmfit.errors import UserError

# The one name of an example's identity: the row of the user's source it came from (data/prepare.py writes it; a
# dataset without it, a built-in set, gets its index). Batches carry it, and every collation, label, length and
# divergence error names it.
ROW = "source_row"

ROLES = ("system", "user", "assistant")


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part() -> dict:
    return {"type": "image", "text": None}


def chat_example(question: str, answer: str, images: list, system: str | None = None, **extra: Any) -> dict:
    """A one-turn example: [system], user (images first, then the question), assistant answer."""
    messages = []
    if system:
        messages.append({"role": "system", "content": [text_part(system)]})
    messages.append({"role": "user", "content": [image_part() for _ in images] + [text_part(question)]})
    messages.append({"role": "assistant", "content": [text_part(answer)]})
    return {"messages": messages, "images": list(images), **extra}


def count_image_parts(messages: list[dict]) -> int:
    return sum(1 for m in messages for part in _parts(m) if part.get("type") == "image")


def _parts(message: dict) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [text_part(content)]
    return list(content or [])


def message_text(message: dict) -> str:
    return "".join(p.get("text") or "" for p in _parts(message) if p.get("type") == "text")


def prompt_of(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) the last assistant turn: what the model is asked to complete."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise UserError("conversation has no assistant turn to learn from or evaluate against")
    return list(messages[:last])


def final_answer(messages: list[dict]) -> str:
    return message_text([m for m in messages if m["role"] == "assistant"][-1])


def check_chat_example(example: dict, where: str = "example") -> None:
    """Raise a UserError when an example cannot be trained on as given (never fix it silently)."""
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError("'messages' must be a non-empty list of {role, content}", where=where)
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise UserError(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}", where=where)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("no assistant turn: nothing to train on", where=where)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not message_text(m).strip():
            raise UserError(f"assistant turn (message {i}) is empty: it would teach the model to answer nothing",
                            where=where, hint="fill in the answer or drop the example")
    for kind, key in (("image", "images"), ("video", "videos")):
        n_parts = sum(1 for m in messages for part in _parts(m) if part.get("type") == kind)
        n_given = len(example.get(key) or [])
        if n_parts != n_given:
            raise UserError(
                f"{n_parts} {kind} placeholders in the messages but {n_given} {key} given",
                where=where,
                hint=f"each {{'type': '{kind}'}} content part takes the next item of '{key}', in order",
            )


def stored_video_metadata(frames: list, timestamps: list[float], source_fps: float | None, duration: float) -> dict:
    """`video_metadata` from stored facts (a prepared dataset keeps fps, duration and timestamps, not the file).
    Indices are source frame numbers, so `timestamps` (index / fps) are our presentation times."""
    fps = source_fps or (len(frames) / duration if duration else 24.0)
    return {"total_num_frames": max(1, round(duration * fps)), "fps": fps, "duration": duration,
            "width": frames[0].width, "height": frames[0].height, "video_backend": "pyav",
            "frames_indices": [round(t * fps) for t in timestamps]}
