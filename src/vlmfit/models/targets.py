"""Which parameters train, per part of the model: LoRA target resolution (the user's scopes (language / vision /
projector) x layer names, or all-linear, become the exact module names of this model, with wrapper modules resolved
to the nn.Linear they wrap), applying it with PEFT, and activation checkpointing per tower."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from vlmfit.errors import UserError
from vlmfit.models.families import GENERIC_PARTS, Family


def part_of(name: str, family: Family) -> str | None:
    """Which part of the model a module name belongs to: projector, vision, language, or None (e.g. lm_head)."""
    key = name + "."
    if not (family.vision_prefixes or family.language_prefixes):  # unknown family: go by module-name keywords
        for part, words in GENERIC_PARTS:
            if any(w in name for w in words):
                return part
        return None
    if any(key.startswith(p) for p in family.projector_prefixes):
        return "projector"
    if any(key.startswith(p) for p in family.vision_prefixes):
        return "vision"
    if any(key.startswith(p) for p in family.language_prefixes):
        return "language"
    return None


@dataclass
class Resolved:
    modules: list[str]  # full module names that get LoRA (all nn.Linear, inner linears of wrappers included)
    fully_trained: list[str]  # top-level modules of the parts trained in full (PEFT modules_to_save)
    groups: dict[str, dict]  # per part: {"lora_modules": n, "full_modules": n, "params": trainable params}
    skipped: list[str]  # what matched the request but cannot carry LoRA, with the reason

    def as_dict(self) -> dict:
        return {"lora_modules": self.modules, "fully_trained": self.fully_trained, "groups": self.groups, "skipped": self.skipped}

    def table(self):
        from rich.table import Table

        table = Table(title="LoRA targets")
        for col in ("module group", "LoRA modules", "fully trained modules", "trainable params"):
            table.add_column(col, justify="left" if col == "module group" else "right")
        for part, g in self.groups.items():
            table.add_row(part, str(g["lora_modules"]), str(g["full_modules"]), f"{g['params']:,}")
        return table


def _part_roots(model: nn.Module, family: Family, part: str) -> list[str]:
    """The outermost modules that make up `part` (e.g. model.visual.merger for Qwen's projector). A container
    (Qwen3-VL's deepstack_merger_list is a ModuleList) stands for its children: PEFT's modules_to_save copies
    modules that compute, not lists of them."""
    modules = dict(model.named_modules())
    roots = []
    for name, module in modules.items():
        if name and part_of(name, family) == part and not any(name.startswith(r + ".") for r in roots):
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if part_of(parent, family) != part:
                roots.append(name)
    expanded = []
    for r in roots:
        stack = [r]
        while stack:
            name = stack.pop(0)
            if isinstance(modules[name], (nn.ModuleList, nn.ModuleDict)):
                stack[:0] = [f"{name}.{child}" for child, _ in modules[name].named_children()]
            else:
                expanded.append(name)
    return expanded


def resolve_lora_targets(model: nn.Module, family: Family, scope: list[str], targets: str | list[str],
                         train_fully: list[str] = ()) -> Resolved:
    """Scopes x layer names -> exact module names. Parts in `train_fully` are trained in full instead of LoRA."""
    wrappers = set(family.wrapper_classes)
    wanted = None if targets == "all-linear" else set(targets)
    modules, skipped = [], []
    groups = {p: {"lora_modules": 0, "full_modules": 0, "params": 0} for p in dict.fromkeys([*scope, *train_fully])}
    for name, mod in model.named_modules():
        part = part_of(name, family)
        if part not in scope or part in train_fully:
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
        if isinstance(mod, nn.Linear):
            # The linear inside a wrapper (Gemma4ClippableLinear.linear) goes by its wrapper's name: LoRA sits on
            # the inner linear, so the wrapper's input/output clamps keep applying around the adapted layer.
            in_wrapper = parent is not None and type(parent).__name__ in wrappers
            label = name.rsplit(".", 2)[-2] if in_wrapper else leaf
            if wanted is None or label in wanted:
                modules.append(name)
                groups[part]["lora_modules"] += 1
        elif isinstance(mod, nn.modules.conv._ConvNd) and (wanted is None or leaf in wanted):
            skipped.append(f"{name} ({type(mod).__name__}): LoRA needs a linear layer; frozen (add the part to "
                           "lora.train_fully to train it)")
    fully = [r for part in train_fully for r in _part_roots(model, family, part)]
    for part in train_fully:
        n = [r for r in fully if part_of(r, family) == part]
        groups[part]["full_modules"] = len(n)
        groups[part]["params"] = sum(p.numel() for r in n for p in model.get_submodule(r).parameters())
    if not modules and not fully:
        raise UserError(
            f"no linear layers match lora.targets={targets!r} in scope {scope}",
            where="lora.targets",
            hint="use 'all-linear' or layer names such as q_proj, v_proj (`vlmfit doctor` lists what it resolved)",
        )
    return Resolved(modules, fully, groups, skipped)


def count_lora_params(model: nn.Module, resolved: Resolved, family: Family) -> None:
    """After PEFT injection: fill in the trainable LoRA parameters per part (PEFT names shift by its wrapper)."""
    for part in resolved.groups:
        if resolved.groups[part]["lora_modules"]:
            resolved.groups[part]["params"] = 0
    for name, p in model.named_parameters():
        if "lora_" in name and p.requires_grad:
            base = name.split(".lora_")[0].removeprefix("base_model.model.")
            part = part_of(base, family)
            if part in resolved.groups:
                resolved.groups[part]["params"] += p.numel()


def resolve_for(model: nn.Module, family: Family, lora) -> Resolved:
    """resolve_lora_targets with the recipe's lora section."""
    return resolve_lora_targets(model, family, list(lora.scope), lora.targets, list(lora.train_fully))


def peft_config(lora, resolved: Resolved):
    """PEFT's LoraConfig for the recipe's lora section on the resolved modules."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=resolved.modules or None, modules_to_save=resolved.fully_trained or None,
                      task_type="CAUSAL_LM")


def make_trainable(model: nn.Module, family: Family, method: str, lora) -> tuple[nn.Module, Resolved | None]:
    """full: every parameter trains. Otherwise (lora, qlora, zo): PEFT adapters on the resolved targets, base frozen;
    a k-bit base gets PEFT's k-bit preparation (norms upcast, input grads) first. Returns (model, resolved)."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    from peft import get_peft_model

    model = prepare_kbit(model)
    resolved = resolve_for(model, family, lora)
    model = get_peft_model(model, peft_config(lora, resolved))
    count_lora_params(model, resolved, family)
    return model, resolved


def prepare_kbit(model: nn.Module) -> nn.Module:
    """PEFT's k-bit preparation for a quantized base (norms upcast, input grads on); a no-op otherwise. vlmfit turns
    checkpointing on per tower itself (enable_checkpointing), so PEFT must not do it globally."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def enable_checkpointing(model: nn.Module, family: Family, parts: list[str]) -> None:
    """Activation checkpointing for the language model and/or the vision tower, separately.

    transformers switches it on for every layer that supports it; the layers of the parts not asked for are then
    switched back off through their public `gradient_checkpointing` flag.

    Non-reentrant checkpointing gives the parameters inside a checkpointed block their gradients whatever its input,
    so no input needs to require grad: see drop_input_grad_hooks."""
    if not parts:
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    drop_input_grad_hooks(model)
    for name, mod in model.named_modules():
        if getattr(mod, "gradient_checkpointing", None) is True:
            base = name.removeprefix("base_model.model.")
            if part_of(base, family) not in parts:
                mod.gradient_checkpointing = False


def drop_input_grad_hooks(model: nn.Module) -> None:
    """Undo enable_input_require_grads, which transformers (on enabling checkpointing) and PEFT (on wrapping a
    checkpointed model) call: it hooks every sub-model's input embeddings, a frozen vision tower's patch embedding
    included, which then keeps its activations for a backward that never reaches it (4.7 GiB in the Qwen2.5-VL-3B
    video plan). vlmfit checkpoints non-reentrantly, which needs no input to require grad."""
    model.disable_input_require_grads()
