"""The Trainer callbacks of vlmfit's TRL-based recipes (sft, dpo): progress and metrics.jsonl, checkpoint completion
markers, clean stops on a signal, the divergence guard, and evaluation during training. Each reads and writes the
run directory only through RunDir."""

from __future__ import annotations

import math

from transformers import TrainerCallback

from vlmfit.config import RunConfig
from vlmfit.launch.ranks import barrier, is_main
from vlmfit.rundir import RunDir
from vlmfit.train.run import SignalCatcher


class DivergenceGuard(TrainerCallback):
    """A non-finite gradient norm (a NaN or inf loss makes one) or one above train.divergence_grad_norm: the step's
    gradients are dropped so the optimizer leaves the weights as they were, the step, its norm and its batch's source
    rows go to metrics.jsonl, and with train.on_divergence: stop the run ends there, without a checkpoint of that step."""

    def __init__(self, cfg: RunConfig, run: RunDir):
        self.action, self.limit, self.run = cfg.train.on_divergence, cfg.train.divergence_grad_norm, run
        self.rows: list[int] = []  # the current optimizer step's source rows (all its micro-batches)
        self.events: list[dict] = []
        self.stopped: dict | None = None

    def check(self, trainer, model, norm) -> None:
        rows, self.rows = self.rows, []
        value = float(norm) if norm is not None else math.nan
        if math.isfinite(value) and (self.limit is None or value <= self.limit):
            return
        for p in model.parameters():
            p.grad = None  # torch's and bitsandbytes' optimizers skip a parameter without a gradient
        step = trainer.state.global_step + 1
        event = {"step": step, "grad_norm": value if math.isfinite(value) else str(value), "action": self.action,
                 "rows": rows}
        self.events.append(event)
        if is_main():  # the norm is the global one: every rank drops the same step
            self.run.log_metrics({"step": step, "divergence": event})
        if self.action == "stop":
            self.stopped = event
            trainer.control.should_training_stop = True

    def on_step_end(self, args, state, control, **kw):
        if self.stopped is not None and self.stopped["step"] == state.global_step:
            control.should_save = False  # the last good checkpoint is the one before

    @staticmethod
    def describe(event: dict) -> str:
        return f"step {event['step']}: gradient norm {event['grad_norm']} on source rows {event['rows']}"


class Checkpoints(TrainerCallback):
    """After each checkpoint the Trainer writes: the recipe beside it, the completion marker, and the oldest complete
    ones beyond train.save_total_limit removed (RunDir's rule; the Trainer's own rotation is off)."""

    def __init__(self, run: RunDir, keep: int):
        self.run, self.keep = run, keep

    def on_save(self, args, state, control, **kw):
        barrier()  # launched: every rank has written its part (its RNG state, its optimizer shard) before the marker
        if args.should_save:  # rank 0
            self.run.complete_checkpoint(state.global_step, {"world_size": args.world_size, "epoch": state.epoch},
                                         keep=self.keep)


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM during training (run.SignalCatcher): finish the current step, write a checkpoint, stop."""

    def __init__(self):
        self.catcher = SignalCatcher()
        self.step: int | None = None

    @property
    def signum(self) -> int | None:
        return self.catcher.signum

    def on_train_begin(self, args, state, control, **kw):
        self.catcher.install()

    def on_step_end(self, args, state, control, **kw):
        if self.catcher.signum is not None:
            self.step = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kw):
        self.catcher.restore()


def headline(result: dict, task: str | None) -> tuple[str, float]:
    """The one figure a run's evaluations are ranked by: constrained accuracy with a label set, else the task's own
    metric of the generated answers (CIDEr-D for captions, VQA accuracy, ChartQA-style relaxed accuracy ...)."""
    if "constrained" in result:
        return "constrained accuracy", result["constrained"]["accuracy"]
    metrics = result["generate"]["metrics"]
    for name in {"caption": ("cider_d",), "vqa": ("vqa_accuracy",)}.get(task or "", ()) + ("exact_match",):
        if name in metrics:
            return name, metrics[name]["value"]
    return "generate accuracy", result["generate"]["accuracy"]


class EvalDuring(TrainerCallback):
    """eval.every_steps: the task evaluation on the validation split every N optimizer steps (rank 0; the other
    ranks wait), each in metrics.jsonl ({"step", "eval": {metric: value}}), and the best step so far. A resumed
    run continues from the evaluations its metrics kept."""

    def __init__(self, every: int, run: RunDir, evaluate, task: str | None):
        self.every, self.run, self.evaluate, self.task = every, run, evaluate, task
        self.history = [r for r in run.metrics() if "eval" in r]

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every:
            return
        if is_main():
            name, value = headline(self.evaluate(model), self.task)
            record = {"step": state.global_step, "eval": {name: value}}
            self.history.append(record)
            self.run.log_metrics(record)
        barrier()

    def best(self) -> dict | None:
        if not self.history:
            return None
        top = max(self.history, key=lambda r: (next(iter(r["eval"].values())), -r["step"]))  # the earliest of ties
        (name, value), = top["eval"].items()
        return {"step": top["step"], "metric": name, "value": value, "evaluations": len(self.history)}


class RichProgress(TrainerCallback):
    """Progress bar (step, loss, ETA) and metrics.jsonl, one record per logging step."""

    def __init__(self, run: RunDir):
        self.run, self.progress, self.task, self.loss = run, None, None, math.nan

    def on_train_begin(self, args, state, control, **kw):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, loss=math.nan)

    def on_step_end(self, args, state, control, **kw):
        self.progress.update(self.task, completed=state.global_step, loss=self.loss)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        if "loss" in logs or "train_loss" in logs:
            self.loss = logs.get("loss", logs.get("train_loss"))
        self.run.log_metrics({"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs})

    def on_train_end(self, args, state, control, **kw):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step, loss=self.loss)
            self.progress.stop()


def standard(run: RunDir, guard: DivergenceGuard, keep: int) -> list:
    """The callbacks every TRL-based run has (the progress bar on rank 0 only)."""
    return ([RichProgress(run)] if is_main() else []) + [Checkpoints(run, keep), guard, StopOnSignal()]
