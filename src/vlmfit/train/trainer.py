"""TRL glue for the Trainer-based recipes (sft, dpo): the TrainingArguments they share, the trainer class vlmfit
runs (lean loss, divergence guard, source rows, packed positions, reused image features), trainer.train() with its
early stops turned into one message each, and full-weight resume. The run's lifecycle is in train/run.py."""

from __future__ import annotations

import errno

import torch
from rich.console import Console
from transformers import PrinterCallback

from vlmfit.chat.collate import ROW
from vlmfit.config import RunConfig
from vlmfit.errors import UserError
from vlmfit.launch.ranks import is_main, world_size
from vlmfit.launch.strategy import here_refusal, require_supported, strategy_arguments
from vlmfit.models.families import Family
from vlmfit.models.features import IMAGE_KEYS, FeatureCache
from vlmfit.models.loss import causal_lm_loss
from vlmfit.models.targets import part_of
from vlmfit.models.packing import unpack_inputs
from vlmfit.models.towers import TowerSync
from vlmfit.rundir import LAUNCH, RunDir
from vlmfit.train.callbacks import DivergenceGuard, StopOnSignal, standard
from vlmfit.train.run import Stopped, resume_hint
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
        save_total_limit=None,  # callbacks.Checkpoints prunes, by RunDir's rule (train.save_total_limit)
        seed=t.seed,
        disable_tqdm=True,
        # transformers' LengthGroupedSampler over the "length" column (chat/length.py measures it) when asked
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        # vlmfit's collators read the columns they need; the rest (ROW: the source rows errors and the divergence
        # guard name) must reach them, where TRL would keep only its own column names.
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
    if world_size() == 1 or not cfg.launch.sharded:
        return None
    return TowerSync(processor, videos)


def with_row_ids(ds):
    """The train split with each example's source row in it (column ROW): prepared data has the row of the user's
    file already; a dataset without one (a built-in set) gets its index. add_column adds one column beside the
    table, without rewriting the images."""
    return ds if ROW in ds.column_names else ds.add_column(ROW, list(range(len(ds))))


def lr_groups(model, family: Family, rates: dict[str, float], base_lr: float) -> dict[str, list[str]]:
    """The trainable parameter names of each learning-rate group: the parts `rates` names (vision, projector,
    language) and "default" (train.lr) for the rest; every trainable parameter is in exactly one."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = part_of(name.removeprefix("base_model.model.").removeprefix("module."), family)
            groups.setdefault(part if part in rates else "default", []).append(name)
    return groups


def split_by_part(optimizer, model, family: Family, rates: dict[str, float]) -> None:
    """The Trainer's optimizer groups (decay / no decay) cut further by part, each part at its own learning rate,
    before any step (no state yet): the scheduler then scales every group's rate alike."""
    owner = {id(p): n for n, p in model.named_parameters()}
    names = {n: part for part, ns in lr_groups(model, family, rates, 0.0).items() for n in ns}
    new = []
    for group in optimizer.param_groups:
        by_part: dict[str, list] = {}
        for p in group["params"]:
            by_part.setdefault(names.get(owner.get(id(p)), "default"), []).append(p)
        for part, params in by_part.items():
            new.append({**group, "params": params, "part": part,
                        **({"lr": rates[part], "initial_lr": rates[part]} if part in rates else {})})
    optimizer.param_groups = new


def vlmfit_trainer(trainer_class, guard: "DivergenceGuard", lean_loss: bool = False, family: Family | None = None,
                   features: FeatureCache | None = None, sync: TowerSync | None = None,
                   rates: dict[str, float] | None = None):
    """`trainer_class` (TRL's SFTTrainer or DPOTrainer) as vlmfit runs it:
    - with `lean_loss`, the loss is models.loss.causal_lm_loss: the LM head only at the labelled positions, never
      full logits. Trainer.compute_loss is the documented place to change the loss; the normalisation follows the
      Trainer's (its global count of labelled tokens when the model takes loss kwargs, else this micro-batch's mean,
      which the Trainer then divides by the accumulation steps). Without it, the trainer's own loss, unchanged.
    - the batch's source rows (ROW, put there by the collators) are taken out before the model sees the batch, for
      the guard;
    - a packed batch (chat/rows.py) gets its examples' own position ids here, where the model is (`family`'s rule);
    - with `features`, images seen before get their features from that cache instead of the vision tower;
    - with `sync` (launched, towers trained or sharded), a batch without images runs the tower on a blank one
      (models/towers.py), so every rank's collective calls match;
    - with `rates` (train.lr_groups), the optimizer's groups are split by part, each at its own learning rate;
    - every optimizer step's gradient norm (before clipping: the value the Trainer logs) goes through the guard,
      which can drop the step's gradients (the optimizer then skips every parameter) or stop the run."""

    class VlmfitTrainer(trainer_class):
        def create_optimizer(self, model=None):
            fresh = self.optimizer is None
            optimizer = super().create_optimizer(model)
            if rates and fresh and family is not None:  # train.lr_groups: a learning rate per part
                split_by_part(optimizer, self.model if model is None else model, family, rates)
            return optimizer

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


def trainer_callbacks(run: RunDir, guard: DivergenceGuard, cfg: RunConfig) -> list:
    return standard(run, guard, cfg.train.save_total_limit)


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
                      hint=resume_hint(run, "free some space, then")) from None
    stopper = stopper_of(trainer)
    if stopper.signum is not None:
        raise stopper.catcher.stopped(run, f"step {stopper.step}")
    if guard.stopped is not None:
        raise Stopped(f"training diverged at {guard.describe(guard.stopped)}; stopped (train.on_divergence: stop)",
                      where=str(run.path), hint=resume_hint(run, "lower train.lr or raise train.warmup_ratio in a new run, "
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


def quiet_printing(trainer) -> None:
    """With tqdm off, transformers prints every log dict; RichProgress shows them instead (and writes metrics.jsonl)."""
    trainer.remove_callback(PrinterCallback)
