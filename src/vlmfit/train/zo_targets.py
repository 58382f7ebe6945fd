"""What forward-only training (train/zo.py) tunes: the prompt of a CLIP model (models/clip_prompt.py) or LoRA
adapters of a generative VLM, each with its loss, minibatches, flat views for CMA-ES and evaluation."""

from __future__ import annotations

import numpy as np
import torch
from rich.console import Console

from vlmfit.chat.collate import LABEL_METHODS, VisionChatCollator
from vlmfit.config import RunConfig
from vlmfit.data.splits import load_splits
from vlmfit.errors import UserError
from vlmfit.models.load import check_model, is_dual_encoder, load_dual_encoder, load_for
from vlmfit.models.targets import make_trainable
from vlmfit.rundir import RunDir
from vlmfit.train.run import report_targets

# ---- targets --------------------------------------------------------------------------------------------------


def make_target(cfg: RunConfig, console: Console):
    """The tuned parameters and their loss: CLIP prompt tuning or LoRA adapters of a generative VLM."""
    _, model_type = check_model(cfg.model.name, cfg.model.revision, chat=False, trust_remote_code=cfg.model.trust_remote_code)  # before any data is loaded
    clip = is_dual_encoder(model_type)
    kind = cfg.zo.target if cfg.zo.target != "auto" else ("prompt" if clip else "lora")
    if (kind == "prompt") != clip:
        raise UserError(f"zo.target {kind} does not fit a '{model_type}' model",
                        where="zo.target", hint="prompt tuning needs a CLIP model (e.g. tiny:clip); generative VLMs use lora")
    if kind == "lora" and cfg.zo.optimizer == "coop":
        raise UserError("zo.optimizer coop is backprop prompt tuning of a CLIP model", where="zo.optimizer",
                        hint="for a generative VLM use method lora (backprop) or zo.optimizer mezo / sharpzo")
    splits = load_splits(cfg)
    if splits.labels is None:
        raise UserError("method zo evaluates classification accuracy: the data needs a label set",
                        where="data.task", hint="use task classification (e.g. builtin:mnist)")
    if kind == "prompt":
        return clip_prompt(cfg, splits.train, splits.test, splits.labels)
    return LoraTarget(cfg, console, splits.train, splits.test, splits.labels)


def clip_prompt(cfg: RunConfig, train_ds, test_ds, labels: list[str]):
    """The recipe's CLIP model with a tunable prompt (models/clip_prompt.py), image features of the train (few-shot)
    and held-out test images cached. `vlmfit eval` builds the same to score a saved prompt."""
    from vlmfit.models.clip_prompt import ClipPrompt

    model, processor = load_dual_encoder(cfg.model.name, cfg.model.revision, cfg.model.dtype)
    target = ClipPrompt(model, processor, labels, cfg.zo.ctx_init, cfg.zo.intrinsic_dim, cfg.zo.sigma, cfg.train.seed,
                        cfg.zo.n_ctx)
    target.cache_images("train", [ex[0] for ex in train_ds["images"]], list(train_ds["label"]), cfg.eval.batch_size)
    target.cache_images("test", [ex[0] for ex in test_ds["images"]], list(test_ds["label"]), cfg.eval.batch_size)
    return target


class LoraTarget:
    """LoRA adapters of a generative VLM (any supported family), loss = the SFT loss with vlmfit's labels."""

    kind = "lora"

    def __init__(self, cfg: RunConfig, console: Console, train_ds, test_ds, labels: list[str]):
        self.cfg, self.train_ds, self.test_ds, self.labels = cfg, train_ds, test_ds, labels
        self.loaded = load_for(cfg)
        self.model, resolved = make_trainable(self.loaded.model, self.loaded.family, "lora", cfg.lora)
        report_targets(resolved, console, None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.model.parameters():
            p.requires_grad_(False)  # nothing builds a graph; tests assert it
        self.model.eval()  # dropout off: both sides of a two-point estimate must see the same function
        self.collator = VisionChatCollator(self.loaded.processor, self.loaded.family, loss_on=cfg.train.loss_on,
                                           max_length=cfg.train.max_length)
        self.label_method = LABEL_METHODS[self.collator.label_method]
        self.device = self.params[0].device
        self.n_train, self.n_test = len(train_ds), len(test_ds)
        self.total_params = sum(p.numel() for p in self.model.parameters())

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    # flat views go through the host one tensor at a time: no device copy of all adapters at once
    def flat(self) -> np.ndarray:
        return np.concatenate([p.detach().double().cpu().numpy().ravel() for p in self.params])

    def set_flat(self, x) -> None:
        x, i = np.asarray(x), 0
        for p in self.params:
            p.copy_(torch.from_numpy(x[i:i + p.numel()]).view(p.shape))
            i += p.numel()

    def batches(self, batch_size: int, seed: int):
        g = np.random.default_rng(seed)
        while True:
            order = g.permutation(self.n_train)
            for i in range(0, self.n_train - batch_size + 1, batch_size):
                rows = [self.train_ds[int(j)] for j in order[i:i + batch_size]]
                yield {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in self.collator(rows).items()}

    @torch.no_grad()
    def loss(self, batch) -> float:
        return float(self.model(**batch, use_cache=False).loss)

    @torch.no_grad()
    def population_losses(self, X, batch, chunk: int | None = None) -> np.ndarray:
        """One candidate per forward (adapters cannot be batched as prompts can): `chunk` does not apply."""
        keep = self.flat()
        out = []
        for x in np.asarray(X):
            self.set_flat(x)
            out.append(self.loss(batch))
        self.set_flat(keep)
        return np.asarray(out)

    def evaluate(self) -> dict:
        from vlmfit.evaluate.classification import evaluate_classification

        res = evaluate_classification(self.model, self.collator, self.test_ds, self.labels, ["constrained"], self.cfg.eval.batch_size)
        self.model.eval()
        return res


def save_tuned(target, run: RunDir) -> str:
    """What forward-only training tuned, into the run directory: the prompt's context vectors, or the adapters."""
    if target.kind == "prompt":
        return run.save_prompt(target.context_vectors(), target.info())
    run.save_processor(target.loaded.processor)
    return run.save_adapter(target.model)
