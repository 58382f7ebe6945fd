"""`vlmfit eval` and `vlmfit predict` as Python functions: the CLI's own code path (the CLI prints what these
return). `vlmfit.evaluate(...)` and `vlmfit.predict(...)` call them."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from vlmfit.errors import UserError


def evaluate(target: str | Path, overrides: list[str] | None = None, *, use_cache: bool = True,
             console: Console | None = None) -> dict:
    """Evaluate `target` (a run directory: its trained weights; a recipe: its base model; a model directory, e.g. an
    export) on its test split, as the recipe's eval section says; returns the results (accuracy with intervals per
    mode, the task's metrics). `overrides`: ["eval.modes=[generate]", ...]. Cached under $VLMFIT_CACHE."""
    from vlmfit.evaluate.eval import evaluate_target

    result, _ = evaluate_target(str(target), overrides, console or Console(quiet=True), use_cache=use_cache)
    return result


def predict(target: str | Path, images: list[str | Path] | None = None, *, data: str | None = None,
            prompt: str | None = None, split: str = "test", limit: int | None = None, task: str | None = None,
            max_new_tokens: int = 64, batch_size: int = 8, fps: float = 2.0, max_frames: int = 32,
            out: str | Path | None = None, console: Console | None = None) -> list[dict]:
    """Greedy answers of `target` (a model, a run directory, a checkpoint or an export) to image or video files, or
    to the rows of a data source (`data`, with its own questions); one dict per input with its "answer"."""
    from vlmfit.evaluate.predict import predict as run_predict

    files = [Path(p) for p in images or []]
    if fps <= 0 or max_frames < 1:
        raise UserError("--fps must be positive and --max-frames at least 1", where="--fps" if fps <= 0 else "--max-frames")
    return run_predict(str(target), files, data, prompt, Path(out) if out else None, max_new_tokens, batch_size, split,
                       limit, console or Console(quiet=True), task, fps, max_frames)

