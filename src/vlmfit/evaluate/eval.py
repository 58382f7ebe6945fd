"""`vlmfit eval`: evaluate a run directory's trained weights (or prompt), the base model of a recipe, or a model
directory (an exported one) on the test split; a run directory gets the result as a timestamped eval_*.json.
Results are cached per weights + processor + data + settings (+ vlmfit's code and the library versions), so an
unchanged rerun is instant."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rich.console import Console

from vlmfit import cache
from vlmfit.chat.collate import VisionChatCollator
from vlmfit.config import load_config
from vlmfit.data.splits import load_splits
from vlmfit.errors import UserError
from vlmfit.evaluate.classification import evaluate_task
from vlmfit.models.load import check_model, is_dual_encoder, load_dual_encoder, load_for
from vlmfit.rundir import RunDir


EVAL_FORMAT = 2  # bump when what a cached result holds changes (2: the key's parts kept beside the result)
# Stat'd (size, mtime_ns): weights are large and rewritten whole. Every other file of a model or run directory (the
# tokenizer, processor, chat template, configs: small, and edited in place) is keyed by its content.
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_PART_NAMES = {"format": "the cache format", "weights": "the weights or processor", "data": "the data",
               "settings": "the settings", "code": "vlmfit's code", "libraries": "the library versions"}


def _files_state(path: Path) -> list:
    """Every file at or under `path` (evaluation results aside) with its state: weights by size and mtime, the rest
    by content."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and not RunDir.is_record(f.name))
    hashed = [f.suffix not in _WEIGHTS and f.stat().st_size <= 64 << 20 for f in files]
    return [(str(f.relative_to(path)) if f != path else f.name, cache.file_digest(f) if h else cache.file_stat(f))
            for f, h in zip(files, hashed)]


def result_parts(cfg, run: RunDir | None) -> dict:
    """What an evaluation result depends on, by part: the weights and processor (a run's saved ones, and the model
    directory or hub id and revision), the data (what preparing it reads), every setting but the output's, vlmfit's
    code (its family facts, labels and metrics) and the versions of the libraries that encode."""
    from vlmfit.data.prepare import source_state
    from vlmfit.models.load import resolve_reference

    ref = Path(resolve_reference(cfg.model.name))
    weights = [_files_state(ref) if ref.is_dir() else [cfg.model.name, cfg.model.revision]]  # the (base) model
    if run is not None:  # what the run trained, and the processor it saved
        kind = run.trained_kind()
        weights += [_files_state(run.weights_path(kind)) if kind else None,
                    _files_state(p) if (p := run.processor_path()) else None]
    return {"format": EVAL_FORMAT, "weights": weights, "data": [cfg.data.source, source_state(cfg.data)],
            "settings": cfg.model_dump(mode="json", exclude={"output"}), "code": cache.code_fingerprint(),
            "libraries": cache.library_versions()}


def _digest(value) -> str:
    """The cache key of an evaluation (of its result_parts), and of each part."""
    return hashlib.blake2b(json.dumps(value, default=str).encode(), digest_size=20).hexdigest()


def _target(cfg, run: RunDir | None) -> str:
    """What is evaluated, for saying why a result is not cached: the run directory, or the model."""
    return str(run.path.resolve()) if run is not None else cfg.model.name


def cache_status(cfg, run: RunDir | None = None) -> str:
    """Whether `vlmfit eval` of this run (or of the recipe's base model) would reuse a cached result, and why not:
    the parts that differ from the newest cached evaluation of the same target."""
    parts = result_parts(cfg, run)
    if (cache.cache_dir("evals") / f"{_digest(parts)}.json").is_file():
        return "hit — the same weights, processor, data, settings, code and libraries were evaluated before"
    target, newest = _target(cfg, run), None
    for path in sorted(cache.cache_dir("evals").glob("*.json"), key=lambda p: p.stat().st_mtime_ns):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # torn, or gone meanwhile
        if isinstance(doc, dict) and doc.get("format") == EVAL_FORMAT and doc["target"] == target:
            newest = doc
    if newest is None:
        return f"miss — {target} was never evaluated"
    changed = [_PART_NAMES[k] for k, v in parts.items() if newest["parts"][k] != _digest(v)]
    return f"miss — {', '.join(changed)} changed since the last evaluation of {target}"


def evaluate_target(target: str, overrides: list[str] | None, console: Console, use_cache: bool = True) -> tuple[dict, Path | None]:
    path = Path(target)
    model_dir = path.is_dir() and (path / "config.json").is_file() and not RunDir.is_run_dir(path)
    if model_dir:  # an HF-format model directory (e.g. from `vlmfit export`): scored on data.source (--set)
        run, cfg = None, load_config(base={"model": {"name": str(path)}}, overrides=overrides)
    else:  # a directory must be a run directory; a file is a recipe
        run = RunDir.open(path) if path.is_dir() else None
        cfg = run.config(overrides) if run else load_config(path, overrides)
    _, model_type = check_model(cfg.model.name, cfg.model.revision, chat=False, trust_remote_code=cfg.model.trust_remote_code)  # before any data is loaded
    parts = result_parts(cfg, run)
    cached = cache.cache_dir("evals") / f"{_digest(parts)}.json"
    if use_cache and cached.is_file():
        res = json.loads(cached.read_text())["result"]
        console.print(f"cached result ({cached}; the same weights, data and settings): {_headline(res)}; "
                      "--no-cache computes it again")
    else:
        res = evaluate_prompt(cfg, run, console) if is_dual_encoder(model_type) else evaluate_chat(cfg, run, console)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        doc = {"format": EVAL_FORMAT, "target": _target(cfg, run), "parts": {k: _digest(v) for k, v in parts.items()},
               "result": res}
        tmp.write_text(json.dumps(doc, default=str))
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
        loaded = load_for(cfg)
        model, processor, family = loaded.model, loaded.processor, loaded.family
    collator = VisionChatCollator(processor, family, loss_on=cfg.train.loss_on)
    splits = load_splits(cfg)
    return evaluate_task(model, collator, splits.test, splits.labels, cfg.eval, console,
                         "of " + (str(run.path) if run else cfg.model.name), cfg.data.task)
