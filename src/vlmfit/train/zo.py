"""Forward-only training recipe (method: zo): MeZO and SharpZO as explicit loops with no backward pass anywhere,
plus CoOp (backprop prompt tuning) as the reference behind the same recipe. Read top to bottom: `train_zo` is the
recipe, then the optimizers, then the LoRA target (the CLIP prompt target is in train/prompt.py).

Memory: a perturbation z is never stored. It is regenerated from an integer seed each time it is needed (perturb,
restore, update), so training holds the weights, the tuned parameters and one forward's activations: inference.
SharpZO's stage 1 keeps the CMA-ES population (popsize x tuned dim) on the host, as CMA-ES must.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from vlmfit.config import RunConfig
from vlmfit.errors import UserError
from vlmfit.report import RunDir, plot_loss, write_report


def train_zo(cfg: RunConfig, console: Console | None = None) -> Path:
    """Run the recipe end to end and return the run directory."""
    console = console or Console()
    torch.manual_seed(cfg.train.seed)
    target = make_target(cfg, console)
    run = RunDir.create(cfg)
    console.print(f"[bold]run directory[/] {run.path}")
    console.print(f"zo: {cfg.zo.optimizer} on {target.kind} ({target.dim:,} tuned values), "
                  f"budget {cfg.zo.forward_passes:,} forward passes")
    before = target.evaluate()
    run.write_json("eval_before.json", before)
    console.print(f"accuracy before training: {100 * before['constrained']['accuracy']:.1f}%")
    log = Log(run, target, cfg.zo.eval_every, known=before)
    with console.status("forward-only training" if cfg.zo.optimizer != "coop" else "CoOp (backprop) training"):
        OPTIMIZERS[cfg.zo.optimizer](target, cfg, log)
    after = log.evaluation  # the final record's evaluation: the parameters as they end (not evaluated twice)
    run.write_json("eval_after.json", after)
    console.print(f"accuracy after training: {100 * after['constrained']['accuracy']:.1f}%")
    weights = target.save(run.path) if cfg.output.save_model else "not saved (output.save_model: false)"
    summary = {
        "steps": log.used, "forward_passes": log.used, "train_seconds": log.seconds, "final_loss": log.last_loss,
        "trainable_params": target.dim, "total_params": target.total_params, "train_examples": target.n_train,
        "test_examples": target.n_test, "weights": weights, "label_method": target.label_method,
        "max_length": {"limit": None}, "optimizer": cfg.zo.optimizer, "target": target.kind,
        "history": log.history, "outliers_skipped": log.outliers,
    }
    if torch.cuda.is_available():
        summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    run.write_json("summary.json", summary)
    plot_loss(run)
    write_report(run, cfg, summary, before, after)
    return run.path


# ---- bookkeeping ----------------------------------------------------------------------------------------------


@dataclass
class Log:
    """Forward-pass budget, training clock (evaluation excluded), held-out accuracy every `every` passes
    (`track_accuracy=False`: no evaluation at all, e.g. while measuring the training loop's memory)."""

    run: RunDir | None
    target: object
    every: int
    track_accuracy: bool = True
    known: dict | None = None  # evaluation of the starting parameters, when the caller already has it
    evaluation: dict | None = None  # target.evaluate() of the latest record
    used: int = 0
    seconds: float = 0.0
    last_loss: float = math.nan
    outliers: int = 0
    history: list = field(default_factory=list)
    _t0: float = field(default_factory=time.perf_counter)
    _next_eval: int = 0

    def __post_init__(self):
        self._record(None)  # accuracy at 0 forward passes (the untrained parameters)

    def spend(self, n: int, loss: float | None = None, stage: str | None = None) -> None:
        self.used += n
        if loss is not None:
            self.last_loss = float(loss)
        if self.used >= self._next_eval:
            self._record(stage)

    def _record(self, stage: str | None) -> None:
        self.seconds += time.perf_counter() - self._t0
        if self.known is not None:
            self.evaluation, self.known = self.known, None
        elif self.track_accuracy:
            self.evaluation = self.target.evaluate()
        acc = self.evaluation["constrained"]["accuracy"] if self.track_accuracy else None
        rec = {"step": self.used, "forward_passes": self.used, "accuracy": acc,
               "train_seconds": round(self.seconds, 3), **({"stage": stage} if stage else {})}
        if not math.isnan(self.last_loss):
            rec["loss"] = self.last_loss
        self.history.append(rec)
        if self.run is not None:
            self.run.log_metrics(rec)
        self._next_eval = self.used + self.every
        self._t0 = time.perf_counter()  # evaluation time is not training time

    def close(self) -> None:
        if self.history[-1]["forward_passes"] != self.used:
            self._record(None)


def _seeds(seed: int):
    rng = np.random.default_rng(seed)
    while True:
        yield int(rng.integers(2**62))


def perturb_(params: list[torch.Tensor], seed: int, scale: float, sparsity: float = 0.0) -> None:
    """params += scale * z in place, z ~ N(0, I) regenerated from `seed`; with sparsity s, z keeps a random
    (1 - s) share of its coordinates (the mask comes from the same seed)."""
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        z = torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)
        if sparsity:
            z.mul_(torch.rand(p.shape, generator=g, device=p.device) >= sparsity)
        p.add_(z, alpha=scale)


def noise(params: list[torch.Tensor], seed: int, sparsity: float = 0.0) -> np.ndarray:
    """The z of `perturb_(params, seed, ...)` as one flat float64 host vector (for CMA-ES, which lives on the host),
    built one tensor at a time so that at most one parameter's worth of noise is a device tensor."""
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    out = []
    for p in params:
        z = torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)
        if sparsity:
            z.mul_(torch.rand(p.shape, generator=g, device=p.device) >= sparsity)
        out.append(z.double().cpu().numpy().ravel())
        del z
    return np.concatenate(out)


def projected_gradient(target, batch, seed: int, eps: float, sparsity: float = 0.0) -> tuple[float, float]:
    """Two-point estimate (L(θ+εz) - L(θ-εz)) / 2ε of the directional derivative along z(seed); θ is restored.
    Returns (estimate, L(θ+εz))."""
    perturb_(target.params, seed, eps, sparsity)
    plus = target.loss(batch)
    perturb_(target.params, seed, -2 * eps, sparsity)
    minus = target.loss(batch)
    perturb_(target.params, seed, eps, sparsity)
    return (plus - minus) / (2 * eps), plus


# ---- optimizers -----------------------------------------------------------------------------------------------


@torch.no_grad()
def mezo(target, cfg: RunConfig, log: Log) -> None:
    """MeZO (Malladi et al. 2023): SPSA with q directions, θ -= lr * mean_i(g_i z_i), z regenerated from seeds."""
    z = cfg.zo
    seeds, batches = _seeds(cfg.train.seed), target.batches(cfg.train.batch_size, cfg.train.seed)
    while log.used + 2 * z.perturbations <= z.forward_passes:
        batch = next(batches)
        est = [(s, *projected_gradient(target, batch, s, z.eps)) for s in (next(seeds) for _ in range(z.perturbations))]
        for s, g, _ in est:
            perturb_(target.params, s, -z.lr * g / z.perturbations)
        log.spend(2 * z.perturbations, np.mean([plus for _, _, plus in est]), "mezo")
    log.close()


@torch.no_grad()
def sharpzo(target, cfg: RunConfig, log: Log) -> None:
    """SharpZO: stage 1 is CMA-ES whose candidates are scored at a sharpness-aware worst case L(x + ε*), with
    ε* = ρ g/|g| and g a two-point gradient estimate at the CMA-ES mean; stage 2 continues from the mean with
    sparse ZO-SGD: each perturbation touches a random (1 - sparsity) share of coordinates, the projected gradient
    is normalised by its running RMS, and estimates beyond outlier_threshold x RMS are skipped."""
    import cma

    z = cfg.zo
    seeds, batches = _seeds(cfg.train.seed), target.batches(cfg.train.batch_size, cfg.train.seed)
    per_gen = z.popsize + (2 * z.perturbations if z.rho > 0 else 0)
    if z.generations and z.forward_passes >= per_gen:
        # Full covariance is O(dim^2): above a few thousand tuned values CMA-ES keeps a diagonal one (sep-CMA).
        opts = {"popsize": z.popsize, "seed": cfg.train.seed % (2**32 - 1) + 1, "verbose": -9, "CMA_diagonal": target.dim > 4096}
        es = cma.CMAEvolutionStrategy(target.flat(), z.sigma, opts)
        for _ in range(z.generations):
            if log.used + per_gen > z.forward_passes:
                break
            batch = next(batches)
            target.set_flat(es.mean)
            shift = 0.0
            if z.rho > 0:
                direction = np.zeros(target.dim)
                for s in (next(seeds) for _ in range(z.perturbations)):
                    g, _ = projected_gradient(target, batch, s, z.eps)
                    direction += g * noise(target.params, s)
                norm = float(np.linalg.norm(direction))
                shift = z.rho * direction / norm if norm > 0 else 0.0
            X = es.ask()
            losses = target.population_losses(np.asarray(X) + shift, batch, z.population_batch)
            es.tell(X, losses.tolist())
            target.set_flat(es.mean)
            log.spend(per_gen, float(np.mean(losses)), "cma-es")
        target.set_flat(es.mean)
    rms, seen = 0.0, 0
    while log.used + 2 <= z.forward_passes:
        batch = next(batches)
        s = next(seeds)
        g, plus = projected_gradient(target, batch, s, z.eps, z.sparsity)
        seen += 1
        if seen > 5 and abs(g) > z.outlier_threshold * math.sqrt(rms):
            log.outliers += 1  # a heavy-tailed estimate: skipped, and kept out of the running RMS
        else:
            rms = g * g if seen == 1 else 0.9 * rms + 0.1 * g * g
            perturb_(target.params, s, -z.lr * g / (math.sqrt(rms) + 1e-12), z.sparsity)
        log.spend(2, plus, "sparse-zo")
    log.close()


def coop(target, cfg: RunConfig, log: Log) -> None:
    """CoOp (Zhou et al. 2022), the backprop reference: SGD with a cosine schedule on the context vectors
    themselves (the intrinsic projection is a forward-only device and is not used). One step = one forward."""
    ctx = torch.nn.Parameter(target.context_vectors().clone())
    target.A, target.params = None, [ctx]
    steps = cfg.zo.forward_passes
    opt = torch.optim.SGD([ctx], lr=cfg.zo.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batches = target.batches(cfg.train.batch_size, cfg.train.seed)
    for _ in range(steps):
        loss = target.losses(ctx[None], next(batches))[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.spend(1, float(loss), "coop")
    ctx.requires_grad_(False)
    log.close()


OPTIMIZERS = {"mezo": mezo, "sharpzo": sharpzo, "coop": coop}


# ---- targets --------------------------------------------------------------------------------------------------


def make_target(cfg: RunConfig, console: Console):
    """The tuned parameters and their loss: CLIP prompt tuning or LoRA adapters of a generative VLM."""
    from transformers import AutoConfig

    from vlmfit.models.load import resolve_reference
    from vlmfit.train.sft import load_splits

    ref = resolve_reference(cfg.model.name)
    model_type = AutoConfig.from_pretrained(ref, revision=cfg.model.revision).model_type
    kind = cfg.zo.target if cfg.zo.target != "auto" else ("prompt" if model_type == "clip" else "lora")
    if (kind == "prompt") != (model_type == "clip"):
        raise UserError(f"zo.target {kind} does not fit a '{model_type}' model",
                        where="zo.target", hint="prompt tuning needs a CLIP model (e.g. tiny:clip); generative VLMs use lora")
    if kind == "lora" and cfg.zo.optimizer == "coop":
        raise UserError("zo.optimizer coop is backprop prompt tuning of a CLIP model", where="zo.optimizer",
                        hint="for a generative VLM use method lora (backprop) or zo.optimizer mezo / sharpzo")
    train_ds, test_ds, labels = load_splits(cfg)
    if labels is None:
        raise UserError("method zo evaluates classification accuracy: the data needs a label set",
                        where="data.task", hint="use task classification (e.g. builtin:mnist)")
    if kind == "prompt":
        return clip_prompt(ref, cfg, train_ds, test_ds, labels)
    return LoraTarget(cfg, console, train_ds, test_ds, labels)


def clip_prompt(ref: str, cfg: RunConfig, train_ds, test_ds, labels: list[str]):
    """PromptTarget (train/prompt.py) on the recipe's data: few-shot train and held-out test image features."""
    from transformers import AutoProcessor, CLIPModel

    from vlmfit.models.load import pick_dtype
    from vlmfit.train.prompt import PromptTarget

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = CLIPModel.from_pretrained(ref, revision=cfg.model.revision, dtype=pick_dtype(cfg.model.dtype)).to(device)
    processor = AutoProcessor.from_pretrained(ref, revision=cfg.model.revision)
    target = PromptTarget(model, processor, labels, cfg.zo.ctx_init, cfg.zo.intrinsic_dim, cfg.zo.sigma, cfg.train.seed,
                          cfg.zo.n_ctx)
    target.cache_images("train", [ex[0] for ex in train_ds["images"]], list(train_ds["label"]), cfg.eval.batch_size)
    target.cache_images("test", [ex[0] for ex in test_ds["images"]], list(test_ds["label"]), cfg.eval.batch_size)
    return target


class LoraTarget:
    """LoRA adapters of a generative VLM (any supported family), loss = the SFT loss with vlmfit's labels."""

    kind = "lora"

    def __init__(self, cfg: RunConfig, console: Console, train_ds, test_ds, labels: list[str]):
        from vlmfit.models.load import load
        from vlmfit.train.collate import VisionChatCollator
        from vlmfit.train.sft import LABEL_METHODS, apply_method

        self.cfg, self.train_ds, self.test_ds, self.labels = cfg, train_ds, test_ds, labels
        self.loaded = load(cfg.model.name, cfg.model.dtype, cfg.model.revision, cfg.model)
        self.model = apply_method(self.loaded, cfg, console)  # method zo takes the LoRA branch: adapters on targets
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.model.parameters():
            p.requires_grad_(False)  # nothing builds a graph; tests assert it
        self.model.eval()  # dropout off: both sides of a two-point estimate must see the same function
        self.collator = VisionChatCollator(self.loaded.processor, self.loaded.family, loss_on=cfg.train.loss_on,
                                           max_length=cfg.train.max_length)
        self.label_method = LABEL_METHODS[self.collator.label_method]
        self.device = self.params[0].device
        self.n_train, self.n_test = len(train_ds), len(test_ds)
        self.total_params = sum(p.numel() for p in self.model.parameters())

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    # flat views go through the host one tensor at a time: no device copy of all adapters at once
    def flat(self) -> np.ndarray:
        return np.concatenate([p.detach().double().cpu().numpy().ravel() for p in self.params])

    def set_flat(self, x) -> None:
        x, i = np.asarray(x), 0
        for p in self.params:
            p.copy_(torch.from_numpy(x[i:i + p.numel()]).view(p.shape))
            i += p.numel()

    def batches(self, batch_size: int, seed: int):
        g = np.random.default_rng(seed)
        while True:
            order = g.permutation(self.n_train)
            for i in range(0, self.n_train - batch_size + 1, batch_size):
                rows = [self.train_ds[int(j)] for j in order[i:i + batch_size]]
                yield {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in self.collator(rows).items()}

    @torch.no_grad()
    def loss(self, batch) -> float:
        return float(self.model(**batch, use_cache=False).loss)

    @torch.no_grad()
    def population_losses(self, X, batch, chunk: int | None = None) -> np.ndarray:
        """One candidate per forward (adapters cannot be batched as prompts can): `chunk` does not apply."""
        keep = self.flat()
        out = []
        for x in np.asarray(X):
            self.set_flat(x)
            out.append(self.loss(batch))
        self.set_flat(keep)
        return np.asarray(out)

    def evaluate(self) -> dict:
        from vlmfit.evaluate.classification import evaluate_classification

        res = evaluate_classification(self.model, self.collator, self.test_ds, self.labels, ["constrained"], self.cfg.eval.batch_size)
        self.model.eval()
        return res

    def save(self, out: Path) -> str:
        self.loaded.processor.save_pretrained(out / "processor")
        self.model.save_pretrained(out / "adapter")
        return "adapter/"
