"""Supervised fine-tuning recipe: config -> model + processor -> examples -> collator -> TRL SFTTrainer -> run dir.

Read top to bottom: `train_sft` is the whole recipe; what it shares with the other recipes lives in leaf modules
(train/run.py: the lifecycle; train/trainer.py: the TRL glue; data/splits.py, models/targets.py, chat/).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from vlmfit.cache import cache_dir
from vlmfit.chat.collate import LABEL_METHODS, VisionChatCollator
from vlmfit.chat.length import apply_length_policy
from vlmfit.chat.rows import EncodedCache, RowCollator, processor_fingerprint
from vlmfit.config import RunConfig
from vlmfit.data.splits import load_splits, require_chat, validation_split
from vlmfit.evaluate.classification import evaluate_task
from vlmfit.launch.ranks import barrier, is_main, main_first, world_size
from vlmfit.models.features import FeatureCache, feature_cache_refusal
from vlmfit.models.load import Loaded, load_for
from vlmfit.models.offload import offload_activations
from vlmfit.models.packing import packing_refusal
from vlmfit.models.towers import TowerSync
from vlmfit.models.targets import enable_checkpointing, make_trainable
from vlmfit.rundir import RunDir, RunSummary
from vlmfit.train.callbacks import DivergenceGuard, EvalDuring
from vlmfit.train.run import begin, final_loss, param_counts, report_targets, save_trained
from vlmfit.train.tracking import track_locally
from vlmfit.train.trainer import (launch_arguments, note_uneven_epoch, quiet_printing, run_training, sync_towers,
                                  trainer_arguments, trainer_callbacks, vlmfit_trainer, with_row_ids)


def train_sft(cfg: RunConfig, console: Console | None = None, profile: bool = False, resume: RunDir | None = None,
              overwrite: bool = False) -> Path:
    """Run the recipe end to end and return the run directory (`profile`: where each step's time goes, printed
    and in the run directory; `resume`: continue that run from its last complete checkpoint, exactly)."""
    life = begin(cfg, console, resume)
    cfg, console = life.cfg, life.console
    with main_first():  # launched: rank 0 builds the caches and the run directory, then the other ranks read them
        life.check()  # a wrong model name, a missing tracker or a bad resume fails before any data is prepared
        splits = load_splits(cfg)
        require_chat(splits)
        validation = None
        if cfg.eval.every_steps:
            train_split, validation, origin = validation_split(splits, cfg)
            splits = replace(splits, train=train_split)
            console.print(f"evaluation every {cfg.eval.every_steps} steps on {len(validation)} validation examples ({origin})")
        loaded = load_for(cfg)
        collator = VisionChatCollator(loaded.processor, loaded.family, loss_on=cfg.train.loss_on, max_length=cfg.train.max_length)
        console.print(f"family [bold]{loaded.family.name}[/]; labels by {collator.label_method} "
                      f"({LABEL_METHODS[collator.label_method]}); loss on {cfg.train.loss_on} tokens")
        for note in loaded.notes:
            console.print(note)
        train_ds, length_report = apply_length_policy(with_row_ids(splits.train), collator, cfg, console)
        note_uneven_epoch(len(train_ds), cfg, console)
        run = life.open(overwrite, loaded)

    if cfg.eval.before and not (resume and run.evals()[0] is not None):
        if is_main():
            run.write_eval("before", evaluate_task(loaded.model, collator, splits.test, splits.labels, cfg.eval, console,
                                                      "before training", cfg.data.task))
        barrier()

    model, resolved = make_trainable(loaded.model, loaded.family, cfg.method, cfg.lora)
    if resolved is not None:
        report_targets(resolved, console, run)
    guard = DivergenceGuard(cfg, run)
    features = image_feature_cache(model, loaded.family, cfg, console)
    sync = sync_towers(model, loaded.family, loaded.processor, cfg, videos="videos" in train_ds.column_names)
    trainer = make_trainer(model, loaded, train_collator(collator, cfg, console, image_keys=features is not None), train_ds,
                           cfg, run, guard, features, sync)
    during = None
    if validation is not None:
        def evaluate_now(m):
            return evaluate_task(m, collator, validation, splits.labels, cfg.eval, Console(quiet=True), "during",
                                 cfg.data.task)

        during = EvalDuring(cfg.eval.every_steps, run, evaluate_now, cfg.data.task)
        trainer.add_callback(during)
    profiler = None
    if profile:
        from vlmfit.train.profile import StepProfiler

        profiler = StepProfiler(run)
        profiler.attach(trainer.model, loaded.family)
        trainer.add_callback(profiler)
    t0 = time.perf_counter()
    result = run_training(trainer, run, guard, life.checkpoint)
    train_seconds = time.perf_counter() - t0
    if profiler is not None and profiler.steps:
        from vlmfit.train.profile import profile_table

        console.print(profile_table(profiler.summary()))

    if not is_main():  # the other ranks' part ends with the training steps: rank 0 saves, evaluates, reports
        return run.path
    weights = save_trained(model, loaded.processor, cfg, run)
    run.drop_empty_checkpoints()
    if cfg.eval.after:
        run.write_eval("after", evaluate_task(model, collator, splits.test, splits.labels, cfg.eval, console, "after training",
                                                 cfg.data.task))
    return life.finish(RunSummary(
        method=cfg.method, steps=result.global_step, train_seconds=train_seconds, final_loss=final_loss(run),
        **param_counts(model), train_examples=len(train_ds), test_examples=len(splits.test), weights=weights,
        label_method=LABEL_METHODS[collator.label_method], lengths=length_report, resumed_from=life.resumed_from,
        divergence=guard.events or None, best=during.best() if during is not None else None,
        tracking=track_locally(cfg, run) or None,
    ), splits.test)


def make_trainer(model, loaded: Loaded, collator, train_ds, cfg: RunConfig, run: RunDir, guard: DivergenceGuard | None = None,
                 features: FeatureCache | None = None, sync: TowerSync | None = None):
    from trl import SFTConfig, SFTTrainer

    guard = guard or DivergenceGuard(cfg, run)
    enable_checkpointing(model, loaded.family, cfg.train.gradient_checkpointing)
    offload_activations(model, loaded.family, cfg.train.activation_offload)
    trainer = vlmfit_trainer(SFTTrainer, guard, lean_loss=cfg.train.lean_loss, family=loaded.family, features=features,
                             sync=sync, rates=cfg.train.lr_groups)(
        model=model,
        args=SFTConfig(**trainer_arguments(cfg, run), **launch_arguments(cfg, model, loaded.family, run)),
        train_dataset=train_ds,
        processing_class=loaded.processor,
        data_collator=collator,
        callbacks=trainer_callbacks(run, guard, cfg),
    )
    quiet_printing(trainer)
    return trainer


def image_feature_cache(model, family, cfg: RunConfig, console: Console) -> FeatureCache | None:
    """A cache of image features when the recipe allows it and the towers it reads are frozen, else None."""
    if not cfg.train.cache_image_features:
        return None
    why = feature_cache_refusal(model, family)
    if not why and world_size() > 1 and cfg.launch.sharded:
        why = f"the towers are sharded (launch.strategy {cfg.launch.strategy}): every rank runs them every step"
    if why:
        console.print(f"image features: computed every step ({why})")
        return None
    console.print(f"image features: computed once per image and reused (vision tower and projector frozen; "
                  f"up to {cfg.train.feature_cache_gib:g} GiB)")
    return FeatureCache(int(cfg.train.feature_cache_gib * 2**30))


def train_collator(chat: VisionChatCollator, cfg: RunConfig, console: Console, image_keys: bool = False):
    """What batches the training steps: per-example encodings (cached, packed) unless both are off, then the plain
    batch collator (the processor's own batch call, as plain TRL's collators make it)."""
    pack = cfg.train.packing
    if pack and (why := packing_refusal(chat.family)):
        console.print(f"[yellow]train.packing: {why}; training on padded batches instead[/]")
        pack = False
    if not pack and not cfg.train.processor_cache and not image_keys:
        return chat
    cache = EncodedCache(cache_dir("encoded"), processor_fingerprint(chat)) if cfg.train.processor_cache else None
    if pack:
        console.print("packing: each step's examples in one padding-free row, positions per example")
    return RowCollator(chat, cache, pack, cfg.train.pack_tokens, image_keys)
