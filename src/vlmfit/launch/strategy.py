"""How a launched run shares its work between processes (launch.strategy), as the Trainer's own arguments:

- ddp: every rank holds the whole model; gradients are averaged (torch DDP).
- fsdp: FSDP2 (torch `fully_shard` through accelerate): weights, gradients and optimizer state sharded, the
  family's repeated blocks of *both* towers wrapped one by one (a wrap list with the decoder layers alone leaves
  the vision tower in one unsharded root unit: accelerate#3748).
- zero2 / zero3: DeepSpeed ZeRO stage 2 (optimizer state and gradients sharded) or 3 (weights too).

The refusals come before any process starts, each with the alternative."""

from __future__ import annotations

import importlib.util

from torch import nn

from vlmfit.config import STRATEGIES
from vlmfit.errors import UserError
from vlmfit.models.families import Family
from vlmfit.models.targets import part_of

def refusal(strategy: str, method: str, nproc_total: int = 2) -> str | None:
    """Why `strategy` cannot run `method` here (None: it can)."""
    if method == "zo":
        return ("forward-only training (method zo) runs in one process: its perturbations are one seeded stream, "
                "not a batch to split; run `vlmfit train` on one device")
    if strategy == "fsdp" and method == "qlora":
        return ("FSDP2 cannot shard 4-bit bitsandbytes weights (accelerate#3874): use --strategy ddp (QLoRA + DDP) "
                "or --strategy zero2, or method lora with --strategy fsdp")
    if strategy in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        return (f"--strategy {strategy} needs DeepSpeed, which is not installed: `pip install deepspeed` (on the "
                "training machines), or use --strategy fsdp (sharded like ZeRO-3, in torch) or ddp")
    if strategy == "zero3" and method == "qlora":
        return ("ZeRO-3 cannot partition 4-bit bitsandbytes weights: use --strategy zero2 or ddp for QLoRA")
    return None


def here_refusal(strategy: str) -> str | None:
    """Why `strategy` cannot run on this machine's devices (None: it can). Checked where the ranks run."""
    import torch

    if strategy == "fsdp" and not torch.cuda.is_available():
        # accelerate (1.15) keeps MULTI_CPU for CPU processes and drops the FSDP plugin without a word: the run would
        # be DDP, every rank holding the whole model, while the user believes it sharded
        return ("FSDP2 through accelerate runs on GPUs only (on CPUs accelerate drops the FSDP plugin and the run "
                "would silently be DDP): use --strategy ddp here, fsdp on the GPU machines")
    return None


def require_supported(strategy: str, method: str) -> None:
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy '{strategy}'", where="--strategy", hint=f"one of {', '.join(STRATEGIES)}")
    why = refusal(strategy, method)
    if why:
        raise UserError(why, where="--strategy")


def shard_layers(model: nn.Module, family: Family) -> list[str]:
    """Class names of the repeated blocks FSDP wraps one by one: the elements of every layer list (ModuleList)
    inside the vision tower and the language model, found in the model itself rather than read from transformers'
    `_no_split_modules` (which for Idefics3 / SmolVLM names the attention, not the encoder layer)."""
    found: dict[str, None] = {}
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.")  # a PEFT model wraps it
        if isinstance(module, nn.ModuleList) and part_of(name, family) in ("vision", "language") and len(module) > 1:
            kinds = {type(child).__name__ for child in module}
            if len(kinds) == 1:
                found.setdefault(kinds.pop())
    return list(found)


def deepspeed_config(strategy: str, precision_bf16: bool, fp16: bool) -> dict:
    """A DeepSpeed config the Trainer completes ("auto": batch sizes, accumulation, clipping, from its arguments)."""
    stage = {"zero2": 2, "zero3": 3}[strategy]
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 3:
        # the whole 16-bit model saved at the end (one file set the run directory can export), not only shards
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": "auto",
                     "stage3_param_persistence_threshold": "auto"})
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto" if precision_bf16 else False},
        "fp16": {"enabled": "auto" if fp16 else False},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
    }


def fsdp_config(model: nn.Module, family: Family) -> dict:
    return {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": shard_layers(model, family), "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False}


def strategy_arguments(strategy: str, model: nn.Module, family: Family, bf16: bool, fp16: bool,
                       trainable_towers_unused: bool) -> dict:
    """TrainingArguments for `strategy` (empty for a single process). `trainable_towers_unused`: some trained
    parameter may get no gradient on a rank in some step (Gemma 4's audio tower, say): DDP must look for them."""
    if strategy == "ddp":
        return {"ddp_find_unused_parameters": trainable_towers_unused}
    if strategy == "fsdp":
        return {"fsdp": "full_shard auto_wrap", "fsdp_config": fsdp_config(model, family)}
    return {"deepspeed": deepspeed_config(strategy, bf16, fp16)}
