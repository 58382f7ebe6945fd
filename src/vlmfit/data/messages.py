"""Chat rows as the hub and other tools store them -> vlmfit's canonical messages (typed content lists).

Spellings read, each counted in the prepare report under its name:
- "typed": content lists of {"type": "image"} / {"type": "text", "text": ...} parts (TRL, the hub's VLM SFT sets,
  and what `vlmfit prepare` writes);
- "<image> placeholders": string content with "<image>" where each image goes (LLaVA-style);
- "sharegpt": {"from": "human" | "gpt" | "system", "value": ...} turns, with or without placeholders;
- "plain text": string content and no placeholder anywhere; TRL's rule then puts the row's images before the first
  user message's text.
A row mixing typed lists and strings is read part by part and counted as "typed"."""

from __future__ import annotations

from vlmfit.chat.schema import count_image_parts, image_part, text_part
from vlmfit.data.validate import RowProblem

PLACEHOLDER = "<image>"
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}


def _role(m: dict, column: str) -> str:
    raw = m.get("role", m.get("from"))
    role = ROLES.get(str(raw).strip().lower()) if raw is not None else None
    if role is None:
        raise RowProblem(column, f"unknown role {raw!r} (expected user / assistant / system, or ShareGPT's human / gpt)")
    return role


def _split_placeholders(text: str) -> list[dict]:
    """'<image>\\nWhat is it?' -> [image, text 'What is it?']: text around each placeholder, stripped, empty dropped."""
    parts: list[dict] = []
    for i, segment in enumerate(text.split(PLACEHOLDER)):
        if i:
            parts.append(image_part())
        if segment.strip():
            parts.append(text_part(segment.strip()))
    return parts


def _typed(content: list, column: str) -> list[dict]:
    parts = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "image":
            parts.append(image_part())
        elif kind == "text":
            parts.append(text_part(p.get("text") or ""))
        else:
            raise RowProblem(column, f"content part of type {kind!r}: chat rows take 'image' and 'text' parts "
                                     "(videos come from a video column)")
    return parts


def canonical_messages(raw, n_images: int, column: str) -> tuple[list[dict], str]:
    """(canonical messages, spelling) for one row's messages and its number of images; RowProblem if unusable."""
    if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
        raise RowProblem(column, "missing or empty messages list")
    sharegpt = any("from" in m and "role" not in m for m in raw)
    contents = [m.get("content", m.get("value")) for m in raw]
    if any(c is None for c in contents):
        raise RowProblem(column, "a message has no content")
    strings = [c for c in contents if isinstance(c, str)]
    placeholders = any(PLACEHOLDER in c for c in strings)
    messages = []
    for m, content in zip(raw, contents):
        if isinstance(content, str):
            parts = _split_placeholders(content) if placeholders else [text_part(content)]
        elif isinstance(content, list):
            parts = _typed(content, column)
        else:
            raise RowProblem(column, f"message content is a {type(content).__name__}, not text or a list of parts")
        messages.append({"role": _role(m, column), "content": parts})
    if strings and not placeholders and count_image_parts(messages) == 0 and n_images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RowProblem(column, "images but no user message to put them in")
        first_user["content"] = [image_part() for _ in range(n_images)] + first_user["content"]
    spelling = ("sharegpt" if sharegpt else "<image> placeholders" if placeholders
                else "plain text" if len(strings) == len(contents) else "typed")
    return messages, spelling
