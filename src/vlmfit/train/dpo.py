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
from transformers import PrinterCallback, set_seed

from vlmfit.config import RunConfig, load_config
from vlmfit.data.preference import EVASIVE, pairs_from_labelled
from vlmfit.data.prepare import load_dataset_source
from vlmfit.data.schema import message_text
from vlmfit.errors import UserError
from vlmfit.evaluate.preference import evaluate_preference
from vlmfit.models.load import Loaded, load
from vlmfit.report import RunDir, plot_loss, write_report
from vlmfit.train.collate import PreferenceCollator, VisionChatCollator
from vlmfit.train.sft import (LABEL_METHODS, RichProgress, apply_length_policy, drop_empty_checkpoints,
                              enable_checkpointing, run_eval, targets_table, trainer_arguments)


def train_dpo(cfg: RunConfig, console: Console | None = None) -> Path:
    """Run the recipe end to end and return the run directory."""
    console = console or Console()
    if cfg.train.loss_on != "assistant":
        raise UserError("DPO compares the final replies of each pair; train.loss_on: all does not apply",
                        where="train.loss_on", hint="remove train.loss_on (or set it to assistant) for method dpo")
    if cfg.model.quantization != "none" and cfg.dpo.tuning == "full":
        raise UserError(f"a {cfg.model.quantization} quantized model cannot be trained in full", where="dpo.tuning",
                        hint="dpo.tuning: lora trains adapters on the quantized base (QLoRA), or set model.quantization: none")
    set_seed(cfg.train.seed)
    data = load_pairs(cfg)
    loaded, start = load_start(cfg, console)
    chat = VisionChatCollator(loaded.processor, loaded.family, max_length=cfg.train.max_length)
    collator = PreferenceCollator(chat)
    console.print(f"family [bold]{loaded.family.name}[/]; {len(data.train)} training pairs ({data.kinds}); replies "
                  f"found by {chat.label_method} ({LABEL_METHODS[chat.label_method]})")
    train_pairs, length_report = apply_length_policy(data.train, collator, cfg, console)
    run = RunDir.create(cfg)  # only once every check above has passed
    console.print(f"[bold]run directory[/] {run.path}")

    trainer, reference = make_trainer(loaded, collator, train_pairs, cfg, run, console, start)
    model, ref_model = trainer.model, trainer.ref_model
    console.print(f"reference: {reference}")
    # Evaluation scores whole sequences (no max_length): it needs no gradients and nothing is cut.
    scorer = PreferenceCollator(VisionChatCollator(loaded.processor, loaded.family))
    eval_before = None
    if cfg.eval.before:
        eval_before = evaluate(model, ref_model, scorer, data, cfg, console, "before training")
        run.write_json("eval_before.json", eval_before)

    t0 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t0
    params = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total_params": sum(p.numel() for p in model.parameters())}

    weights = save_policy(model, loaded, cfg, run)
    drop_empty_checkpoints(run)
    eval_after = None
    if cfg.eval.after:
        eval_after = evaluate(model, ref_model, scorer, data, cfg, console, "after training")
        run.write_json("eval_after.json", eval_after)
    if start == "model" and cfg.dpo.tuning == "lora" and cfg.output.save_model:
        # The adapter sits on the earlier run's weights, not on model.name: write the merged policy too, so the run
        # directory alone reproduces it (`vlmfit eval RUN` loads model/ first). Last, because merging is in place.
        model.merge_and_unload().save_pretrained(run.path / "model")
        loaded.processor.save_pretrained(run.path / "model")
        weights = "adapter/ (on the weights of dpo.init_from) and model/ (merged)"

    losses = [r["loss"] for r in run.metrics() if "loss" in r]
    summary = {
        "steps": result.global_step,
        "train_seconds": train_seconds,
        "final_loss": losses[-1] if losses else float("nan"),
        **params,
        "train_examples": len(train_pairs),
        "test_examples": len(data.test),
        "weights": weights,
        "label_method": chat.label_method,
        "max_length": length_report,
        "dpo": {"tuning": cfg.dpo.tuning, "beta": cfg.dpo.beta, "loss_type": cfg.dpo.loss_type, "reference": reference,
                "start": str(cfg.dpo.init_from or cfg.model.name), "pairs": data.kinds},
    }
    run.write_json("summary.json", summary)
    plot_loss(run)
    report = write_report(run, cfg, summary, eval_before and eval_before["task"], eval_after and eval_after["task"])
    with open(report, "a") as f:
        f.write(preference_section(summary, eval_before, eval_after, data.task_test is not None))
    return run.path


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
    data = load_dataset_source(cfg.data, Path(cfg.output.dir) / ".prepared")
    for split in ("train", "test"):
        if split not in data or len(data[split]) == 0:
            raise UserError(f"dataset has no (or an empty) '{split}' split (has: {', '.join(f'{k} {len(v)}' for k, v in data.items())})",
                            where="data.source", hint="more rows, or a larger data.test_fraction")
    train, test = data["train"], data["test"]
    if cfg.data.train_limit:
        train = train.select(range(min(cfg.data.train_limit, len(train))))
    if cfg.data.eval_limit:
        test = test.select(range(min(cfg.data.eval_limit, len(test))))
    kind = cfg.dpo.pairs_from_labels
    if kind is None:
        if not {"prompt", "chosen", "rejected"} <= set(train.column_names):
            raise UserError("DPO trains on preference pairs (prompt / chosen / rejected), but data.source has chat examples",
                            where="data.task", hint="use a preference source (data.task: preference), or build pairs from "
                            "labels with dpo.pairs_from_labels: mixed")
        return Pairs(train, test, None, None, "preference pairs as given", None)
    if "messages" not in train.column_names:
        raise UserError("dpo.pairs_from_labels builds pairs from labelled chat examples, but data.source is already "
                        "preference data", where="dpo.pairs_from_labels", hint="remove dpo.pairs_from_labels to train on the pairs as given")
    feature = train.features.get("label")
    labels = list(feature.names) if hasattr(feature, "names") else None
    if labels is None and kind != "evasive":
        raise UserError(f"pairs_from_labels: {kind} picks wrong labels from the class list, and this dataset has none",
                        where="dpo.pairs_from_labels", hint="use a classification dataset, or pairs_from_labels: evasive")
    seed = cfg.data.split_seed
    test_pairs = pairs_from_labelled(test, labels or [], kind, seed)
    groups = ["evasive" if message_text(r[-1]) == EVASIVE else "wrong label" for r in test_pairs["rejected"]]
    described = {"mixed": "half wrong labels, half evasive", "wrong_label": "wrong labels", "evasive": "evasive"}[kind]
    return Pairs(pairs_from_labelled(train, labels or [], kind, seed), test_pairs, test, labels,
                 f"chosen = the label, rejected = {described}", groups)


def load_start(cfg: RunConfig, console: Console) -> tuple[Loaded, str]:
    """The model DPO starts from: model.name ("base"), or an earlier run's weights (SFT then DPO): its LoRA adapter,
    trained further ("adapter"), or its full weights ("model")."""
    src = cfg.dpo.init_from
    if src is None:
        return load_base(cfg.model.name, cfg), "base"
    where = f"dpo.init_from ({src})"
    if not (src / "config.yaml").is_file():
        raise UserError("not a run directory (no config.yaml)", where=where,
                        hint="give a directory written by `vlmfit train`, e.g. the SFT run of recipes/demo.yaml")
    prev = load_config(src / "config.yaml")
    if prev.model.name != cfg.model.name:
        raise UserError(f"that run was trained from '{prev.model.name}', but this recipe's model.name is '{cfg.model.name}'",
                        where=where, hint=f"set model.name: {prev.model.name}")
    if (src / "model").is_dir():
        console.print(f"starting from the full weights in {src / 'model'}")
        return load_base(str(src / "model"), cfg), "model"
    if (src / "adapter").is_dir():
        from peft import PeftModel

        loaded = load_base(cfg.model.name, cfg)
        loaded.model = PeftModel.from_pretrained(loaded.model, str(src / "adapter"), is_trainable=True)
        if cfg.dpo.tuning == "lora":
            console.print(f"continuing the adapter in {src / 'adapter'} (its own LoRA settings: the lora section is not used)")
        return loaded, "adapter"
    raise UserError("the run directory has no saved weights (model/ or adapter/)", where=where,
                    hint="was it trained with output.save_model: false? train it again with weights saved")


def load_base(name: str, cfg: RunConfig) -> Loaded:
    """The weights to start from, with the model section's resolution caps and quantization (QLoRA: 4bit + lora)."""
    loaded = load(name, cfg.model.dtype, cfg.model.revision if name == cfg.model.name else None, cfg.model)
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # Norms upcast and input grads on, as for SFT; checkpointing stays per tower (enable_checkpointing).
        loaded.model = prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False)
    return loaded


def make_trainer(loaded: Loaded, collator: PreferenceCollator, train_pairs, cfg: RunConfig, run: RunDir, console: Console,
                 start: str = "base"):
    """TRL's DPOTrainer on our pair collator, and a description of the reference the rewards are measured against."""
    from peft import LoraConfig, PeftModel
    from trl import DPOConfig, DPOTrainer

    from vlmfit.models.targets import count_lora_params, resolve_lora_targets

    model, peft_config, ref_model, resolved = loaded.model, None, None, None
    if cfg.dpo.tuning == "lora" and isinstance(model, PeftModel):
        # Given a PEFT model, TRL keeps a frozen copy of its adapter as the reference ('ref'): adapter-sized, and the
        # starting point (the SFT policy) is what DPO's reference should be.
        reference = "a frozen copy of the starting adapter (TRL's 'ref' adapter; base weights shared)"
    elif cfg.dpo.tuning == "lora":
        # Given the base model and a peft_config, TRL adds the adapter and scores the reference with it disabled.
        resolved = resolve_lora_targets(model, loaded.family, list(cfg.lora.scope), cfg.lora.targets, list(cfg.lora.train_fully))
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=resolved.modules or None, modules_to_save=resolved.fully_trained or None,
                                 task_type="CAUSAL_LM")
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
    args = DPOConfig(
        **trainer_arguments(cfg, run),
        beta=cfg.dpo.beta,
        loss_type=[cfg.dpo.loss_type],
        label_smoothing=cfg.dpo.label_smoothing,
        # Dropout off (TRL's default, lora.dropout included): with it, policy and reference would disagree on
        # identical weights and the rewards would be noise.
        disable_dropout=True,
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_pairs, data_collator=collator,
                         processing_class=loaded.processor, peft_config=peft_config, callbacks=[RichProgress(run)])
    # With tqdm off, transformers prints every log dict; RichProgress shows them instead (and writes metrics.jsonl).
    trainer.remove_callback(PrinterCallback)
    if resolved is not None:
        count_lora_params(trainer.model, resolved, loaded.family)
        console.print(targets_table(resolved))
        for note in resolved.skipped:
            console.print(f"[yellow]skipped[/] {note}")
        run.write_json("lora_targets.json", resolved.as_dict())
    return trainer, reference


def evaluate(model, ref_model, scorer: PreferenceCollator, data: Pairs, cfg: RunConfig, console: Console, when: str) -> dict:
    """Preference metrics on the held-out pairs and, when the pairs came from labels, the task's own metric."""
    with console.status(f"scoring {len(data.test)} held-out pairs {when}"):
        pref = evaluate_preference(model, scorer, data.test, cfg.dpo.beta, ref_model, max(1, cfg.eval.batch_size // 2), data.groups)
    console.print(f"held-out pairs {when}: reward accuracy {100 * pref['reward_accuracy']:.1f}% (margin "
                  f"{pref['reward_margin']:.3f}); the policy alone prefers the chosen reply in {100 * pref['policy_accuracy']:.1f}%")
    task = run_eval(model, scorer.chat, data.task_test, data.labels, cfg, console, when) if data.task_test is not None else None
    return {"preference": pref, "task": task}


def save_policy(model, loaded: Loaded, cfg: RunConfig, run: RunDir) -> str:
    loaded.processor.save_pretrained(run.path / "processor")
    if not cfg.output.save_model:
        return "not saved (output.save_model: false)"
    if cfg.dpo.tuning == "full":
        model.save_pretrained(run.path / "model")
        loaded.processor.save_pretrained(run.path / "model")  # a full model dir loads with from_pretrained as is
        return "model/"
    # The trained adapter only: TRL's frozen 'ref' copy (when continuing an adapter) is not part of the result.
    model.save_pretrained(run.path / "adapter", selected_adapters=["default"])
    return "adapter/"


def _pct(ev: dict | None, key: str, group: str | None = None) -> str:
    if not ev:
        return "-"
    pref = ev["preference"] if group is None else ev["preference"]["by_group"][group]
    return f"{100 * pref[key]:.1f}%" if "accuracy" in key else f"{pref[key]:.3f}"


def preference_section(summary: dict, before: dict | None, after: dict | None, has_task: bool) -> str:
    d = summary["dpo"]
    ev = after or before
    if ev is None:
        return "\n## Preference\n\nNot evaluated (eval.before and eval.after are off).\n"
    rows = [("reward accuracy", "reward_accuracy"), ("reward margin", "reward_margin"),
            ("policy alone prefers chosen", "policy_accuracy"), ("policy log-prob margin", "policy_logp_margin")]
    lines = ["", f"## Preference ({ev['preference']['n']} held-out pairs)", "",
             f"- DPO ({d['loss_type']}, beta {d['beta']}), {d['tuning']} tuning from `{d['start']}`; pairs: {d['pairs']}",
             f"- reference: {d['reference']}", "", "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {_pct(before, key)} | {_pct(after, key)} |" for name, key in rows]
    for g in ev["preference"].get("by_group", {}):
        lines.append(f"| reward accuracy, rejected = {g} | {_pct(before, 'reward_accuracy', g)} | {_pct(after, 'reward_accuracy', g)} |")
    lines += ["", "Reward = beta * (log policy(reply) - log reference(reply)); accuracy = share of pairs whose chosen reply "
              "gets the higher reward. A tie counts half: before training the policy is the reference, every pair ties "
              "and the accuracy is 50% by construction. 'Policy alone' compares log policy(chosen) with log policy(rejected), "
              "without the reference.",
              "" if has_task else "\nNo task metric: these pairs carry no labels to score against.", ""]
    return "\n".join(lines)
