"""`vlmfit eval`: evaluate a run directory's trained weights (or prompt), the base model of a recipe, or a model
directory (an exported one) on the test split; a run directory gets the result as a timestamped eval_*.json."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from vlmfit.chat.collate import VisionChatCollator
from vlmfit.config import load_config
from vlmfit.data.splits import load_splits
from vlmfit.errors import UserError
from vlmfit.evaluate.classification import evaluate_task
from vlmfit.models.load import check_model, is_dual_encoder, load, load_dual_encoder
from vlmfit.rundir import RunDir


def evaluate_target(target: str, overrides: list[str] | None, console: Console) -> tuple[dict, Path | None]:
    path = Path(target)
    model_dir = path.is_dir() and (path / "config.json").is_file() and not (path / "config.yaml").is_file()
    if model_dir:  # an HF-format model directory (e.g. from `vlmfit export`): scored on data.source (--set)
        run, cfg = None, load_config(base={"model": {"name": str(path)}}, overrides=overrides)
    else:  # a directory must be a run directory; a file is a recipe
        run = RunDir.open(path) if path.is_dir() else None
        cfg = run.config(overrides) if run else load_config(path, overrides)
    _, model_type = check_model(cfg.model.name, cfg.model.revision, chat=False, trust_remote_code=cfg.model.trust_remote_code)  # before any data is loaded
    if is_dual_encoder(model_type):
        res = evaluate_prompt(cfg, run, console)
    else:
        res = evaluate_chat(cfg, run, console)
    return res, run.write_eval("later", res) if run else None


def evaluate_prompt(cfg, run: RunDir | None, console: Console) -> dict:
    """A CLIP model: accuracy with the run's tuned context vectors (or, for a recipe, with its initial prompt:
    zero-shot)."""
    from vlmfit.models.clip_prompt import ClipPrompt

    if run is not None:
        trained = run.load_trained()
        model, processor, ctx = trained.model, trained.processor, trained.prompt["context"]
    else:
        model, processor = load_dual_encoder(cfg.model.name, cfg.model.revision, cfg.model.dtype)
        ctx = None
    splits = load_splits(cfg)
    if splits.labels is None:
        raise UserError("a CLIP prompt classifies: the data needs a label set", where="data.task",
                        hint="use task classification (e.g. builtin:mnist)")
    prompt = ClipPrompt(model, processor, splits.labels, cfg.zo.ctx_init, None, n_ctx=cfg.zo.n_ctx)
    if ctx is not None:
        prompt.set_context(ctx)  # the saved vectors are the context itself
    prompt.cache_images("test", [ex[0] for ex in splits.test["images"]], list(splits.test["label"]), cfg.eval.batch_size)
    acc = prompt.accuracy()
    console.print(f"accuracy of {run.path if run else cfg.model.name} ({'tuned prompt' if run else 'zero-shot'}): {100 * acc:.1f}%")
    return {"n": len(splits.test), "labels": splits.labels, "constrained": {"accuracy": acc}}


def evaluate_chat(cfg, run: RunDir | None, console: Console) -> dict:
    if run is not None:
        trained = run.load_trained()
        model, processor, family = trained.model, trained.processor, trained.family
    else:
        loaded = load(cfg.model.name, cfg.model.dtype, cfg.model.revision, cfg.model, "4bit" if cfg.method == "qlora" else "none")
        model, processor, family = loaded.model, loaded.processor, loaded.family
    collator = VisionChatCollator(processor, family, loss_on=cfg.train.loss_on)
    splits = load_splits(cfg)
    return evaluate_task(model, collator, splits.test, splits.labels, cfg.eval, console,
                         "of " + (str(run.path) if run else cfg.model.name), cfg.data.task)
