"""The memory plan: a per-component breakdown (bytes) of one training run, predicted from the model config alone.

Components: base weights (by dtype / quantization), trainable adapters, gradients, optimizer state, activations of
the language model and of the vision tower, logits and loss buffers, framework overhead. They do not all coexist, so
the peak is taken over the phases of a step (what HF Trainer does, see `peak`):
    static   = weights + adapters + optimizer state                  (alive for the whole run after step 1)
    backward = saved activations + max(loss buffers, one block's backward [+ its recomputation])
               + gradients already alive (all of them under gradient accumulation; else those made first)
    step     = all gradients + optimizer temporaries
    peak     = static + max(backward, step) (+ CUDA context on a GPU)
Facts HF Trainer/PEFT/bitsandbytes set, as this estimate assumes them:
- a bf16/fp16-loaded model is trained as is (no fp32 master copy): full fine-tuning costs weights + grads + AdamW
  states all in bf16 = 8 B/param; DeepSpeed ZeRO instead keeps fp32 master weights and states (see `per_gpu`).
- PEFT keeps LoRA weights in fp32 (autocast_adapter_dtype): adapter + grad + AdamW = 16 B/param.
- QLoRA: NF4 = 4.5 bits/param (4.127 with double quantization) for the linears vlmfit quantizes (language model
  only: the LM head, vision tower and projector stay unquantized, see shape._quantizable);
  prepare_model_for_kbit_training then upcasts every other parameter (embeddings, norms, LM head, vision tower)
  to fp32. 8-bit: 1 B/param + an fp32 scale per output row.
- "adamw" is HF's adamw_torch: torch.optim.AdamW with its default implementation, foreach on CUDA (the step
  allocates one copy of the second-moment state for its square root) and a per-tensor loop on the CPU (two
  temporaries the size of the largest trained tensor).
- vlmfit checkpoints non-reentrantly and removes the input-grad hooks transformers and PEFT add, so a frozen
  vision tower keeps no activations.
- Attention is sdpa/flash (no s x s matrix). On CUDA with batch > 1 a padding mask is assumed, under which
  transformers repeats K/V to every head before sdpa. Projector activations (one small MLP) are not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from vlmfit.config import STRATEGIES, quantization_for
from vlmfit.memory.activations import Dtypes, checkpoint_bytes, layer_bytes, lean_logits_bytes, logits_bytes, working_bytes
from vlmfit.memory.budget import GiB, SAFETY_MARGIN, verdict
from vlmfit.memory.shape import ModelShape
from vlmfit.memory.vision import image_cost
from vlmfit.models.loss import chunk_for

CUDA_OVERHEAD = int(0.75 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces: on the card, not in max_memory_allocated
NF4_BITS = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4 + 32 / 64}  # double quant -> ~4.127, else 4.5


@dataclass(frozen=True)
class PlanInputs:
    """Everything the estimate depends on; `inputs_from_config` fills it from a recipe."""

    method: str = "lora"  # full | lora | qlora | zo (dpo resolves to its tuning, with a doubled batch)
    quantization: str = "none"  # none | 4bit | 8bit (qlora implies 4bit)
    double_quant: bool = True
    weight_dtype: str = "bfloat16"  # dtype the weights are loaded in
    precision: str = "bf16"  # autocast: bf16 | fp16 | fp32
    device: str = "cuda"
    batch_size: int = 1
    grad_accum: int = 1
    text_tokens: int = 512
    lean_loss: bool = True  # train.lean_loss: the LM head only at labelled positions
    label_tokens: int = 64  # labelled tokens per example (every text token with loss_on all)
    max_length: int | None = None
    images: int = 1  # images per example (frames split into images count here)
    image_hw: tuple[int, int] = (1024, 1024)
    video_frames: int = 0  # frames of one video per example (0: no video)
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_soft_tokens: int | None = None
    checkpointing: tuple[str, ...] = ()
    optim: str = "adamw"
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_scope: tuple[str, ...] = ("language",)
    lora_train_fully: tuple[str, ...] = ()
    lora_dropout: float = 0.05
    media_tokens: tuple[int, int] | None = None  # (LLM tokens, encoder positions) per example, measured: skips the rules
    kbit_upcast: bool = True  # prepare_model_for_kbit_training casts non-quantized params to fp32
    dpo_reference: bool = False  # full-tuning DPO keeps a frozen reference copy of the weights
    packing: bool = False  # train.packing: the batch as one row of batch x seq tokens with a block-diagonal mask
    pack_tokens: int | None = None  # train.pack_tokens: at most this many tokens per packed row
    activation_offload: tuple[str, ...] = ()  # train.activation_offload: towers whose saved activations go to host
    reuse_features: bool = False  # train.cache_image_features: a frozen tower's image features kept in host memory
    feature_cache_gib: float = 4.0
    per_layer_embeddings: str = "auto"  # model.per_layer_embeddings: device | cpu | auto (models/placement.py)
    unused_towers: str = "cpu"  # model.unused_towers: device | cpu
    rollouts: int = 0  # GRPO: sequences generated together (the generation batch), each text_tokens long at its end


@dataclass
class Breakdown:
    """Predicted memory of one run. Byte figures per component; `peak` is what a device must hold."""

    model: str
    inputs: PlanInputs
    params: dict[str, int]
    trainable_params: int
    tokens: dict[str, int]  # seq_len, image tokens, vision encoder positions (per example)
    weights_by_part: dict[str, float]  # bytes of the loaded weights per part (vision/projector/language/embeddings)
    components: dict[str, float]  # bytes
    phases: dict[str, float]  # static / backward / step (bytes, before overhead)
    peak: float
    notes: list[str] = field(default_factory=list)
    host: dict[str, float] = field(default_factory=dict)  # bytes kept in host memory per module (not in `peak`)
    budget: int | None = None
    margin: float = SAFETY_MARGIN

    @property
    def verdict(self) -> str | None:
        return verdict(int(self.peak), self.budget, self.margin) if self.budget else None

    def with_budget(self, budget: int | None, margin: float = SAFETY_MARGIN) -> Breakdown:
        return replace(self, budget=budget, margin=margin)

    def as_dict(self) -> dict:
        d = {
            "model": self.model, "inputs": asdict(self.inputs), "params": self.params,
            "trainable_params": self.trainable_params, "tokens": self.tokens,
            "weights_by_part_gib": {k: round(v / GiB, 3) for k, v in self.weights_by_part.items()},
            "components_bytes": {k: int(v) for k, v in self.components.items()},
            "components_gib": {k: round(v / GiB, 3) for k, v in self.components.items()},
            "phases_gib": {k: round(v / GiB, 3) for k, v in self.phases.items()},
            "peak_bytes": int(self.peak), "peak_gib": round(self.peak / GiB, 3), "notes": self.notes,
            "host_gib": {k: round(v / GiB, 3) for k, v in self.host.items()},
        }  # fmt: skip
        if self.budget:
            d.update(budget_gib=round(self.budget / GiB, 3), margin=self.margin, verdict=self.verdict)
        return d

    def table(self, title: str | None = None):
        from rich.table import Table

        t = Table(title=title or f"memory plan: {self.model}")
        t.add_column("component")
        t.add_column("GiB", justify="right")
        t.add_column("note", overflow="fold")
        for name, value in self.components.items():
            t.add_row(name, f"{value / GiB:.2f}", COMPONENT_NOTES.get(name, ""))
        t.add_section()
        phases = "backward, optimizer step" + (", generation" if "generation" in self.phases else "")
        t.add_row("[bold]peak[/]", f"[bold]{self.peak / GiB:.2f}[/]", f"static + max({phases}) + overhead")
        if self.host:
            t.add_row("host memory", f"{sum(self.host.values()) / GiB:.2f}", "kept off the device: "
                      + ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.host.items()))
        if self.budget:
            colour = {"fits": "green", "tight": "yellow"}.get(self.verdict, "red")
            t.add_row("budget", f"{self.budget / GiB:.2f}", f"[{colour}]{self.verdict}[/] "
                      f"(keeps {self.margin:.0%} free for fragmentation and spikes)")
        return t


COMPONENT_NOTES = {
    "weights": "base model as loaded (quantized linears at 4.127/4.5 or 8 bits)",
    "adapters": "trainable LoRA weights (fp32) and fully trained copies (PEFT modules_to_save)",
    "gradients": "one per trainable parameter, in its dtype",
    "optimizer": "optimizer state (AdamW 2 x param dtype; 8-bit: 2 B/param)",
    "activations (language)": "saved for backward over all language blocks",
    "activations (vision)": "saved for backward in the vision tower (0 when it is frozen)",
    "logits + loss": "fused head + loss: one chunk of labelled positions at a time (full logits: batch x seq x vocab)",
    "backward working set": "gradients in flight in one block (+ its recomputation with checkpointing)",
    "optimizer step temporaries": "AdamW's sqrt of the second moment (foreach on CUDA; per tensor on CPU)",
    "overhead": "CUDA context and library workspaces (not counted by max_memory_allocated)",
    "generation (KV cache + step logits)": "GRPO's rollouts, before the step: K and V of every completion generated "
    "together (batch x grad_accum) at full length, and one step's fp32 logits",
    "forward working set": "forward-only: the largest block's intermediate tensors (nothing is kept for backward)",
    "logits": "forward-only: the logits of the batch and their fp32 upcast for the loss",
}


def _dtype_bytes(name: str) -> int:
    return 4 if name in ("float32", "fp32") else 2


def _resolve_lora(shape: ModelShape, inp: PlanInputs) -> tuple[dict[str, tuple[int, int]], list[str], int]:
    """LoRA module name -> (in, out), the roots of fully trained parts and their parameter count, from vlmfit's
    own resolver (the one training uses) run on the meta model."""
    from vlmfit.models.targets import resolve_lora_targets

    key = ("lora", inp.lora_scope, inp.lora_targets, inp.lora_train_fully)
    if key not in shape.cache:
        targets = inp.lora_targets if isinstance(inp.lora_targets, str) else list(inp.lora_targets)
        res = resolve_lora_targets(shape.model, shape.family, list(inp.lora_scope), targets, list(inp.lora_train_fully))
        mods = {n: (shape.model.get_submodule(n).in_features, shape.model.get_submodule(n).out_features)
                for n in res.modules}
        n_full = sum(p.numel() for r in res.fully_trained for p in shape.model.get_submodule(r).parameters())
        shape.cache[key] = (mods, res.fully_trained, n_full)
    return shape.cache[key]


def _part_modes(shape: ModelShape, lora: dict, fully: list[str], method: str) -> dict[str, str]:
    """Per part: full / lora / through (frozen but gradients pass through it) / none."""
    from vlmfit.models.targets import part_of

    if method == "full":
        return {"vision": "full", "projector": "full", "language": "full"}
    lora_parts = {part_of(n, shape.family) for n in lora}
    full_parts = {part_of(n, shape.family) for n in fully}
    modes = {p: ("full" if p in full_parts else "lora" if p in lora_parts else "none")
             for p in ("vision", "projector", "language")}
    if modes["language"] == "none" and (modes["vision"] != "none" or modes["projector"] != "none"):
        modes["language"] = "through"  # the loss is at the top: gradients cross the language model to reach below
    return modes


def _sequence(shape: ModelShape, inp: PlanInputs, name: str = "") -> tuple[int, int, int, list[str]]:
    """Per example: LLM sequence length, image tokens, vision-encoder positions."""
    fam = shape.family
    notes = []
    if inp.media_tokens is not None:
        tokens, positions = inp.media_tokens
        return tokens + inp.text_tokens, tokens, positions, [f"{tokens} media tokens per example (given)"]
    h, w = inp.image_hw
    kw = dict(min_pixels=inp.min_pixels, max_pixels=inp.max_pixels, max_soft_tokens=inp.max_soft_tokens)
    img = image_cost(shape.config, fam, h, w, model=name, **kw)
    tokens, positions = img.tokens * inp.images, img.encoder_positions * inp.images
    if inp.images:
        notes.append(f"image {h}x{w}: {img.detail}; x{inp.images} per example")
    if inp.video_frames:
        vid = image_cost(shape.config, fam, h, w, frames=inp.video_frames, model=name, **kw)
        tokens, positions = tokens + vid.tokens, positions + vid.encoder_positions
        notes.append(f"video of {inp.video_frames} frames: {vid.detail}")
    seq = tokens + inp.text_tokens
    if inp.max_length and seq > inp.max_length:
        notes.append(f"sequence {seq} > max_length {inp.max_length}: planned at max_length (text is what gets cut)")
        seq = max(inp.max_length, tokens)
    return seq, tokens, positions, notes


@dataclass(frozen=True)
class _Bytes:
    """Bytes per element of a run's tensors, from its dtypes and quantization."""

    quant: str  # the quantization actually used: none | 4bit | 8bit
    weight: int  # the dtype the weights are loaded in
    compute: int  # matmul / attention outputs: 2 under bf16/fp16 autocast or a 16-bit unquantized model
    stream: int  # the residual stream and every non-quantized parameter: fp32 after a k-bit upcast
    autocast16: bool
    cuda: bool


def _bytes(inp: PlanInputs) -> _Bytes:
    quant = quantization_for(inp.method, inp.quantization)
    wb = _dtype_bytes(inp.weight_dtype)
    autocast16 = inp.precision in ("bf16", "fp16")
    upcast = quant != "none" and inp.kbit_upcast
    return _Bytes(quant=quant, weight=wb, compute=2 if autocast16 or (wb == 2 and quant == "none") else 4,
                  stream=4 if upcast else wb, autocast16=autocast16, cuda=inp.device.startswith("cuda"))


def _linear_bytes(w: int, b: int, out: int, quantized: bool, inp: PlanInputs, by: _Bytes) -> float:
    if by.quant == "4bit" and quantized:
        return w * NF4_BITS[inp.double_quant] / 8 + b * by.stream
    if by.quant == "8bit" and quantized:
        return w + out * 4 + b * by.stream  # int8 weight + an fp32 scale per output row
    return (w + b) * by.stream


def weights_by_part(shape: ModelShape, inp: PlanInputs, by: _Bytes) -> dict[str, float]:
    """Bytes of the base model as loaded, per part: quantized linears at NF4 or int8, the rest in its dtype."""
    parts = {p: n * by.stream for p, n in shape.other_params.items()}
    for part, w, b, out, quantized in shape.linears.values():
        parts[part] += _linear_bytes(w, b, out, quantized, inp, by)
    return parts


def host_weights(shape: ModelShape, inp: PlanInputs, by: _Bytes) -> dict[str, float]:
    """Bytes of the modules a GPU run keeps in host memory (models/placement.py), per module."""
    from types import SimpleNamespace

    from vlmfit.models.placement import host_modules

    if not by.cuda:
        return {}
    keys = SimpleNamespace(per_layer_embeddings=inp.per_layer_embeddings, unused_towers=inp.unused_towers)
    out = {}
    for name in host_modules(shape.model, shape.family, keys, inp.method, inp.lora_train_fully):
        inside = [v for k, v in shape.linears.items() if k.startswith(name + ".")]
        total = sum(p.numel() for p in shape.model.get_submodule(name).parameters())
        rest = total - sum(w + b for _, w, b, _, _ in inside)
        out[name] = rest * by.stream + sum(_linear_bytes(w, b, o, q, inp, by) for _, w, b, o, q in inside)
    return out


@dataclass(frozen=True)
class _Trainable:
    """What a run trains: parameter count, bytes per trained value, the adapters' bytes, the LoRA modules."""

    params: int
    bytes: int  # per value of a gradient or an AdamW state
    adapters: float  # bytes of the trainable weights beyond the base model (LoRA, fully trained copies)
    large: int  # parameters in tensors of 4096 elements or more (bitsandbytes' 8-bit optimizers quantize only those)
    lora: dict[str, tuple[int, int]]  # LoRA module name -> (in, out)
    fully: list[str]  # roots of the fully trained parts


def trainable(shape: ModelShape, inp: PlanInputs, by: _Bytes) -> _Trainable:
    """Every parameter (full fine-tuning), or the LoRA adapters and fully trained parts vlmfit's resolver picks."""
    if inp.method == "full":  # trained in the dtype they were loaded in
        return _Trainable(shape.total_params, by.weight, 0.0, shape.total_params, {}, [])
    lora, fully, n_full = _resolve_lora(shape, inp)
    n_lora = sum(inp.lora_r * (i + o) for i, o in lora.values())
    large = sum(inp.lora_r * (i + o) for i, o in lora.values() if inp.lora_r * min(i, o) >= 4096) + n_full
    # PEFT's fp32 adapters; fully trained copies follow the (upcast) dtype
    return _Trainable(n_lora + n_full, 4, n_lora * 4 + n_full * by.stream, large, lora, fully)


def optimizer_state(inp: PlanInputs, t: _Trainable) -> float:
    """Bytes of the optimizer's state: none for SGD, AdamW's two moments (8-bit: 2 B per large-tensor value)."""
    if inp.optim == "sgd":
        return 0.0
    if inp.optim in ("adamw-8bit", "paged-adamw-8bit"):
        return t.large * 2 + (t.params - t.large) * 8  # bnb keeps fp32 state for tensors under 4096 elements
    return t.params * 2 * t.bytes


def optimizer_step(shape: ModelShape, inp: PlanInputs, t: _Trainable, by: _Bytes) -> float:
    """AdamW's temporaries during the step: one second-moment copy (foreach, CUDA) or two of the largest tensor."""
    if inp.optim != "adamw":
        return 0
    if by.cuda:
        return t.params * t.bytes
    largest = (max(shape.largest_param, 1) if inp.method == "full" else
               max((inp.lora_r * max(i, o) for i, o in t.lora.values()), default=0))
    return 2 * largest * t.bytes


def _activation_dtypes(inp: PlanInputs, by: _Bytes) -> Dtypes:
    """The dtypes of saved activations: LoRA's input copy under autocast (or an fp32 upcast), the dropout mask."""
    copy = by.compute if by.autocast16 else (4 if by.stream != 4 else 0)
    mask = 1 if by.cuda else (copy or by.stream)
    return Dtypes(stream=by.stream, compute=by.compute, adapter_copy=copy, mask=mask,
                  expand_kv=by.cuda and inp.batch_size > 1)


@dataclass(frozen=True)
class _Towers:
    """How the activations of the towers are counted: each part's mode and the key of these facts in shape.cache."""

    modes: dict[str, str]
    lora_names: set[str]
    dt: Dtypes
    key: tuple


def _towers(shape: ModelShape, inp: PlanInputs, t: _Trainable, dt: Dtypes) -> _Towers:
    key = ("modes", inp.method, inp.lora_scope, inp.lora_targets, inp.lora_train_fully, bool(inp.checkpointing))
    if key not in shape.cache:
        shape.cache[key] = (_part_modes(shape, t.lora, t.fully, inp.method), set(t.lora))
    modes, lora_names = shape.cache[key]
    return _Towers(modes, lora_names, dt, key)


def tower_activations(shape: ModelShape, inp: PlanInputs, tw: _Towers, which: str, tokens: int) -> tuple[float, float]:
    """(saved bytes, backward working bytes) of one tower over `tokens` positions; per-token figures are cached
    for fit's search."""
    saved, working, _ = _tower(shape, inp, tw, which)
    return saved * tokens, working * tokens


def offloaded_activations(shape: ModelShape, inp: PlanInputs, tw: _Towers, which: str, tokens: int) -> float:
    """Bytes of one tower's saved activations that train.activation_offload keeps in host memory."""
    return _tower(shape, inp, tw, which)[2] * tokens


def _tower(shape: ModelShape, inp: PlanInputs, tw: _Towers, which: str) -> tuple[float, float, float]:
    """Per token: (saved on the device, backward working set, saved in host memory). Offloaded activations
    (models/offload.py) are packed to the host as they are saved, and unpacked one op at a time in backward: the
    device holds about one block's."""
    layers = shape.text_layers if which == "language" else shape.vision_layers
    mode, ckpt = tw.modes[which], which in inp.checkpointing
    if not layers or mode == "none":
        return 0.0, 0.0, 0.0
    offload = which in inp.activation_offload and not ckpt
    key = ("tower", which, mode, tw.dt, tw.key, inp.lora_r, inp.lora_dropout, ckpt, offload)
    if key not in shape.cache:
        per = [layer_bytes(L, mode, tw.dt, tw.lora_names, inp.lora_r, inp.lora_dropout) for L in layers]
        work = max(working_bytes(L, tw.dt) for L in layers)
        if ckpt:
            shape.cache[key] = (sum(checkpoint_bytes(L, tw.dt) for L in layers), max(per) + work, 0.0)
        elif offload:
            shape.cache[key] = (max(per), work, sum(per) - max(per))
        else:
            shape.cache[key] = (sum(per), work, 0.0)
    return shape.cache[key]


def language_activations(shape: ModelShape, inp: PlanInputs, tw: _Towers, seq: int) -> tuple[float, float, list[str]]:
    """(saved bytes, backward working bytes, notes) of the language model: its blocks, the final norm (and the LM
    head's input when it trains), and under packing the block-diagonal mask."""
    b = inp.batch_size  # DPO: inputs_from_config already doubled it (chosen + rejected)
    notes = []
    lang, work = tower_activations(shape, inp, tw, "language", b * seq)
    final = 4 * shape.hidden + ((tw.dt.stream * 2) * shape.hidden if tw.modes["language"] == "full" else 0)
    lang += final * b * seq
    per_row = min(b, max(1, inp.pack_tokens // seq)) if inp.pack_tokens else b  # examples in one packed row
    if inp.packing and per_row > 1:
        if shape.family is not None and shape.family.packing:
            # transformers' packed mask: one [rows, 1, T, T] bool tensor per forward, kept for the backward of every
            # layer (sdpa; flash-attention's varlen path has none). Examples are planned at equal length, so the
            # padding that packing removes from mixed-length batches is not in the plan either way.
            rows = -(-b // per_row)
            mask_bytes = float(rows * (per_row * seq) ** 2)
            lang += mask_bytes
            notes.append(f"packing: {rows} row(s) of {per_row} x {seq} tokens, block-diagonal mask {mask_bytes / 2**20:.0f} MiB"
                         + ("" if inp.pack_tokens else " (train.pack_tokens caps a row, and the mask with it)"))
        else:
            notes.append("packing: not for this family (padded batches, as planned)")
    return lang, work, notes


def logits_and_loss(shape: ModelShape, inp: PlanInputs, dt: Dtypes, seq: int) -> tuple[float, list[str]]:
    """Bytes at the loss: the lean loss's labelled positions (chunked), or the full logits of every position."""
    b = inp.batch_size
    if not inp.lean_loss:
        return logits_bytes(shape.vocab, dt, shape.logit_softcap) * b * seq, []
    labelled = b * min(inp.label_tokens, seq)
    logits = lean_logits_bytes(shape.vocab, dt, shape.logit_softcap, labelled, chunk_for(shape.vocab))
    return logits, [f"loss over {min(inp.label_tokens, seq)} labelled tokens per example (--answer-tokens), not all {seq}"]


def dequantization(shape: ModelShape, by: _Bytes) -> float:
    """bitsandbytes dequantizes one weight at a time to multiply on the CPU / in backward."""
    return shape.largest_linear() * by.compute * (1 if by.cuda else 2) if by.quant != "none" else 0.0


def _advice(shape: ModelShape, inp: PlanInputs, modes: dict[str, str], lang: float, peak: float, img_tokens: int) -> list[str]:
    """What the plan points out: reused image features, activations that checkpointing would cut."""
    notes = []
    if (inp.reuse_features and img_tokens and modes["vision"] == "none" and modes["projector"] == "none"
            and shape.family is not None and shape.family.feature_cache):
        # Device memory is what the plan shows either way (a frozen tower keeps no activations); the vision forward
        # itself is skipped for images seen before.
        notes.append(f"image features reused after an image's first step (vision tower not run): host memory up to "
                     f"{inp.feature_cache_gib:g} GiB (train.feature_cache_gib)")
    if "language" not in inp.checkpointing and lang > 0.5 * peak:
        notes.append("language activations dominate: gradient checkpointing would cut them to the block inputs")
    return notes


def estimate(shape: ModelShape, inp: PlanInputs, name: str = "") -> Breakdown:
    """The breakdown for one device (multi-GPU: per GPU, see `per_gpu`)."""
    by = _bytes(inp)
    by_part = weights_by_part(shape, inp, by)
    if inp.method == "zo":
        return _forward_only(shape, inp, name, by_part)
    host = host_weights(shape, inp, by)
    weights = (sum(by_part.values()) - sum(host.values())) * (2 if inp.dpo_reference else 1)
    host = dict(host)
    t = trainable(shape, inp, by)
    grads = t.params * t.bytes
    optim = optimizer_state(inp, t)

    seq, img_tokens, positions, notes = _sequence(shape, inp, name)
    b = inp.batch_size
    dt = _activation_dtypes(inp, by)
    tw = _towers(shape, inp, t, dt)
    lang, lang_work, lang_notes = language_activations(shape, inp, tw, seq)
    vis, vis_work = tower_activations(shape, inp, tw, "vision", b * positions)
    logits, loss_notes = logits_and_loss(shape, inp, dt, seq)
    for which, tokens in (("language", b * seq), ("vision", b * positions)):
        if which in inp.activation_offload and (moved := offloaded_activations(shape, inp, tw, which, tokens)):
            host[f"activations ({which}, train.activation_offload)"] = moved
            if which in inp.checkpointing:
                notes.append(f"activation offload of {which}: nothing to offload, the tower is checkpointed")
    notes += lang_notes + loss_notes

    # The phases of a step (module docstring): the gradients alive in backward are all of them under gradient
    # accumulation, else those made first (full fine-tuning: the LM head's).
    early = shape.params["embeddings"] * t.bytes if inp.method == "full" else 0
    static = weights + t.adapters + optim
    dequant = dequantization(shape, by)
    backward = lang + vis + max(logits, lang_work, vis_work) + (grads if inp.grad_accum > 1 else early) + dequant
    step = grads + optimizer_step(shape, inp, t, by)
    rollout = rollout_memory(shape, inp, by, seq)
    peak = static + max(backward, step, rollout)
    overhead = CUDA_OVERHEAD if by.cuda else 0
    components = {
        "weights": weights, "adapters": t.adapters, "gradients": grads, "optimizer": optim,
        "activations (language)": lang, "activations (vision)": vis, "logits + loss": logits,
        "backward working set": max(lang_work, vis_work) + dequant, "optimizer step temporaries": step - grads,
        "overhead": overhead,
    }  # fmt: skip
    if inp.rollouts:
        components["generation (KV cache + step logits)"] = rollout
        if rollout > max(backward, step):
            notes.append(f"the rollout phase sets the peak: {inp.rollouts} sequences generated together hold "
                         f"{rollout / GiB:.2f} GiB of KV cache and step logits (fewer completions per step lower it)")
    notes += _advice(shape, inp, tw.modes, lang, peak, img_tokens)
    notes += [f"{k} kept in host memory: {v / GiB:.2f} GiB off the device ("
              + ("model.per_layer_embeddings" if k in shape.family.host_tables else "model.unused_towers") + ")"
              for k, v in host.items() if not k.startswith("activations")]
    phases = {"static": static, "backward": backward, "step": step}
    if inp.rollouts:
        phases["generation"] = rollout
    return Breakdown(
        model=name, inputs=inp, params=dict(shape.params), trainable_params=int(t.params), weights_by_part=by_part,
        tokens={"seq_len": seq, "image_tokens": img_tokens, "vision_positions": positions, "batch": b},
        components=components, phases=phases,
        peak=peak + overhead, notes=notes, host=host,
    )  # fmt: skip


def rollout_memory(shape: ModelShape, inp: PlanInputs, by: _Bytes, seq: int) -> float:
    """GRPO's generation phase (no gradients; outside the training step): the KV cache of every sequence generated
    together at its full length (prompt + completion; K and V per text layer, in the compute dtype) and one decoding
    step's logits over the vocabulary in fp32 (transformers' sampling upcasts them)."""
    if not inp.rollouts:
        return 0.0
    kv = sum(layer.kv_dim + layer.v_dim for layer in shape.text_layers) * by.compute
    return inp.rollouts * (seq * kv + shape.vocab * 4 * 2)


def _forward_only(shape: ModelShape, inp: PlanInputs, name: str, by_part: dict[str, float]) -> Breakdown:
    """Forward-only training (MeZO / SharpZO on LoRA adapters): the weights, the fp32 adapters and what one
    inference forward of a batch holds at its peak (measured at 1.00x an inference forward: docs/BENCHMARKS.md).
    No gradients and no optimizer state on the device; SharpZO's CMA-ES population lives on the host."""
    from vlmfit.errors import UserError
    from vlmfit.models.families import DUAL_ENCODER_TYPES

    if shape.model_type in DUAL_ENCODER_TYPES:
        raise UserError(f"vlmfit plan models generative VLMs; '{name}' is a dual encoder (CLIP prompt tuning)",
                        where="model.name", hint="a CLIP prompt run needs the weights plus one image-tower forward of a "
                        "batch (measured 1.00x an inference forward, docs/BENCHMARKS.md)")
    weights = sum(by_part.values())
    lora, fully, n_full = _resolve_lora(shape, inp)
    n_lora = sum(inp.lora_r * (i + o) for i, o in lora.values())
    adapters = n_lora * 4 + n_full * _dtype_bytes(inp.weight_dtype)
    seq, img_tokens, positions, notes = _sequence(shape, inp, name)
    b = inp.batch_size
    cb = 2 if inp.precision in ("bf16", "fp16") or _dtype_bytes(inp.weight_dtype) == 2 else 4
    sb = _dtype_bytes(inp.weight_dtype)
    dt = Dtypes(stream=sb, compute=cb, adapter_copy=0, mask=1, expand_kv=False)
    # In a forward without autograd a block holds its input, the residual stream and its widest intermediate
    # (the MLP's, for gate and up together): the same per-token sizes as the backward working set.
    lang = max((working_bytes(L, dt) for L in shape.text_layers), default=0.0) * b * seq
    vis = max((working_bytes(L, dt) for L in shape.vision_layers), default=0.0) * b * positions
    logits = (cb + 4) * shape.vocab * b * seq
    overhead = CUDA_OVERHEAD if inp.device.startswith("cuda") else 0
    static = weights + adapters
    peak = static + max(lang, vis, logits)
    notes.append("forward-only: no gradients, no optimizer state; SharpZO's CMA-ES state (popsize x tuned values) is host memory")
    components = {"weights": weights, "adapters": adapters, "forward working set": max(lang, vis), "logits": logits,
                  "overhead": overhead}
    return Breakdown(
        model=name, inputs=inp, params=dict(shape.params), trainable_params=int(n_lora + n_full), weights_by_part=by_part,
        tokens={"seq_len": seq, "image_tokens": img_tokens, "vision_positions": positions, "batch": b},
        components=components, phases={"static": static, "backward": 0.0, "step": 0.0}, peak=peak + overhead, notes=notes,
    )  # fmt: skip


def per_gpu(bd: Breakdown, shape: ModelShape, strategy: str, n: int) -> dict[str, float]:
    """Per-GPU bytes at n GPUs. Activations are per device (per-device batch). Model states follow each engine:
    DDP replicates (plus gradient buckets); ZeRO-2 = 4P + 16P/N and ZeRO-3 = 4*largest layer + 18P/N over the
    trained params P (DeepSpeed's estimator: fp32 master + states); FSDP FULL_SHARD shards weights, grads and
    optimizer state in the model's own dtypes and gathers ~2 layers at a time."""
    c = dict(bd.components)
    c["weights"] += sum(v for k, v in bd.host.items() if not k.startswith("activations"))  # launched: no host weights
    acts = c["activations (language)"] + c["activations (vision)"] + max(c["logits + loss"], c["backward working set"])
    frozen_w = c["weights"] if bd.inputs.method != "full" else 0.0
    p = bd.trainable_params
    largest = max(shape.largest_linear(), shape.vocab * shape.hidden)  # params of the largest module
    if strategy == "ddp":
        states = c["weights"] + c["adapters"] + c["optimizer"] + 2 * c["gradients"]  # grads + DDP buckets
    elif strategy == "zero2":
        states = frozen_w + 4 * p + 16 * p / n
    elif strategy == "zero3":
        states = frozen_w / n + 4 * largest + 18 * p / n
    elif strategy == "fsdp":
        states = (c["weights"] + c["adapters"] + c["gradients"] + c["optimizer"]) / n + 2 * largest * 2
    else:
        from vlmfit.errors import UserError

        raise UserError(f"unknown strategy '{strategy}'", where="--strategy", hint=", ".join(STRATEGIES))
    return {"model states": states, "activations": acts, "overhead": c["overhead"], "total": states + acts + c["overhead"]}


def inputs_from_config(cfg, *, device: str = "cuda", image_hw: tuple[int, int] | None = None, text_tokens: int = 512,
                       answer_tokens: int = 64) -> PlanInputs:
    """PlanInputs for a RunConfig. `device` decides what "auto" dtype/precision mean (vlmfit: bf16 on a GPU)."""
    m, t, d, lo = cfg.model, cfg.train, cfg.data, cfg.lora
    cuda = device.startswith("cuda")
    method, dpo_ref = cfg.method, False
    if method == "dpo":
        method = cfg.dpo.tuning
        dpo_ref = method == "full"
    elif method == "grpo":  # completions are the batch; a full-tuning policy with a KL term keeps a reference copy
        method = cfg.grpo.tuning
        dpo_ref = method == "full" and cfg.grpo.beta > 0
        answer_tokens = cfg.grpo.max_completion_length
        text_tokens = max(text_tokens, answer_tokens + 64)
    dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if cuda else "float32")
    precision = t.precision if t.precision != "auto" else ("bf16" if cuda else "fp32")
    images, frames = 1, 0
    if d.frames_per_example:
        images = d.frames_per_example  # each example is that many frames, fed as images
    elif d.video_column:
        images, frames = 0, d.video_max_frames or 16
    return PlanInputs(
        method=method, quantization=m.quantization, double_quant=m.double_quant, weight_dtype=dtype,
        precision=precision, device=device, batch_size=t.batch_size * (2 if cfg.method == "dpo" else 1),
        grad_accum=t.grad_accum, text_tokens=text_tokens, max_length=t.max_length, images=images,
        lean_loss=t.lean_loss, label_tokens=text_tokens if t.loss_on == "all" else min(answer_tokens, text_tokens),
        image_hw=image_hw or (1024, 1024), video_frames=frames, min_pixels=m.min_pixels, max_pixels=m.max_pixels,
        max_soft_tokens=m.max_soft_tokens, checkpointing=tuple(t.gradient_checkpointing), optim=t.optim,
        lora_r=lo.r, lora_targets=lo.targets if isinstance(lo.targets, str) else tuple(lo.targets),
        lora_scope=tuple(lo.scope), lora_train_fully=tuple(lo.train_fully), lora_dropout=lo.dropout,
        dpo_reference=dpo_ref, packing=t.packing, pack_tokens=t.pack_tokens,
        reuse_features=t.cache_image_features and cfg.method not in ("dpo", "grpo"), feature_cache_gib=t.feature_cache_gib,
        per_layer_embeddings=m.per_layer_embeddings, unused_towers=m.unused_towers,
        activation_offload=tuple(t.activation_offload),
        rollouts=t.batch_size * t.grad_accum if cfg.method == "grpo" else 0,
    )  # fmt: skip


def recipe_shape(cfg) -> ModelShape:
    """The ModelShape of a recipe's model, from its config only (built on the meta device, no weights)."""
    from vlmfit.memory.catalog import load_model_config
    from vlmfit.memory.shape import model_shape

    return model_shape(load_model_config(cfg.model.name, cfg.model.revision), cfg.model.name)


def plan_memory(cfg, *, device: str = "cuda", budget: int | None = None, image_hw: tuple[int, int] | None = None,
                text_tokens: int = 512, answer_tokens: int = 64, shape: ModelShape | None = None) -> Breakdown:
    """The breakdown for a recipe (pass `shape` to reuse one meta-device build across several plans)."""
    shape = shape or recipe_shape(cfg)
    inp = inputs_from_config(cfg, device=device, image_hw=image_hw, text_tokens=text_tokens, answer_tokens=answer_tokens)
    return estimate(shape, inp, cfg.model.name).with_budget(budget)
