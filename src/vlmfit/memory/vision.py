"""How many tokens an image (or a video frame) becomes, per family: LLM tokens and vision-encoder positions.

The rules are data (IMAGE_RULES, one entry per family); each names a rule kind and the processor defaults the
hub checkpoints ship (preprocessor_config.json), so the plan sees what the real processor would produce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageRule:
    kind: str  # "dynamic" (Qwen smart_resize), "fixed" (one square resize), "soft_tokens" (Gemma 4), "tiles" (Idefics3)
    min_pixels: int = 0  # processor defaults for "dynamic"
    max_pixels: int = 0
    video_max_pixels: int = 0  # per frame, for videos (Qwen's video processors use a lower cap)
    soft_tokens: int = 0  # Gemma 4 default max_soft_tokens
    video_soft_tokens: int = 0  # Gemma 4 tokens per video frame
    longest_edge_tiles: int = 4  # Idefics3: images are resized to this many tiles on the longest edge
    note: str = ""


IMAGE_RULES: dict[str, ImageRule] = {
    # Qwen2/2.5-VL: one LLM token per 28x28 px after smart_resize, the encoder sees 4x that (2x2 merge);
    # hub preprocessor_config: min_pixels 3136, max_pixels 12845056; video frames capped at 768 tokens.
    "qwen2_vl": ImageRule("dynamic", 3136, 12845056, 768 * 28 * 28, note="1 token / 28x28 px; encoder 4x"),
    "qwen2_5_vl": ImageRule("dynamic", 3136, 12845056, 768 * 28 * 28, note="1 token / 28x28 px; encoder 4x"),
    # Qwen3-VL: patch 16, merge 2 -> one token per 32x32 px; size.shortest_edge 65536, longest_edge 16777216.
    "qwen3_vl": ImageRule("dynamic", 65536, 16777216, 768 * 32 * 32, note="1 token / 32x32 px; encoder 4x"),
    # Gemma 3: every image is resized to 896x896 (4096 patches of 14 px), pooled to mm_tokens_per_image (256).
    "gemma3": ImageRule("fixed", note="fixed 256 tokens; encoder 4096 patches at 896 px"),
    # Gemma 4: patch 16, pooling 3; pixels are padded to max_soft_tokens*9 patches, so the encoder always runs
    # that many positions. Default 280 soft tokens per image, 70 per video frame.
    "gemma4": ImageRule("soft_tokens", soft_tokens=280, video_soft_tokens=70, note="max_soft_tokens, encoder 9x"),
    # SmolVLM / Idefics3: longest edge resized to 4 tiles of vision image_size, split into tiles (+1 global
    # image when split); each tile = (image_size/patch)^2 patches, pixel-shuffled by scale_factor^2 into tokens.
    "smolvlm": ImageRule("tiles", longest_edge_tiles=4, note="tiles of image_size px (+1 global)"),
    "llava": ImageRule("fixed", note="CLIP 336 px: 576 tokens (+CLS in the encoder)"),
    "paligemma": ImageRule("fixed", note="(image_size/patch)^2 tokens"),
}


@dataclass(frozen=True)
class ImageCost:
    tokens: int  # LLM tokens per image (or per video of `frames` frames)
    encoder_positions: int  # vision-encoder sequence length for it
    detail: str


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's resize (transformers' qwen2_vl smart_resize): both sides multiples of factor, pixels within bounds."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


def _vision(config):
    return getattr(config, "vision_config", None)


def image_cost(config, family: str | None, height: int, width: int, *, frames: int = 0, min_pixels: int | None = None,
               max_pixels: int | None = None, max_soft_tokens: int | None = None) -> ImageCost:
    """Tokens for one image of height x width (frames=0) or one video of `frames` frames at that size."""
    rule = IMAGE_RULES.get(family or "", ImageRule("fixed"))
    v = _vision(config)
    if v is None:
        return ImageCost(0, 0, "no vision tower")
    patch = int(getattr(v, "patch_size", 14))
    if rule.kind == "dynamic":
        merge = int(getattr(v, "spatial_merge_size", 2))
        factor = patch * merge
        cap = max_pixels or (rule.video_max_pixels if frames else rule.max_pixels)
        h, w = smart_resize(height, width, factor, min_pixels or rule.min_pixels, cap)
        per_frame = (h // patch) * (w // patch)
        temporal = int(getattr(v, "temporal_patch_size", 2))
        groups = max(1, math.ceil(frames / temporal)) if frames else 1  # an image is one temporal group
        patches = per_frame * groups
        return ImageCost(patches // merge**2, patches, f"{h}x{w} px -> {per_frame // merge**2} tokens"
                         + (f" x {groups} frame groups" if frames else ""))
    if rule.kind == "soft_tokens":
        pool = int(getattr(v, "pooling_kernel_size", 3))
        per = max_soft_tokens or (rule.video_soft_tokens if frames else
                                  int(getattr(config, "vision_soft_tokens_per_image", 0) or rule.soft_tokens))
        n = max(frames, 1)
        return ImageCost(per * n, per * pool**2 * n, f"{per} soft tokens x {n}, encoder {per * pool**2} each")
    if rule.kind == "tiles":
        tile = int(getattr(v, "image_size", 512))
        scale = int(getattr(config, "scale_factor", 2))
        longest = tile * rule.longest_edge_tiles
        s = longest / max(height, width)
        h, w = height * s, width * s
        if max_pixels and h * w > max_pixels:  # a resolution cap shrinks the image before tiling
            r = math.sqrt(max_pixels / (h * w))
            h, w = h * r, w * r
        tiles = math.ceil(h / tile) * math.ceil(w / tile)
        tiles += 1 if tiles > 1 else 0
        per_tile = (tile // patch) ** 2
        n = max(frames, 1)
        return ImageCost(tiles * per_tile // scale**2 * n, tiles * per_tile * n, f"{tiles} tiles of {tile} px x {n}")
    # fixed: one square resize of the vision config's image_size
    size = int(getattr(v, "image_size", 224))
    patches = (size // patch) ** 2
    tokens = int(getattr(config, "mm_tokens_per_image", 0) or getattr(config, "image_seq_length", 0) or patches)
    extra = 1 if "clip" in str(getattr(v, "model_type", "")) else 0  # CLIP keeps a CLS position in the encoder
    n = max(frames, 1)
    return ImageCost(tokens * n, (patches + extra) * n, f"{size} px fixed: {tokens} tokens x {n}")
