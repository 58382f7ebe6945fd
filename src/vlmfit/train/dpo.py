"""Preference optimisation recipe (method: dpo): config -> preference pairs -> model (or an earlier run's weights)
-> policy (LoRA or full) against a reference -> TRL DPOTrainer -> run dir with preference and task metrics.

Read top to bottom: `train_dpo` is the whole recipe; the helpers below it are leaves.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from vlmfit.chat.collate import LABEL_METHODS, PreferenceCollator, VisionChatCollator
from vlmfit.chat.length import apply_length_policy
from vlmfit.chat.schema import message_text
from vlmfit.config import RunConfig
from vlmfit.data.preference import EVASIVE, pairs_from_labelled
from vlmfit.data.splits import load_splits
from vlmfit.errors import UserError
from vlmfit.evaluate.classification import evaluate_task
from vlmfit.evaluate.preference import evaluate_preference
from vlmfit.launch.ranks import barrier, is_main, main_first
from vlmfit.models.load import Loaded
from vlmfit.models.offload import offload_activations
from vlmfit.models.targets import count_lora_params, drop_input_grad_hooks, enable_checkpointing, peft_config, resolve_for
from vlmfit.rundir import RunDir, RunSummary
from vlmfit.train.callbacks import DivergenceGuard
from vlmfit.train.run import begin, final_loss, param_counts, report_targets, save_trained
from vlmfit.train.start import load_start, start_run
from vlmfit.train.tracking import track_locally
from vlmfit.train.trainer import (launch_arguments, note_uneven_epoch, quiet_printing, run_training, trainer_arguments,
                                  trainer_callbacks, vlmfit_trainer, with_row_ids)


def train_dpo(cfg: RunConfig, console: Console | None = None, resume: RunDir | None = None, overwrite: bool = False) -> Path:
    """Run the recipe end to end and return the run directory (`resume`: continue that run from its last complete
    checkpoint, exactly). What the recipe refuses (loss_on: all, full tuning of a quantized base) config.py refuses."""
    life = begin(cfg, console, resume)
    cfg, console = life.cfg, life.console
    with main_first():  # launched: rank 0 builds the caches and the run directory, then the other ranks read them
        life.check()  # a wrong model name, a missing tracker or a bad resume fails before any data is prepared
        if cfg.dpo.init_from:
            start_run(cfg.dpo.init_from, "dpo.init_from")  # not a run directory: fails before any data is prepared
        data = load_pairs(cfg)
        loaded, start = load_start(cfg, console, cfg.dpo.init_from, cfg.dpo.tuning, "dpo.init_from")
        chat = VisionChatCollator(loaded.processor, loaded.family, max_length=cfg.train.max_length)
        collator = PreferenceCollator(chat)
        console.print(f"family [bold]{loaded.family.name}[/]; {len(data.train)} training pairs ({data.kinds}); replies "
                      f"found by {chat.label_method} ({LABEL_METHODS[chat.label_method]})")
        train_pairs, length_report = apply_length_policy(with_row_ids(data.train), collator, cfg, console)
        note_uneven_epoch(len(train_pairs), cfg, console)
        run = life.open(overwrite, loaded)

    guard = DivergenceGuard(cfg, run)
    trainer, reference = make_trainer(loaded, collator, train_pairs, cfg, run, console, start, guard)
    model, ref_model = trainer.model, trainer.ref_model
    console.print(f"reference: {reference}")
    # Evaluation scores whole sequences (no max_length): it needs no gradients and nothing is cut.
    scorer = PreferenceCollator(VisionChatCollator(loaded.processor, loaded.family))
    if cfg.eval.before and not (resume and run.evals()[0] is not None):
        if is_main():
            run.write_eval("before", evaluate(model, ref_model, scorer, data, cfg, console, "before training"))
        barrier()

    t0 = time.perf_counter()
    result = run_training(trainer, run, guard, life.checkpoint)
    train_seconds = time.perf_counter() - t0
    params = param_counts(model)
    if not is_main():  # the other ranks' part ends with the training steps: rank 0 saves, evaluates, reports
        return run.path

    # the trained adapter only: TRL's frozen 'ref' copy (when continuing an adapter) is not part of the result
    weights = save_trained(model, loaded.processor, cfg, run, adapters=["default"])
    run.drop_empty_checkpoints()
    if cfg.eval.after:
        run.write_eval("after", evaluate(model, ref_model, scorer, data, cfg, console, "after training"))
    if start == "model" and cfg.dpo.tuning == "lora" and cfg.output.save_model:
        # The adapter sits on the earlier run's weights, not on model.name: write the merged policy too, so the run
        # directory alone reproduces it (`vlmfit eval RUN` loads model/ first). Last, because merging is in place.
        run.save_model(model.merge_and_unload(), loaded.processor)
        weights = "adapter/ (on the weights of dpo.init_from) and model/ (merged)"
    return life.finish(RunSummary(
        method="dpo", steps=result.global_step, train_seconds=train_seconds, final_loss=final_loss(run), **params,
        train_examples=len(train_pairs), test_examples=len(data.test), weights=weights,
        label_method=LABEL_METHODS[chat.label_method], lengths=length_report, resumed_from=life.resumed_from,
        divergence=guard.events or None,
        dpo={"tuning": cfg.dpo.tuning, "beta": cfg.dpo.beta, "loss_type": cfg.dpo.loss_type, "reference": reference,
             "start": str(cfg.dpo.init_from or cfg.model.name), "pairs": data.kinds, "has_task": data.task_test is not None},
        tracking=track_locally(cfg, run) or None,
    ), data.task_test)


@dataclass
class Pairs:
    train: object  # datasets.Dataset with prompt / chosen / rejected / images
    test: object  # held-out pairs for the preference metrics
    task_test: object | None  # the labelled test examples the pairs came from (for the task metric), if any
    labels: list[str] | None
    kinds: str  # what the pairs are, for logs and the report
    groups: list[str] | None  # per test pair, the kind of rejected answer (a breakdown of the metrics)


def load_pairs(cfg: RunConfig) -> Pairs:
    """Preference pairs from data.source as given, or built from a labelled dataset (dpo.pairs_from_labels)."""
    splits = load_splits(cfg)
    train, test = splits.train, splits.test
    kind = cfg.dpo.pairs_from_labels
    if kind is None:
        if not splits.is_preference:
            raise UserError("DPO trains on preference pairs (prompt / chosen / rejected), but data.source has chat examples",
                            where="data.task", hint="use a preference source (data.task: preference), or build pairs from "
                            "labels with dpo.pairs_from_labels: mixed")
        return Pairs(train, test, None, None, "preference pairs as given", None)
    if "messages" not in train.column_names:
        raise UserError("dpo.pairs_from_labels builds pairs from labelled chat examples, but data.source is already "
                        "preference data", where="dpo.pairs_from_labels", hint="remove dpo.pairs_from_labels to train on the pairs as given")
    labels = splits.labels
    if labels is None and kind != "evasive":
        raise UserError(f"pairs_from_labels: {kind} picks wrong labels from the class list, and this dataset has none",
                        where="dpo.pairs_from_labels", hint="use a classification dataset, or pairs_from_labels: evasive")
    seed = cfg.data.split_seed
    test_pairs = pairs_from_labelled(test, labels or [], kind, seed)
    groups = ["evasive" if message_text(r[-1]) == EVASIVE else "wrong label" for r in test_pairs["rejected"]]
    described = {"mixed": "half wrong labels, half evasive", "wrong_label": "wrong labels", "evasive": "evasive"}[kind]
    return Pairs(pairs_from_labelled(train, labels or [], kind, seed), test_pairs, test, labels,
                 f"chosen = the label, rejected = {described}", groups)


def make_trainer(loaded: Loaded, collator: PreferenceCollator, train_pairs, cfg: RunConfig, run: RunDir, console: Console,
                 start: str = "base", guard: DivergenceGuard | None = None):
    """TRL's DPOTrainer on our pair collator, and a description of the reference the rewards are measured against."""
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    model, lora, ref_model, resolved = loaded.model, None, None, None
    if cfg.dpo.tuning == "lora" and isinstance(model, PeftModel):
        # Given a PEFT model, TRL keeps a frozen copy of its adapter as the reference ('ref'): adapter-sized, and the
        # starting point (the SFT policy) is what DPO's reference should be.
        reference = "a frozen copy of the starting adapter (TRL's 'ref' adapter; base weights shared)"
    elif cfg.dpo.tuning == "lora":
        # Given the base model and a peft_config, TRL adds the adapter and scores the reference with it disabled.
        resolved = resolve_for(model, loaded.family, cfg.lora)
        lora = peft_config(cfg.lora, resolved)
        weights = "the base model" if start == "base" else "the starting model (dpo.init_from)"
        reference = f"{weights}: the same weights with the adapter disabled (no copy)"
    else:
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()  # the earlier run's adapter becomes part of the weights DPO starts from
        model.requires_grad_(True)
        # Full fine-tuning moves every weight, so the reference has to be a second, frozen copy of the model.
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        reference = "a frozen copy of the starting model (full fine-tuning needs one)"

    enable_checkpointing(model, loaded.family, cfg.train.gradient_checkpointing)
    offload_activations(model, loaded.family, cfg.train.activation_offload)
    args = DPOConfig(
        **trainer_arguments(cfg, run),
        **launch_arguments(cfg, model, loaded.family, run),
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type],
        label_smoothing=cfg.dpo.label_smoothing,
        # Dropout off (TRL's default, lora.dropout included): with it, policy and reference would disagree on
        # identical weights and the rewards would be noise.
        disable_dropout=True,
    )
    guard = guard or DivergenceGuard(cfg, run)
    trainer = vlmfit_trainer(DPOTrainer, guard, family=loaded.family, rates=cfg.train.lr_groups)(
        model=model, ref_model=ref_model, args=args, train_dataset=train_pairs, data_collator=collator,
        processing_class=loaded.processor, peft_config=lora, callbacks=trainer_callbacks(run, guard, cfg))
    quiet_printing(trainer)
    if cfg.train.gradient_checkpointing:
        drop_input_grad_hooks(trainer.model)  # PEFT re-hooks the inputs when TRL wraps the checkpointed model
    if resolved is not None:
        count_lora_params(trainer.model, resolved, loaded.family)
        report_targets(resolved, console, run)
    return trainer, reference


def evaluate(model, ref_model, scorer: PreferenceCollator, data: Pairs, cfg: RunConfig, console: Console, when: str) -> dict:
    """Preference metrics on the held-out pairs and, when the pairs came from labels, the task's own metric."""
    with console.status(f"scoring {len(data.test)} held-out pairs {when}"):
        pref = evaluate_preference(model, scorer, data.test, cfg.dpo.beta, ref_model, max(1, cfg.eval.batch_size // 2), data.groups)
    console.print(f"held-out pairs {when}: reward accuracy {100 * pref['reward_accuracy']:.1f}% (margin "
                  f"{pref['reward_margin']:.3f}); the policy alone prefers the chosen reply in {100 * pref['policy_accuracy']:.1f}%")
    task = (evaluate_task(model, scorer.chat, data.task_test, data.labels, cfg.eval, console, when)
            if data.task_test is not None else None)
    return {"preference": pref, "task": task}
