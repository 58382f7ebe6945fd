"""The lifecycle every recipe shares (sft, dpo, zo), with no Trainer in it. start: rank roles, the seed, one run
name for every rank, the model checked, the resume point checked, the disk checked, then the run directory opened
or resumed; signals caught for a clean stop; finish: the summary, plots, report.md, report.html and the final line.
A recipe reads as: `life = begin(...)`, `life.check()`, data and model, `run = life.open(...)`, train, `life.finish(...)`."""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from transformers import set_seed

from vlmfit.config import RunConfig
from vlmfit.errors import UserError
from vlmfit.launch.ranks import broadcast, is_main, world_size
from vlmfit.models.load import check_model
from vlmfit.report import plot_loss, write_html, write_report
from vlmfit.rundir import ENVIRONMENT, LORA_TARGETS, SUMMARY, RunDir, RunSummary, environment
from vlmfit.train.tracking import require_trackers


@dataclass
class Lifecycle:
    """One run from start to finish: the config every rank uses, the console (quiet off rank 0), the run being
    resumed (if any) and its checkpoint, and the run directory once opened."""

    cfg: RunConfig
    console: Console
    resume: RunDir | None = None
    point: tuple[int, Path] | None = None  # (step, checkpoint) to continue from, set by check()
    run: RunDir | None = None

    def check(self, chat: bool = True) -> None:
        """Before any data or weights: the model exists (a wrong name fails here), the trackers are installed, and
        a resumed run can continue exactly (incomplete checkpoints removed, later metrics dropped)."""
        m = self.cfg.model
        check_model(m.name, m.revision, chat=chat, trust_remote_code=m.trust_remote_code)
        require_trackers(self.cfg)
        self.point = resume_point(self.resume) if self.resume is not None else None

    @property
    def checkpoint(self) -> Path | None:
        return self.point[1] if self.point else None

    @property
    def resumed_from(self) -> list[int] | None:
        return [self.point[0]] if self.point else None

    def open(self, overwrite: bool, loaded=None, at: str = "") -> RunDir:
        """The run directory, only once every check has passed: `resume`'s, or a new one made by rank 0 alone (the
        other ranks open it; called under ranks.main_first, so rank 0 has made it by then). With `loaded` (a Trainer
        run), first refuse a disk that cannot hold a checkpoint. `at`: how to say the resume point (default: step)."""
        if loaded is not None:
            require_disk_for_checkpoints(loaded, self.cfg, self.resume.path if self.resume else self.cfg.output.dir)
        if self.resume is not None:
            self.run = self.resume
        elif is_main():
            self.run = RunDir.create(self.cfg, overwrite)
        else:
            self.run = RunDir.open(RunDir.path_for(self.cfg))
        where = (at or f"from step {self.point[0]}") if self.point else ""
        self.console.print(f"[bold]run directory[/] {self.run.path}" + (f" (resuming {where})" if where else ""))
        return self.run

    def finish(self, summary: RunSummary, test_ds=None) -> Path:
        """Rank 0, after training: summary.json, the loss plot, report.md and report.html, and the final line."""
        run = self.run
        run.write_summary(summary)
        plot_loss(run)
        write_report(run)
        write_html(run, test_ds)
        self.console.print(f"[green]done[/]: {run.path}")
        return run.path


def begin(cfg: RunConfig, console: Console | None = None, resume: RunDir | None = None) -> Lifecycle:
    """The start every recipe shares: rank 0 speaks for a launched run, the seed is set, every rank uses one name."""
    console = rank_console(console or Console())
    set_seed(cfg.train.seed)
    return Lifecycle(shared_run_name(cfg), console, resume)


class Stopped(UserError):
    """The run stopped before its end (signal, divergence, full disk) with a resumable checkpoint: not a traceback,
    and an exit code of its own (3; 128 + the signal for a signal)."""

    exit_code = 3

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None, exit_code: int = 3):
        super().__init__(what, where=where, hint=hint)
        self.exit_code = exit_code


class SignalCatcher:
    """SIGINT / SIGTERM while installed: remembered (the loop then finishes its step, checkpoints and stops); a second
    SIGINT stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> None:
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: no handlers, the default behaviour stays
            self._previous = {}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def stopped(self, run: RunDir, after: str) -> Stopped:
        name = signal.Signals(self.signum).name
        return Stopped(f"stopped by {name} after {after}; checkpoint written", where=str(run.path),
                       hint=resume_hint(run), exit_code=128 + self.signum)


def rank_console(console: Console) -> Console:
    """The console on rank 0; on the other ranks of a launch one that prints nothing (rank 0 speaks for the run)."""
    return console if is_main() else Console(quiet=True)


def shared_run_name(cfg: RunConfig) -> RunConfig:
    """Launched: every rank uses rank 0's run directory name (the default name carries a timestamp)."""
    if world_size() == 1 or cfg.output.name is not None:
        return cfg
    name = broadcast(RunDir.default_name(cfg))
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"name": name})})


def resume_hint(run: RunDir, before: str = "") -> str:
    done = run.complete_checkpoints()
    if not done:
        return f"{before} no complete checkpoint yet: start the run again".strip()
    return f"{before} resume from {done[-1][1].name}: vlmfit train --resume {run.path}".strip()


# Packages whose versions must match for a resume to continue exactly (kernels, optimizer and checkpoint formats).
RESUME_PACKAGES = ("vlmfit", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes")


def resume_point(run: RunDir):
    """The checkpoint to resume `run` from, after checking that resuming is safe here; incomplete checkpoints
    (killed mid-write) are removed, and metrics after the checkpoint dropped (those steps run again)."""
    if run.read_json(SUMMARY) is not None:
        raise UserError("this run finished; there is nothing to resume", where=str(run.path),
                        hint="start a new run (another output.name), or evaluate / export this one")
    then = (run.read_json(ENVIRONMENT) or {}).get("packages", {})
    now = environment()["packages"]
    changed = [f"{p} {then.get(p)} -> {now.get(p)}" for p in RESUME_PACKAGES if then.get(p) != now.get(p)]
    if changed:
        raise UserError(f"the run was written with other package versions ({'; '.join(changed)}); a resume would not "
                        "continue exactly", where=str(run.path),
                        hint=f"install the run's versions (see {ENVIRONMENT}) to resume, or start a new run")
    dropped = run.drop_incomplete_checkpoints()
    done = run.complete_checkpoints()
    if not done:
        raise UserError("the run has no complete checkpoint to resume from" + (f" ({', '.join(dropped)} was incomplete)" if dropped else ""),
                        where=str(run.path), hint="it stopped before its first checkpoint (train.save_steps): start it again")
    step, path = done[-1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    saved_world = run.checkpoint_info(path).get("world_size", 1)
    if saved_world != world:
        raise UserError(f"the checkpoint was written by {saved_world} processes, this is {world}: the data order and "
                        "the optimizer shards would not continue exactly", where=str(path),
                        hint=f"resume with {saved_world} processes (vlmfit launch --nproc {saved_world})")
    run.truncate_metrics(step)
    return step, path


def require_disk_for_checkpoints(loaded, cfg: RunConfig, where) -> None:
    """Refuse before the run directory is made when its disk cannot hold a checkpoint (the Trainer writes a new one
    before it deletes the oldest): weights or adapter plus the optimizer state of every trained value."""
    from peft import PeftModel

    from vlmfit.models.targets import resolve_for

    model = loaded.model
    states = {"sgd": 4, "adamw": 8}.get(cfg.train.optim, 2)  # bytes of optimizer state per trained value
    if cfg.full_weights:
        trained = sum(p.numel() for p in model.parameters())
        need = sum(p.numel() * p.element_size() for p in model.parameters()) + trained * states
    elif isinstance(model, PeftModel):  # DPO continuing an earlier run's adapter: what it trains is there already
        need = sum(p.numel() for p in model.parameters() if p.requires_grad) * (4 + states)
    else:
        resolved = resolve_for(model, loaded.family, cfg.lora)
        modules = dict(model.named_modules())
        trained = sum(cfg.lora.r * (modules[m].in_features + modules[m].out_features) for m in resolved.modules
                      if hasattr(modules[m], "in_features"))
        trained += sum(p.numel() for m in resolved.fully_trained for p in modules[m].parameters())
        need = trained * (4 + states)
    path = Path(where)
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < 1.2 * need:
        raise UserError(f"{_size(free)} free on the disk of {where}, and a checkpoint needs about {_size(need)}",
                        where="output.dir", hint="free space, or put output.dir on a larger disk")


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def report_targets(resolved, console: Console, run: RunDir | None) -> None:
    """The LoRA targets table, what was skipped and why, and lora_targets.json in the run."""
    console.print(resolved.table())
    for note in resolved.skipped:
        console.print(f"[yellow]skipped[/] {note}")
    if run is not None:
        run.write_json(LORA_TARGETS, resolved.as_dict())


NOT_SAVED = "not saved (output.save_model: false)"


def save_trained(model, processor, cfg: RunConfig, run: RunDir, adapters: list[str] | None = None) -> str:
    """What a Trainer run (sft, dpo) trained, as the recipe says: full weights (cfg.full_weights) or the adapter
    (`adapters`: which; DPO leaves out TRL's frozen 'ref' copy), with the processor; in words, for the summary."""
    if not cfg.output.save_model:
        run.save_processor(processor)
        return NOT_SAVED
    return run.save_trained(model, processor, "model" if cfg.full_weights else "adapter", adapters)


def param_counts(model) -> dict:
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters())}


def final_loss(run: RunDir) -> float:
    losses = [r["loss"] for r in run.metrics() if "loss" in r]
    return losses[-1] if losses else float("nan")
