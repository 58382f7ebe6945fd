"""Batches from per-example encodings: each example is encoded alone by VisionChatCollator (processor output and
labels, once per example: cached on disk per processor + settings + example content, so later epochs and later
runs skip the processor), then the step's examples are assembled into a right-padded batch (what the processor's
own batch call gives: tests/test_packing.py) or, with packing, into one padding-free row whose examples keep
their own positions (models/packing.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile

import numpy as np
import PIL.Image
import safetensors.torch
import torch

from vlmfit import cache
from vlmfit.chat.collate import ROW, VisionChatCollator
from vlmfit.models.families import Family
from vlmfit.models.loss import IGNORE_INDEX
from vlmfit.models.features import IMAGE_KEYS
from vlmfit.models.packing import SEGMENTS

ROWS_FORMAT = 3  # bump when what an encoded row holds changes: old cache entries are then never read


def processor_fingerprint(chat: VisionChatCollator) -> str:
    """What an encoding depends on besides the example: the serialized tokenizer and processor (template, image and
    video settings: the resolution is there), the family's facts, the collator's settings, and vlmfit's code and the
    encoding libraries' versions (vlmfit.cache)."""
    proc = chat.processor
    parts = [ROWS_FORMAT, cache.code_fingerprint(), cache.library_versions(), tokenizer_state(proc.tokenizer),
             proc.to_json_string(), proc.chat_template or proc.tokenizer.chat_template, family_facts(chat.family),
             chat.loss_on, chat.label_method, chat.max_length]
    return hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=16).hexdigest()


# init_kwargs that say where a tokenizer was loaded from, not how it encodes: a copied model hits the same entries.
_WHERE_FROM = {"name_or_path", "is_local", "local_files_only", "cache_dir", "revision", "token", "_commit_hash"}


def tokenizer_state(tok) -> list:
    """The tokenizer as it encodes: its full serialization (vocabulary, merges, normalizer, pre-tokenizer, the
    post-processor that adds BOS / EOS, added tokens), its special tokens and its settings (add_bos / add_eos ...)."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tok, PreTrainedTokenizerFast):
        body = tok.backend_tokenizer.to_str()
    else:  # a Python (sentencepiece) tokenizer has no serialization of its own; its vocabulary stands in for it
        body = json.dumps(tok.get_vocab(), sort_keys=True)
    settings = {k: v for k, v in tok.init_kwargs.items() if k not in _WHERE_FROM and not k.endswith("_file")}
    return [type(tok).__name__, body, tok.special_tokens_map, settings, tok.padding_side, tok.truncation_side]


def family_facts(family: Family) -> dict:
    """Every field of a models.families.Family (markers, end of turn, image tokens, ...), functions by name."""
    facts = dataclasses.asdict(family)
    return {k: f"{v.__module__}.{v.__qualname__}" if callable(v) else v for k, v in facts.items()}


def _feed(h, value) -> None:
    if isinstance(value, PIL.Image.Image):  # its pixels, not its file
        h.update(f"PIL{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    elif isinstance(value, np.ndarray):
        h.update(f"np{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value):
            h.update(str(k).encode())
            _feed(h, value[k])
        h.update(b"}")
    else:
        h.update(repr(value).encode())


def example_key(example: dict) -> str:
    """Content hash of what the encoding reads: messages, images (pixels), videos (frames) and their timing."""
    h = hashlib.blake2b(digest_size=20)
    for field in ("messages", "images", "videos", "video_meta", "video_timestamps"):
        h.update(field.encode())
        _feed(h, example.get(field) or [])
    return h.hexdigest()


class EncodedCache:
    """Encoded examples on disk under `root/<processor fingerprint>/`, plus the ones seen in this process in memory
    (up to `memory_bytes`). Files are written whole (temp file, then rename): dataloader workers may share it."""

    def __init__(self, root: pathlib.Path, fingerprint: str, memory_bytes: int = 1 << 30):
        self.dir = pathlib.Path(root) / fingerprint
        self.memory: dict[str, dict] = {}
        self.memory_left = memory_bytes
        self.hits = self.misses = 0

    def _path(self, key: str) -> pathlib.Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        """Whether `key` has an entry (counted as neither hit nor miss: doctor asks without encoding)."""
        return key in self.memory or self._path(key).is_file()

    def get(self, key: str) -> dict | None:
        row = self.memory.get(key)
        if row is None:
            path = self._path(key)
            if not path.is_file():
                self.misses += 1
                return None
            try:
                row = safetensors.torch.load(path.read_bytes())
            except Exception:  # a torn or foreign file: encode again and overwrite it
                self.misses += 1
                return None
            self._remember(key, row)
        self.hits += 1
        return row

    def put(self, key: str, row: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = safetensors.torch.save({k: v.contiguous() for k, v in row.items()})
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        self._remember(key, row)

    def _remember(self, key: str, row: dict) -> None:
        size = sum(v.numel() * v.element_size() for v in row.values())
        if size <= self.memory_left:
            self.memory[key], self.memory_left = row, self.memory_left - size


class RowCollator:
    """Examples -> a training batch from per-example encodings (cached when `cache` is given): right-padded, or with
    `pack` padding-free rows (one, or rows of at most `pack_tokens`; batch[SEGMENTS] tells the model side where
    each example starts)."""

    def __init__(self, chat: VisionChatCollator, cache: EncodedCache | None = None, pack: bool = False,
                 pack_tokens: int | None = None, image_keys: bool = False):
        self.chat, self.cache, self.pack, self.pack_tokens = chat, cache, pack, pack_tokens
        self.image_keys = image_keys  # name each image in the batch (batch[IMAGE_KEYS]) for models/features.py
        self.family = chat.family

    def encode(self, examples: list[dict], keys: list[str] | None = None) -> list[dict]:
        """Each example's encoding: from the cache, the rest in one processor call (a call costs ~2x more per
        example when made one example at a time) and split into single-example rows. `keys`: the examples'
        example_key values, when the caller has them already."""
        if self.cache is not None and keys is None:
            keys = [example_key(ex) for ex in examples]
        keys = keys if self.cache is not None else [None] * len(examples)
        rows = [self.cache.get(k) if k is not None else None for k in keys]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            for i, row in zip(missing, self._encode_fresh([examples[i] for i in missing])):
                rows[i] = row
                if keys[i] is not None:
                    self.cache.put(keys[i], row)
        return rows

    def _encode_fresh(self, examples: list[dict]) -> list[dict]:
        media = {bool(ex.get("images")) for ex in examples}
        if len(examples) == 1 or len(media) > 1:  # the processor takes no batch mixing image and text-only rows
            return [self._chat([ex]) for ex in examples]
        rows = split_batch(self._chat(examples), [len(ex.get("images") or []) for ex in examples],
                           [[len(v) for v in ex.get("videos") or []] for ex in examples], self.family)
        return rows if rows is not None else [self._chat([ex]) for ex in examples]

    def _chat(self, examples: list[dict]) -> dict:
        """The chat collator's encoding; the examples keep their source rows (its errors name them), but what is
        encoded and cached does not hold them (the same example under another row is the same entry)."""
        batch = self.chat(examples)
        batch.pop(ROW, None)
        return batch

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        # each example hashed once, for the processor cache and the image keys alike
        keys = [example_key(ex) for ex in examples] if self.cache is not None or self.image_keys else None
        rows = self.encode(examples, keys)
        pad_id = self.chat.processor.tokenizer.pad_token_id
        batch = (pack_rows(rows, self.family, self.pack_tokens, pad_id) if self.pack
                 else pad_rows(rows, self.family, pad_id))
        if all(ROW in ex for ex in examples):
            batch[ROW] = torch.tensor([ex[ROW] for ex in examples])
        if self.image_keys:
            batch[IMAGE_KEYS] = [f"{key}:{i}" for key, ex in zip(keys, examples) for i in range(len(ex.get("images") or []))]
        return batch


def pad_values(family: Family, pad_id: int | None = None) -> dict:
    """The family's sequence-shaped tensors and what pads each (input_ids: the tokenizer's pad id); every other
    tensor of an encoding is per image (or per tile, per video)."""
    return {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX, **dict(family.sequence_inputs)}


def _image_keys(rows: list[dict], family: Family) -> list[str]:
    sequence = pad_values(family)
    keys = []
    for row in rows:
        keys += [k for k in row if k not in sequence and k not in keys]
    return keys


def _pad_to(t: torch.Tensor, dim: int, size: int, value) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_full(shape, value)], dim)


def pad_rows(rows: list[dict], family: Family, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of single-example encodings, laid out as the processor lays out its own batches."""
    width = max(r["input_ids"].shape[1] for r in rows)
    batch = {}
    for key, value in pad_values(family, pad_id).items():
        if key in rows[0]:
            batch[key] = torch.cat([_pad_to(r[key], 1, width, value) for r in rows])
    for key in _image_keys(rows, family):
        have = [r[key] for r in rows if key in r]
        if family.images_per_row:  # [1, images, ...] per example: pad the image dimension (zero images are padding)
            n = max(t.shape[1] for t in have)
            like = have[0]
            parts = [_pad_to(r[key], 1, n, 0) if key in r else like.new_zeros((1, n, *like.shape[2:])) for r in rows]
            batch[key] = torch.cat(parts)
        else:
            batch[key] = torch.cat(have)
    return batch


def split_batch(batch: dict, images: list[int], videos: list[list[int]], family: Family) -> list[dict] | None:
    """The processor's right-padded batch as single-example encodings (the inverse of pad_rows): sequences cut at
    each row's length; per-image tensors split by each example's images (Qwen's patches by their grids), per-video
    ones by its videos or their frames (`videos`: frames of each video of each example), whichever the tensor
    holds; Idefics3's [batch, tiles, ...] tensors by row, without the padding tiles. None when a tensor fits no
    split (the caller then encodes the examples one at a time)."""
    lengths = batch["attention_mask"].sum(1).tolist()
    rows: list[dict] = [{} for _ in lengths]
    sequence = pad_values(family)
    for key in sequence:
        if key in batch:
            for r, n in enumerate(lengths):
                rows[r][key] = batch[key][r:r + 1, :n].clone()  # its own storage, not a view of the batch
    for key in [k for k in batch if k not in sequence]:
        t = batch[key]
        if family.images_per_row:
            tiles = batch.get("pixel_attention_mask")
            for r in range(len(lengths)):
                real = int(tiles[r].flatten(1).any(1).sum()) if tiles is not None else t.shape[1]
                rows[r][key] = t[r:r + 1, :real].clone()
            continue
        video = "video" in key
        items = [len(v) for v in videos] if video else images
        options = [items] + ([[sum(v) for v in videos]] if video else [])  # per video, per frame
        grid = batch.get("video_grid_thw" if video else "image_grid_thw")
        if grid is not None and key.startswith("pixel_values"):  # patches: each item's t*h*w rows
            per_item = grid.prod(-1).tolist()
            bounds = np.cumsum([0] + items).tolist()
            options.insert(0, [int(sum(per_item[bounds[r]:bounds[r + 1]])) for r in range(len(lengths))])
        counts = next((c for c in options if sum(c) == t.shape[0]), None)
        if counts is None:
            return None
        for r, part in enumerate(torch.split(t, counts)):
            if part.shape[0]:
                rows[r][key] = part.clone()
    return rows


def pack_rows(rows: list[dict], family: Family, budget: int | None = None, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The examples end to end in packed rows of at most `budget` tokens each (None: one row; an example longer
    than the budget gets a row of its own), in order; rows padded to the longest (the padding is a segment of
    its own: it attends only to itself and carries no label). No attention mask; batch[SEGMENTS] holds one line
    per example: row, tokens, images, videos."""
    bins: list[list[int]] = [[]]
    used = 0
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        if budget is not None and bins[-1] and used + n > budget:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    packed = []
    sequence = pad_values(family)
    for members in bins:
        part = [rows[i] for i in members]
        row = {key: torch.cat([r[key] for r in part], 1) for key in sequence if key in part[0] and key != "attention_mask"}
        if "labels" in row:  # an example's last position must not learn the next example's first token
            starts = np.cumsum([0] + [r["input_ids"].shape[1] for r in part[:-1]])
            row["labels"] = row["labels"].clone()
            row["labels"][0, starts] = IGNORE_INDEX
        for key in _image_keys(part, family):
            row[key] = torch.cat([r[key] for r in part if key in r], 1 if family.images_per_row else 0)
        packed.append(row)
    batch = pad_rows(packed, family, pad_id) if len(packed) > 1 else packed[0]
    batch[SEGMENTS] = torch.tensor([[b, rows[i]["input_ids"].shape[1], _count(rows[i], "image_grid_thw"),
                                     _count(rows[i], "video_grid_thw")] for b, members in enumerate(bins) for i in members])
    return batch


def _count(row: dict, key: str) -> int:
    return int(row[key].shape[0]) if key in row else 0
