"""`vlmfit eval`: evaluate a run directory's trained weights (or prompt), the base model of a recipe, or a model
directory (an exported one) on the test split; a run directory gets the result as a timestamped eval_*.json.
Results are cached per model + data + settings (+ vlmfit's evaluation code), so an unchanged rerun is instant."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import vlmfit

from rich.console import Console

from vlmfit.chat.collate import VisionChatCollator
from vlmfit.config import load_config
from vlmfit.data.splits import load_splits
from vlmfit.errors import UserError
from vlmfit.evaluate.classification import evaluate_task
from vlmfit.models.load import check_model, is_dual_encoder, load, load_dual_encoder
from vlmfit.rundir import RunDir


EVAL_FORMAT = 1  # bump when what a cached result holds changes


def _files_state(path: Path) -> list:
    """(relative path, size, mtime) of every file at or under `path` (evaluation results aside): what make-style
    invalidation looks at."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("eval_"))
    return [(str(f.relative_to(path)) if f != path else f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def result_key(cfg, run: RunDir | None) -> str:
    """What an evaluation result depends on: the weights (a run's saved ones, or the model directory / hub id and
    revision), the data (a local source's files, or its name), every setting but the output's, and the code."""
    from vlmfit.models.load import resolve_reference

    code = b"".join(sorted(f.read_bytes() for f in Path(__file__).parent.glob("*.py")))
    code += (Path(vlmfit.__file__).parent / "chat" / "collate.py").read_bytes()
    ref = Path(resolve_reference(cfg.model.name))
    weights = [_files_state(ref) if ref.is_dir() else [cfg.model.name, cfg.model.revision]]  # the (base) model
    if run is not None:  # what the run trained, and the processor it saved
        kind = run.trained_kind()
        weights += [_files_state(run.weights_path(kind)) if kind else None,
                    _files_state(p) if (p := run.processor_path()) else None]
    source = Path(str(cfg.data.source))
    data = _files_state(source) if cfg.data.source and source.exists() else [cfg.data.source]
    settings = cfg.model_dump(mode="json", exclude={"output"})
    doc = [vlmfit.__version__, EVAL_FORMAT, hashlib.blake2b(code).hexdigest(), weights, data, settings]
    return hashlib.blake2b(json.dumps(doc, default=str).encode(), digest_size=20).hexdigest()


def evaluate_target(target: str, overrides: list[str] | None, console: Console, use_cache: bool = True) -> tuple[dict, Path | None]:
    path = Path(target)
    model_dir = path.is_dir() and (path / "config.json").is_file() and not (path / "config.yaml").is_file()
    if model_dir:  # an HF-format model directory (e.g. from `vlmfit export`): scored on data.source (--set)
        run, cfg = None, load_config(base={"model": {"name": str(path)}}, overrides=overrides)
    else:  # a directory must be a run directory; a file is a recipe
        run = RunDir.open(path) if path.is_dir() else None
        cfg = run.config(overrides) if run else load_config(path, overrides)
    _, model_type = check_model(cfg.model.name, cfg.model.revision, chat=False, trust_remote_code=cfg.model.trust_remote_code)  # before any data is loaded
    from vlmfit.models.tiny.corpus import cache_home

    cached = cache_home() / "evals" / f"{result_key(cfg, run)}.json"
    if use_cache and cached.is_file():
        res = json.loads(cached.read_text())
        console.print(f"cached result ({cached}; the same weights, data and settings): {_headline(res)}; "
                      "--no-cache computes it again")
    else:
        res = evaluate_prompt(cfg, run, console) if is_dual_encoder(model_type) else evaluate_chat(cfg, run, console)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, default=str))
        tmp.replace(cached)
    return res, run.write_eval("later", res) if run else None


def _headline(res: dict) -> str:
    figures = [f"{mode} {100 * res[mode]['accuracy']:.1f}%" for mode in ("constrained", "generate")
               if isinstance(res.get(mode), dict) and "accuracy" in res[mode]]
    return ", ".join(figures) or f"{res.get('n', '?')} examples"


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
