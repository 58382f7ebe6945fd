"""Supervised fine-tuning recipe: config -> model + processor -> examples -> collator -> TRL SFTTrainer -> run dir.

Read top to bottom: `train_sft` is the whole recipe; the helpers below it are leaves.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PrinterCallback, TrainerCallback, set_seed

from vlmfit.config import RunConfig
from vlmfit.data.prepare import load_dataset_source
from vlmfit.errors import UserError
from vlmfit.evaluate.classification import evaluate_classification
from vlmfit.models.load import Loaded, load
from vlmfit.report import RunDir, plot_loss, write_report
from vlmfit.train.collate import VisionChatCollator


def train_sft(cfg: RunConfig, console: Console | None = None) -> Path:
    """Run the recipe end to end and return the run directory."""
    console = console or Console()
    set_seed(cfg.train.seed)
    train_ds, test_ds, labels = load_splits(cfg)
    loaded = load(cfg.model.name, cfg.model.dtype, cfg.model.revision, cfg.model, "4bit" if cfg.method == "qlora" else "none")
    collator = VisionChatCollator(loaded.processor, loaded.family, loss_on=cfg.train.loss_on, max_length=cfg.train.max_length)
    console.print(f"family [bold]{loaded.family.name}[/]; labels by {collator.label_method} "
                  f"({LABEL_METHODS[collator.label_method]}); loss on {cfg.train.loss_on} tokens")
    train_ds, length_report = apply_length_policy(train_ds, collator, cfg, console)
    run = RunDir.create(cfg)  # only once every check above has passed
    console.print(f"[bold]run directory[/] {run.path}")

    eval_before = None
    if cfg.eval.before:
        eval_before = run_eval(loaded.model, collator, test_ds, labels, cfg, console, "before training")
        run.write_json("eval_before.json", eval_before)

    model = apply_method(loaded, cfg, console, run)
    trainer = make_trainer(model, loaded, collator, train_ds, cfg, run)
    t0 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t0

    weights = save_weights(model, loaded, cfg, run)
    drop_empty_checkpoints(run)
    eval_after = None
    if cfg.eval.after:
        eval_after = run_eval(model, collator, test_ds, labels, cfg, console, "after training")
        run.write_json("eval_after.json", eval_after)

    losses = [r["loss"] for r in run.metrics() if "loss" in r]
    summary = {
        "steps": result.global_step,
        "train_seconds": train_seconds,
        "final_loss": losses[-1] if losses else float("nan"),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_examples": len(train_ds),
        "test_examples": len(test_ds),
        "weights": weights,
        "label_method": collator.label_method,
        "max_length": length_report,
    }
    run.write_json("summary.json", summary)
    plot_loss(run)
    write_report(run, cfg, summary, eval_before, eval_after)
    return run.path


def load_splits(cfg: RunConfig):
    """Train and test splits (limited as configured) and the class labels of the task."""
    data = load_dataset_source(cfg.data, Path(cfg.output.dir) / ".prepared")
    for split in ("train", "test"):
        if split not in data or len(data[split]) == 0:
            raise UserError(f"dataset has no (or an empty) '{split}' split (has: {', '.join(f'{k} {len(v)}' for k, v in data.items())})",
                            where="data.source", hint="more rows, or a larger data.test_fraction")
    if "messages" not in data["train"].column_names:
        raise UserError("this is preference data (prompt/chosen/rejected); supervised fine-tuning needs chat examples",
                        where="data.task", hint="use task classification / vqa / caption / chat for method full or lora")
    train_ds, test_ds = data["train"], data["test"]
    if cfg.data.shots_per_class:
        train_ds = few_shot(train_ds, cfg.data.shots_per_class, cfg.data.split_seed)
    if cfg.data.train_limit:
        train_ds = train_ds.select(range(min(cfg.data.train_limit, len(train_ds))))
    if cfg.data.eval_limit:
        test_ds = test_ds.select(range(min(cfg.data.eval_limit, len(test_ds))))
    label_feature = train_ds.features.get("label")
    labels = list(label_feature.names) if hasattr(label_feature, "names") else None
    return train_ds, test_ds, labels


def drop_empty_checkpoints(run: RunDir) -> None:
    """The Trainer makes its output_dir even with save_strategy "no": don't leave an empty folder in the run."""
    ckpt = run.path / "checkpoints"
    if ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()


def few_shot(train_ds, k: int, seed: int = 0):
    """k examples of each class, drawn with `seed` (in training order)."""
    if "label" not in train_ds.column_names:
        raise UserError("data.shots_per_class needs a classification dataset (a 'label' column)", where="data.shots_per_class")
    import numpy as np

    labels = list(train_ds["label"])
    seen: dict[int, int] = {}
    keep = []
    for i in np.random.default_rng(seed).permutation(len(labels)).tolist():
        lab = labels[i]
        if seen.get(lab, 0) < k:
            seen[lab] = seen.get(lab, 0) + 1
            keep.append(i)
    short = {lab: n for lab, n in seen.items() if n < k}
    if short:
        raise UserError(f"{len(short)} classes have fewer than {k} training examples (e.g. class {next(iter(short))}: "
                        f"{next(iter(short.values()))})", where="data.shots_per_class", hint="lower data.shots_per_class")
    return train_ds.select(sorted(keep))


LABEL_METHODS = {
    "markers": "the family's assistant turn markers",
    "prefix": "template-agnostic: rendering the conversation prefix by prefix",
    "suffix": "the processor's prompt/suffix split",
}


def apply_length_policy(train_ds, collator: VisionChatCollator, cfg: RunConfig, console: Console):
    """With train.max_length set, measure every example first: drop the overlong ones (counted, with reasons), or
    check that truncating them cuts only text and keeps part of the answer. Fails before training, not during."""
    limit = cfg.train.max_length
    if limit is None:
        return train_ds, {"limit": None}
    with console.status(f"measuring {len(train_ds)} examples against max_length={limit}"):
        stats = collator.measure([train_ds[i] for i in range(len(train_ds))], cfg.train.batch_size)
    over = [i for i, s in enumerate(stats) if s["length"] > limit]
    report = {"limit": limit, "policy": cfg.train.overlong, "overlong": len(over), "longest": max(s["length"] for s in stats)}
    if not over:
        return train_ds, report
    if cfg.train.overlong == "drop":
        keep = sorted(set(range(len(train_ds))) - set(over))
        report["dropped"] = len(over)
        report["dropped_rows"] = [{"row": i, "reason": f"{stats[i]['length']} tokens > max_length {limit}"} for i in over[:100]]
        console.print(f"[yellow]dropped {len(over)} of {len(train_ds)} examples longer than max_length={limit}[/]")
        if not keep:
            raise UserError(f"every training example is longer than max_length={limit}", where="train.max_length")
        return train_ds.select(sorted(keep)), report
    bad = [i for i in over if stats[i]["media_end"] > limit]
    if bad:
        raise UserError(
            f"{len(bad)} training examples would be truncated through an image at max_length={limit} "
            f"(rows {', '.join(map(str, bad[:10]))}{', ...' if len(bad) > 10 else ''}; longest {report['longest']} tokens)",
            where="train.max_length",
            hint="raise train.max_length (or set it to null), lower the image resolution, or set train.overlong: drop",
        )
    lost = [i for i in over if stats[i]["first_trained"] >= limit]
    if lost:
        raise UserError(
            f"{len(lost)} training examples would lose their whole answer when truncated at max_length={limit} "
            f"(rows {', '.join(map(str, lost[:10]))})",
            where="train.max_length",
            hint="raise train.max_length or set train.overlong: drop",
        )
    report["truncated"] = len(over)
    console.print(f"[yellow]{len(over)} examples will be truncated to {limit} tokens (inside text only)[/]")
    return train_ds, report


def run_eval(model, collator, test_ds, labels, cfg: RunConfig, console: Console, when: str) -> dict:
    # Without a label set (vqa, captions, chat) there is nothing to constrain to: score free generation only.
    modes = [m for m in cfg.eval.modes if labels is not None or m == "generate"]
    with console.status(f"evaluating {len(test_ds)} test examples {when} ({', '.join(modes)})"):
        res = evaluate_classification(model, collator, test_ds, labels or [], modes, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    accs = "  ".join(f"{m}: {100 * res[m]['accuracy']:.1f}%" for m in modes if m in res)
    console.print(f"accuracy {when}: {accs}")
    return res


def apply_method(loaded: Loaded, cfg: RunConfig, console: Console, run: RunDir | None = None) -> torch.nn.Module:
    """full: every parameter trains. lora: PEFT adapters on the resolved targets, base frozen. qlora: the same on
    a 4-bit NF4 base (norms upcast and input grads enabled by PEFT's k-bit preparation)."""
    model = loaded.model
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # vlmfit turns checkpointing on per tower itself (enable_checkpointing), so PEFT must not do it globally.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    from vlmfit.models.targets import count_lora_params, resolve_lora_targets

    resolved = resolve_lora_targets(model, loaded.family, list(cfg.lora.scope), cfg.lora.targets, list(cfg.lora.train_fully))
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=resolved.modules or None, modules_to_save=resolved.fully_trained or None,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    count_lora_params(model, resolved, loaded.family)
    console.print(targets_table(resolved))
    for note in resolved.skipped:
        console.print(f"[yellow]skipped[/] {note}")
    if run is not None:
        run.write_json("lora_targets.json", resolved.as_dict())
    return model


def targets_table(resolved):
    from rich.table import Table

    table = Table(title="LoRA targets")
    for col in ("module group", "LoRA modules", "fully trained modules", "trainable params"):
        table.add_column(col, justify="left" if col == "module group" else "right")
    for part, g in resolved.groups.items():
        table.add_row(part, str(g["lora_modules"]), str(g["full_modules"]), f"{g['params']:,}")
    return table


def make_trainer(model, loaded: Loaded, collator, train_ds, cfg: RunConfig, run: RunDir):
    from trl import SFTConfig, SFTTrainer

    enable_checkpointing(model, loaded.family, cfg.train.gradient_checkpointing)
    args = SFTConfig(**trainer_arguments(cfg, run))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        processing_class=loaded.processor,
        data_collator=collator,
        callbacks=[RichProgress(run)],
    )
    # With tqdm off, transformers prints every log dict; RichProgress shows them instead (and writes metrics.jsonl).
    trainer.remove_callback(PrinterCallback)
    return trainer


def trainer_arguments(cfg: RunConfig, run: RunDir) -> dict:
    """The TrainingArguments every vlmfit recipe shares (SFT and DPO configs take them, plus their own)."""
    t = cfg.train
    use_cuda = torch.cuda.is_available()
    bf16 = t.precision == "bf16" or (t.precision == "auto" and use_cuda and torch.cuda.is_bf16_supported())
    return dict(
        output_dir=str(run.path / "checkpoints"),
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
        dataloader_num_workers=0,
        dataloader_pin_memory=use_cuda,
    )


OPTIMIZERS = {"adamw": "adamw_torch", "adamw-8bit": "adamw_bnb_8bit", "paged-adamw-8bit": "paged_adamw_8bit", "sgd": "sgd"}


def enable_checkpointing(model, family, parts: list[str]) -> None:
    """Activation checkpointing for the language model and/or the vision tower, separately.

    transformers switches it on for every layer that supports it; the layers of the parts not asked for are then
    switched back off through their public `gradient_checkpointing` flag."""
    if not parts:
        return
    from vlmfit.models.targets import part_of

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # a frozen embedding would otherwise cut the graph at the first layer
    for name, mod in model.named_modules():
        if getattr(mod, "gradient_checkpointing", None) is True:
            base = name.removeprefix("base_model.model.")
            if part_of(base, family) not in parts:
                mod.gradient_checkpointing = False


class RichProgress(TrainerCallback):
    """Progress bar (step, loss, ETA) and metrics.jsonl, one record per logging step."""

    def __init__(self, run: RunDir):
        self.run, self.progress, self.task, self.loss = run, None, None, math.nan

    def on_train_begin(self, args, state, control, **kw):
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


def save_weights(model, loaded: Loaded, cfg: RunConfig, run: RunDir) -> str:
    loaded.processor.save_pretrained(run.path / "processor")
    if not cfg.output.save_model:
        return "not saved (output.save_model: false)"
    if cfg.method in ("lora", "qlora"):
        model.save_pretrained(run.path / "adapter")  # PEFT format, safetensors
        return "adapter/"
    model.save_pretrained(run.path / "model")
    loaded.processor.save_pretrained(run.path / "model")  # a full model dir loads with from_pretrained as is
    return "model/"
