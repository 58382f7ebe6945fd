"""The `vlmfit launch` verb: check the recipe and the strategy here, then run it on this machine (torchrun), write
and submit an sbatch script (--slurm), or build the job-service command (--hf-jobs). `--dry-run` prints what would
run and starts nothing."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from vlmfit.config import RunConfig, load_config
from vlmfit.errors import UserError
from vlmfit.launch.jobs import HfJob, gpus_of, hf_jobs_command, job_script, remote_refusal, shell
from vlmfit.launch.local import Launch, check, check_resume, run_local, torchrun_argv, train_args
from vlmfit.launch.slurm import SlurmJob, sbatch_script, submit
from vlmfit.rundir import RunDir


def resolve(launch: Launch, recipe_path: Path | None) -> RunConfig:
    """The recipe as every rank will read it (its overrides and the strategy applied)."""
    if launch.resume is not None:
        if recipe_path is not None or launch.overrides or launch.strategy:
            raise UserError("--resume continues a run with its own recipe and strategy (config.yaml in the run directory)",
                            where="--resume", hint=f"run `vlmfit launch --resume {launch.resume} --nproc N` alone")
        return RunDir.open(launch.resume, where="--resume").config()
    if recipe_path is None:
        raise UserError("Missing argument 'RECIPE'", where="vlmfit launch",
                        hint="give a recipe (`vlmfit launch recipes/demo.yaml --nproc 2`) or a run to continue (--resume RUN_DIR)")
    extra = [f"launch.strategy={launch.strategy}"] if launch.strategy else []
    return load_config(recipe_path, [*launch.overrides, *extra])


def named(launch: Launch, cfg: RunConfig) -> tuple[Launch, RunConfig]:
    """A fixed run name, for scripts that run later elsewhere and must say where their run goes."""
    if launch.resume is not None or cfg.output.name is not None:
        return launch, cfg
    name = RunDir.default_name(cfg)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"name": name})})
    return replace(launch, overrides=(*launch.overrides, f"output.name={name}")), cfg


def launch_command(launch: Launch, recipe_path: Path | None, console: Console, *, dry_run: bool = False,
                   slurm: SlurmJob | None = None, hf_job: HfJob | None = None) -> int:
    cfg = resolve(launch, recipe_path)
    world = slurm.nodes * slurm.gpus_per_node if slurm else gpus_of(hf_job.flavor) if hf_job else launch.world
    check(launch, cfg.method, cfg.launch.strategy)
    if slurm is not None and hf_job is not None:
        raise UserError("--slurm and --hf-jobs are two places to run; pick one", where="vlmfit launch")
    if launch.resume is not None:
        check_resume(launch.resume, world)
    recipe = str(Path(recipe_path).resolve()) if recipe_path is not None else None
    # every rank gets the resolved strategy (train_args); a resumed run has its own in config.yaml
    launch = replace(launch, recipe=recipe, strategy=None if launch.resume is not None else cfg.launch.strategy)
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world
    procs = f"{world} process{'es' if world > 1 else ''}"
    console.print(f"strategy [bold]{cfg.launch.strategy}[/], {procs}; global batch {global_batch} "
                  f"(per device {cfg.train.batch_size} x accumulation {cfg.train.grad_accum} x {procs})")

    if slurm is not None:
        launch, cfg = named(launch, cfg)
        script = sbatch_script(replace(slurm, train_args=tuple(train_args(launch)), name=slurm.name or f"vlmfit-{cfg.output.name}"))
        if dry_run:
            print(script, end="")
            return 0
        path = Path(cfg.output.dir) / f"{cfg.output.name}.sbatch"
        console.print(f"{submit(script, path)} (script: {path}; run directory: {Path(cfg.output.dir) / cfg.output.name})")
        return 0

    if hf_job is not None:
        if launch.resume is not None:
            raise UserError("a job's machine starts empty: it cannot resume a local run directory", where="--hf-jobs",
                            hint="resume locally (vlmfit launch --resume RUN_DIR) or start a new job")
        why = remote_refusal(cfg)
        if why:
            raise UserError(why, where="--hf-jobs")
        launch, cfg = named(launch, cfg)
        script = job_script(cfg, hf_job, world)
        path = Path(cfg.output.dir) / f"{cfg.output.name}.hfjob.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        argv = hf_jobs_command(hf_job, path)
        console.print(f"job script: {path} (the recipe inside; the run directory goes to "
                      f"https://huggingface.co/{hf_job.push_to}/tree/main/{cfg.output.name})")
        if dry_run:
            print(shell(argv))
            return 0
        if shutil.which("hf") is None:
            raise UserError("the `hf` command is not installed here", where="--hf-jobs",
                            hint=f"`pip install -U huggingface_hub`, log in (`hf auth login`), then run: {shell(argv)}")
        return subprocess.call(argv)

    if dry_run:
        print(shell(torchrun_argv(launch)))
        return 0
    return run_local(launch, cfg.launch.strategy, console)
