"""Image features computed once: when the vision tower and the projector are frozen, an image's features (the
projector's output the language model reads) are the same every epoch, so they are kept (in memory, up to a
budget) and handed to the model through transformers' `mm_encoder_outputs` input, which skips the vision tower.
Each image is known by its key (its example's content hash and its index there: chat/rows.py puts them in the
batch), so the features follow the image whatever batch it lands in; one cache serves one run, one processor."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmfit.models.families import Family
from vlmfit.models.targets import part_of

IMAGE_KEYS = "vlmfit_image_keys"  # batch key: one key per image, in the order of the batch's images


def feature_cache_refusal(model, family: Family) -> str | None:
    """Why image features cannot be reused for this model as it trains (None: they can)."""
    if not family.feature_cache:
        return f"not verified for {family.name}"
    for name, p in model.named_parameters():
        if p.requires_grad and part_of(name.removeprefix("base_model.model."), family) in ("vision", "projector"):
            return "the vision tower or projector trains (lora.scope / lora.train_fully / method full)"
    for name, module in model.named_modules():
        rate = module.p if isinstance(module, torch.nn.Dropout) else None
        if rate and part_of(name.removeprefix("base_model.model."), family) in ("vision", "projector"):
            return "the vision tower has dropout, so its features differ each time"
    return None


class FeatureCache:
    """Per-image features on the CPU, up to `budget_bytes`; images past the budget are encoded every time."""

    def __init__(self, budget_bytes: int):
        self.features: dict[str, torch.Tensor] = {}
        self.left = budget_bytes
        self.hits = self.misses = 0
        self.stacked = False
        self.off: str | None = None  # why the cache stopped keeping features (a layout it cannot split per image)

    def inputs(self, model, batch: dict) -> dict:
        """The batch with its images' features in `mm_encoder_outputs` instead of `pixel_values`."""
        from peft import PeftModel

        keys = batch.pop(IMAGE_KEYS, None)
        if not keys or "pixel_values" not in batch or self.off:
            return batch
        found = [self.features.get(k) for k in keys]
        out = {k: v for k, v in batch.items() if k != "pixel_values"}
        if all(f is not None for f in found):
            self.hits += len(keys)
            device = batch["pixel_values"].device
            pooled = [f.to(device, non_blocking=True) for f in found]
            # the layout the family's own get_image_features gives: one tensor, or a tuple of per-image ones
            encoded = torch.stack(pooled) if self.stacked else tuple(pooled)
        else:
            self.misses += sum(f is None for f in found)
            grid = {"image_grid_thw": batch["image_grid_thw"]} if "image_grid_thw" in batch else {}
            base = model.get_base_model() if isinstance(model, PeftModel) else model
            with torch.no_grad():
                encoded = base.get_image_features(pixel_values=batch["pixel_values"], return_dict=True, **grid).pooler_output
            self.stacked = torch.is_tensor(encoded)
            if len(encoded) != len(keys):  # not one entry per image (tiles): use these, keep nothing from now on
                self.off = f"{len(encoded)} feature entries for {len(keys)} images"
            else:
                for key, f in zip(keys, encoded):
                    size = f.numel() * f.element_size()
                    if key not in self.features and size <= self.left:
                        self.features[key], self.left = f.detach().to("cpu", copy=True), self.left - size
        out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=encoded)}
        return out
