"""The run config: one typed schema for a whole run (model, data, method, lora, train, eval, output), read from YAML.

Defaults live here and nowhere else; unknown keys are rejected with the nearest valid name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmfit.errors import UserError, nearest


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    name: str = Field(description="hub id (Qwen/Qwen2-VL-2B-Instruct), local HF-format directory, or tiny:<family>")
    revision: str | None = None
    """hub revision to load (branch, tag or commit); null: the default branch"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the weights load in; auto: bfloat16 on a GPU, float32 on a CPU"""
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="load the base weights quantized with bitsandbytes (method qlora implies 4bit NF4)"
    )
    double_quant: bool = Field(True, description="4-bit: quantize the quantization constants too (~0.37 bit/param saved)")
    min_pixels: int | None = Field(None, ge=1, description="image resolution floor (Qwen: pixels; one token per 28x28)")
    max_pixels: int | None = Field(None, ge=1, description="image resolution cap (Qwen: pixels; bounds image tokens)")
    max_soft_tokens: int | None = Field(None, ge=1, description="Gemma 4: image tokens per image (70/140/280/560/1120)")
    trust_remote_code: bool = Field(False, description="run the model repository's own Python code (read it first): "
                                    "needed only for architectures transformers does not ship")
    allow_pickle: bool = Field(False, description="load pickle weights (pytorch_model.bin) when there are no safetensors; "
                               "pickle can run code, so only for files you trust (read with weights_only=True)")
    per_layer_embeddings: Literal["device", "cpu", "auto"] = Field(
        "auto", description="Gemma 3n / 4 per-layer embedding table on a GPU run: cpu keeps it in host memory (looked "
        "up there, only the batch's rows go to the GPU); auto: cpu unless it is trained (full fine-tuning)")
    unused_towers: Literal["device", "cpu"] = Field(
        "cpu", description="towers the data never runs (Gemma 4's audio tower) on a GPU run: cpu keeps them in host "
        "memory (exported unchanged either way)")


class DataConfig(_Section):
    source: str = Field("builtin:mnist", description="builtin:<name>, a prepared dir, a file (jsonl/json/csv/parquet), "
                        "an image folder, a save_to_disk dir, Parquet shards, or a hub dataset id")
    task: Literal["classification", "vqa", "caption", "chat", "preference"] = "classification"
    """what the rows are: classification (a label per image), vqa (question -> answer), caption, chat (whole conversations), preference (prompt / chosen / rejected)"""
    image_column: str | None = None
    """the column holding the image (path, URL-less file name, bytes or PIL); null: found by name"""
    video_column: str | None = None
    """the column holding a video file; null: none"""
    question_column: str | None = None
    """vqa: the question column; null: found by name"""
    answer_column: str | None = None
    """vqa / caption: the answer (or caption) column; null: found by name"""
    label_column: str | None = None
    """classification: the label column; null: found by name (or the class folder)"""
    chosen_column: str | None = None
    """preference: the preferred reply column"""
    rejected_column: str | None = None
    """preference: the dispreferred reply column"""
    messages_column: str | None = None
    """chat: the column with the conversation (OpenAI / ShareGPT / LLaVA spellings are read)"""
    classes: list[str] | None = Field(None, description="the valid class names; rows with another label are skipped")
    prompt: str | None = Field(None, description="question template; {classes} and {question} are filled in")
    system: str | None = None
    """a system prompt put in front of every example"""
    val_fraction: float = Field(0.1, ge=0, lt=1)
    """share of the rows held out as the validation split (when the source has none)"""
    test_fraction: float = Field(0.1, ge=0, lt=1)
    """share of the rows held out as the test split (when the source has none)"""
    split_seed: int = Field(0, description="seed of the train/validation/test split and of the few-shot draw")
    strict: bool = Field(False, description="fail on the first bad row instead of skipping and reporting it")
    max_image_pixels: int = Field(64_000_000, ge=1)
    """images larger than this many pixels are skipped as rows (decompression-bomb guard)"""
    video_fps: float | None = Field(2.0, gt=0)
    """frames sampled per second of video"""
    video_max_frames: int | None = Field(16, ge=1)
    """at most this many frames per video, spread over the clip"""
    frames_per_example: int | None = Field(None, ge=1, description="split each video into examples of this many frames (as images)")
    train_limit: int | None = Field(None, ge=1, description="use at most this many training examples")
    shots_per_class: int | None = Field(None, ge=1, description="few-shot: keep k training examples of each class, "
                                        "drawn with data.split_seed")
    eval_limit: int | None = Field(None, ge=1, description="evaluate on at most this many test examples")


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    """LoRA rank"""
    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)"""
    dropout: float = Field(0.05, ge=0, lt=1)
    """dropout on the LoRA input"""
    targets: Literal["all-linear"] | list[str] = "all-linear"
    """all-linear (every linear layer in scope, family wrappers understood) or a list of module name patterns"""
    scope: list[Literal["language", "vision", "projector"]] = ["language"]
    """the parts LoRA goes into: language, vision, projector"""
    train_fully: list[Literal["language", "vision", "projector"]] = Field(
        [], description="parts trained in full (not LoRA), e.g. [projector] while the towers use LoRA"
    )

    @field_validator("scope")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("scope needs at least one of language, vision, projector")
        return v


class DpoConfig(_Section):
    """Preference optimisation (method: dpo). The policy is trained with `tuning` (LoRA uses the lora section)."""

    tuning: Literal["lora", "full"] = "lora"
    """how the policy trains: lora (reference = adapter disabled) or full (reference = a frozen copy)"""
    beta: float = Field(0.1, gt=0)
    """DPO's temperature: how far the policy may move from the reference"""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"] = "sigmoid"
    """TRL's DPO loss"""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """conservative DPO: the assumed share of flipped preference labels"""
    init_from: Path | None = Field(None, description="a previous run directory: start from its adapter or weights (SFT then DPO)")
    pairs_from_labels: Literal["mixed", "wrong_label", "evasive"] | None = Field(
        None, description="build pairs from a labelled (classification) dataset: chosen = the label, rejected = a wrong "
        "label or the evasive 'The image does not provide that information.'",
    )


class RewardConfig(_Section):
    """One reward of method grpo: a built-in name or the user's own function, its weight and its arguments."""

    fn: str = Field(description="exact_match, normalised_match, numeric, multiple_choice, format, length_penalty, or "
                    "your own: path/to/rewards.py:function or module:function, called as fn(completions, **columns)")
    weight: float = 1.0
    """its weight in the sum of the rewards"""
    name: str | None = Field(None, description="the name it is logged under (default: the function's)")
    args: dict[str, Any] = Field({}, description="keyword arguments for the function (numeric: tolerance, relative)")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v):
        return {"fn": v} if isinstance(v, str) else v


class GrpoConfig(_Section):
    """Reinforcement learning with verifiable rewards (method: grpo) on TRL's GRPOTrainer: each prompt gets
    num_generations sampled completions, the rewards score them, and the policy moves toward the better ones of its
    group. The policy is trained with `tuning` (LoRA uses the lora section; QLoRA: model.quantization: 4bit)."""

    tuning: Literal["lora", "full"] = "lora"
    """how the policy trains: lora or full"""
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig(fn="exact_match")], min_length=1,
                                        description="the rewards, summed with their weights")
    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (the group whose rewards are compared)")
    max_completion_length: int = Field(64, ge=1, description="tokens generated per completion at most")
    temperature: float = Field(1.0, gt=0)
    """sampling temperature of the completions"""
    top_p: float = Field(1.0, gt=0, le=1)
    """nucleus sampling of the completions (1: off)"""
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"] = Field(
        "dapo", description="how token losses are aggregated (TRL's loss types): dapo normalises by the generation "
        "batch's completion tokens, grpo by each completion's length, dr_grpo by a constant")
    importance_sampling: Literal["token", "sequence"] = Field(
        "token", description="sequence: GSPO's sequence-level importance ratio (with num_iterations > 1 or grad_accum)")
    beta: float = Field(0.0, ge=0, description="KL penalty to the reference; 0: no reference model at all. With LoRA "
                        "the reference is the same weights with the adapter disabled (no copy)")
    epsilon: float = Field(0.2, gt=0, description="clip range of the importance ratio (lower side)")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip (DAPO's clip-higher; null: epsilon)")
    num_iterations: int = Field(1, ge=1, description="optimisation passes over each batch of rollouts")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="advantages divided by the reward "
                                                             "std of the group, of the batch, or not at all (Dr. GRPO)")
    mask_truncated_completions: bool = Field(False, description="leave completions cut at max_completion_length out of the loss")
    init_from: Path | None = Field(None, description="a previous run directory: start from its adapter or weights "
                                   "(SFT then GRPO)")
    warm_start_epochs: float | None = Field(None, gt=0, description="without init_from: first this many epochs of SFT "
                                            "on the same training split, in a run directory of its own "
                                            "(<name>-warm-start), then GRPO from it")
    warm_start_lr: float | None = Field(None, gt=0, description="the warm start's learning rate (null: train.lr)")
    warm_start_examples: int | None = Field(None, ge=1, description="the warm start trains on the first this many "
                                            "training examples and GRPO on the others (prompts it has not seen "
                                            "answered); null: both on the whole training split")
    generation: Literal["transformers", "vllm"] = Field(
        "transformers", description="who samples the completions: the model's own generate (CPU or GPU), or vLLM in the "
        "training process (TRL's colocate mode; CUDA and the vllm package needed)")
    share_vision: bool = Field(True, description="encode each image once per forward for all its prompt's "
                               "completions (and, with the tower frozen, reuse the generation's features in the loss)")


class ZoConfig(_Section):
    """Forward-only training (method: zo): no backward pass, perturbations regenerated from seeds, so memory stays
    at inference level. Defaults follow SharpZO (NeurIPS 2025) and MeZO (Malladi et al. 2023)."""

    optimizer: Literal["sharpzo", "mezo", "coop"] = Field(
        "sharpzo", description="sharpzo: sharpness-aware CMA-ES then sparse ZO; mezo: SPSA baseline; "
        "coop: backprop prompt tuning, the reference (not forward-only)")
    target: Literal["auto", "prompt", "lora"] = Field(
        "auto", description="prompt: CoOp-style context vectors of a CLIP text encoder; lora: LoRA adapters of a "
        "generative VLM (lora section, SFT labels); auto: prompt for CLIP models, lora otherwise")
    forward_passes: int = Field(5000, ge=2, description="budget: loss evaluations of one parameter setting on one batch "
                                "(the default: SharpZO's 100 generations x (popsize 40 + 2) = 4,200, then 800 of sparse ZO)")
    lr: float = Field(1e-3, gt=0)
    """learning rate of the zeroth-order updates"""
    eps: float = Field(1e-3, gt=0, description="finite-difference step")
    perturbations: int = Field(1, ge=1, description="random directions per gradient estimate (q)")
    # prompt target (CLIP)
    ctx_init: str = Field("a photo of a", description="words whose embeddings initialise the context vectors")
    n_ctx: int | None = Field(None, ge=1, description="context vectors; more than ctx_init has words: the extra ones "
                              "start as the embedding of 'X' (CoOp's placeholder) in front of ctx_init")
    intrinsic_dim: int | None = Field(512, ge=1, description="tune w in R^d mapped by a fixed random matrix to the "
                                      "context vectors; null: tune the context vectors directly")
    # SharpZO stage 1: CMA-ES scored at a sharpness-aware worst case
    generations: int = Field(100, ge=0, description="CMA-ES generations before switching to sparse ZO (the switch point)")
    popsize: int = Field(40, ge=2)
    """CMA-ES population per generation"""
    sigma: float = Field(0.4, gt=0, description="CMA-ES initial step size")
    rho: float = Field(0.1, ge=0, description="radius of the worst-case perturbation (0 = plain CMA-ES)")
    population_batch: int | None = Field(None, ge=1, description="prompt target: candidates scored per text-encoder "
                                         "forward (null: the whole population at once; lower it to cap memory)")
    # SharpZO stage 2: sparse ZO with normalised estimates and outlier filtering
    sparsity: float = Field(0.5, ge=0, lt=1, description="share of coordinates left out of each perturbation")
    outlier_threshold: float = Field(3.0, gt=0, description="skip estimates larger than this many running RMS")
    eval_every: int = Field(500, ge=1, description="forward passes between held-out evaluations (not counted)")


class TrainConfig(_Section):
    epochs: float = Field(1.0, gt=0)
    """passes over the training split (max_steps overrides it)"""
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(8, ge=1)
    """examples per device per micro-step (grpo: completions)"""
    grad_accum: int = Field(1, ge=1)
    """micro-steps per optimizer step (global batch = batch_size x grad_accum x processes)"""
    lr: float = Field(2e-4, gt=0)
    """peak learning rate"""
    lr_groups: dict[Literal["vision", "projector", "language"], float] = Field(
        {}, description="a learning rate per part, e.g. {vision: 2e-5, projector: 1e-4} (ms-swift's vit_lr / aligner_lr); "
        "parts not named, and parameters outside the three (the LM head), use train.lr; 0 leaves that part as it is")

    @field_validator("lr_groups")
    @classmethod
    def _rates_are_not_negative(cls, v):
        bad = {k: r for k, r in v.items() if r < 0}
        if bad:
            raise ValueError(f"learning rates cannot be negative: {bad}")
        return v
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """learning-rate schedule after the warmup"""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """share of the optimizer steps spent warming the learning rate up from 0"""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay"""
    max_grad_norm: float = Field(1.0, gt=0)
    """gradient norm clipping"""
    max_length: int | None = Field(None, ge=8, description="None: never truncate (recommended for VLMs)")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="examples longer than max_length: truncate (inside text only; a cut through an image is an error "
        "before training) or drop (counted, with reasons, in the run report)",
    )
    loss_on: Literal["assistant", "all"] = "assistant"
    """assistant: loss on the replies only (the prompt and images never); all: every text token"""
    lean_loss: bool = Field(True, description="LM head and loss only at the positions that carry a label (false: the "
                            "model's own loss over full logits, as plain TRL computes it)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """autocast: auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16"""
    gradient_checkpointing: list[Literal["language", "vision"]] = Field(
        [], description="recompute activations in these towers during backward (less memory, ~30% more compute)"
    )
    activation_offload: list[Literal["language", "vision"]] = Field(
        [], description="keep the activations these towers save for backward in host memory (torch's saved-tensor "
        "hooks; pinned copies on a GPU, brought back op by op in backward): same losses, the device holds about one "
        "block's; not with gradient_checkpointing on the same tower")
    optim: Literal["adamw", "adamw-8bit", "paged-adamw-8bit", "sgd"] = "adamw"
    """optimizer: adamw, adamw-8bit / paged-adamw-8bit (bitsandbytes), sgd"""
    seed: int = 42
    """seed of the data order, the initialisation of new weights and sampling"""
    logging_steps: int = Field(10, ge=1)
    """optimizer steps between log lines (metrics.jsonl)"""
    dataloader_workers: int = Field(0, ge=0, description="processes that collate batches ahead of the training step "
                                    "(0: in the training process)")
    group_by_length: bool = Field(False, description="batches of examples of similar token length (image sizes vary "
                                  "the count), so less padding; lengths measured once before training")
    packing: bool = Field(False, description="padding-free batches: a step's examples end to end in one row, each with "
                          "its own positions and attention kept inside it (families where that is proven exact; others "
                          "fall back to padded batches, with the reason printed)")
    pack_tokens: int | None = Field(None, ge=16, description="with packing: the most tokens in one packed row; a step's "
                                    "examples then fill several rows (null: one row per step)")
    processor_cache: bool = Field(True, description="keep each example's processor output and labels on disk "
                                  "($VLMFIT_CACHE/encoded, keyed by processor, settings and content) and reuse it "
                                  "across epochs and runs")
    cache_image_features: bool = Field(True, description="when the vision tower and projector are frozen, compute each "
                                       "image's features once and reuse them (in memory, up to feature_cache_gib)")
    feature_cache_gib: float = Field(4.0, ge=0, description="host memory for reused image features")
    save_steps: int = Field(200, ge=1, description="write a resumable checkpoint every this many optimizer steps (and "
                            "at the end): weights, optimizer, scheduler, RNG states, data position")
    save_total_limit: int = Field(2, ge=1, description="keep this many most recent checkpoints")
    on_divergence: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss or gradient norm (or one above divergence_grad_norm): stop the run at the "
        "last good checkpoint, or skip that optimizer step; either way the step and its batch rows are reported")
    divergence_grad_norm: float | None = Field(None, gt=0, description="a gradient norm above this counts as divergence "
                                               "(None: only non-finite ones)")
    report_to: list[Literal["trackio", "tensorboard", "wandb", "mlflow"]] = Field(
        [], description="experiment trackers that also get the training logs (none by default), local-first: logs in the "
        "run directory's tracking/ unless the tracker's own environment variables say otherwise (train/tracking.py)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, v):
        """`none`, one tracker, a comma-separated string or a list, as TrainingArguments.report_to takes them."""
        if v is None:
            return []
        if isinstance(v, str):
            v = [t.strip() for t in v.split(",") if t.strip()]
        return [] if list(v) == ["none"] else v


class EvalConfig(_Section):
    before: bool = True
    """evaluate the starting model on the test split before training"""
    after: bool = True
    """evaluate the trained model on the test split after training"""
    modes: list[Literal["constrained", "generate"]] = ["constrained", "generate"]
    """constrained (the likeliest label of the class set) and / or generate (free greedy answer)"""
    batch_size: int = Field(32, ge=1)
    """test examples per forward"""
    max_new_tokens: int = Field(8, ge=1)
    """tokens generated per answer at most (generate mode, predict, serve's advice)"""
    every_steps: int | None = Field(None, ge=1, description="also evaluate on the validation split every this many "
                                    "optimizer steps (supervised recipes): metric curves and the best step in the report")


STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")


class LaunchConfig(_Section):
    strategy: Literal["ddp", "fsdp", "zero2", "zero3"] = Field(
        "ddp", description="how `vlmfit launch` shares the work between processes: ddp (replicated model), fsdp "
        "(FSDP2: weights, gradients, optimizer state sharded), zero2 / zero3 (DeepSpeed ZeRO stage 2 / 3)")

    @property
    def sharded(self) -> bool:
        """The weights are sharded across the ranks (every rank then runs every tower every step); launched only."""
        return self.strategy in ("fsdp", "zero3")


class OutputConfig(_Section):
    dir: Path = Path("runs")
    """where run directories are made"""
    name: str | None = Field(None, description="run directory name; default <model>-<method>-<timestamp>")
    save_model: bool = True
    """save the trained weights (adapter or full model) in the run directory"""


class RunConfig(_Section):
    model: ModelConfig
    data: DataConfig = DataConfig()
    method: Literal["full", "lora", "qlora", "dpo", "grpo", "zo"] = "lora"
    """full (every weight), lora, qlora (LoRA on a 4-bit base), dpo (preference pairs), grpo (rewards), zo (forward-only)"""
    lora: LoraConfig = LoraConfig()
    dpo: DpoConfig = DpoConfig()
    grpo: GrpoConfig = GrpoConfig()
    zo: ZoConfig = ZoConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    launch: LaunchConfig = LaunchConfig()
    output: OutputConfig = OutputConfig()

    @property
    def quantization(self) -> str:
        """How the base weights load for this run: method qlora implies 4-bit, else model.quantization."""
        return quantization_for(self.method, self.model.quantization)

    @property
    def full_weights(self) -> bool:
        """Every weight trains (method full, or DPO with dpo.tuning: full): no adapter, no quantized base."""
        return (self.method == "full" or (self.method == "dpo" and self.dpo.tuning == "full")
                or (self.method == "grpo" and self.grpo.tuning == "full"))

    @model_validator(mode="after")
    def _full_training_is_not_quantized(self):
        if self.full_weights and self.model.quantization != "none":
            key = f"{self.method}.tuning" if self.method in ("dpo", "grpo") else "method"
            raise ValueError(f"a {self.model.quantization} quantized model cannot be trained in full ({key}): "
                             f"{f'{self.method}.tuning: lora' if self.method in ('dpo', 'grpo') else 'method: qlora'} trains adapters on the "
                             "quantized base (QLoRA), or set model.quantization: none")
        return self

    @model_validator(mode="after")
    def _dpo_compares_replies(self):
        if self.method in ("dpo", "grpo") and self.train.loss_on != "assistant":
            what = "compares the final replies of each pair" if self.method == "dpo" else "trains on sampled completions"
            raise ValueError(f"{self.method.upper()} {what}; train.loss_on: all does not apply: remove "
                             f"train.loss_on (or set it to assistant) for method {self.method}")
        return self

    @model_validator(mode="after")
    def _warm_start_examples_need_a_warm_start(self):
        g = self.grpo
        if self.method == "grpo" and g.warm_start_examples and not (g.warm_start_epochs or g.init_from):
            raise ValueError("grpo.warm_start_examples keeps the first examples for the warm start, but there is none: "
                             "set grpo.warm_start_epochs (or remove grpo.warm_start_examples)")
        return self

    @model_validator(mode="after")
    def _grpo_groups_fill_batches(self):
        g = self.grpo.num_generations
        if self.method == "grpo" and (self.train.batch_size * self.train.grad_accum) % g:
            raise ValueError(f"train.batch_size x train.grad_accum ({self.train.batch_size} x {self.train.grad_accum}) "
                             f"counts completions per optimizer step and must be a multiple of grpo.num_generations ({g}): "
                             f"each prompt's {g} completions are compared as one group")
        return self

    @model_validator(mode="after")
    def _pairs_from_labels_need_labels(self):
        if self.method == "dpo" and self.dpo.pairs_from_labels and self.data.task == "preference":
            raise ValueError("dpo.pairs_from_labels builds pairs from labelled chat examples, but data.task is preference: "
                             "remove dpo.pairs_from_labels to train on the pairs as given")
        return self

    @model_validator(mode="after")
    def _coop_tunes_prompts(self):
        if self.method == "zo" and self.zo.optimizer == "coop" and self.zo.target == "lora":
            raise ValueError("zo.optimizer coop is backprop prompt tuning of a CLIP model, not of LoRA adapters (zo.target: "
                             "lora): for a generative VLM use method lora (backprop) or zo.optimizer mezo / sharpzo")
        return self

    @model_validator(mode="after")
    def _packing_is_sft(self):
        if self.train.packing and self.method in ("dpo", "grpo", "zo"):
            raise ValueError(f"train.packing packs supervised fine-tuning batches (methods full, lora, qlora), not "
                             f"method {self.method}: set train.packing: false")
        return self

    @model_validator(mode="after")
    def _every_steps_is_sft(self):
        if self.eval.every_steps and self.method in ("dpo", "grpo", "zo"):
            raise ValueError(f"eval.every_steps evaluates supervised fine-tuning runs (methods full, lora, qlora); "
                             f"method {self.method} evaluates before and after (zo: zo.eval_every): remove eval.every_steps")
        return self

    @model_validator(mode="after")
    def _trackers_follow_the_trainer(self):
        if self.train.report_to and self.method == "zo":
            raise ValueError("train.report_to logs through the Trainer (methods full, lora, qlora, dpo); method zo runs its "
                             "own loop and logs to metrics.jsonl in the run directory: remove train.report_to")
        return self

    @model_validator(mode="after")
    def _offload_or_checkpoint(self):
        both = [t for t in self.train.activation_offload if t in self.train.gradient_checkpointing]
        if both:
            raise ValueError(f"train.activation_offload and train.gradient_checkpointing both name {', '.join(both)}: a "
                             "checkpointed tower keeps only its block inputs, which checkpointing holds itself, so there "
                             "is nothing to offload; keep one of the two for that tower")
        if self.train.activation_offload and self.method == "zo":
            raise ValueError("train.activation_offload keeps activations for backward; method zo runs forward only: "
                             "remove train.activation_offload")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def quantization_for(method: str, quantization: str) -> str:
    """The one rule for the quantization a method trains on (the planner applies it to its own inputs too)."""
    return "4bit" if method == "qlora" else quantization


RECIPES = Path(__file__).parent / "recipes"  # the YAML recipes shipped with vlmfit


def recipe_path(name: str | Path) -> Path:
    """A recipe given by path, or by the name of one shipped with vlmfit (e.g. `demo`)."""
    p = Path(name)
    if p.exists() or p.suffix in (".yaml", ".yml"):
        return p
    return RECIPES / f"{name}.yaml"


def _fields_at(loc: tuple) -> list[str]:
    """Valid key names of the section that `loc` (a pydantic error location) points into."""
    model: Any = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> UserError:
    lines, hint = [], None
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            near = nearest(str(e["loc"][-1]), _fields_at(e["loc"]))
            lines.append(f"unknown key '{key}'" + (f" (did you mean '{near}'?)" if near else ""))
            valid = _fields_at(e["loc"])
            hint = hint or f"valid keys here: {', '.join(valid)}"
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}'")
            hint = hint or "see recipes/demo.yaml for a complete recipe"
        elif not e["loc"]:  # a rule across sections (a model validator): its message says it all
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            got = e.get("input")
            lines.append(f"'{key}': {e['msg']} (got {got!r})")
    return UserError("; ".join(lines), where=source, hint=hint)


def _set_dotted(doc: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = doc
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise UserError(f"cannot set '{dotted}': '{p}' is not a section", where=where)
        node = child
    node[parts[-1]] = value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML says is wrong: a marked error's problem (without the position, which `where` gives)."""
    return str(e.problem) if isinstance(e, yaml.MarkedYAMLError) and e.problem else str(e)


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value", where="--set", hint="e.g. --set train.lr=1e-4")
        key, raw = item.split("=", 1)
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise UserError(f"override '{item}' has no key (or an empty part of one)", where="--set",
                            hint="e.g. --set train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise UserError(f"the value of '{item}' is not valid YAML ({_yaml_problem(e)})", where=f"--set {key.strip()}",
                            hint="quote it: --set 'data.prompt=\"...\"'") from None
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Read a YAML recipe (or a dict), apply `key.sub=value` overrides, validate. Raises UserError on any problem."""
    source = str(path) if path is not None else "config"
    doc: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError("recipe file not found", where=str(p), hint="pass the path of a YAML recipe, e.g. recipes/demo.yaml")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"not a text file in UTF-8 (byte {e.start}: {e.reason})", where=str(p),
                            hint="a recipe is a YAML text file, e.g. recipes/demo.yaml") from None
        except yaml.YAMLError as e:
            mark = e.problem_mark if isinstance(e, yaml.MarkedYAMLError) else None
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise UserError(f"not valid YAML ({_yaml_problem(e)})", where=where) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError("a recipe must be a YAML mapping of sections (model, data, method, ...)", where=str(p))
        doc.update(loaded)
    for key, value in parse_overrides(overrides):
        _set_dotted(doc, key, value, where=f"--set {key}")
    try:
        return RunConfig.model_validate(doc)
    except ValidationError as e:
        raise _explain(e, source) from None


def recipe_reference() -> str:
    """docs/recipe-reference.md: every recipe key of the schema above with its type, default and description, one
    table per section (tests/test_docs.py fails when the file is not this text)."""
    import typing

    def type_of(annotation) -> str:
        text = str(annotation).replace("typing.", "").replace("pathlib.", "").replace("vlmfit.config.", "")
        text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
        return text.replace("NoneType", "None").replace("|", "\\|")

    def default_of(f) -> str:
        if f.is_required():
            return "(required)"
        value = f.default_factory() if f.default_factory is not None else f.default
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            value = [v.model_dump(exclude_defaults=True) for v in value]
        return "`" + json.dumps(value, default=str) + "`"

    def rows(model, prefix: str):
        for key, f in model.model_fields.items():
            ann = f.annotation
            inner = typing.get_args(ann)[0] if typing.get_origin(ann) is list and typing.get_args(ann) else None
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                continue  # a section: its own table
            desc = " ".join((f.description or "").split()).replace("|", "\\|")
            yield f"| `{prefix}{key}` | {type_of(ann)} | {default_of(f)} | {desc} |"
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                yield from rows(inner, f"{prefix}{key}[].")

    out = ["# Recipe reference", "",
           "Every key a recipe (YAML) takes, generated from vlmfit's config schema (src/vlmfit/config.py); unknown keys "
           "are refused with the nearest valid name. Regenerate with "
           "`python -c \"from vlmfit.config import recipe_reference; print(recipe_reference(), end='')\" > docs/recipe-reference.md`.",
           "", "## Top level", "", "| key | type | default | description |", "|---|---|---|---|", *rows(RunConfig, "")]
    for key, f in RunConfig.model_fields.items():
        section = f.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            out += ["", f"## {key}", ""]
            if section.__doc__ and section.__doc__ != BaseModel.__doc__:
                out += [" ".join(section.__doc__.split()), ""]
            out += ["| key | type | default | description |", "|---|---|---|---|", *rows(section, f"{key}.")]
    return "\n".join(out) + "\n"
