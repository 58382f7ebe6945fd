"""Activation offload (`train.activation_offload: [language, vision]`): the tensors a tower's forward saves for
backward go to host memory as they are saved and come back when backward needs them, through torch's
saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks, the mechanism of torch.autograd.graph.save_on_cpu:
pinned host copies on a GPU, copied back non-blocking), so the device holds about one block's activations at a time
instead of every block's. Entered by a forward pre-hook on the tower's module and left by its forward hook
(always_call, so an exception leaves no hook behind); tensors saved outside the tower (the loss, the other tower)
stay where they are. Same math: tests/test_offload.py checks equal losses and gradients."""

from __future__ import annotations

import torch

from vlmfit.models.families import Family


class HostActivations(torch.autograd.graph.saved_tensors_hooks):
    """save_on_cpu's pack / unpack, counting what it packs (`packed`, `bytes_moved`: device tensors copied)."""

    def __init__(self, pin_memory: bool, copy_host: bool = False):
        self.packed = 0
        self.bytes_moved = 0

        def pack(t: torch.Tensor):
            self.packed += 1
            if t.device.type == "cpu" and not copy_host:  # already in host memory (copy_host: tests, on a CPU)
                return t.device, t
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin_memory)
            host.copy_(t)
            self.bytes_moved += t.numel() * t.element_size()
            return t.device, host

        def unpack(packed):
            device, t = packed
            return t.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)


def tower_modules(model: torch.nn.Module, family: Family, parts) -> dict[str, torch.nn.Module]:
    """{name: module} of the towers named in `parts` (language, vision) present in this model."""
    prefixes = {"language": family.language_prefixes, "vision": family.vision_prefixes}
    wanted = {p.rstrip(".") for part in parts for p in prefixes[part]}
    return {n: m for n, m in model.named_modules() if n.removeprefix("base_model.model.") in wanted}


def offload_activations(model: torch.nn.Module, family: Family, parts, copy_host: bool = False) -> HostActivations | None:
    """Hook the towers in `parts` so their saved activations live in host memory; None when there is none."""
    towers = tower_modules(model, family, parts)
    if not towers:
        return None
    hooks = HostActivations(pin_memory=torch.cuda.is_available(), copy_host=copy_host)
    for module in towers.values():
        module.register_forward_pre_hook(lambda m, args: hooks.__enter__())
        module.register_forward_hook(lambda m, args, out: hooks.__exit__(None, None, None), always_call=True)
    return hooks
