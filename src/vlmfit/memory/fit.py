"""Auto-fit a recipe to a GPU budget: search the memory knobs, keep the fastest configuration that fits.

Knobs: method (full -> lora -> qlora), 8-bit loading, batch size with gradient accumulation (the global batch
is kept), gradient checkpointing per tower, activation offload to host memory per tower (not beside checkpointing of
the same tower), optimizer (AdamW -> 8-bit AdamW), image resolution cap (Qwen
max_pixels, Gemma 4 max_soft_tokens) and frames per example for video.

Choice = lexicographic (what changes in the result, then predicted time):
1. fidelity rank: changes that keep the same training math rank 0 (micro-batch split, checkpointing, activation
   offload, 8-bit optimizer state); a lossy change of the model ranks 1 each (full -> LoRA, 8-bit or 4-bit base); fewer pixels or
   frames per example rank 2 per step down (the model sees less of each image);
2. predicted time per optimizer step under a simple cost model, relative to the recipe as written:
   time ~ global batch x tokens x (1 + 0.25 / micro-batch)      (small micro-batches use a GPU poorly)
          x 1.33 with language checkpointing (one extra forward) and + 0.33 x vision's share of compute
          x 1.25 for 4-bit (dequantize every matmul), x 1.5 for LLM.int8, x 1.02 for 8-bit AdamW,
          + 0.15 x a tower's share for offloading its activations (host copies both ways over PCIe).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

from vlmfit.config import quantization_for
from vlmfit.errors import UserError
from vlmfit.memory.budget import GiB, SAFETY_MARGIN
from vlmfit.memory.estimate import Breakdown, PlanInputs, estimate, inputs_from_config, recipe_shape
from vlmfit.memory.shape import ModelShape
from vlmfit.models.families import RESOLUTION_KEYS, Family

FRAME_SPLITS = (None, 8, 4, 2, 1)


def _resolution_key(family: Family) -> str | None:
    """The PlanInputs / model-section key of the family's resolution cap (max_pixels, max_soft_tokens), if any."""
    return RESOLUTION_KEYS.get(family.resolution) if family.resolution and family.resolution_caps else None


def _options(inp: PlanInputs, shape: ModelShape, unit: int = 1) -> dict[str, list]:
    methods = {"full": ["full", "lora", "qlora"], "lora": ["lora", "qlora"], "qlora": ["qlora"]}[inp.method]
    # Checkpointing a frozen vision tower saves nothing (it keeps no activations) but costs little to try.
    ckpts = [(), ("language",), ("language", "vision")]
    g = inp.batch_size * inp.grad_accum
    # unit 2 for DPO: a micro-batch holds whole (chosen, rejected) pairs
    batches = sorted({b for b in range(unit, inp.batch_size + 1, unit) if g % b == 0} | {inp.batch_size}, reverse=True)
    key = _resolution_key(shape.family)
    if key:
        now = getattr(inp, key)
        res = [now] + [c for c in shape.family.resolution_caps if not now or c < now]
    else:
        res = [None]
    frames = [None]
    if inp.video_frames:
        frames += [f for f in FRAME_SPLITS[1:] if f < inp.video_frames]
    quants = ["none", "8bit"] if inp.quantization == "none" else [inp.quantization]
    optims = [inp.optim] + (["adamw-8bit"] if inp.optim == "adamw" else [])
    offloads = [inp.activation_offload] + [o for o in ((), ("language",), ("vision",), ("language", "vision"))
                                           if o != inp.activation_offload]
    return dict(method=methods, quant=quants, ckpt=ckpts, optim=optims, batch=batches, res=res, frames=frames,
                offload=offloads)


def _candidate(inp: PlanInputs, res_key: str | None, method, quant, ckpt, optim, batch, res, frames,
               offload=()) -> PlanInputs | None:
    if method == "qlora" and quant == "8bit":
        return None
    if set(offload) & set(ckpt):
        return None  # a checkpointed tower has nothing to offload (config.py refuses both)
    if method == "full" and quant != "none":
        return None  # bitsandbytes weights cannot be trained in full
    g = inp.batch_size * inp.grad_accum
    new = replace(inp, method=method, quantization=quantization_for(method, quant), checkpointing=ckpt,
                  optim=optim, batch_size=batch, grad_accum=g // batch, activation_offload=tuple(offload))
    if res_key:
        new = replace(new, **{res_key: res})
    if frames:  # each example becomes `frames` frames fed as images, instead of one long video
        new = replace(new, video_frames=0, images=frames)
    if method != "full" and inp.method == "full":
        new = replace(new, lora_scope=("language",), lora_train_fully=())
    return new


def fidelity_rank(orig: PlanInputs, new: PlanInputs, res_levels: list, frame_levels: list) -> int:
    order = ["full", "lora", "qlora"]
    rank = max(0, order.index(new.method) - order.index(orig.method))
    rank += int(new.quantization == "8bit" and orig.quantization == "none")
    for key in ("max_pixels", "max_soft_tokens"):
        value = getattr(new, key)
        if value != getattr(orig, key) and value in res_levels:
            rank += 2 * res_levels.index(value)
    if new.video_frames != orig.video_frames:
        rank += 2 * frame_levels.index(new.images)
    return rank


def relative_time(bd: Breakdown, shape: ModelShape) -> float:
    inp, tok = bd.inputs, bd.tokens
    lang = sum(p for k, p in shape.params.items() if k in ("language", "embeddings")) * tok["seq_len"]
    vis = shape.params["vision"] * tok["vision_positions"]
    share = vis / max(lang + vis, 1)
    t = inp.batch_size * inp.grad_accum * (lang + vis) * (1 + 0.25 / inp.batch_size)
    if "language" in inp.checkpointing:
        t *= 1 + 0.33 * (1 - share)
    if "vision" in inp.checkpointing:
        t *= 1 + 0.33 * share
    t *= {"4bit": 1.25, "8bit": 1.5}.get(inp.quantization, 1.0)
    t *= 1.02 if "8bit" in inp.optim else 1.0
    t *= 1 + 0.15 * (("language" in inp.activation_offload) * (1 - share) + ("vision" in inp.activation_offload) * share)
    return t


def host_budget() -> int:
    """Host memory a fitted recipe may keep there (offloaded activations, host-resident weights): 80% of this
    machine's RAM ($VLMFIT_HOST_MEMORY, e.g. 256GiB, for planning another machine's)."""
    import os

    from vlmfit.memory.budget import parse_budget

    if os.environ.get("VLMFIT_HOST_MEMORY"):
        return parse_budget(os.environ["VLMFIT_HOST_MEMORY"])
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def search(shape: ModelShape, inp: PlanInputs, budget: int, margin: float = SAFETY_MARGIN, name: str = "",
           unit: int = 1):
    """All candidates (rank, time, breakdown) that fit the device and the host, best first, and the smallest plan
    seen."""
    opts = _options(inp, shape, unit)
    host = host_budget()
    res_key = _resolution_key(shape.family)
    fitting, smallest = [], None
    for combo in itertools.product(*opts.values()):
        new = _candidate(inp, res_key, *combo)
        if new is None:
            continue
        bd = estimate(shape, new, name).with_budget(budget, margin)
        if smallest is None or bd.peak < smallest.peak:
            smallest = bd
        if bd.verdict == "fits" and sum(bd.host.values()) <= host:
            fitting.append((fidelity_rank(inp, new, opts["res"], opts["frames"]), relative_time(bd, shape), bd))
    fitting.sort(key=lambda x: (x[0], x[1]))
    return fitting, smallest


def _to_config(cfg, orig: PlanInputs, new: PlanInputs):
    """The recipe with the chosen knobs, built with model_copy on the frozen sections."""
    t = cfg.train.model_copy(update=dict(batch_size=new.batch_size // (2 if cfg.method == "dpo" else 1) or 1,
                                         grad_accum=new.grad_accum, gradient_checkpointing=list(new.checkpointing),
                                         optim=new.optim, activation_offload=list(new.activation_offload)))
    m = cfg.model.model_copy(update=dict(quantization="none" if new.method == "qlora" else new.quantization,
                                         max_pixels=new.max_pixels, max_soft_tokens=new.max_soft_tokens))
    upd = dict(model=m, train=t)
    if cfg.method != "dpo":
        upd["method"] = new.method
    elif new.method in ("full", "lora"):
        upd["dpo"] = cfg.dpo.model_copy(update=dict(tuning=new.method))
    if new.lora_scope != tuple(cfg.lora.scope) or new.lora_train_fully != tuple(cfg.lora.train_fully):
        upd["lora"] = cfg.lora.model_copy(update=dict(scope=list(new.lora_scope), train_fully=list(new.lora_train_fully)))
    if new.video_frames != orig.video_frames:
        upd["data"] = cfg.data.model_copy(update=dict(frames_per_example=new.images))
    return cfg.model_copy(update=upd)


def _reasons(orig: Breakdown, best: Breakdown, budget: int) -> list[str]:
    a, b = orig.inputs, best.inputs
    out = [f"recipe as written: {orig.peak / GiB:.2f} GiB predicted against {budget / GiB:.2f} GiB "
           f"({orig.verdict}); chosen: {best.peak / GiB:.2f} GiB ({best.verdict}, {best.margin:.0%} kept free)"]
    comp = lambda bd, k: bd.components[k] / GiB  # noqa: E731
    if a.method != b.method:
        out.append(f"method {a.method} -> {b.method}: weights+adapters+grads+optimizer "
                   f"{sum(comp(orig, k) for k in ('weights', 'adapters', 'gradients', 'optimizer')):.2f} -> "
                   f"{sum(comp(best, k) for k in ('weights', 'adapters', 'gradients', 'optimizer')):.2f} GiB")
    if a.quantization != b.quantization and b.method != "qlora":
        out.append(f"load the base in {b.quantization}: weights {comp(orig, 'weights'):.2f} -> {comp(best, 'weights'):.2f} GiB")
    if a.checkpointing != b.checkpointing:
        out.append(f"gradient checkpointing {list(a.checkpointing)} -> {list(b.checkpointing)}: activations "
                   f"{comp(orig, 'activations (language)') + comp(orig, 'activations (vision)'):.2f} -> "
                   f"{comp(best, 'activations (language)') + comp(best, 'activations (vision)'):.2f} GiB"
                   + (" (~33% more compute)" if len(b.checkpointing) > len(a.checkpointing) else ""))
    if a.activation_offload != b.activation_offload:
        out.append(f"activation offload {list(a.activation_offload)} -> {list(b.activation_offload)}: "
                   f"{sum(v for k, v in best.host.items() if k.startswith('activations')) / GiB:.2f} GiB of saved "
                   "activations in host memory (same math, host copies over PCIe)")
    if a.optim != b.optim:
        out.append(f"optimizer {a.optim} -> {b.optim}: state {comp(orig, 'optimizer'):.2f} -> {comp(best, 'optimizer'):.2f} GiB")
    if a.batch_size != b.batch_size:
        out.append(f"batch {a.batch_size} x accumulation {a.grad_accum} -> {b.batch_size} x {b.grad_accum} sequences "
                   f"(global batch kept at {a.batch_size * a.grad_accum}; a DPO pair counts as two)")
    if (a.max_pixels, a.max_soft_tokens) != (b.max_pixels, b.max_soft_tokens):
        out.append(f"image resolution cap: {orig.tokens['image_tokens']} -> {best.tokens['image_tokens']} image tokens "
                   f"per example (max_pixels {b.max_pixels}, max_soft_tokens {b.max_soft_tokens})")
    if a.video_frames != b.video_frames:
        out.append(f"video of {a.video_frames} frames -> {b.images} frame(s) per example: sequence "
                   f"{orig.tokens['seq_len']} -> {best.tokens['seq_len']} tokens")
    return out


def fit(cfg, budget: int, *, device: str = "cuda", margin: float = SAFETY_MARGIN, image_hw: tuple[int, int] | None = None,
        text_tokens: int = 512, answer_tokens: int = 64, shape: ModelShape | None = None):
    """(RunConfig, reasons): the fastest configuration of `cfg` predicted to fit `budget` bytes with the margin.

    Raises UserError when nothing in the search space fits, naming the smallest plan found.
    """
    shape = shape or recipe_shape(cfg)
    inp = inputs_from_config(cfg, device=device, image_hw=image_hw, text_tokens=text_tokens, answer_tokens=answer_tokens)
    orig = estimate(shape, inp, cfg.model.name).with_budget(budget, margin)
    fitting, smallest = search(shape, inp, budget, margin, cfg.model.name, unit=2 if cfg.method == "dpo" else 1)
    if not fitting:
        raise UserError(
            f"no configuration of this recipe fits {budget / GiB:.2f} GiB with a {margin:.0%} margin "
            f"(smallest found: {smallest.peak / GiB:.2f} GiB with method {smallest.inputs.method}, batch "
            f"{smallest.inputs.batch_size}, checkpointing {list(smallest.inputs.checkpointing)})",
            where=cfg.model.name,
            hint="a bigger GPU, several GPUs (vlmfit plan --gpus N --strategy zero3), a shorter text length, "
            "or a smaller model",
        )
    best = fitting[0][2]
    return _to_config(cfg, inp, best.inputs), _reasons(orig, best, budget)


def write_recipe(cfg, reasons: list[str], path: str | Path) -> Path:
    """Write the fitted recipe as YAML, the reasons as a comment header."""
    p = Path(path)
    head = "# Fitted by `vlmfit plan --fit`:\n" + "".join(f"#   {r}\n" for r in reasons)
    p.write_text(head + cfg.to_yaml())
    return p


def memory_options(shape: ModelShape, inp: PlanInputs, name: str = "") -> list[tuple[str, float]]:
    """The same-math memory options this recipe has not switched on, each with the device bytes it saves alone
    (largest first): what `vlmfit plan` and `vlmfit doctor` suggest when a run does not fit."""
    base = estimate(shape, inp, name).peak
    tried = []
    if inp.per_layer_embeddings == "device" and shape.family.host_tables:
        tried.append(("model.per_layer_embeddings: cpu", replace(inp, per_layer_embeddings="cpu")))
    if inp.unused_towers == "device" and shape.family.unused_towers:
        tried.append(("model.unused_towers: cpu", replace(inp, unused_towers="cpu")))
    if not inp.lean_loss:
        tried.append(("train.lean_loss: true", replace(inp, lean_loss=True)))
    for tower in ("language", "vision"):
        if tower not in inp.checkpointing and tower not in inp.activation_offload:
            tried.append((f"train.activation_offload with {tower} (or its gradient_checkpointing)",
                          replace(inp, activation_offload=(*inp.activation_offload, tower))))
    if "8bit" not in inp.optim and inp.optim != "sgd":
        tried.append(("train.optim: adamw-8bit", replace(inp, optim="adamw-8bit")))
    saved = [(label, base - estimate(shape, new, name).peak) for label, new in tried]
    return sorted([(label, s) for label, s in saved if s >= 0.01 * GiB], key=lambda x: -x[1])
