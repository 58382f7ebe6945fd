"""Reinforcement learning with verifiable rewards (method: grpo): config -> chat examples as prompts with their answer
-> model (or an earlier run's weights; grpo.warm_start trains that run first, by SFT) -> policy (LoRA or full) -> TRL
GRPOTrainer, with every multimodal placeholder id kept out of sampling and each image encoded once for all the
completions of its prompt (models/rollout.py) -> run dir with the task metric before and after, and the rewards.

Read top to bottom: `train_grpo` is the whole recipe; the helpers below it are leaves.
"""

from __future__ import annotations

import time
from pathlib import Path

import datasets
from rich.console import Console

from vlmfit.chat.collate import VisionChatCollator
from vlmfit.chat.schema import ROW, message_text, prompt_of
from vlmfit.config import RunConfig, load_config
from vlmfit.data.splits import load_splits, require_chat
from vlmfit.errors import UserError
from vlmfit.evaluate.classification import evaluate_task
from vlmfit.launch.ranks import barrier, is_main, main_first
from vlmfit.models.load import Loaded
from vlmfit.models.offload import offload_activations
from vlmfit.models.rollout import SharedVision, placeholder_ids
from vlmfit.models.targets import count_lora_params, drop_input_grad_hooks, enable_checkpointing, peft_config, resolve_for
from vlmfit.rundir import RunDir, RunSummary
from vlmfit.train.callbacks import DivergenceGuard
from vlmfit.train.rewards import ANSWER, Reward, completion_text, rewards_for
from vlmfit.train.run import begin, final_loss, param_counts, report_targets, save_trained, shared_run_name
from vlmfit.train.start import load_start, start_run
from vlmfit.train.tracking import track_locally
from vlmfit.train.trainer import (launch_arguments, quiet_printing, run_training, towers_trained, trainer_arguments,
                                  trainer_callbacks, vlmfit_trainer, with_row_ids)


def train_grpo(cfg: RunConfig, console: Console | None = None, resume: RunDir | None = None, overwrite: bool = False) -> Path:
    """Run the recipe end to end and return the run directory (`resume`: continue that run from its last complete
    checkpoint, exactly)."""
    if cfg.grpo.warm_start_epochs and cfg.grpo.init_from is None and resume is None:
        rewards_for(cfg.grpo.rewards)  # what would fail after the warm start fails before it
        cfg = warm_start(shared_run_name(cfg), console or Console(), overwrite)
    life = begin(cfg, console, resume)
    cfg, console = life.cfg, life.console
    with main_first():  # launched: rank 0 builds the caches and the run directory, then the other ranks read them
        life.check()  # a wrong model name, a missing tracker or a bad resume fails before any data is prepared
        if cfg.grpo.init_from:
            start_run(cfg.grpo.init_from, "grpo.init_from")
        rewards, weights = rewards_for(cfg.grpo.rewards)  # a reward that does not import fails before any data
        splits = load_splits(cfg)
        require_chat(splits)
        loaded, start = load_start(cfg, console, cfg.grpo.init_from, cfg.grpo.tuning, "grpo.init_from")
        if loaded.family.prompt_style != "chat":
            raise UserError(f"method grpo renders prompts with the processor's chat template, and {loaded.family.name} "
                            "takes a prefix and a suffix instead (no chat template)", where="model.name",
                            hint="train this family with method lora / full / dpo, or use a chat VLM for grpo")
        prompts = prompt_rows(rl_split(with_row_ids(splits.train), cfg))
        prompts, length_report = prompt_length_policy(prompts, loaded, cfg, console)
        console.print(f"family [bold]{loaded.family.name}[/]; {len(prompts)} training prompts x {cfg.grpo.num_generations} "
                      f"completions; rewards: {', '.join(f'{r.__name__} x {w:g}' for r, w in zip(rewards, weights))}")
        run = life.open(overwrite, loaded)

    chat = VisionChatCollator(loaded.processor, loaded.family)  # evaluation: the task's own metric, as SFT scores it
    if cfg.eval.before and not (resume and run.evals()[0] is not None):
        if is_main():
            run.write_eval("before", evaluate_task(loaded.model, chat, splits.test, splits.labels, cfg.eval, console,
                                                   "before training", cfg.data.task))
        barrier()

    guard = DivergenceGuard(cfg, run)
    trainer, facts = make_trainer(loaded, prompts, rewards, weights, cfg, run, console, start, guard)
    console.print(f"reference: {facts['reference']}; vision: {facts['vision']}")
    t0 = time.perf_counter()
    result = run_training(trainer, run, guard, life.checkpoint)
    train_seconds = time.perf_counter() - t0
    model = trainer.model
    shared = facts.pop("shared")
    if shared is not None:
        facts["vision_images"] = {"asked": shared.images_in, "encoded": shared.images_encoded}
        shared.remove()
    params = param_counts(model)
    if not is_main():
        return run.path

    run.write_samples(trainer.samples)
    # the trained adapter only: TRL's frozen 'ref' copy (continuing an adapter with beta > 0) is not the result
    weights_saved = save_trained(model, loaded.processor, cfg, run, adapters=["default"])
    run.drop_empty_checkpoints()
    if cfg.eval.after:
        run.write_eval("after", evaluate_task(model, chat, splits.test, splits.labels, cfg.eval, console, "after training",
                                              cfg.data.task))
    if start == "model" and cfg.grpo.tuning == "lora" and cfg.output.save_model:
        # the adapter sits on the earlier run's weights: the merged policy too, so the run directory alone has it
        run.save_model(model.merge_and_unload(), loaded.processor)
        weights_saved = "adapter/ (on the weights of grpo.init_from) and model/ (merged)"
    g = cfg.grpo
    return life.finish(RunSummary(
        method="grpo", steps=result.global_step, train_seconds=train_seconds, final_loss=final_loss(run), **params,
        train_examples=len(prompts), test_examples=len(splits.test), weights=weights_saved,
        label_method="sampled completions (prompt and images never in the loss)", lengths=length_report,
        resumed_from=life.resumed_from, divergence=guard.events or None,
        grpo={"tuning": g.tuning, "start": str(g.init_from or cfg.model.name), "num_generations": g.num_generations,
              "loss_type": g.loss_type, "importance_sampling": g.importance_sampling, "beta": g.beta,
              "rewards": [{"name": r.__name__, "fn": r.spec, "weight": w} for r, w in zip(rewards, weights)], **facts},
        tracking=track_locally(cfg, run) or None,
    ), splits.test)


def warm_start(cfg: RunConfig, console: Console, overwrite: bool = False) -> RunConfig:
    """grpo.warm_start_epochs: first an SFT run on the same training split (its answers as labels, the same tuning),
    in its own run directory (<name>-warm-start, evaluated after, so its figure is the SFT-alone baseline); the GRPO
    run then starts from it (grpo.init_from, recorded in this run's config.yaml, so a resume does not train it again)."""
    from vlmfit.train.sft import train_sft

    g = cfg.grpo
    name = cfg.output.name or RunDir.default_name(cfg)
    if (Path(cfg.output.dir) / name).exists() and not overwrite:  # the GRPO run's directory: refused before the SFT
        raise UserError(f"run directory {Path(cfg.output.dir) / name} already exists", where="output.name",
                        hint="choose another output.name, pass --overwrite, or continue it with `vlmfit train --resume`")
    sft = load_config(overrides=None, base={
        **cfg.model_dump(mode="json"), "method": "full" if g.tuning == "full" else "lora",
        "grpo": {}, "data": {**cfg.data.model_dump(mode="json"), "train_limit": _warm_limit(cfg)},
        "train": {**cfg.train.model_dump(mode="json"), "epochs": g.warm_start_epochs,
                              "lr": g.warm_start_lr or cfg.train.lr, "max_steps": None},
        "eval": {**cfg.eval.model_dump(mode="json"), "before": False},
        "output": {**cfg.output.model_dump(mode="json"), "name": f"{name}-warm-start"}})
    console.print(f"[bold]warm start[/]: {g.warm_start_epochs:g} epochs of SFT first (grpo.warm_start_epochs)")
    path = train_sft(sft, console, overwrite=overwrite)
    return cfg.model_copy(update={"grpo": g.model_copy(update={"init_from": path}),
                                  "output": cfg.output.model_copy(update={"name": name})})


def _warm_limit(cfg: RunConfig) -> int | None:
    n, limit = cfg.grpo.warm_start_examples, cfg.data.train_limit
    return n if limit is None or n is None else min(n, limit)


def rl_split(train, cfg: RunConfig):
    """The examples GRPO samples from: with grpo.warm_start_examples, those after the warm start's (the test split
    is never among them: load_splits keeps it apart for the evaluation)."""
    n = cfg.grpo.warm_start_examples
    if n is None:
        return train
    if n >= len(train):
        raise UserError(f"grpo.warm_start_examples ({n}) leaves none of the {len(train)} training examples for GRPO",
                        where="grpo.warm_start_examples", hint=f"use fewer than {len(train)}")
    return train.select(range(n, len(train)))


def prompt_rows(train) -> datasets.Dataset:
    """Chat examples as GRPO prompts: the conversation up to the last assistant turn, its images, and that turn's
    text as the reference answer (column `answer`), with the example's other columns (label, source row, ...)."""
    if "videos" in train.column_names:
        raise UserError("method grpo samples completions for image prompts; this data has videos, which TRL's GRPO "
                        "generation does not take", where="data.source", hint="use image data (frames as images: "
                        "data.frames_per_example), or method lora / full for video")
    keep = [c for c in train.column_names if c not in ("messages",)]

    def convert(ex):
        messages = ex["messages"]
        prompt = [{"role": m["role"], "content": [_part(p) for p in m["content"]]} for m in prompt_of(messages)]
        return {"prompt": prompt, ANSWER: message_text(messages[-1])}

    return train.map(convert, remove_columns=["messages"], desc="prompts").select_columns(["prompt", ANSWER, *keep])


def _part(p: dict) -> dict:
    return {"type": "image"} if p.get("type") == "image" else {"type": "text", "text": p.get("text") or ""}


def prompt_length_policy(prompts, loaded: Loaded, cfg: RunConfig, console: Console):
    """train.max_length bounds prompt + grpo.max_completion_length. A prompt cannot be cut (the cut would go through
    its images or its question; TRL would then drop the images silently): overlong prompts are dropped (overlong:
    drop, counted, with rows) or refused before training (overlong: truncate)."""
    limit = cfg.train.max_length
    if limit is None:
        return prompts, {"limit": None}
    room = limit - cfg.grpo.max_completion_length
    if room < 1:
        raise UserError(f"train.max_length {limit} leaves no room for a prompt beside grpo.max_completion_length "
                        f"{cfg.grpo.max_completion_length}", where="train.max_length", hint="raise it, or lower the completion length")
    proc = loaded.processor
    with console.status(f"measuring {len(prompts)} prompts against max_length={limit}"):
        lengths = []
        for ex in prompts:
            enc = proc.apply_chat_template([_with_images(ex["prompt"], ex.get("images") or [])], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)
            lengths.append(len(enc["input_ids"][0]))
    over = [i for i, n in enumerate(lengths) if n > room]
    report = {"limit": limit, "policy": cfg.train.overlong, "overlong": len(over), "longest": max(lengths)}
    if not over:
        return prompts, report
    rows = prompts[ROW]
    if cfg.train.overlong != "drop":
        raise UserError(f"{len(over)} prompts are longer than max_length {limit} - max_completion_length "
                        f"{cfg.grpo.max_completion_length} = {room} tokens (source rows {', '.join(str(rows[i]) for i in over[:10])}; "
                        f"longest {max(lengths)}); a prompt is never cut, its images would go", where="train.max_length",
                        hint="raise train.max_length, lower the image resolution, or set train.overlong: drop")
    keep = sorted(set(range(len(prompts))) - set(over))
    if not keep:
        raise UserError(f"every prompt is longer than {room} tokens", where="train.max_length")
    report["dropped"] = len(over)
    report["dropped_rows"] = [{"row": rows[i], "reason": f"prompt {lengths[i]} tokens > {room}"} for i in over[:100]]
    console.print(f"[yellow]dropped {len(over)} of {len(prompts)} prompts longer than {room} tokens[/]")
    return prompts.select(keep), report


def _with_images(prompt: list[dict], images: list) -> list[dict]:
    it = iter(images)
    return [{**m, "content": [{"type": "image", "image": next(it)} if p["type"] == "image" else p for p in m["content"]]}
            for m in prompt]


def make_trainer(loaded: Loaded, prompts, rewards: list[Reward], weights: list[float], cfg: RunConfig, run: RunDir,
                 console: Console, start: str = "base", guard: DivergenceGuard | None = None):
    """TRL's GRPOTrainer on the prompts, and the facts the summary reports (reference, vision sharing)."""
    from peft import PeftModel
    from trl import GRPOConfig, GRPOTrainer

    g = cfg.grpo
    model, lora, resolved = loaded.model, None, None
    if g.tuning == "lora" and isinstance(model, PeftModel):
        # With beta > 0, TRL keeps a frozen copy of the given adapter as the reference ('ref'): the starting policy
        reference = "none (grpo.beta 0)" if g.beta == 0 else "a frozen copy of the starting adapter (TRL's 'ref' adapter)"
    elif g.tuning == "lora":
        resolved = resolve_for(model, loaded.family, cfg.lora)
        lora = peft_config(cfg.lora, resolved)
        reference = "none (grpo.beta 0)" if g.beta == 0 else "the starting weights with the adapter disabled (no copy)"
    else:
        if isinstance(model, PeftModel):
            if g.beta > 0:  # TRL would build the reference from config._name_or_path: the base, not the merged policy
                raise UserError("grpo.tuning: full with grpo.beta > 0 from an adapter run (grpo.init_from): the KL "
                                "reference would be the base model, not the starting policy", where="grpo.beta",
                                hint="set grpo.beta: 0, or start from a run with full weights (or an export merged with "
                                "`vlmfit export --merge`), or keep grpo.tuning: lora")
            model = model.merge_and_unload()
        model.requires_grad_(True)
        reference = "none (grpo.beta 0)" if g.beta == 0 else "a second copy of the starting model, loaded by TRL"

    enable_checkpointing(model, loaded.family, cfg.train.gradient_checkpointing)
    offload_activations(model, loaded.family, cfg.train.activation_offload)
    # trainer_arguments keeps remove_unused_columns off: the prompt's columns (answer, label, source row) reach the rewards
    base = {k: v for k, v in trainer_arguments(cfg, run).items() if k not in ("max_length", "train_sampling_strategy")}
    suppressed = placeholder_ids(loaded.processor, model.config, loaded.family)
    vllm = vllm_arguments(g.generation)
    args = GRPOConfig(
        **base, **launch_arguments(cfg, model, loaded.family, run),
        num_generations=g.num_generations, max_completion_length=g.max_completion_length, temperature=g.temperature,
        top_p=g.top_p, loss_type=g.loss_type, importance_sampling_level=g.importance_sampling, beta=g.beta,
        epsilon=g.epsilon, epsilon_high=g.epsilon_high, num_iterations=g.num_iterations, scale_rewards=g.scale_rewards,
        mask_truncated_completions=g.mask_truncated_completions, reward_weights=weights,
        # every image / video / audio placeholder and marker, not only config.image_token_id (TRL's own choice)
        generation_kwargs=sampling_kwargs(g.generation, suppressed, model.get_output_embeddings().weight.shape[0]),
        disable_dropout=True, log_completions=False,
        shuffle_dataset=True, **vllm,
    )
    guard = guard or DivergenceGuard(cfg, run)
    trainer = vlmfit_trainer(rollout_trainer(GRPOTrainer), guard, family=loaded.family, rates=cfg.train.lr_groups)(
        model=model, reward_funcs=rewards, args=args, train_dataset=prompts, processing_class=loaded.processor,
        peft_config=lora, callbacks=trainer_callbacks(run, guard, cfg))
    quiet_printing(trainer)
    if cfg.train.gradient_checkpointing:
        drop_input_grad_hooks(trainer.model)
    if resolved is not None:
        count_lora_params(trainer.model, resolved, loaded.family)
        report_targets(resolved, console, run)
    shared, vision = None, "each forward encodes every copy of an image (grpo.share_vision: false)"
    if g.share_vision:
        shared = SharedVision(trainer.model, reuse=not towers_trained(trainer.model, loaded.family))
        trainer.shared_vision = shared
        vision = ("each image encoded once per rollout batch, its features reused by every completion and the loss "
                  "(tower frozen)" if shared.reuse else
                  "each image encoded once per forward for all completions of its prompt (tower trains)")
    return trainer, {"reference": reference, "vision": vision, "shared": shared, "suppressed_ids": len(suppressed)}


def vllm_arguments(generation: str) -> dict:
    """grpo.generation: vllm: TRL's colocated vLLM engine (it shares the training GPU), refused where it cannot run."""
    if generation != "vllm":
        return {}
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise UserError("grpo.generation: vllm needs a CUDA GPU", where="grpo.generation",
                        hint="use grpo.generation: transformers (the model's own generate) on this machine")
    if importlib.util.find_spec("vllm") is None:
        raise UserError("grpo.generation: vllm needs the vllm package", where="grpo.generation",
                        hint="pip install vllm (a version TRL supports), or use grpo.generation: transformers")
    return {"use_vllm": True, "vllm_mode": "colocate"}


def sampling_kwargs(generation: str, suppressed: list[int], vocab: int) -> dict:
    """Every placeholder id kept out of sampling: transformers' generate takes suppress_tokens; TRL hands vLLM's
    SamplingParams the same dict, which takes the complement instead (allowed_token_ids; the gpu-marked test checks
    it on a lent GPU)."""
    if generation == "vllm":
        banned = set(suppressed)
        return {"allowed_token_ids": [i for i in range(vocab) if i not in banned]}
    return {"suppress_tokens": suppressed}


SAMPLES_KEPT = 16  # completions of the last rollout batch the report shows (two prompts' groups at G = 8)


def rollout_trainer(trainer_class):
    """GRPOTrainer with the kept image features dropped before each new batch of rollouts (new prompts, new images)."""

    class RolloutTrainer(trainer_class):
        shared_vision: SharedVision | None = None
        samples: list[dict] = []  # the last rollout batch's first completions, with their rewards (for the report)

        def _generate_and_score_completions(self, inputs):
            if self.shared_vision is not None:
                self.shared_vision.clear()
            return super()._generate_and_score_completions(inputs)

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            names = self.reward_func_names
            self.samples = [
                {"row": ex.get(ROW), "answer": ex.get(ANSWER), "completion": completion_text(c),
                 "rewards": {n: float(per_func[i, j]) for j, n in enumerate(names)},
                 "image": (ex.get("images") or [None])[0], "step": self.state.global_step}
                for i, (ex, c) in enumerate(zip(inputs[:SAMPLES_KEPT], completions))]
            return per_func

    return RolloutTrainer
