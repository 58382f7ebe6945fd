"""`vlmfit train --profile`: where a training step's time goes, measured on the real run with hooks and Trainer
callbacks: data (fetching and collating the step's batches), the vision tower's and the language model's forward,
the rest of the forward (projector, LM head), the loss with the backward and gradient clipping, and the optimizer
step. On CUDA every boundary synchronises the device (so the figures are wall time of the work, at a small cost)."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import TrainerCallback

from vlmfit.models.targets import part_of
from vlmfit.rundir import RunDir

BUCKETS = ("data", "vision forward", "language forward", "other forward", "loss + backward", "optimizer")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepProfiler(TrainerCallback):
    """Per optimizer step, seconds per bucket (BUCKETS); `attach(model, family)` hooks the towers' forwards."""

    def __init__(self, run: RunDir):
        self.run, self.steps, self.hooks = run, [], []
        self._fwd, self._open, self._mark = {}, {}, None

    def attach(self, model, family) -> None:
        roots = {"vision": None, "language": None}
        for name, mod in model.named_modules():
            base = name.removeprefix("base_model.model.")
            part = part_of(base, family)
            parent = part_of(base.rsplit(".", 1)[0], family) if "." in base else None
            if part in roots and roots[part] is None and parent != part:
                roots[part] = mod  # the outermost module of the tower (a projector outside it is "other forward")
        for key, mod in (("total", model), ("vision", roots["vision"]), ("language", roots["language"])):
            if mod is None:
                continue
            self.hooks.append(mod.register_forward_pre_hook(lambda m, a, k=key: self._start(k)))
            self.hooks.append(mod.register_forward_hook(lambda m, a, o, k=key: self._stop(k)))

    def _start(self, key: str) -> None:
        _sync()
        self._open[key] = time.perf_counter()

    def _stop(self, key: str) -> None:
        _sync()
        self._fwd[key] = self._fwd.get(key, 0.0) + time.perf_counter() - self._open.pop(key, time.perf_counter())

    def on_train_begin(self, args, state, control, **kw):
        _sync()
        self._mark = time.perf_counter()

    def on_step_begin(self, args, state, control, **kw):
        _sync()
        now = time.perf_counter()
        self._step = {"data": now - self._mark}
        self._fwd, self._mark = {}, now

    def on_pre_optimizer_step(self, args, state, control, **kw):
        _sync()
        now = time.perf_counter()
        compute = now - self._mark
        total = self._fwd.get("total", 0.0)
        vision, language = self._fwd.get("vision", 0.0), self._fwd.get("language", 0.0)
        self._step.update({"vision forward": vision, "language forward": language,
                           "other forward": max(total - vision - language, 0.0), "loss + backward": compute - total})
        self._mark = now

    def on_step_end(self, args, state, control, **kw):
        _sync()
        now = time.perf_counter()
        self._step["optimizer"] = now - self._mark  # step, scheduler, zero_grad
        self.steps.append(self._step)
        self._mark = now

    def summary(self) -> dict:
        # The first step pays one-off costs (allocator warm-up, lazy init): medians skip it when there are others.
        steps = self.steps[1:] if len(self.steps) > 1 else self.steps
        med = {b: statistics.median(s[b] for s in steps) for b in BUCKETS}
        total = sum(med.values())
        return {"steps_profiled": len(steps), "median_step_seconds": total,
                "median_seconds": {b: round(v, 5) for b, v in med.items()},
                "share": {b: round(v / total, 4) if total else 0.0 for b, v in med.items()},
                "note": "loss + backward includes gradient clipping; on CUDA each boundary synchronises the device"}

    def on_train_end(self, args, state, control, **kw):
        for h in self.hooks:
            h.remove()
        if self.steps:
            self.run.write_profile(self.summary())


def profile_table(summary: dict):
    from rich.table import Table

    t = Table(title=f"where a step's time goes (median of {summary['steps_profiled']} steps: "
                    f"{summary['median_step_seconds'] * 1000:.1f} ms)")
    for col in ("part", "ms", "share"):
        t.add_column(col, justify="left" if col == "part" else "right")
    for b in BUCKETS:
        t.add_row(b, f"{summary['median_seconds'][b] * 1000:.1f}", f"{100 * summary['share'][b]:.1f}%")
    return t
