"""Padding-free packed batches, the model side: a packed batch is one row holding several examples end to end,
with no attention mask and no padding. Each example gets its own position ids, starting at 0, from which
transformers' mask code (masking_utils.find_packed_sequence_indices) builds the block-diagonal mask that keeps
attention inside each example (flash-attention's varlen kernel reads the same positions on GPU). For the M-RoPE
families the positions are the model's own `get_rope_index`, run per example, with text positions as a fourth row
(the layout Qwen2/2.5/3-VL's forward reads as packed)."""

from __future__ import annotations

import torch

from vlmfit.models.families import Family

SEGMENTS = "vlmfit_segments"  # batch key, [examples, 4]: row, tokens, images, videos of each packed example, in order


def packing_refusal(family: Family) -> str | None:
    """Why this family is not packed (None: it is)."""
    if family.packing:
        return None
    return family.packing_note or f"packing is not verified for {family.name}"


def _rope_index_owner(model):
    """The Qwen*VLModel inside the *ForConditionalGeneration (under PEFT's wrapper when adapted): the module whose
    get_rope_index the M-RoPE families' forward calls (transformers 5.24)."""
    from peft import PeftModel

    return (model.get_base_model() if isinstance(model, PeftModel) else model).model


@torch.no_grad()
def packed_position_ids(model, batch: dict, family: Family) -> torch.Tensor:
    """Position ids of a packed batch (batch[SEGMENTS] says which row each example is in, its tokens, images and
    videos): per row, an arange per example and one for the row's padding tail (a sequence of its own);
    [rows, tokens], or for "mrope" [4, rows, tokens] (text row + the model's 3-D)."""
    ids = batch["input_ids"]
    rows, width = ids.shape
    mrope = family.packing == "mrope"
    owner = _rope_index_owner(model) if mrope else None
    per_row: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    used = [0] * rows
    img = vid = 0
    for r, n, n_img, n_vid in batch[SEGMENTS].tolist():
        start = used[r]
        text = torch.arange(n, device=ids.device)
        if mrope:
            kwargs = {"mm_token_type_ids": batch["mm_token_type_ids"][r:r + 1, start:start + n]}
            if n_img:
                kwargs["image_grid_thw"] = batch["image_grid_thw"][img:img + n_img]
            if n_vid:
                kwargs["video_grid_thw"] = batch["video_grid_thw"][vid:vid + n_vid]
            ones = torch.ones((1, n), dtype=torch.long, device=ids.device)
            rope, _ = owner.get_rope_index(ids[r:r + 1, start:start + n], attention_mask=ones, **kwargs)
            per_row[r].append(torch.cat([text.view(1, 1, n), rope.to(ids.device)], 0))
        else:
            per_row[r].append(text.view(1, n))
        used[r], img, vid = start + n, img + n_img, vid + n_vid
    out = []
    for r in range(rows):
        tail = torch.arange(width - used[r], device=ids.device)
        tail = tail.view(1, 1, -1).expand(4, 1, -1) if mrope else tail.view(1, -1)
        out.append(torch.cat(per_row[r] + [tail], -1))
    return torch.cat(out, -2)


def unpack_inputs(model, batch: dict, family: Family) -> dict:
    """The model inputs of a batch: for a packed one, its per-example position ids in place of the segment table
    (and no cache, whose presence would turn the packed mask off); any other batch unchanged."""
    if SEGMENTS not in batch:
        return batch
    inputs = {k: v for k, v in batch.items() if k != SEGMENTS}
    inputs["position_ids"] = packed_position_ids(model, batch, family)
    inputs["use_cache"] = False
    return inputs
