"""Measure the peak memory of a few real training steps, to check a plan against the device.

CUDA: torch.cuda.max_memory_allocated (what the caching allocator handed to tensors), reset before the steps.
CPU: there is no allocator counter, and process RSS mixes in malloc caching and Python objects, so vlmfit counts
tensor storage directly. `TensorMemory` is a TorchDispatchMode: every storage an operator returns is counted once
(keyed by its data pointer) and a weakref finalizer on the storage subtracts it when the storage is freed, so the
running sum is the bytes of live tensor storage at every moment and its maximum is the peak. Storages alive before
the mode starts (weights, buffers, bitsandbytes quantization state) are found through the garbage collector and
registered the same way. Every tensor op goes through the dispatcher (autograd's backward ops included, on the
thread that calls backward for CPU tensors), so nothing made by torch is missed; memory that C/C++ code allocates
outside torch tensors is not tensor memory and is not counted.

Components: weights (live storage after loading and adapters), optimizer state (the growth across the first
optimizer step, gradients released), and the peak during the steps.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Live tensor storage bytes (`current`) and their maximum (`peak`) on one device type."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device, self.live, self.current, self.peak = device, {}, 0, 0

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type != self.device or t.is_sparse:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            return
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self.live:
            return
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def register_existing(self) -> int:
        """Count every tensor alive now (found by the garbage collector); returns the bytes found."""
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    self._add(obj)
            except ReferenceError:
                continue
        self.peak = self.current
        return self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


@dataclass
class Measured:
    device: str
    weights: int  # live after the model (and adapters) are built
    optimizer: int  # growth across the first step, gradients released
    peak: int  # maximum during the steps
    steps: int
    losses: list[float]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _step(model, batch, optimizer, grad_accum: int, max_grad_norm: float | None, lean: bool = True):
    from vlmfit.models.loss import causal_lm_loss

    losses = []
    for _ in range(grad_accum):
        # the loss vlmfit trains with (train.lean_loss), or the model's own over full logits; either way the output
        # goes out of scope before backward, as in Trainer
        loss = (causal_lm_loss(model, batch) if lean else model(**batch).loss) / grad_accum
        loss.backward()
        losses.append(float(loss.detach()) * grad_accum)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(losses) / len(losses)


def measure_steps(model, batch: dict, optimizer, *, steps: int = 3, grad_accum: int = 1,
                  max_grad_norm: float | None = 1.0, lean: bool = True) -> Measured:
    """Run `steps` optimizer steps on one batch and report weights / optimizer state / peak in bytes."""
    device = next(model.parameters()).device.type
    model.train()
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        losses = [_step(model, batch, optimizer, grad_accum, max_grad_norm, lean)]
        optim = torch.cuda.memory_allocated() - weights
        losses += [_step(model, batch, optimizer, grad_accum, max_grad_norm, lean) for _ in range(steps - 1)]
        torch.cuda.synchronize()
        return Measured("cuda", weights, optim, torch.cuda.max_memory_allocated(), steps, losses)
    gc.collect()
    tracker = TensorMemory(device)
    with tracker:
        weights = tracker.register_existing()
        losses = [_step(model, batch, optimizer, grad_accum, max_grad_norm, lean)]
        gc.collect()
        optim = tracker.current - weights
        losses += [_step(model, batch, optimizer, grad_accum, max_grad_norm, lean) for _ in range(steps - 1)]
        peak = tracker.peak
    # the batch itself was alive before the mode started and is counted in `weights`; report it apart
    batch_bytes = sum(v.untyped_storage().nbytes() for v in batch.values() if isinstance(v, torch.Tensor))
    return Measured(device, weights - batch_bytes, optim, peak - batch_bytes, steps, losses)


def make_optimizer(model, name: str, lr: float = 1e-4):
    """The optimizer HF Trainer builds for vlmfit's train.optim (see vlmfit.train.trainer.OPTIMIZERS): adamw_torch is
    torch's AdamW with its default implementation; the 8-bit ones are bitsandbytes'."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name in ("adamw-8bit", "paged-adamw-8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def predict_for_batch(cfg, batch: dict, config, device: str, shape=None):
    """The planner's breakdown for exactly this batch (its sequence length and media token counts)."""
    from dataclasses import replace

    from vlmfit.memory.estimate import estimate, inputs_from_config
    from vlmfit.memory.shape import model_shape
    from vlmfit.memory.vision import image_cost
    from vlmfit.models.packing import SEGMENTS

    shape = shape or model_shape(config, cfg.model.name)
    ids = batch["input_ids"]
    b, seq = ids.shape
    if SEGMENTS in batch:  # packed rows: their examples, at their mean length
        b = len(batch[SEGMENTS])
        seq = int(batch[SEGMENTS][:, 1].sum()) // b
    media_ids = [getattr(config, k, None) for k in ("image_token_id", "image_token_index", "video_token_id")]
    media = sum(int((ids == t).sum()) for t in set(media_ids) if isinstance(t, int)) // b
    ref = image_cost(config, shape.family, 1024, 1024, model=cfg.model.name)
    positions = media * ref.encoder_positions // max(ref.tokens, 1)  # encoder positions per LLM token: the rule's ratio
    labelled = int((batch["labels"][:, 1:] != -100).sum()) // b if "labels" in batch else seq - media
    inp = replace(inputs_from_config(cfg, device=device), batch_size=b, text_tokens=seq - media, label_tokens=labelled,
                  media_tokens=(media, positions), max_length=None)
    return estimate(shape, inp, cfg.model.name)


def measure_recipe(cfg, steps: int = 3, shape=None):
    """Load the recipe's model as `vlmfit train` does (quantization, method, checkpointing, optimizer), run `steps`
    steps on its first batch, and return (Measured, the planner's Breakdown for that batch)."""
    from vlmfit.chat.collate import VisionChatCollator
    from vlmfit.chat.rows import RowCollator
    from vlmfit.data.splits import load_splits
    from vlmfit.errors import UserError
    from vlmfit.models.load import load_for
    from vlmfit.models.packing import packing_refusal, unpack_inputs
    from vlmfit.models.targets import enable_checkpointing, make_trainable

    if cfg.method == "dpo":
        raise UserError("--measure runs supervised steps; a DPO recipe is planned but not measured", where="method")
    loaded = load_for(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.method != "qlora" and cfg.model.quantization == "none":
        loaded.model.to(device)  # bitsandbytes already placed a quantized model
    model, _ = make_trainable(loaded.model, loaded.family, cfg.method, cfg.lora)
    enable_checkpointing(model, loaded.family, list(cfg.train.gradient_checkpointing))
    train_ds = load_splits(cfg).train
    collator = VisionChatCollator(loaded.processor, loaded.family, loss_on=cfg.train.loss_on, max_length=cfg.train.max_length)
    examples = [train_ds[i] for i in range(min(cfg.train.batch_size, len(train_ds)))]
    packed = cfg.train.packing and packing_refusal(loaded.family) is None
    batch = RowCollator(collator, pack=True, pack_tokens=cfg.train.pack_tokens)(examples) if packed else collator(examples)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    plan_batch = batch
    if packed:
        batch = unpack_inputs(model, batch, loaded.family)
    optimizer = make_optimizer(model, cfg.train.optim, cfg.train.lr)
    measured = measure_steps(model, batch, optimizer, steps=steps, grad_accum=cfg.train.grad_accum,
                             max_grad_norm=cfg.train.max_grad_norm, lean=cfg.train.lean_loss)
    return measured, predict_for_batch(cfg, plan_batch, loaded.model.config, device, shape)
