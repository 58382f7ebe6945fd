"""Forward-only training recipe (method: zo): MeZO and SharpZO as explicit loops with no backward pass anywhere,
plus CoOp (backprop prompt tuning) as the reference behind the same recipe. Read top to bottom: `train_zo` is the
recipe, then the optimizers; what they tune (CLIP prompts, LoRA adapters) is in train/zo_targets.py.

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
from vlmfit.rundir import RunDir, RunSummary
from vlmfit.train.run import NOT_SAVED, SignalCatcher, begin
from vlmfit.train.zo_targets import make_target, save_tuned


def train_zo(cfg: RunConfig, console: Console | None = None, overwrite: bool = False, resume: RunDir | None = None) -> Path:
    """Run the recipe end to end and return the run directory (`resume`: continue that run from its last complete
    checkpoint, exactly: tuned values, forward-pass count, CMA-ES state, seeds and batch order). SIGINT / SIGTERM
    stop at the next checkpoint (every zo.eval_every forward passes), resumable."""
    if resume is not None and cfg.zo.optimizer == "coop":
        raise UserError("resuming a CoOp run is not supported (it is the backprop reference, not a forward-only run)",
                        where="--resume", hint="start the CoOp run again")
    life = begin(cfg, console, resume)
    cfg, console = life.cfg, life.console
    life.check(chat=False)  # refusals as for the Trainer's runs
    target = make_target(cfg, console)
    run = life.open(overwrite, at=f"at {life.point[0]:,} forward passes" if life.point else "")
    console.print(f"zo: {cfg.zo.optimizer} on {target.kind} ({target.dim:,} tuned values), "
                  f"budget {cfg.zo.forward_passes:,} forward passes")
    state = ZoState()
    if life.point is None:
        before = target.evaluate()
        run.write_eval("before", before)
        budget = Budget(run, target, cfg.zo.eval_every, known=before, keep=cfg.train.save_total_limit)
    else:
        before = run.evals()[0]
        budget, state = Budget.restore(run, target, cfg, life.checkpoint)
    console.print(f"accuracy before training: {100 * before['constrained']['accuracy']:.1f}%")
    budget.state = state
    budget.signals.install()
    try:
        with console.status("forward-only training" if cfg.zo.optimizer != "coop" else "CoOp (backprop) training"):
            OPTIMIZERS[cfg.zo.optimizer](target, cfg, budget)
    finally:
        budget.signals.restore()
    after = budget.evaluation  # the final record's evaluation: the parameters as they end (not evaluated twice)
    run.write_eval("after", after)
    console.print(f"accuracy after training: {100 * after['constrained']['accuracy']:.1f}%")
    weights = save_tuned(target, run) if cfg.output.save_model else NOT_SAVED
    return life.finish(RunSummary(
        method="zo", steps=budget.used, train_seconds=budget.seconds, final_loss=budget.last_loss,
        trainable_params=target.dim, total_params=target.total_params, train_examples=target.n_train,
        test_examples=target.n_test, weights=weights, label_method=target.label_method,
        zo={"optimizer": cfg.zo.optimizer, "target": target.kind, "forward_passes": budget.used,
            "history": budget.history, "outliers_skipped": budget.outliers},
        peak_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        resumed_from=life.resumed_from,
    ))


# ---- bookkeeping ----------------------------------------------------------------------------------------------


@dataclass
class ZoState:
    """Where an optimizer loop is, beyond the tuned values: how many seeds and batches it drew (regenerated on
    resume by drawing as many again), its running values, and the losses it told CMA-ES per generation (replayed
    on resume: ask() is seeded, so ask/tell with the same losses rebuilds the same CMA-ES state without a forward)."""

    seeds: int = 0
    batches: int = 0
    stage: str = "start"  # start | cma-es | sparse-zo | mezo
    rms: float = 0.0
    seen: int = 0
    cma_losses: list = field(default_factory=list)

    def seed_stream(self, seed: int):
        return _Counted(self, "seeds", _seeds(seed))

    def batch_stream(self, target, batch_size: int, seed: int):
        return _Counted(self, "batches", target.batches(batch_size, seed))


class _Counted:
    """A generator that counts its draws into ZoState (and, when resumed, first skips the ones already drawn)."""

    def __init__(self, state: ZoState, name: str, gen):
        self.state, self.name, self.gen = state, name, gen
        for _ in range(getattr(state, name)):
            next(gen)

    def __iter__(self):
        return self

    def __next__(self):
        setattr(self.state, self.name, getattr(self.state, self.name) + 1)
        return next(self.gen)


@dataclass
class Budget:
    """The forward-pass budget spent so far, the training clock (evaluation excluded) and held-out accuracy every
    `every` passes, logged to metrics.jsonl (`track_accuracy=False`: no evaluation at all, e.g. while measuring the
    training loop's memory). With a run directory, every record is also a resumable checkpoint (the last `keep`)."""

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
    keep: int = 2
    state: ZoState = field(default_factory=ZoState)
    start: np.ndarray | None = None  # the tuned values the run started from (set when resumed: CMA-ES replays from it)
    signals: SignalCatcher = field(default_factory=SignalCatcher)  # installed by train_zo around the loop
    _t0: float = field(default_factory=time.perf_counter)
    _next_eval: int = 0
    _restored: bool = False

    def __post_init__(self):
        if not self._restored:
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
        self._next_eval = self.used + self.every
        if self.run is not None:
            self.run.log_metrics(rec)
            if self.used:
                self._checkpoint()
                if self.signals.signum is not None:  # a clean stop, at a checkpoint
                    raise self.signals.stopped(self.run, f"{self.used:,} forward passes")
        self._t0 = time.perf_counter()  # evaluation time is not training time

    def _checkpoint(self) -> None:
        """checkpoint-<forward passes>/ through RunDir: the tuned values and the loop's state; the last `keep` stay."""
        from dataclasses import asdict

        budget = {"used": self.used, "seconds": self.seconds, "last_loss": self.last_loss, "outliers": self.outliers,
                  "history": self.history, "evaluation": self.evaluation, "next_eval": self._next_eval}
        self.run.save_zo_checkpoint(self.used, torch.from_numpy(self.target.flat()),
                                    {"budget": budget, "loop": asdict(self.state)}, self.keep)

    @classmethod
    def restore(cls, run: RunDir, target, cfg: RunConfig, path: Path) -> tuple["Budget", ZoState]:
        """The budget and loop state of checkpoint `path`, with the target set to its tuned values."""
        tuned, saved = run.load_zo_checkpoint(path)
        b = saved["budget"]
        budget = cls(run, target, cfg.zo.eval_every, used=b["used"], seconds=b["seconds"], last_loss=b["last_loss"],
                     outliers=b["outliers"], history=b["history"], evaluation=b["evaluation"],
                     keep=cfg.train.save_total_limit, _restored=True)
        budget._next_eval = b["next_eval"]
        budget.start = target.flat()
        with torch.no_grad():
            target.set_flat(tuned.numpy())
        return budget, ZoState(**saved["loop"])

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
def mezo(target, cfg: RunConfig, budget: Budget) -> None:
    """MeZO (Malladi et al. 2023): SPSA with q directions, θ -= lr * mean_i(g_i z_i), z regenerated from seeds."""
    z, state = cfg.zo, budget.state
    seeds, batches = state.seed_stream(cfg.train.seed), state.batch_stream(target, cfg.train.batch_size, cfg.train.seed)
    state.stage = "mezo"
    while budget.used + 2 * z.perturbations <= z.forward_passes:
        batch = next(batches)
        est = [(s, *projected_gradient(target, batch, s, z.eps)) for s in (next(seeds) for _ in range(z.perturbations))]
        for s, g, _ in est:
            perturb_(target.params, s, -z.lr * g / z.perturbations)
        budget.spend(2 * z.perturbations, np.mean([plus for _, _, plus in est]), "mezo")
    budget.close()


@torch.no_grad()
def sharpzo(target, cfg: RunConfig, budget: Budget) -> None:
    """SharpZO: stage 1 is CMA-ES whose candidates are scored at a sharpness-aware worst case L(x + ε*), with
    ε* = ρ g/|g| and g a two-point gradient estimate at the CMA-ES mean; stage 2 continues from the mean with
    sparse ZO-SGD: each perturbation touches a random (1 - sparsity) share of coordinates, the projected gradient
    is normalised by its running RMS, and estimates beyond outlier_threshold x RMS are skipped.
    Resumable: budget.state says where the loop was (see ZoState)."""
    import cma

    z, state = cfg.zo, budget.state
    seeds, batches = state.seed_stream(cfg.train.seed), state.batch_stream(target, cfg.train.batch_size, cfg.train.seed)
    per_gen = z.popsize + (2 * z.perturbations if z.rho > 0 else 0)
    if state.stage in ("start", "cma-es") and z.generations and z.forward_passes >= per_gen:
        # Full covariance is O(dim^2): above a few thousand tuned values CMA-ES keeps a diagonal one (sep-CMA).
        opts = {"popsize": z.popsize, "seed": cfg.train.seed % (2**32 - 1) + 1, "verbose": -9, "CMA_diagonal": target.dim > 4096}
        # Resumed: CMA-ES starts where the run started, and the replay of its told losses rebuilds its state.
        es = cma.CMAEvolutionStrategy(budget.start if state.cma_losses else target.flat(), z.sigma, opts)
        for told in state.cma_losses:
            es.tell(es.ask(), told)
        state.stage = "cma-es"
        for _ in range(len(state.cma_losses), z.generations):
            if budget.used + per_gen > z.forward_passes:
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
            state.cma_losses.append(losses.tolist())
            target.set_flat(es.mean)
            budget.spend(per_gen, float(np.mean(losses)), "cma-es")
        target.set_flat(es.mean)
    state.stage = "sparse-zo"
    while budget.used + 2 <= z.forward_passes:
        batch = next(batches)
        s = next(seeds)
        g, plus = projected_gradient(target, batch, s, z.eps, z.sparsity)
        state.seen += 1
        if state.seen > 5 and abs(g) > z.outlier_threshold * math.sqrt(state.rms):
            budget.outliers += 1  # a heavy-tailed estimate: skipped, and kept out of the running RMS
        else:
            state.rms = g * g if state.seen == 1 else 0.9 * state.rms + 0.1 * g * g
            perturb_(target.params, s, -z.lr * g / (math.sqrt(state.rms) + 1e-12), z.sparsity)
        budget.spend(2, plus, "sparse-zo")
    budget.close()


def coop(target, cfg: RunConfig, budget: Budget) -> None:
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
        budget.spend(1, float(loss), "coop")
    ctx.requires_grad_(False)
    budget.close()


OPTIMIZERS = {"mezo": mezo, "sharpzo": sharpzo, "coop": coop}
