"""The weights a policy run (dpo, grpo) starts from: model.name, or an earlier run's adapter (trained further) or full
weights (`<method>.init_from`: SFT first, then preference or reward optimisation)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from vlmfit.config import RunConfig
from vlmfit.errors import UserError
from vlmfit.models.load import Loaded, load_for
from vlmfit.models.targets import prepare_kbit
from vlmfit.rundir import RunDir


def start_run(init_from: Path, key: str) -> RunDir:
    """The run directory `init_from` names (an init_from that is not one fails here, before any data is prepared)."""
    return RunDir.open(init_from, where=f"{key} ({init_from})")


def load_start(cfg: RunConfig, console: Console, init_from: Path | None, tuning: str, key: str) -> tuple[Loaded, str]:
    """The model to start from: model.name ("base"), or an earlier run's weights: its LoRA adapter, trained further
    ("adapter"), or its full weights ("model"). `key`: the recipe key that named the run (dpo.init_from, ...)."""
    if init_from is None:
        return load_base(cfg.model.name, cfg), "base"
    start = start_run(init_from, key)
    where = f"{key} ({start.path})"
    prev = start.config()
    if prev.model.name != cfg.model.name:
        raise UserError(f"that run was trained from '{prev.model.name}', but this recipe's model.name is '{cfg.model.name}'",
                        where=where, hint=f"set model.name: {prev.model.name}")
    kind = start.trained_kind()
    if kind not in ("model", "adapter"):
        raise UserError("the run directory has no saved weights (model/ or adapter/)", where=where,
                        hint="was it trained with output.save_model: false? train it again with weights saved")
    if kind == "model":
        console.print(f"starting from the full weights of {start.path}")
        return load_base(str(start.weights_path("model")), cfg), "model"
    from peft import PeftModel

    loaded = load_base(cfg.model.name, cfg)  # this recipe's model section: resolution caps, quantization
    loaded.model = PeftModel.from_pretrained(loaded.model, str(start.weights_path("adapter")), is_trainable=True)
    if tuning == "lora":
        console.print(f"continuing the adapter of {start.path} (its own LoRA settings: the lora section is not used)")
    return loaded, "adapter"


def load_base(name: str, cfg: RunConfig) -> Loaded:
    """The weights to start from, with the model section's resolution caps and quantization (QLoRA: 4bit + lora)."""
    loaded = load_for(cfg, name)
    loaded.model = prepare_kbit(loaded.model)  # a quantized base: norms upcast and input grads on, as for SFT
    return loaded
