"""The model's module tree without its weights (the meta device), and the one rule for which linears vlmfit's
k-bit loading quantizes: what the loader, the planner and the doctor all read."""

from __future__ import annotations

import torch
import torch.nn as nn

from vlmfit.models.families import Family

BNB_BLOCK = 64  # bitsandbytes quantizes weights in blocks of this many input values


def meta_model(config) -> nn.Module:
    """The class transformers would load for `config`, instantiated with no storage (exact shapes, zero bytes).
    A dual encoder such as CLIP is not an image-text-to-text model; it is built with AutoModel."""
    from transformers import AutoModel, AutoModelForImageTextToText

    with torch.device("meta"):
        try:
            return AutoModelForImageTextToText.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def meta_model_of(ref: str, revision: str | None = None) -> nn.Module:
    """meta_model of a resolved reference (local directory or hub id: config.json only)."""
    from transformers import AutoConfig

    return meta_model(AutoConfig.from_pretrained(ref, revision=revision))


def _kept_in_fp32(name: str, keep: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) or f".{k}." in f".{name}." for k in keep)


def quantizable(name: str, module: nn.Module, family: Family, model: nn.Module) -> bool:
    """Whether k-bit loading quantizes this module: a plain linear of the language side (the vision tower and the
    projector are a small share of the parameters whose quantization costs accuracy, and bitsandbytes' CPU 4-bit
    kernel fails on their biased layers under checkpointing), not the LM head, input width a multiple of
    bitsandbytes' block, and not in the class's _keep_in_fp32_modules."""
    from vlmfit.models.targets import part_of

    if type(module) is not nn.Linear or module is model.get_output_embeddings():
        return False
    return (part_of(name, family) not in ("vision", "projector") and module.in_features % BNB_BLOCK == 0
            and not _kept_in_fp32(name, list(model._keep_in_fp32_modules or [])))  # PreTrainedModel's; None: none


def unquantized_linears(model: nn.Module, family: Family) -> list[str]:
    """Full names of the linears `quantizable` keeps in the compute dtype (bitsandbytes' llm_int8_skip_modules)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not quantizable(n, m, family, model)]
