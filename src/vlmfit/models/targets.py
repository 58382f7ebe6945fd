"""LoRA target resolution: the user's scopes (language / vision / projector) x layer names (or all-linear) become
the exact module names of this model, with wrapper modules resolved to the nn.Linear they wrap."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from vlmfit.errors import UserError
from vlmfit.models.families import Family


def part_of(name: str, family: Family) -> str | None:
    """Which part of the model a module name belongs to: projector, vision, language, or None (e.g. lm_head)."""
    key = name + "."
    if any(key.startswith(p) for p in family.projector_prefixes):
        return "projector"
    if any(key.startswith(p) for p in family.vision_prefixes):
        return "vision"
    if any(key.startswith(p) for p in family.language_prefixes):
        return "language"
    return None


@dataclass
class Resolved:
    modules: list[str]  # full module names handed to PEFT (all nn.Linear)
    per_part: dict[str, int]  # how many modules per part
    skipped: list[str]  # notes on what matched a name but cannot carry LoRA


def resolve_lora_targets(model: nn.Module, family: Family, scope: list[str], targets: str | list[str]) -> Resolved:
    wrappers = set(family.wrapper_classes)
    modules, skipped, per_part = [], [], {}
    wanted = None if targets == "all-linear" else set(targets)
    for name, mod in model.named_modules():
        part = part_of(name, family)
        if part not in scope:
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent_leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if isinstance(mod, nn.Linear):
            # A linear inside a wrapper (Gemma4ClippableLinear.linear) is named after its wrapper by the user.
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
            label = parent_leaf if parent is not None and type(parent).__name__ in wrappers else leaf
            if wanted is None or label in wanted:
                modules.append(name)
                per_part[part] = per_part.get(part, 0) + 1
        elif wanted is not None and leaf in wanted and type(mod).__name__ not in wrappers:
            skipped.append(f"{name} ({type(mod).__name__}: LoRA needs a linear layer)")
    if not modules:
        raise UserError(
            f"no linear layers match lora.targets={targets!r} in scope {scope}",
            where="lora.targets",
            hint="use 'all-linear' or names such as q_proj, v_proj (see `vlmfit doctor` for the model's layers)",
        )
    return Resolved(modules, per_part, skipped)
