"""`vlmfit eval`: evaluate a run directory's trained weights, or the base model of a recipe, on the test split."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from rich.console import Console

from vlmfit.config import load_config
from vlmfit.errors import UserError


def evaluate_target(target: str, overrides: list[str] | None, console: Console) -> tuple[dict, Path | None]:
    path = Path(target)
    run_dir = path if path.is_dir() and (path / "config.yaml").is_file() else None
    if path.is_dir() and run_dir is None:
        raise UserError("not a run directory (no config.yaml)", where=str(path), hint="pass a directory written by `vlmfit train`, or a recipe")
    cfg = load_config(run_dir / "config.yaml" if run_dir else path, overrides)
    if cfg.method == "zo" and (run_dir is None or (run_dir / "prompt.safetensors").is_file()) and _is_clip(cfg):
        res = evaluate_prompt(cfg, run_dir, console)
    else:
        res = _evaluate_chat(cfg, run_dir, console)
    written = None
    if run_dir:
        written = run_dir / f"eval_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        written.write_text(json.dumps(res, indent=2) + "\n")
    return res, written


def _is_clip(cfg) -> bool:
    from transformers import AutoConfig

    from vlmfit.models.load import resolve_reference

    return AutoConfig.from_pretrained(resolve_reference(cfg.model.name), revision=cfg.model.revision).model_type == "clip"


def evaluate_prompt(cfg, run_dir: Path | None, console: Console) -> dict:
    """Prompt tuning of a CLIP model: accuracy with the run's tuned context vectors (or, for a recipe, with the
    initial prompt: zero-shot)."""
    from safetensors.torch import load_file

    from vlmfit.train.zo import make_target

    target = make_target(cfg, Console(quiet=True))
    if run_dir:
        ctx = load_file(str(run_dir / "prompt.safetensors"))["context"].to(target.device)
        target.A, target.params = None, [ctx]  # the saved vectors are the context itself
    acc = target.accuracy()
    console.print(f"accuracy of {run_dir or cfg.model.name} ({'tuned prompt' if run_dir else 'zero-shot'}): {100 * acc:.1f}%")
    return target.evaluate()


def _evaluate_chat(cfg, run_dir: Path | None, console: Console) -> dict:
    from vlmfit.models.load import load, load_processor
    from vlmfit.train.collate import VisionChatCollator
    from vlmfit.train.sft import load_splits, run_eval

    if run_dir and (run_dir / "model").is_dir():
        loaded = load(str(run_dir / "model"), cfg.model.dtype)
    else:
        loaded = load(cfg.model.name, cfg.model.dtype, cfg.model.revision, cfg.model, "4bit" if cfg.method == "qlora" else "none")
        if run_dir and (run_dir / "adapter").is_dir():
            from peft import PeftModel

            loaded.model = PeftModel.from_pretrained(loaded.model, str(run_dir / "adapter"))
            loaded.processor = load_processor(str(run_dir / "processor"))
        elif run_dir:
            raise UserError("run directory has no saved weights (model/ or adapter/)", where=str(run_dir))
    collator = VisionChatCollator(loaded.processor, loaded.family, loss_on=cfg.train.loss_on)
    _, test_ds, labels = load_splits(cfg)
    return run_eval(loaded.model, collator, test_ds, labels, cfg, console, "of " + (str(run_dir) if run_dir else cfg.model.name))
