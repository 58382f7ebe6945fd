"""How many tokens an image (or a video frame) becomes: LLM tokens and vision-encoder positions.

The rules are data (Family.image_rule in vlmfit.models.families): a rule kind and the processor defaults the hub
checkpoints ship; this module does the arithmetic. Config keys a rule needs and the config lacks are an error
naming the key, never a guessed default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlmfit.models.families import Family, require


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


def image_cost(config, family: Family, height: int, width: int, *, frames: int = 0, min_pixels: int | None = None,
               max_pixels: int | None = None, max_soft_tokens: int | None = None, model: str = "") -> ImageCost:
    """Tokens for one image of height x width (frames=0) or one video of `frames` frames at that size."""
    rule = family.image_rule
    v = getattr(config, "vision_config", None)  # a text-only config has none: no image tokens at all
    if v is None:
        return ImageCost(0, 0, "no vision tower")
    patch = int(require(v, "patch_size", model))
    if rule.kind == "dynamic":
        merge = int(require(v, "spatial_merge_size", model))
        factor = patch * merge
        cap = max_pixels or (rule.video_max_pixels if frames else rule.max_pixels)
        h, w = smart_resize(height, width, factor, min_pixels or rule.min_pixels, cap)
        per_frame = (h // patch) * (w // patch)
        temporal = int(require(v, "temporal_patch_size", model))
        groups = max(1, math.ceil(frames / temporal)) if frames else 1  # an image is one temporal group
        patches = per_frame * groups
        return ImageCost(patches // merge**2, patches, f"{h}x{w} px -> {per_frame // merge**2} tokens"
                         + (f" x {groups} frame groups" if frames else ""))
    if rule.kind == "soft_tokens":
        pool = int(require(v, "pooling_kernel_size", model))
        per = max_soft_tokens or (rule.video_soft_tokens if frames else
                                  int(getattr(config, "vision_soft_tokens_per_image", 0) or rule.soft_tokens))
        n = max(frames, 1)
        return ImageCost(per * n, per * pool**2 * n, f"{per} soft tokens x {n}, encoder {per * pool**2} each")
    if rule.kind == "tiles":
        tile = int(require(v, "image_size", model))
        scale = int(require(config, "scale_factor", model))
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
    size = int(require(v, "image_size", model))
    patches = (size // patch) ** 2
    tokens = int(require(config, rule.tokens_key, model)) if rule.tokens_key else patches
    extra = 1 if rule.cls_position else 0
    n = max(frames, 1)
    return ImageCost(tokens * n, (patches + extra) * n, f"{size} px fixed: {tokens} tokens x {n}")
