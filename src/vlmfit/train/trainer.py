"""What the TRL-based recipes (sft, dpo) share: the TrainingArguments, the trainer class (lean loss, divergence
guard, batch rows), checkpoints and resume, clean stops on SIGINT / SIGTERM, the progress/metrics callback, the LoRA
targets report, and the run summary's common fields. Leaves only: nothing here knows a recipe."""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal

import torch
from rich.console import Console
from transformers import PrinterCallback, TrainerCallback

from vlmfit.chat.collate import ROW
from vlmfit.config import RunConfig
from vlmfit.errors import UserError
from vlmfit.launch.ranks import barrier, broadcast, is_main, world_size
from vlmfit.launch.strategy import here_refusal, require_supported, strategy_arguments
from vlmfit.models.families import Family
from vlmfit.models.features import IMAGE_KEYS, FeatureCache
from vlmfit.models.loss import causal_lm_loss
from vlmfit.models.targets import part_of
from vlmfit.models.packing import unpack_inputs
from vlmfit.models.towers import TowerSync
from vlmfit.rundir import ENVIRONMENT, LAUNCH, LORA_TARGETS, SUMMARY, RunDir, environment
from vlmfit.train.tracking import track_locally, tracker_arguments

OPTIMIZERS = {"adamw": "adamw_torch", "adamw-8bit": "adamw_bnb_8bit", "paged-adamw-8bit": "paged_adamw_8bit", "sgd": "sgd"}


def trainer_arguments(cfg: RunConfig, run: RunDir) -> dict:
    """The TrainingArguments every vlmfit recipe shares (SFT and DPO configs take them, plus their own)."""
    t = cfg.train
    track_locally(cfg, run)
    use_cuda = torch.cuda.is_available()
    bf16 = t.precision == "bf16" or (t.precision == "auto" and use_cuda and torch.cuda.is_bf16_supported())
    return dict(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        max_length=None,  # vlmfit's collators own truncation: they never cut through an image
        gradient_checkpointing=False,  # enabled per tower by enable_checkpointing: the Trainer's covers everything
        optim=OPTIMIZERS[t.optim],
        bf16=bf16,  # TRL's default is bf16 on, which a CPU run must not get by accident
        fp16=t.precision == "fp16",
        logging_steps=t.logging_steps,
        save_strategy="steps",  # and at the end (the Trainer's rule for "steps")
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        disable_tqdm=True,
        # transformers' LengthGroupedSampler over the "length" column (chat/length.py measures it) when asked
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        # vlmfit's collators read the columns they need; the rest (ROW: the rows the divergence guard names) must
        # reach them, where TRL would keep only its own column names.
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        dataloader_persistent_workers=t.dataloader_workers > 0,  # not re-forked every epoch
        dataloader_pin_memory=use_cuda,
        # launched on CPUs (tests, CPU clusters): accelerate's MULTI_CPU with gloo, which it picks only with use_cpu
        use_cpu=not use_cuda and world_size() > 1,
        **tracker_arguments(cfg, run),  # train.report_to; track_locally has pointed them at the run directory
    )


def launch_arguments(cfg: RunConfig, model, family: Family, run: RunDir) -> dict:
    """Launched (WORLD_SIZE > 1): the TrainingArguments of cfg.launch.strategy, also written to the run directory
    (launch.json) by rank 0, so the run records how it was shared out. Empty in a single process."""
    if world_size() == 1:
        return {}
    strategy = cfg.launch.strategy
    require_supported(strategy, cfg.method)
    why = here_refusal(strategy)
    if why:
        raise UserError(why, where="launch.strategy")
    args = trainer_arguments(cfg, run)
    # Parameters that can go without a gradient in a step: a trained tower on a rank whose batch has no image, its
    # layers past the one the features are read from (LLaVA's vision_feature_layer -2, its post-layernorm), or a
    # family's own (Gemma 4's audio tower). Without the search, DDP waits for their gradients: the launch hangs.
    unused = family.ddp_unused_parameters or towers_trained(model, family)
    extra = strategy_arguments(strategy, model, family, args["bf16"], args["fp16"], unused)
    if is_main():
        run.write_json(LAUNCH, {"strategy": strategy, "world_size": world_size(), "arguments": extra,
                                "global_batch": cfg.train.batch_size * cfg.train.grad_accum * world_size()})
    return extra


def towers_trained(model, family: Family) -> bool:
    return any(p.requires_grad and part_of(n.removeprefix("base_model.model."), family) in ("vision", "projector")
               for n, p in model.named_parameters())


def note_uneven_epoch(n: int, cfg: RunConfig, console: Console) -> None:
    """Launched: when the examples do not fill the last step of every rank, accelerate's even batches repeat the
    epoch's first examples to fill it (so no rank waits for another); said, with the count."""
    world = world_size()
    per_step = cfg.train.batch_size * world
    extra = -n % per_step
    if world > 1 and extra:
        console.print(f"[yellow]note[/]: {n} training examples do not fill the last step of {world} ranks x "
                      f"{cfg.train.batch_size}: it repeats {extra} from the epoch's start (a multiple of {per_step} "
                      "examples avoids it)")


def sync_towers(model, family: Family, processor, cfg: RunConfig, videos: bool) -> TowerSync | None:
    """Launched with sharded weights (fsdp, zero3): the blank-image inputs that keep the ranks' gathers in step.
    DDP needs none: with a trained tower it looks for unused parameters (launch_arguments), which covers a rank
    whose batch has no image, and a blank pass outside DDP's forward would mark those parameters ready twice."""
    if world_size() == 1 or cfg.launch.strategy not in ("fsdp", "zero3"):
        return None
    return TowerSync(processor, videos)


class Stopped(UserError):
    """The run stopped before its end (signal, divergence, full disk) with a resumable checkpoint: not a traceback,
    and an exit code of its own (3; 128 + the signal for a signal)."""

    exit_code = 3

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None, exit_code: int = 3):
        super().__init__(what, where=where, hint=hint)
        self.exit_code = exit_code


def rank_console(console: Console) -> Console:
    """The console on rank 0; on the other ranks of a launch one that prints nothing (rank 0 speaks for the run)."""
    return console if is_main() else Console(quiet=True)


def shared_run_name(cfg: RunConfig) -> RunConfig:
    """Launched: every rank uses rank 0's run directory name (the default name carries a timestamp)."""
    if world_size() == 1 or cfg.output.name is not None:
        return cfg
    name = broadcast(RunDir.default_name(cfg))
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"name": name})})


def open_run(cfg: RunConfig, overwrite: bool, resume: RunDir | None) -> RunDir:
    """The run directory: `resume`'s, or a new one, created by rank 0 alone (the other ranks open it; called under
    ranks.main_first, so rank 0 has made it by then)."""
    if resume is not None:
        return resume
    if is_main():
        return RunDir.create(cfg, overwrite)
    return RunDir.open(RunDir.path_for(cfg))


def with_row_ids(ds):
    """The train split with each example's index in it (column ROW): the divergence guard names the rows of a bad
    step. add_column adds one column beside the table, without rewriting the images."""
    return ds if ROW in ds.column_names else ds.add_column(ROW, list(range(len(ds))))


def vlmfit_trainer(trainer_class, guard: "DivergenceGuard", lean_loss: bool = False, family: Family | None = None,
                   features: FeatureCache | None = None, sync: TowerSync | None = None):
    """`trainer_class` (TRL's SFTTrainer or DPOTrainer) as vlmfit runs it:
    - with `lean_loss`, the loss is models.loss.causal_lm_loss: the LM head only at the labelled positions, never
      full logits. Trainer.compute_loss is the documented place to change the loss; the normalisation follows the
      Trainer's (its global count of labelled tokens when the model takes loss kwargs, else this micro-batch's mean,
      which the Trainer then divides by the accumulation steps). Without it, the trainer's own loss, unchanged.
    - the batch rows (ROW, put there by the collators) are taken out before the model sees the batch, for the guard;
    - a packed batch (chat/rows.py) gets its examples' own position ids here, where the model is (`family`'s rule);
    - with `features`, images seen before get their features from that cache instead of the vision tower;
    - with `sync` (launched, towers trained or sharded), a batch without images runs the tower on a blank one
      (models/towers.py), so every rank's collective calls match;
    - every optimizer step's gradient norm (before clipping: the value the Trainer logs) goes through the guard,
      which can drop the step's gradients (the optimizer then skips every parameter) or stop the run."""

    class VlmfitTrainer(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            rows = inputs.pop(ROW, None)
            if rows is not None:
                guard.rows.extend(rows.tolist())
            inner = self.accelerator.unwrap_model(model)  # launched: the module inside DDP / FSDP
            blank = sync.touch(inner, inputs) if sync is not None else None
            if family is not None:
                inputs = unpack_inputs(inner, inputs, family)
            if features is not None:
                inputs = features.inputs(inner, inputs)
            inputs.pop(IMAGE_KEYS, None)
            if not lean_loss:
                out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
                if blank is None:
                    return out
                return (out[0] + blank, out[1]) if return_outputs else out + blank
            global_count = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            loss = causal_lm_loss(model, inputs, num_items_in_batch if global_count else None)
            if global_count and self.args.average_tokens_across_devices:
                # divided by the tokens of all ranks, and DDP averages the ranks' gradients: scaled back as the
                # Trainer's own compute_loss does, so the gradient is the global batch's
                loss = loss * self.accelerator.num_processes
            if blank is not None:
                loss = loss + blank
            return (loss, None) if return_outputs else loss

        def _get_grad_norm(self, model, grad_norm=None):
            # The one place of transformers' loop that sees each step's pre-clip norm before optimizer.step()
            # (tests/test_resume.py turns red if a transformers release stops calling it).
            norm = super()._get_grad_norm(model, grad_norm=grad_norm)
            guard.check(self, model, norm)
            return norm

    VlmfitTrainer.__name__ = f"Vlmfit{trainer_class.__name__}"
    return VlmfitTrainer


class DivergenceGuard(TrainerCallback):
    """A non-finite gradient norm (a NaN or inf loss makes one) or one above train.divergence_grad_norm: the step's
    gradients are dropped so the optimizer leaves the weights as they were, the step, its norm and its batch rows
    go to metrics.jsonl, and with train.on_divergence: stop the run ends there, without a checkpoint of that step."""

    def __init__(self, cfg: RunConfig, run: RunDir, source_rows: list | None = None):
        self.action, self.limit, self.run, self.source_rows = cfg.train.on_divergence, cfg.train.divergence_grad_norm, run, source_rows
        self.rows: list[int] = []  # the current optimizer step's rows (all its micro-batches)
        self.events: list[dict] = []
        self.stopped: dict | None = None

    def check(self, trainer, model, norm) -> None:
        rows, self.rows = self.rows, []
        value = float(norm) if norm is not None else math.nan
        if math.isfinite(value) and (self.limit is None or value <= self.limit):
            return
        for p in model.parameters():
            p.grad = None  # torch's and bitsandbytes' optimizers skip a parameter without a gradient
        step = trainer.state.global_step + 1
        event = {"step": step, "grad_norm": value if math.isfinite(value) else str(value), "action": self.action,
                 "rows": rows, **({"source_rows": [self.source_rows[r] for r in rows]} if self.source_rows else {})}
        self.events.append(event)
        if is_main():  # the norm is the global one: every rank drops the same step
            self.run.log_metrics({"step": step, "divergence": event})
        if self.action == "stop":
            self.stopped = event
            trainer.control.should_training_stop = True

    def on_step_end(self, args, state, control, **kw):
        if self.stopped is not None and self.stopped["step"] == state.global_step:
            control.should_save = False  # the last good checkpoint is the one before

    def describe(self, event: dict) -> str:
        rows = event.get("source_rows", event["rows"])
        which = "source rows" if "source_rows" in event else "train rows"
        return f"step {event['step']}: gradient norm {event['grad_norm']} on {which} {rows}"


class Checkpoints(TrainerCallback):
    """After each checkpoint the Trainer writes: the recipe beside it and the completion marker (RunDir)."""

    def __init__(self, run: RunDir):
        self.run = run

    def on_save(self, args, state, control, **kw):
        barrier()  # launched: every rank has written its part (its RNG state, its optimizer shard) before the marker
        if args.should_save:  # rank 0
            self.run.complete_checkpoint(state.global_step, {"world_size": args.world_size, "epoch": state.epoch})


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM during training: finish the current step, write a checkpoint, stop. A second SIGINT stops
    at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.step: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def on_train_begin(self, args, state, control, **kw):
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: no handlers, the default behaviour stays
            self._previous = {}

    def on_step_end(self, args, state, control, **kw):
        if self.signum is not None:
            self.step = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kw):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def headline(result: dict, task: str | None) -> tuple[str, float]:
    """The one figure a run's evaluations are ranked by: constrained accuracy with a label set, else the task's own
    metric of the generated answers (CIDEr-D for captions, VQA accuracy, ChartQA-style relaxed accuracy ...)."""
    if "constrained" in result:
        return "constrained accuracy", result["constrained"]["accuracy"]
    metrics = result["generate"]["metrics"]
    for name in {"caption": ("cider_d",), "vqa": ("vqa_accuracy",)}.get(task or "", ()) + ("exact_match",):
        if name in metrics:
            return name, metrics[name]["value"]
    return "generate accuracy", result["generate"]["accuracy"]


class EvalDuring(TrainerCallback):
    """eval.every_steps: the task evaluation on the validation split every N optimizer steps (rank 0; the other
    ranks wait), each in metrics.jsonl ({"step", "eval": {metric: value}}), and the best step so far. A resumed
    run continues from the evaluations its metrics kept."""

    def __init__(self, every: int, run: RunDir, evaluate, task: str | None):
        self.every, self.run, self.evaluate, self.task = every, run, evaluate, task
        self.history = [r for r in run.metrics() if "eval" in r]

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every:
            return
        if is_main():
            name, value = headline(self.evaluate(model), self.task)
            record = {"step": state.global_step, "eval": {name: value}}
            self.history.append(record)
            self.run.log_metrics(record)
        barrier()

    def best(self) -> dict | None:
        if not self.history:
            return None
        top = max(self.history, key=lambda r: (next(iter(r["eval"].values())), -r["step"]))  # the earliest of ties
        (name, value), = top["eval"].items()
        return {"step": top["step"], "metric": name, "value": value, "evaluations": len(self.history)}


def callbacks(run: RunDir, guard: DivergenceGuard) -> list:
    return ([RichProgress(run)] if is_main() else []) + [Checkpoints(run), guard, StopOnSignal()]


def stopper_of(trainer) -> StopOnSignal:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StopOnSignal))


def run_training(trainer, run: RunDir, guard: DivergenceGuard, resume_from=None):
    """trainer.train(), resumable, with the ways a run can stop early turned into one clear message each."""
    if resume_from is not None:
        restore_full_weights(trainer.model, resume_from)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        run.drop_incomplete_checkpoints()
        raise Stopped(f"the disk is full ({e.strerror}) at step {trainer.state.global_step}", where=str(run.path),
                      hint=_resume_hint(run, "free some space, then")) from None
    stopper = stopper_of(trainer)
    if stopper.signum is not None:
        name = signal.Signals(stopper.signum).name
        raise Stopped(f"stopped by {name} after step {stopper.step}; checkpoint written", where=str(run.path),
                      hint=_resume_hint(run), exit_code=128 + stopper.signum)
    if guard.stopped is not None:
        raise Stopped(f"training diverged at {guard.describe(guard.stopped)}; stopped (train.on_divergence: stop)",
                      where=str(run.path), hint=_resume_hint(run, "lower train.lr or raise train.warmup_ratio in a new run, "
                                                             "set train.on_divergence: skip, or inspect those rows;"))
    return result


def restore_full_weights(model, checkpoint) -> None:
    """Full weights of a checkpoint into `model`, through from_pretrained. Needed because the Trainer's own resume
    loads model.safetensors with a raw, non-strict load_state_dict, while transformers 5 saves VLMs under the hub
    checkpoint's key names (model.embed_tokens, not model.language_model.embed_tokens): the keys miss, a warning is
    logged, and the run silently continues from the base weights (QwenLM/Qwen3-VL#1763). PEFT adapters load by
    PEFT's own mapping and need nothing here. The loaded copy matches `model` key for key (strict)."""
    from peft import PeftModel

    from vlmfit.models.load import load_model

    if isinstance(model, PeftModel):
        return
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    saved = load_model(str(checkpoint), dtype, None, "none", True)
    model.load_state_dict(saved.state_dict(), strict=True)
    del saved


def _resume_hint(run: RunDir, before: str = "") -> str:
    done = run.complete_checkpoints()
    if not done:
        return f"{before} no complete checkpoint yet: start the run again".strip()
    return f"{before} resume from {done[-1][1].name}: vlmfit train --resume {run.path}".strip()


# Packages whose versions must match for a resume to continue exactly (kernels, optimizer and checkpoint formats).
RESUME_PACKAGES = ("vlmfit", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes")


def resume_point(run: RunDir):
    """The checkpoint to resume `run` from, after checking that resuming is safe here; incomplete checkpoints
    (killed mid-write) are removed, and metrics after the checkpoint dropped (those steps run again)."""
    if run.read_json(SUMMARY) is not None:
        raise UserError("this run finished; there is nothing to resume", where=str(run.path),
                        hint="start a new run (another output.name), or evaluate / export this one")
    then = (run.read_json(ENVIRONMENT) or {}).get("packages", {})
    now = environment()["packages"]
    changed = [f"{p} {then.get(p)} -> {now.get(p)}" for p in RESUME_PACKAGES if then.get(p) != now.get(p)]
    if changed:
        raise UserError(f"the run was written with other package versions ({'; '.join(changed)}); a resume would not "
                        "continue exactly", where=str(run.path),
                        hint=f"install the run's versions (see {ENVIRONMENT}) to resume, or start a new run")
    dropped = run.drop_incomplete_checkpoints()
    done = run.complete_checkpoints()
    if not done:
        raise UserError("the run has no complete checkpoint to resume from" + (f" ({', '.join(dropped)} was incomplete)" if dropped else ""),
                        where=str(run.path), hint="it stopped before its first checkpoint (train.save_steps): start it again")
    step, path = done[-1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    saved_world = run.checkpoint_info(path).get("world_size", 1)
    if saved_world != world:
        raise UserError(f"the checkpoint was written by {saved_world} processes, this is {world}: the data order and "
                        "the optimizer shards would not continue exactly", where=str(path),
                        hint=f"resume with {saved_world} processes (vlmfit launch --nproc {saved_world})")
    run.truncate_metrics(step)
    return step, path


def require_disk_for_checkpoints(loaded, cfg: RunConfig, where) -> None:
    """Refuse before the run directory is made when its disk cannot hold a checkpoint (the Trainer writes a new one
    before it deletes the oldest): weights or adapter plus the optimizer state of every trained value."""
    from pathlib import Path

    from peft import PeftModel

    from vlmfit.models.targets import resolve_for

    model = loaded.model
    states = {"sgd": 4, "adamw": 8}.get(cfg.train.optim, 2)  # bytes of optimizer state per trained value
    full = cfg.method == "full" or (cfg.method == "dpo" and cfg.dpo.tuning == "full")
    if full:
        trained = sum(p.numel() for p in model.parameters())
        need = sum(p.numel() * p.element_size() for p in model.parameters()) + trained * states
    elif isinstance(model, PeftModel):  # DPO continuing an earlier run's adapter: what it trains is there already
        need = sum(p.numel() for p in model.parameters() if p.requires_grad) * (4 + states)
    else:
        resolved = resolve_for(model, loaded.family, cfg.lora)
        modules = dict(model.named_modules())
        trained = sum(cfg.lora.r * (modules[m].in_features + modules[m].out_features) for m in resolved.modules
                      if hasattr(modules[m], "in_features"))
        trained += sum(p.numel() for m in resolved.fully_trained for p in modules[m].parameters())
        need = trained * (4 + states)
    path = Path(where)
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < 1.2 * need:
        raise UserError(f"{_size(free)} free on the disk of {where}, and a checkpoint needs about {_size(need)}",
                        where="output.dir", hint="free space, or put output.dir on a larger disk")


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def quiet_printing(trainer) -> None:
    """With tqdm off, transformers prints every log dict; RichProgress shows them instead (and writes metrics.jsonl)."""
    trainer.remove_callback(PrinterCallback)


class RichProgress(TrainerCallback):
    """Progress bar (step, loss, ETA) and metrics.jsonl, one record per logging step."""

    def __init__(self, run: RunDir):
        self.run, self.progress, self.task, self.loss = run, None, None, math.nan

    def on_train_begin(self, args, state, control, **kw):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, loss=math.nan)

    def on_step_end(self, args, state, control, **kw):
        self.progress.update(self.task, completed=state.global_step, loss=self.loss)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        if "loss" in logs or "train_loss" in logs:
            self.loss = logs.get("loss", logs.get("train_loss"))
        self.run.log_metrics({"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs})

    def on_train_end(self, args, state, control, **kw):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step, loss=self.loss)
            self.progress.stop()


def report_targets(resolved, console: Console, run: RunDir | None) -> None:
    """The LoRA targets table, what was skipped and why, and lora_targets.json in the run."""
    console.print(resolved.table())
    for note in resolved.skipped:
        console.print(f"[yellow]skipped[/] {note}")
    if run is not None:
        run.write_json(LORA_TARGETS, resolved.as_dict())


def param_counts(model) -> dict:
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}


def final_loss(run: RunDir) -> float:
    losses = [r["loss"] for r in run.metrics() if "loss" in r]
    return losses[-1] if losses else float("nan")
