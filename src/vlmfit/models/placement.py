"""Modules that stay in host memory while the rest of the model is on the GPU (issue 30, items 2 and 3):
- towers vlmfit's data never runs (`Family.unused_towers`: Gemma 4's audio tower on image and video data), recipe
  key `model.unused_towers: cpu | device`;
- frozen lookup tables (`Family.host_tables`: Gemma 3n / 4's per-layer embeddings, 262,144 x layers x 256, 4.4 GiB
  of Gemma 4 E2B's 9.5 GiB in bf16, with no matmul), `model.per_layer_embeddings: cpu | device | auto` (auto: cpu
  whenever the table is frozen, i.e. not under full fine-tuning; its cost is one host lookup and one
  [tokens, layers x 256] copy to the GPU per forward, 36 MB at 2,048 tokens for E2B).

A kept module's `_apply` is replaced on the instance so that `model.to(device)` (the Trainer's, the evaluator's)
leaves it where it is, and accelerate's AlignDevicesHook (io_same_device) runs it on the host and hands its output
back on the caller's device; the state dict keys do not change, so saving and exporting write every weight of the
base. Under `vlmfit launch` (DDP needs every parameter on one device type) nothing is kept on the host."""

from __future__ import annotations

import types

import torch

from vlmfit.models.families import Family

HOST = "cpu"


def host_modules(model: torch.nn.Module, family: Family, model_cfg, method: str, train_fully=()) -> dict[str, str]:
    """{module name: why} of the modules this recipe keeps in host memory (on a CUDA run)."""
    names = {n for n, _ in model.named_modules()}
    out = {}
    if getattr(model_cfg, "unused_towers", "cpu") == "cpu":
        out.update({n: "a tower the data never runs" for n in family.unused_towers if n in names})
    mode = getattr(model_cfg, "per_layer_embeddings", "auto")
    trained = method == "full" or "language" in train_fully
    if mode == "cpu" or (mode == "auto" and not trained):
        out.update({n: "a frozen per-layer lookup table" for n in family.host_tables if n in names})
    return out


def keep_on_host(module: torch.nn.Module) -> None:
    """`module` in host memory from now on, whatever `.to()` its model gets; run there, output on the caller's device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    module.to(HOST)

    def _apply(self, fn, recurse=True):  # Module.to / cuda / half recurse through _apply: this subtree stays put
        return self

    module._apply = types.MethodType(_apply, module)
    add_hook_to_module(module, AlignDevicesHook(execution_device=HOST, io_same_device=True))


def place(model: torch.nn.Module, names: dict[str, str]) -> list[str]:
    """Keep the named modules on the host; the lines that say what moved and how much it saves on the device."""
    lines = []
    for name, why in names.items():
        module = model.get_submodule(name)
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        keep_on_host(module)
        lines.append(f"{name} kept in host memory ({why}): {size / 2**30:.2f} GiB off the device")
    return lines
