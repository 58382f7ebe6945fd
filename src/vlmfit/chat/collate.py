"""VisionChatCollator: canonical chat examples -> model batch with assistant-only labels; PreferenceCollator:
preference pairs -> the batch TRL's DPOTrainer takes.

Labels are computed on the processor's output, i.e. after each image placeholder has been expanded into as many
tokens as the image has features (a count that varies per image), so the mask lines up with what the model sees.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from vlmfit.chat.schema import ROW, check_chat_example, count_image_parts, message_text, prompt_of, stored_video_metadata
from vlmfit.errors import UserError
from vlmfit.models.families import Family, family_of_processor, get_family
from vlmfit.models.loss import IGNORE_INDEX  # re-exported: the label value the loss ignores

# How labels find the loss positions, in words (logs, doctor, reports).

LABEL_METHODS = {
    "markers": "the family's assistant turn markers",
    "prefix": "template-agnostic: rendering the conversation prefix by prefix",
    "suffix": "the processor's prompt/suffix split",
}


def _find_all(ids: np.ndarray, pattern: Sequence[int]) -> list[int]:
    """Start positions of `pattern` in `ids` (vectorised over the first token, verified on the rest)."""
    if not pattern:
        return []
    cand = np.flatnonzero(ids == pattern[0])
    n = len(pattern)
    return [int(i) for i in cand if i + n <= len(ids) and all(ids[i + k] == pattern[k] for k in range(1, n))]


class VisionChatCollator:
    """Collate canonical examples ({"messages", "images"}) into a batch the family's model accepts.

    - `loss_on="assistant"` (default): loss only on assistant replies and their end-of-turn token; system, user,
      image placeholder and padding tokens are -100. `loss_on="all"`: every text token except image and padding.
    - `max_length=None` (default) never truncates. With a limit, a sequence is cut only inside text; one that would
      lose an image token raises a UserError naming the example.
    - `label_method`: how assistant replies are found (see `Family.label_method`); defaults to the family's.
    """

    def __init__(self, processor, family: Family | str | None = None, *, loss_on: str = "assistant",
                 max_length: int | None = None, label_method: str | None = None):
        if isinstance(family, str):
            family = get_family(family)
        family = family or family_of_processor(processor)
        if family is None:
            raise UserError(
                f"no family is known for processor {type(processor).__name__}",
                hint="pass family=<name> (vlmfit.models.families) or load the model with vlmfit.models.load.load",
            )
        if loss_on not in ("assistant", "all"):
            raise UserError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}", where="train.loss_on")
        self.label_method = label_method or family.label_method
        if family.prompt_style == "prefix_suffix" and (loss_on != "assistant" or self.label_method != "suffix"):
            raise UserError(f"{family.name} is a prefix-LM: loss is always on the answer (suffix) only", where="train.loss_on")
        if self.label_method == "markers" and not family.assistant_start:
            raise UserError(f"{family.name} has no assistant marker; use label_method='prefix'")
        self.processor, self.family, self.loss_on, self.max_length = processor, family, loss_on, max_length
        tok = processor.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.turn_end_id = tok.convert_tokens_to_ids(family.turn_end) if family.turn_end else None
        # The assistant marker can tokenize differently after a space; accept each distinct encoding.
        variants = {tuple(tok.encode(v, add_special_tokens=False)) for v in (family.assistant_start, " " + family.assistant_start)}
        self.start_patterns = sorted((v for v in variants if v), key=len, reverse=True)
        media = [family.image_token] + ([family.video_token] if family.video_token else [])
        self.media_ids = {tok.convert_tokens_to_ids(t) for t in media} - {tok.unk_token_id, None}
        # Text that the tokenizer would read as one of its special tokens (turn markers, image placeholders, ...):
        # inside a message it would silently change the conversation's structure, so it is refused (check_content).
        specials = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
        self._special_text = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None

    # -- rendering --------------------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The text the processor sees. For prefix-suffix families: the prompt only (the answer goes in `suffix`)."""
        if self.family.prompt_style == "prefix_suffix":
            return self._prefix_prompt(messages)
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _prefix_prompt(self, messages: list[dict]) -> str:
        turns = [m for m in messages if m["role"] != "system"]
        if len([m for m in turns if m["role"] == "user"]) != 1 or len(turns) > 2:
            raise UserError(f"{self.family.name} takes one question and one answer per example, not a multi-turn chat",
                            hint="split the conversation into single-turn examples")
        system = [message_text(m) for m in messages if m["role"] == "system"]
        n_images = count_image_parts(messages)
        return self.family.image_token * n_images + " ".join(system + [message_text(turns[0])])

    def encode(self, texts: list[str], images: list[list], padding_side: str = "right", suffixes: list[str] | None = None,
               examples: list[dict] | None = None) -> dict:
        """Run the processor (image token expansion happens here) on rendered texts and per-example image lists;
        videos (frames we sampled ourselves, with their timing) come from `examples`."""
        tok = self.processor.tokenizer
        old_side, tok.padding_side = tok.padding_side, padding_side
        try:
            kwargs = {"images": images} if any(images) else {}
            kwargs.update(self._video_kwargs(examples or []))
            if "images" in kwargs and any(len(im) == 0 for im in images):
                # Processors cannot take a batch in which some rows have images and others none.
                raise UserError("a batch mixes examples with and without images", hint="use batch_size 1 or give every example an image")
            # Templates that write BOS themselves (Gemma) would get a second one from the tokenizer.
            if tok.bos_token and all(t.startswith(tok.bos_token) for t in texts):
                kwargs["add_special_tokens"] = False
            if suffixes is not None:
                kwargs["suffix"] = suffixes
            return dict(self.processor(text=texts, padding=True, return_tensors="pt", **kwargs))
        finally:
            tok.padding_side = old_side

    @staticmethod
    def _video_kwargs(examples: list[dict]) -> dict:
        videos, metas = [], []
        for ex in examples:
            for i, frames in enumerate(ex.get("videos") or []):
                meta = (ex.get("video_meta") or [None] * (i + 1))[i] or {}
                videos.append(list(frames))
                metas.append(stored_video_metadata(frames, meta.get("timestamps") or [], meta.get("fps"), meta.get("duration") or 0.0))
        if not videos:
            return {}
        # do_sample_frames=False: the frames were already sampled (by fps, even count); Qwen3-VL would resample.
        return {"videos": videos, "video_metadata": metas, "do_sample_frames": False}

    # -- labels -----------------------------------------------------------------------------------------------
    def check_content(self, example: dict, where: str) -> None:
        """No message may contain text the tokenizer turns into a special token (e.g. a scraped '<|im_end|>')."""
        if self._special_text is None:
            return
        for i, m in enumerate(example["messages"]):
            found = self._special_text.search(message_text(m))
            if found:
                raise UserError(
                    f"message {i} ({m['role']}) contains {found.group()!r}, a special token of the {self.family.name} "
                    "tokenizer: as text it would be read as that token and change the conversation's structure",
                    where=where, hint="remove it from the data, or break it up (e.g. '<|im_end|>' -> '< |im_end|>') if it "
                    "must stay as text")

    def assistant_mask(self, ids: np.ndarray, valid: np.ndarray, replies: int | None = None) -> np.ndarray | None:
        """Marker method: True from after each assistant start marker through its end-of-turn token. With `replies`
        (the conversation's number of assistant turns), None unless the markers found are exactly that many: a
        plain-text marker ('Assistant:') quoted inside any message makes the markers ambiguous."""
        mask = np.zeros(len(ids), dtype=bool)
        starts = sorted({s + len(p) for p in self.start_patterns for s in _find_all(ids, p) if valid[s]})
        if replies is not None and len(starts) != replies:
            return None
        ends = np.flatnonzero(ids == self.turn_end_id)
        for s in starts:
            after = ends[ends >= s]
            stop = int(after[0]) + 1 if len(after) else int(valid.sum())  # an unterminated reply runs to the end
            mask[s:stop] = True
        return mask & valid

    def prefix_mask(self, example: dict, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Template-agnostic method: render the conversation up to each assistant reply (with the generation prompt)
        and through it; the reply's tokens are those between the two lengths, after image expansion."""
        messages, images = example["messages"], list(example.get("images") or [])
        mask = np.zeros(len(ids), dtype=bool)
        tok = self.processor.tokenizer
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            spans = []
            for upto, gen in ((messages[:i], True), (messages[: i + 1], False)):
                n_img = count_image_parts(upto)
                n_vid = sum(1 for mm in upto for p in (mm.get("content") or []) if isinstance(p, dict) and p.get("type") == "video")
                part = {**example, "videos": (example.get("videos") or [])[:n_vid], "video_meta": (example.get("video_meta") or [])[:n_vid]}
                spans.append(self.encode([self.render(upto, add_generation_prompt=gen)], [images[:n_img]], examples=[part])["input_ids"][0].numpy())
            before, through = spans
            if not (np.array_equal(ids[: len(before)], before) and np.array_equal(ids[: len(through)], through)):
                raise UserError(
                    f"the chat template of {type(self.processor).__name__} does not render conversations prefix by prefix, "
                    "so the assistant replies cannot be located",
                    hint="use a known family (vlmfit.models.families) or a template whose turns only append text",
                )
            stop = len(through)
            while stop > len(before) and not tok.decode(ids[stop - 1 : stop]).strip():
                stop -= 1  # whitespace after the end of turn is formatting, not something to learn
            mask[len(before) : stop] = True
        return mask & valid

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        for i, ex in enumerate(examples):
            check_chat_example(ex, where=who(ex, i))
            self.check_content(ex, where=who(ex, i))
        images = [list(ex.get("images") or []) for ex in examples]
        if self.label_method == "suffix":
            answers = [message_text(prompt_and_answer(ex["messages"])[1]) for ex in examples]
            batch = self.encode([self.render(ex["messages"]) for ex in examples], images, suffixes=answers, examples=examples)
        else:
            batch = self.encode([self.render(ex["messages"]) for ex in examples], images, examples=examples)
        input_ids = batch["input_ids"]
        valid = batch["attention_mask"].bool().numpy()
        ids_np = input_ids.numpy()
        media = np.isin(ids_np, list(self.media_ids))
        if self.label_method == "suffix":
            keep = (batch.pop("labels") != IGNORE_INDEX).numpy()  # the processor masked the prompt itself
        elif self.loss_on == "all":
            keep = valid.copy()
        elif self.label_method == "prefix":
            keep = np.stack([self.prefix_mask(ex, ids_np[r], valid[r]) for r, ex in enumerate(examples)])
        else:
            keep = np.stack([self._reply_mask(ex, ids_np[r], valid[r]) for r, ex in enumerate(examples)])
        for r in range(len(examples)):
            if not keep[r].any():
                raise UserError(
                    f"{who(examples[r], r)}: no assistant tokens found after rendering with the chat template",
                    hint=f"check that the example has a non-empty assistant reply and that the template opens replies with "
                    f"{self.family.assistant_start!r}",
                )
        keep &= ~media
        labels = input_ids.clone()
        labels[~torch.from_numpy(keep)] = IGNORE_INDEX
        batch["labels"] = labels
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            batch = self._truncate(batch, media, examples)
        if all(ROW in ex for ex in examples):  # which rows a training step saw (the divergence guard names them)
            batch[ROW] = torch.tensor([ex[ROW] for ex in examples])
        return batch

    def _reply_mask(self, example: dict, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The replies of the conversation's assistant turns: by their markers when these are exactly one per
        assistant turn (the fast path), else by rendering the conversation turn by turn (its structure)."""
        replies = sum(m["role"] == "assistant" for m in example["messages"])
        mask = self.assistant_mask(ids, valid, replies)
        return self.prefix_mask(example, ids, valid) if mask is None else mask

    def measure(self, examples: list[dict], batch_size: int = 32) -> list[dict]:
        """Per example, untruncated: token length, the position just after its last image token, and the
        position of its first trained token. Used to apply the max_length policy before training starts."""
        saved, self.max_length = self.max_length, None
        out = []
        try:
            for i in range(0, len(examples), batch_size):
                batch = self(examples[i : i + batch_size])
                media = np.isin(batch["input_ids"].numpy(), list(self.media_ids))
                trained = (batch["labels"] != IGNORE_INDEX).numpy()
                for r, n in enumerate(batch["attention_mask"].sum(1).tolist()):
                    m, t = np.flatnonzero(media[r]), np.flatnonzero(trained[r])
                    out.append({"length": int(n), "media_end": int(m[-1]) + 1 if len(m) else 0, "first_trained": int(t[0])})
        finally:
            self.max_length = saved
        return out

    def _truncate(self, batch: dict, media: np.ndarray, examples: list[dict]) -> dict:
        """Cut every sequence-shaped tensor at max_length, but never through an image."""
        cut = self.max_length
        for r in range(media.shape[0]):
            if media[r, cut:].any():
                raise UserError(
                    f"{who(examples[r], r)} is {int(batch['attention_mask'][r].sum())} tokens; truncating "
                    f"it to max_length={cut} would cut through an image",
                    where="train.max_length",
                    hint="raise train.max_length (or set it to null), lower the image resolution, or drop this example",
                )
        seq_shape = tuple(batch["input_ids"].shape)
        return {k: (v[:, :cut] if torch.is_tensor(v) and tuple(v.shape[:2]) == seq_shape else v) for k, v in batch.items()}


def who(example: dict, position: int) -> str:
    """How an error names an example: its source row (the user's file), else its place in the batch."""
    return f"source row {example[ROW]}" if example.get(ROW) is not None else f"example {position} of the batch"


def prompt_and_answer(messages: list[dict]) -> tuple[list[dict], dict]:
    prompt = prompt_of(messages)
    return prompt, messages[len(prompt)]


class PreferenceCollator:
    """Preference pairs -> the batch TRL's DPOTrainer takes: rows [prompt+chosen..., prompt+rejected...] with a
    `completion_mask` on each pair's reply, built by VisionChatCollator from whole conversations.

    Why not TRL's DataCollatorForVisionPreference: it gives the same model inputs for the chat families, but cuts at
    max_length with a plain slice (an image cut there fails mid-run or is dropped silently: trl#5283, trl#5285), needs
    a chat template (no PaliGemma) and tokenizes prompt and reply apart. Here truncation is VisionChatCollator's
    (inside text only, else a UserError), and the evaluation scores exactly the batches that are trained on.
    """

    def __init__(self, chat: VisionChatCollator):
        self.chat = chat

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        examples = [self._conversation(p, "chosen") for p in pairs] + [self._conversation(p, "rejected") for p in pairs]
        batch = self.chat(examples)
        batch.pop(ROW, None)
        if all(ROW in p for p in pairs):
            batch[ROW] = torch.tensor([p[ROW] for p in pairs])
        # Assistant turns inside the prompt are labelled too; the reply starts after as many labelled spans.
        skip = [sum(m["role"] == "assistant" for m in p["prompt"]) for p in pairs] * 2
        batch["completion_mask"] = reply_mask(batch.pop("labels") != IGNORE_INDEX, skip).long()
        if not batch["completion_mask"].any(1).all():
            raise UserError("a pair has no reply tokens left after truncation", where="train.max_length",
                            hint="raise train.max_length or set train.overlong: drop")
        if any(ex["images"] for ex in examples):
            missing = [k for k in self.chat.family.required_inputs if k not in batch]
            if missing:  # the model would run without them: wrong attention or no image at all, and no error
                raise UserError(f"the {self.chat.family.name} processor gave no {', '.join(missing)} for a batch with images",
                                where="model.name", hint="check the processor version against vlmfit.models.families")
        return batch

    @staticmethod
    def _conversation(pair: dict, side: str) -> dict:
        ex = {"messages": list(pair["prompt"]) + list(pair[side]), "images": list(pair.get("images") or [])}
        if pair.get(ROW) is not None:
            ex[ROW] = pair[ROW]  # errors then name the row of the user's file
        return ex

    def measure(self, pairs: list[dict], batch_size: int = 32) -> list[dict]:
        """Per pair, untruncated: the length of its longer sequence, the position just after its last image token and
        the position of its first reply token: what the max_length policy checks before training starts."""
        saved, self.chat.max_length = self.chat.max_length, None
        out = []
        try:
            for i in range(0, len(pairs), batch_size):
                chunk = pairs[i : i + batch_size]
                batch, n = self(chunk), len(chunk)
                lengths = batch["attention_mask"].sum(1).tolist()
                media = np.isin(batch["input_ids"].numpy(), list(self.chat.media_ids))
                reply = batch["completion_mask"].bool().numpy()
                for r in range(n):
                    m = np.flatnonzero(media[r])
                    out.append({"length": int(max(lengths[r], lengths[r + n])), "media_end": int(m[-1]) + 1 if len(m) else 0,
                                "first_trained": int(min(np.flatnonzero(reply[j])[0] for j in (r, r + n)))})
        finally:
            self.chat.max_length = saved
        return out


def reply_mask(trained: torch.Tensor, skip: list[int]) -> torch.Tensor:
    """`trained` without the first `skip[r]` contiguous labelled spans of each row r."""
    out = trained.clone()
    for r, k in enumerate(skip):
        if k:
            row = trained[r].numpy()
            starts = np.flatnonzero(row & ~np.r_[False, row[:-1]])
            out[r, : int(starts[k]) if len(starts) > k else len(row)] = False
    return out
