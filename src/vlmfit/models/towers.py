"""Every rank runs the towers every step. Under FSDP2 or ZeRO-3 each tower block gathers its sharded weights from all
ranks when it runs, so the ranks' collective calls must match: a rank whose batch has no image (text-only rows, or
a video where the others have an image) would skip the tower's all-gathers while the others wait in them, and the
launch hangs (LLaMA-Factory#5616, #5944). Such a batch runs the tower on one blank image instead and adds 0 x its
features to the loss: the same calls on every rank, the same loss and gradients. (DDP instead searches for unused
parameters when a tower trains: train/trainer.launch_arguments.)"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from PIL import Image

MODALITIES = (("pixel_values", "get_image_features"), ("pixel_values_videos", "get_video_features"))


class TowerSync:
    """Blank-image (and blank-video, where the family has a video path and the run's data has videos) inputs made
    once by the run's own processor; `touch` gives what to add to a batch's loss."""

    def __init__(self, processor, videos: bool = False):
        self.inputs: dict[str, dict] = {}
        blank = Image.new("RGB", (64, 64))
        parts = type(processor).get_attributes()  # the sub-processors this processor class is made of
        if "image_processor" in parts:
            self.inputs["pixel_values"] = dict(processor.image_processor(images=[blank], return_tensors="pt"))
        if videos and "video_processor" in parts:
            frames = np.zeros((2, 64, 64, 3), dtype=np.uint8)
            self.inputs["pixel_values_videos"] = dict(processor.video_processor(videos=[frames], return_tensors="pt"))

    def touch(self, model, batch: dict) -> torch.Tensor | None:
        """0 x the features of a blank input for each modality this batch lacks (None when it lacks none)."""
        from peft import PeftModel

        base = model.get_base_model() if isinstance(model, PeftModel) else model
        total = None
        for key, method in MODALITIES:
            # hasattr: a processor can take a modality the model class has no get_*_features for (Gemma 4's video
            # processor; Gemma4ForConditionalGeneration has no get_video_features in transformers 5.24)
            if key in batch or key not in self.inputs or not hasattr(base, method):
                continue
            fn = getattr(base, method)
            accepted = inspect.signature(fn).parameters
            device, dtype = base.device, base.dtype
            kwargs = {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device))
                      for k, v in self.inputs[key].items() if k in accepted}
            out = fn(**kwargs)
            tensors = _tensors(out)
            part = sum(t.float().sum() for t in tensors) * 0.0
            total = part if total is None else total + part
        return total


def _tensors(out) -> list[torch.Tensor]:
    """Every tensor in a get_*_features output (a tensor, a tuple of per-image tensors, or a ModelOutput)."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = [v for v in out.values() if v is not None]
    found = []
    for item in out if isinstance(out, (list, tuple)) else []:
        found.extend(_tensors(item))
    return found
