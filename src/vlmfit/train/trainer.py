"""What the TRL-based recipes (sft, dpo) share: the TrainingArguments, the progress/metrics callback, the LoRA
targets report, and the run summary's common fields. Leaves only: nothing here knows a recipe."""

from __future__ import annotations

import math

import torch
from rich.console import Console
from transformers import PrinterCallback, TrainerCallback

from vlmfit.config import RunConfig
from vlmfit.models.loss import causal_lm_loss
from vlmfit.rundir import LORA_TARGETS, RunDir

OPTIMIZERS = {"adamw": "adamw_torch", "adamw-8bit": "adamw_bnb_8bit", "paged-adamw-8bit": "paged_adamw_8bit", "sgd": "sgd"}


def trainer_arguments(cfg: RunConfig, run: RunDir) -> dict:
    """The TrainingArguments every vlmfit recipe shares (SFT and DPO configs take them, plus their own)."""
    t = cfg.train
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
        save_strategy="no",
        report_to="none",
        seed=t.seed,
        disable_tqdm=True,
        dataloader_num_workers=t.dataloader_workers,
        dataloader_persistent_workers=t.dataloader_workers > 0,  # not re-forked every epoch
        dataloader_pin_memory=use_cuda,
    )


def labelled_loss(trainer_class):
    """`trainer_class` (TRL's SFTTrainer) with its loss computed by models.loss.causal_lm_loss: the LM head only at
    the labelled positions, never full logits. Trainer.compute_loss is the documented place to change the loss; the
    normalisation follows the Trainer's (its global count of labelled tokens when the model takes loss kwargs,
    else this micro-batch's mean, which the Trainer then divides by the accumulation steps)."""

    class LabelledLoss(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = causal_lm_loss(model, inputs, num_items_in_batch if self.model_accepts_loss_kwargs else None)
            return (loss, None) if return_outputs else loss

    LabelledLoss.__name__ = f"LabelledLoss{trainer_class.__name__}"
    return LabelledLoss


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
