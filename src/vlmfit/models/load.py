"""Load a VLM and its processor from a hub id, a local HF-format directory, or `tiny:<family>` (offline zoo)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlmfit.errors import UserError
from vlmfit.models.families import Family, family_of_model_type, family_of_processor, generic_family


@dataclass
class Loaded:
    model: torch.nn.Module
    processor: object
    family: Family
    source: str  # where the weights came from (resolved directory or hub id)


def resolve_reference(name: str) -> str:
    """Turn a model reference into something from_pretrained accepts, or fail with a clear message."""
    if name.startswith("tiny:"):
        from vlmfit.models.tiny import TINY_FAMILIES, tiny_path

        fam = name.split(":", 1)[1]
        if fam not in TINY_FAMILIES:
            from vlmfit.errors import nearest

            near = nearest(fam, TINY_FAMILIES)
            raise UserError(
                f"no tiny model '{name}'",
                where="model.name",
                hint=(f"did you mean 'tiny:{near}'? " if near else "") + "see `vlmfit models` for the list",
            )
        return str(tiny_path(fam))
    p = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or p.exists() or name.count("/") != 1
    if looks_local:
        if not p.is_dir():
            raise UserError(
                f"model directory '{name}' does not exist",
                where="model.name",
                hint="give a local HF-format directory (with config.json), a hub id like Qwen/Qwen2-VL-2B-Instruct, or tiny:qwen2_vl",
            )
        if not (p / "config.json").is_file():
            raise UserError(f"'{name}' has no config.json: not an HF-format model directory", where="model.name")
        return str(p)
    return name  # a hub id: from_pretrained downloads (or reads the HF cache)


def pick_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_processor(ref: str, revision: str | None = None):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(ref, revision=revision)
    except OSError as e:
        raise UserError(f"could not load the processor of '{ref}': {str(e).splitlines()[0]}", where="model.name",
                        hint="check the hub id and your network / HF cache (HF_HUB_OFFLINE=1 reads the cache only)") from None


def load_model(ref: str, dtype: str = "auto", revision: str | None = None) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(ref, dtype=pick_dtype(dtype), revision=revision)
    except OSError as e:
        raise UserError(f"could not load the model '{ref}': {str(e).splitlines()[0]}", where="model.name",
                        hint="check the hub id and your network / HF cache (HF_HUB_OFFLINE=1 reads the cache only)") from None


def family_for(model_type: str, processor, name: str) -> Family:
    """The family table for this model; an unknown model with a chat template still trains (prefix labelling)."""
    family = family_of_model_type(model_type) or family_of_processor(processor)
    if family is not None:
        return family
    if getattr(processor, "chat_template", None) and getattr(processor, "tokenizer", None) is not None:
        return generic_family(processor, model_type)
    raise UserError(
        f"model type '{model_type}' is not a known VLM family and its processor has no chat template",
        where="model.name",
        hint="known: qwen2_vl, qwen2_5_vl, qwen3_vl, smolvlm, gemma3, gemma4, llava, paligemma; "
        "or give the processor a chat template",
    )


def load(name: str, dtype: str = "auto", revision: str | None = None) -> Loaded:
    ref = resolve_reference(name)
    processor = load_processor(ref, revision)
    model = load_model(ref, dtype, revision)
    family = family_for(model.config.model_type, processor, name)
    return Loaded(model, processor, family, ref)
