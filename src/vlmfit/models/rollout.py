"""What RL rollouts (method: grpo) need from a VLM beyond plain generation:

- the multimodal placeholder ids (image / video / audio tokens and the markers around them) that must never be
  sampled: one in a completion makes the next forward fail ("Image features and image tokens do not match") or
  read features that are not there. TRL suppresses only config.image_token_id; this is every such id the config,
  the processor and the family name.
- one vision pass per distinct image: TRL repeats each prompt, images included, num_generations times, so every
  forward (generation prefill, old-policy and reference log-probs, the loss) would encode each image G times.
  `share_vision` wraps the model's own get_image_features (an instance attribute; no library source touched): the
  images of a call that are equal are encoded once and their features handed to each copy (through indexing, so the
  gradient of a trained tower is the sum over the copies, as it would be). With the tower and projector frozen, the
  features are also kept across calls of one rollout batch, so the loss forward reuses the prefill's.
"""

from __future__ import annotations

import torch

from vlmfit.models.families import Family

# Config keys (the model's and its text/vision sub-configs) that name a multimodal placeholder or marker token.
_CONFIG_TOKEN_KEYS = (
    "image_token_id", "image_token_index", "video_token_id", "video_token_index", "audio_token_id", "audio_token_index",
    "vision_start_token_id", "vision_end_token_id", "vision_token_id", "boi_token_id", "eoi_token_id", "boi_token_index",
    "eoi_token_index", "boa_token_id", "eoa_token_id", "boa_token_index", "eoa_token_index", "bov_token_id",
    "eov_token_id", "fake_image_token_id", "global_image_token_id",
)
# Processor / tokenizer attributes that hold such a token's text.
_PROCESSOR_TOKEN_ATTRS = (
    "image_token", "video_token", "audio_token", "boi_token", "eoi_token", "boa_token", "eoa_token", "fake_image_token",
    "global_image_token", "image_start_token", "image_end_token", "vision_start_token", "vision_end_token",
    "video_start_token", "video_end_token", "fake_image_token_around_image", "end_of_image_token", "start_of_image_token",
)


def placeholder_ids(processor, config, family: Family) -> list[int]:
    """Every token id that stands for (or frames) an image, video or audio input, for this model and processor:
    generation must never sample one. Read from the config, the processor and the family's own tokens, plus every
    added token the family marks as a tile marker (Idefics3 / SmolVLM `<row_i_col_j>`)."""
    tok = getattr(processor, "tokenizer", processor)
    unk = getattr(tok, "unk_token_id", None)
    ids: set[int] = set()
    configs = [config] + [getattr(config, k, None) for k in ("text_config", "vision_config", "audio_config")]
    for c in configs:
        for key in _CONFIG_TOKEN_KEYS:
            v = getattr(c, key, None) if c is not None else None
            if isinstance(v, int) and v >= 0:
                ids.add(v)
    texts = {family.image_token, family.video_token}
    for owner in (processor, tok):
        for attr in _PROCESSOR_TOKEN_ATTRS:
            v = getattr(owner, attr, None)
            if isinstance(v, str):
                texts.add(v)
    vocab = tok.get_vocab()
    for text in texts:
        if text and text in vocab:
            ids.add(vocab[text])
    if family.tile_markers:
        ids.update(i for t, i in vocab.items() if t.startswith(family.tile_markers))
    ids.discard(unk)
    size = len(vocab)
    return sorted(i for i in ids if 0 <= i < max(size, config_vocab(config)))


def config_vocab(config) -> int:
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "vocab_size", 0) or 0)


# --------------------------------------------------------------------------------------------- shared vision

def inner_model(model):
    """The module whose forward calls self.get_image_features (the transformers *Model inside *ForConditionalGeneration,
    inside PEFT and DDP wrappers)."""
    from peft import PeftModel

    while hasattr(model, "module") and not hasattr(model, "get_image_features"):
        model = model.module  # DDP
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return getattr(model, "model", model)


# The per-image input beside pixel_values, by its argument name in get_image_features, and how pixel_values is laid
# out: "grid" (Qwen: patch rows, image_grid_thw rows per image), "rows" (one entry per image on dim 0: Gemma 3 / 4,
# LLaVA, PaliGemma) or "samples" (Idefics3 / SmolVLM: [batch, images, C, H, W], padded with all-zero images).
_SIDE_INPUTS = ("image_grid_thw", "image_position_ids", "pixel_attention_mask", "image_sizes")


class SharedVision:
    """Encode each distinct image of a get_image_features call once (see the module docstring). `reuse`: keep the
    features across calls too (only when the tower and projector are frozen: their features never change); `clear()`
    drops them (between rollout batches). Counts: `images_in` (images the forwards asked for) and `images_encoded`
    (images the tower ran on)."""

    def __init__(self, model, reuse: bool = False):
        import inspect

        self.target = inner_model(model)
        self.original = self.target.get_image_features  # the class's bound method
        self.signature = inspect.signature(self.original)
        self.__signature__ = self.signature  # generate() reads it to pick the arguments it pre-encodes images with
        self.reuse = reuse
        self.kept: list[tuple[dict, dict]] = []  # (an image's inputs, its outputs), when reuse
        self.images_in = self.images_encoded = 0
        self.target.get_image_features = self

    def remove(self) -> None:
        if self.target.__dict__.get("get_image_features") is self:
            del self.target.get_image_features

    def clear(self) -> None:
        self.kept = []

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        named = dict(bound.arguments)
        named.update(named.pop("kwargs", {}))
        pixels = named.pop("pixel_values")
        side_name = next((k for k in _SIDE_INPUTS if named.get(k) is not None), None)
        side = named.pop(side_name) if side_name else None
        if any(torch.is_tensor(v) for v in named.values()):  # a per-image input this does not know how to split
            self.images_in += pixels.shape[0]  # entries of pixel_values: the unit this layout has
            self.images_encoded += pixels.shape[0]
            return self.original(pixel_values=pixels, **({side_name: side} if side_name else {}), **named)
        units = _units(pixels, side, side_name)
        self.images_in += len(units)
        slots, fresh = [], []  # per unit: ("fresh", i): encoded by this call, or ("kept", i): by an earlier one
        for u in units:
            slot = next((("fresh", j) for j, f in enumerate(fresh) if _same(u, f)), None)
            slot = slot or next((("kept", j) for j, (k, _) in enumerate(self.kept) if _same(u, k)), None)
            if slot is None:
                fresh.append(u)
                slot = ("fresh", len(fresh) - 1)
            slots.append(slot)
        outputs = []
        if fresh:
            joined, joined_side = _join(fresh, side_name)
            out = self.original(**named, pixel_values=joined, **({side_name: joined_side} if side_name else {}))
            outputs = _split(out, fresh, side_name)
            if outputs is None:  # a layout this cannot split per image (tiles): the model's own call, unshared
                self.images_encoded += len(units)
                return self.original(**named, pixel_values=pixels, **({side_name: side} if side_name else {}))
            self.images_encoded += len(fresh)
            self.output_class, self.stacked = type(out), torch.is_tensor(out.pooler_output)
            if self.reuse:
                self.kept.extend((u, _detached(o)) for u, o in zip(fresh, outputs))
        chosen = [outputs[i] if kind == "fresh" else self.kept[i][1] for kind, i in slots]
        pooled = [c["pooler_output"] for c in chosen]
        fields = {"pooler_output": torch.cat(pooled) if self.stacked else tuple(pooled)}
        if "deepstack_features" in chosen[0]:  # Qwen3-VL: per layer, per image
            layers = len(chosen[0]["deepstack_features"])
            fields["deepstack_features"] = [tuple(c["deepstack_features"][i] for c in chosen) for i in range(layers)]
        return self.output_class(**fields)


def _units(pixels, side, side_name) -> list[dict]:
    """pixel_values (and the per-image side input) cut into one entry per image (per example for "samples")."""
    if side_name == "image_grid_thw":
        chunks = torch.split(pixels, side.prod(-1).tolist())
        units = [{"pixels": c, "side": side[i]} for i, c in enumerate(chunks)]
    else:
        units = [{"pixels": pixels[i], "side": side[i] if side is not None else None} for i in range(pixels.shape[0])]
    sums = torch.stack([u["pixels"].double().sum() for u in units]).tolist()  # a cheap key before torch.equal
    for u, total in zip(units, sums):
        u["key"] = (tuple(u["pixels"].shape), total)
    return units


def _join(units: list[dict], side_name):
    if side_name == "image_grid_thw":
        return torch.cat([u["pixels"] for u in units]), torch.stack([u["side"] for u in units])
    side = torch.stack([u["side"] for u in units]) if side_name else None
    return torch.stack([u["pixels"] for u in units]), side


def _real_images(pixels: torch.Tensor) -> int:
    """Idefics3 / SmolVLM: the images of one example that are not all-zero padding (the model's own rule)."""
    flat = pixels.reshape(pixels.shape[0], -1)
    return int(((flat == 0).sum(-1) != flat.shape[1]).sum())


def _split(out, units: list[dict], side_name) -> list[dict] | None:
    """The call's outputs, one dict per unit; None when they do not split one per image."""
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        return None
    if torch.is_tensor(pooled):
        sizes = ([_real_images(u["pixels"]) for u in units] if side_name == "pixel_attention_mask"
                 else [1] * len(units))
        if sum(sizes) != pooled.shape[0]:
            return None
        per = list(torch.split(pooled, sizes))
    else:
        if len(pooled) != len(units):
            return None
        per = list(pooled)
    result = [{"pooler_output": p} for p in per]
    deep = getattr(out, "deepstack_features", None)
    if deep is not None:
        if any(len(layer) != len(units) for layer in deep):
            return None
        for i, r in enumerate(result):
            r["deepstack_features"] = [layer[i] for layer in deep]
    return result


def _same(a: dict, b: dict) -> bool:
    def equal(x, y):
        if x is None or y is None:
            return x is y
        return x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and bool(torch.equal(x, y))

    return a["key"] == b["key"] and equal(a["side"], b["side"]) and equal(a["pixels"], b["pixels"])


def _detached(o: dict) -> dict:
    return {k: ([t.detach() for t in v] if isinstance(v, list) else v.detach()) for k, v in o.items()}
