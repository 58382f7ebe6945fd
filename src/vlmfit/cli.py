"""The `vlmfit` command: a thin typer shell over the Python API (parse, call, print)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlmfit.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune vision-language models on your own data, on the hardware you have.")
console = Console()
err_console = Console(stderr=True)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")]


def _recipe_path(name: str) -> Path:
    from vlmfit.config import recipe_path

    return recipe_path(name)


@app.command()
def train(recipe: Annotated[Optional[str], typer.Argument(help="YAML recipe (path, or the name of a shipped recipe)")] = None,
          set: SetOpt = None,
          resume: Annotated[Optional[Path], typer.Option("--resume", help="continue this run directory from its last complete checkpoint")] = None,
          overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run directory of the same name")] = False,
          force: Annotated[bool, typer.Option("--force", help="train even if the memory plan predicts it will not fit")] = False,
          profile: Annotated[bool, typer.Option("--profile", help="time each step's parts (data, vision, language, loss, optimizer); supervised recipes")] = False):
    """Fine-tune a model as the recipe says (or continue a run with --resume); writes a run directory."""
    from vlmfit.train.api import train as train_recipe

    train_recipe(recipe, set, resume=resume, overwrite=overwrite, force=force, profile=profile, console=console)


@app.command()
def launch(recipe: Annotated[Optional[str], typer.Argument(help="YAML recipe (path, or the name of a shipped recipe)")] = None,
           nproc: Annotated[int, typer.Option(help="processes on this machine (one per GPU)")] = 1,
           nnodes: Annotated[int, typer.Option(help="machines in the launch (run the same command on each)")] = 1,
           node_rank: Annotated[int, typer.Option(help="this machine's index, 0..nnodes-1")] = 0,
           master: Annotated[Optional[str], typer.Option(help="ADDR:PORT of machine 0 (several machines)")] = None,
           strategy: Annotated[Optional[str], typer.Option(help="ddp | fsdp | zero2 | zero3 (default: the recipe's launch.strategy)")] = None,
           set: SetOpt = None,
           resume: Annotated[Optional[Path], typer.Option("--resume", help="continue this launched run (same process count)")] = None,
           overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run directory of the same name")] = False,
           force: Annotated[bool, typer.Option("--force", help="train even if the memory plan predicts it will not fit")] = False,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would run (command, sbatch script, job) and start nothing")] = False,
           slurm: Annotated[bool, typer.Option("--slurm", help="write an sbatch script (srun + torchrun) and submit it")] = False,
           nodes: Annotated[int, typer.Option(help="--slurm: nodes")] = 1,
           gpus_per_node: Annotated[int, typer.Option(help="--slurm: GPUs (processes) per node")] = 1,
           partition: Annotated[Optional[str], typer.Option(help="--slurm: partition")] = None,
           account: Annotated[Optional[str], typer.Option(help="--slurm: account")] = None,
           cpus_per_task: Annotated[Optional[int], typer.Option(help="--slurm: CPUs per node task")] = None,
           hf_jobs: Annotated[bool, typer.Option("--hf-jobs", help="run as a Hugging Face job (hf jobs uv run)")] = False,
           flavor: Annotated[str, typer.Option(help="--hf-jobs: hardware flavor (hf jobs hardware)")] = "a100-large",
           push_to: Annotated[Optional[str], typer.Option(help="--hf-jobs: hub repository that receives the run directory")] = None,
           secret: Annotated[Optional[list[str]], typer.Option("--secret", help="--hf-jobs: a secret's NAME to pass (repeatable; HF_TOKEN always)")] = None,
           package: Annotated[str, typer.Option(help="--hf-jobs: what the job installs (e.g. vlmfit==0.5 or a git URL)")] = "vlmfit",
           timeout: Annotated[Optional[str], typer.Option(help="--slurm / --hf-jobs: time limit, e.g. 2h")] = None):
    """Train a recipe on several processes, machines, a Slurm cluster or a job service (torchrun underneath)."""
    from vlmfit.launch.command import launch_command
    from vlmfit.launch.jobs import HfJob
    from vlmfit.launch.local import Launch
    from vlmfit.launch.slurm import SlurmJob

    plan = Launch(recipe=None, overrides=tuple(set or ()), strategy=strategy, nproc=nproc, nnodes=nnodes,
                  node_rank=node_rank, master=master, resume=str(resume) if resume is not None else None,
                  overwrite=overwrite, force=force)
    job = None
    if hf_jobs:
        if push_to is None:
            raise UserError("--hf-jobs needs --push-to: a job's disk is gone when it ends, so the run directory is "
                            "uploaded to a hub repository", where="--push-to", hint="e.g. --push-to my-user/vlmfit-runs")
        job = HfJob(flavor=flavor, push_to=push_to, timeout=timeout, package=package,
                    secrets=tuple(dict.fromkeys(["HF_TOKEN", *(secret or [])])))
    cluster = SlurmJob(name="", nodes=nodes, gpus_per_node=gpus_per_node, train_args=(), time=timeout,
                       partition=partition, account=account, cpus_per_task=cpus_per_task) if slurm else None
    code = launch_command(plan, _recipe_path(recipe) if recipe else None, console, dry_run=dry_run, slurm=cluster,
                          hf_job=job)
    if code:
        raise typer.Exit(code)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]):
    """Rebuild a finished run's report.md, report.html and loss plot from its run directory."""
    from vlmfit.report import plot_loss, write_html, write_report
    from vlmfit.rundir import SUMMARY, RunDir

    run = RunDir.open(run_dir)
    if run.read_json(SUMMARY) is None:
        raise UserError("the run has not finished (no summary.json): there is nothing to report yet", where=str(run_dir),
                        hint=f"finish it (`vlmfit train --resume {run_dir}`), or evaluate a checkpoint with `vlmfit eval`")
    plot_loss(run)
    md = write_report(run)
    test = None
    try:  # the test images, for the examples that flipped; the report is written without them if the data moved
        from vlmfit.data.splits import load_splits

        cfg = run.config()
        test = load_splits(cfg).test if cfg.method != "dpo" else None
    except UserError as e:
        console.print(f"[yellow]note[/]: flipped examples without images ({e.what})")
    console.print(f"report: {md} and {write_html(run, test)}")


@app.command()
def compare(runs: Annotated[list[Path], typer.Argument(help="two or more run directories")],
            md: Annotated[bool, typer.Option("--md", help="print a Markdown table")] = False):
    """Finished runs side by side: model, method, steps, time, final loss, each metric before -> after."""
    from vlmfit.report import compare_table
    from vlmfit.rundir import SUMMARY, RunDir

    opened = []
    for path in runs:
        run = RunDir.open(path)
        if run.read_json(SUMMARY) is None:
            raise UserError("the run has not finished (no summary.json)", where=str(path), hint="compare finished runs")
        opened.append(run)
    cols, rows = compare_table(opened)
    if md:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    table = Table(title=f"{len(rows)} runs")
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*r)
    console.print(table)


@app.command()
def demo(out: Annotated[Path, typer.Option(help="where run directories go")] = Path("runs"), set: SetOpt = None):
    """Train the tiny Qwen2-VL on real handwritten digits from scratch (offline, CPU) and report accuracy."""
    from vlmfit.rundir import RunDir
    from vlmfit.train.api import train as train_recipe

    run = train_recipe("demo", [f"output.dir={out}", *(set or [])], console=console)
    run_dir = RunDir(run)
    cfg, (before, after) = run_dir.config(), run_dir.evals()
    table = Table(title="builtin:mnist test accuracy (tiny:qwen2_vl)")
    table.add_column("mode")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for mode in cfg.eval.modes:
        table.add_row(mode, f"{100 * before[mode]['accuracy']:.1f}%", f"{100 * after[mode]['accuracy']:.1f}%")
    console.print(table)
    console.print(f"run directory: {run} (report.md, loss.png, eval_*.json)")


@app.command()
def predict(target: Annotated[str, typer.Argument(help="a model (hub id, directory, tiny:<family>), a run directory or a checkpoint")],
            images: Annotated[Optional[list[Path]], typer.Argument(help="image or video files (videos by extension: .mp4, .mkv, .webm, ...)")] = None,
            more: Annotated[Optional[list[Path]], typer.Option("--images", help="image files (repeatable)")] = None,
            videos: Annotated[Optional[list[Path]], typer.Option("--videos", help="video files (repeatable)")] = None,
            fps: Annotated[float, typer.Option(help="videos: frames sampled per second")] = 2.0,
            max_frames: Annotated[int, typer.Option(help="videos: at most this many frames, spread over the clip")] = 32,
            data: Annotated[Optional[str], typer.Option("--data", help="a data source instead of images (its rows' own questions)")] = None,
            task: Annotated[Optional[str], typer.Option(help="with --data from a raw source: how to read it (as in prepare)")] = None,
            split: Annotated[str, typer.Option(help="with --data: the split")] = "test",
            limit: Annotated[Optional[int], typer.Option(help="with --data: at most this many rows")] = None,
            prompt: Annotated[Optional[str], typer.Option(help="the question (default for images: 'Describe this image.')")] = None,
            out: Annotated[Optional[Path], typer.Option(help="write the answers here as JSONL")] = None,
            max_new_tokens: Annotated[int, typer.Option(help="generation length limit")] = 64,
            batch_size: Annotated[int, typer.Option(help="examples per generate call")] = 8):
    """Generate answers (greedy) with a model, a run or an export, on your images or a data source."""
    from vlmfit.evaluate.api import predict as run_predict
    from vlmfit.evaluate.predict import is_video

    if bad := [str(p) for p in videos or [] if not is_video(p)]:
        raise UserError(f"--videos takes video files; {bad[0]} is not one (by its extension)", where="--videos",
                        hint="give .mp4, .mkv, .webm, .avi or .mov files, or pass images with --images")
    rows = run_predict(target, list(images or []) + list(more or []) + list(videos or []), data=data, prompt=prompt, out=out,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, split=split, limit=limit, console=console,
                       task=task, fps=fps, max_frames=max_frames)
    table = Table(title=f"{len(rows)} answers")
    for col in ("input", "answer") + (("reference",) if rows and "reference" in rows[0] else ()):
        table.add_column(col)
    for r in rows[:20]:
        table.add_row(r.get("image") or r.get("video") or f"row {r['row']}", r["answer"], *((r["reference"],) if "reference" in r else ()))
    console.print(table)
    if out is not None:
        console.print(f"written: {out}")


@app.command()
def export(run_dir: Annotated[Path, typer.Argument(help="a run directory written by `vlmfit train`")],
           out: Annotated[Path, typer.Option("--out", help="directory to write (new or empty)")],
           merge: Annotated[bool, typer.Option("--merge", help="merge a LoRA / QLoRA adapter into its base (else: the adapter directory)")] = False,
           dtype: Annotated[str, typer.Option(help="bf16 | fp16 | fp32")] = "bf16",
           push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="upload to this hub repo (owner/name); token from HF_TOKEN")] = None,
           private: Annotated[bool, typer.Option("--private", help="create the hub repo private")] = False,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="with --push-to-hub: list what would be uploaded, upload nothing")] = False):
    """Export a run: a merged model (or the adapter) with processor and model card, that loads in plain transformers."""
    from vlmfit.export import export_run, push

    if dry_run and not push_to_hub:
        raise UserError("--dry-run describes an upload; it needs --push-to-hub REPO_ID", where="--dry-run")
    if push_to_hub is not None and push_to_hub.count("/") != 1:
        raise UserError(f"'{push_to_hub}' is not a hub repo id", where="--push-to-hub", hint="owner/name, e.g. me/qwen2-vl-charts")
    exported = export_run(run_dir, out, merge=merge, dtype=dtype, command=" ".join(["vlmfit", *sys.argv[1:]]))
    console.print(f"[green]exported[/] {exported.kind} model ({len(exported.files)} files) to {exported.path}")
    if push_to_hub:
        for line in push(exported, push_to_hub, private, dry_run):
            console.print(line, highlight=False)


@app.command()
def serve(target: Annotated[str, typer.Argument(help="a run directory, an export / model directory, tiny:<family> or a hub id")],
          host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
          backend: Annotated[str, typer.Option(help="transformers (transformers serve; CPU or GPU) | vllm (vllm serve; GPU)")] = "transformers",
          dtype: Annotated[str, typer.Option(help="auto | bfloat16 | float16 | float32")] = "auto",
          device: Annotated[str, typer.Option(help="transformers backend: auto | cpu | cuda:0 ...")] = "auto",
          dry_run: Annotated[bool, typer.Option("--dry-run", help="print the server command and what to send, start nothing")] = False):
    """Serve a model behind an OpenAI-compatible endpoint (transformers serve or vllm serve), with the run's settings."""
    import os

    from vlmfit.serve import plan_serve

    served = plan_serve(target, host=host, port=port, backend=backend, dtype=dtype, device=device)
    for note in served.notes:
        console.print(note)
    # unwrapped: a client copies them as they are
    console.print(f"base URL: [bold]{served.url}[/]   model: [bold]{served.model}[/]", highlight=False, soft_wrap=True)
    console.print("command: " + " ".join(served.command), highlight=False, markup=False, soft_wrap=True)
    if dry_run:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(served.command[0], served.command)  # the server is the process from here: signals reach it directly


@app.command("eval")
def eval_(target: Annotated[str, typer.Argument(help="a run directory (its trained weights), a recipe (its base model) or a model directory (e.g. exported)")],
          set: SetOpt = None,
          no_cache: Annotated[bool, typer.Option("--no-cache", help="compute again even if this model, data and settings were evaluated before")] = False):
    """Evaluate classification accuracy (constrained and generated) on the test split."""
    from vlmfit.evaluate.eval import evaluate_target

    res, written = evaluate_target(target, set, console, use_cache=not no_cache)
    if written:
        console.print(f"written: {written}")


@app.command()
def prepare(source: Annotated[str, typer.Argument(help="file (jsonl/json/csv/parquet), image folder, save_to_disk dir, Parquet shards, hub id")],
            task: Annotated[str, typer.Option(help="classification | vqa | caption | chat | preference")] = "classification",
            out: Annotated[Optional[Path], typer.Option(help="output directory (default prepared/<source>-<task>)")] = None,
            strict: Annotated[bool, typer.Option(help="fail on the first bad row instead of skipping and reporting it")] = False,
            model: Annotated[Optional[str], typer.Option(help="report token lengths under this model's processor (e.g. tiny:qwen2_vl)")] = None,
            set: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="a data key, e.g. --set image_column=img (repeatable)")] = None):
    """Turn a dataset into vlmfit's canonical format with train/validation/test splits and a report."""
    from vlmfit.data.prepare import prepare_source

    report, out = prepare_source(source, task=task, out=out, strict=strict, model=model, settings=set)
    console.print((out / "prepare_report.md").read_text())
    console.print(f"[green]prepared[/] {report['kept']} of {report['input_rows']} rows into {out}")
    if report["empty_splits"]:
        console.print(f"[yellow]warning:[/] empty split: {', '.join(report['empty_splits'])}")


@app.command()
def doctor(recipe: Annotated[str, typer.Argument(help="YAML recipe (path, or the name of a shipped recipe)")], set: SetOpt = None,
           samples: Annotated[int, typer.Option(help="how many training examples to tokenize")] = 8,
           gpu: Annotated[Optional[str], typer.Option(help="budget to check the memory plan against (default: this "
                                                             "machine's GPU, if any): 14GiB or a card, e.g. a100-80gb")] = None,
           json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False):
    """Pre-flight a recipe without training: labels, image tokens, truncation, LoRA targets, known pitfalls, caches."""
    from vlmfit.config import load_config
    from vlmfit.doctor import print_report, run_doctor
    from vlmfit.evaluate.eval import cache_status

    cfg = load_config(_recipe_path(recipe), set)
    rep = run_doctor(cfg, samples)
    # doctor sits beside evaluate (neither imports the other): the evaluation cache is asked from here
    rep.add("evaluations", "ok", f"`vlmfit eval` of the recipe (its base model): {cache_status(cfg)}")
    rep.add(*_memory_check(cfg, gpu))
    if json_out:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        print_report(rep, console)
    if rep.failed:
        raise typer.Exit(1)


def _memory_check(cfg, gpu: str | None) -> tuple[str, str, str]:
    """doctor's memory line: the plan against --gpu or this machine's GPU, and each same-math option that would save
    memory when it does not fit. doctor sits beside memory (neither imports the other): asked from here."""
    import torch

    from vlmfit.memory.budget import GiB, parse_budget
    from vlmfit.memory.estimate import plan_memory, recipe_shape
    from vlmfit.memory.fit import memory_options

    if cfg.method == "zo":
        return "memory", "ok", "forward-only training: `vlmfit plan` gives its working set"
    budget = parse_budget(gpu) if gpu else (torch.cuda.get_device_properties(0).total_memory
                                            if torch.cuda.is_available() else None)
    try:
        shape = recipe_shape(cfg)
        bd = plan_memory(cfg, device="cuda", budget=budget, shape=shape)
    except UserError as e:  # the cause (e.g. LoRA targets that match nothing) has its own check above
        return "memory", "warn", f"not planned: {e.what}"
    host = f", {sum(bd.host.values()) / GiB:.2f} GiB in host memory" if bd.host else ""
    if budget is None:
        return "memory", "ok", f"planned peak {bd.peak / GiB:.2f} GiB on a CUDA GPU{host} (no GPU here: --gpu checks a budget)"
    head = f"planned peak {bd.peak / GiB:.2f} GiB against {budget / GiB:.2f} GiB: {bd.verdict}{host}"
    if bd.verdict == "fits":
        return "memory", "ok", head
    options = memory_options(shape, bd.inputs, cfg.model.name)
    hint = "; ".join(f"{label} saves {saved / GiB:.2f} GiB" for label, saved in options) or "no same-math option left"
    return "memory", "warn" if bd.verdict == "tight" else "fail", f"{head}. {hint}; `vlmfit plan --fit` searches all knobs"


@app.command()
def plan(recipe: Annotated[Optional[str], typer.Argument(help="YAML recipe; or omit it and give --model")] = None,
         model: Annotated[Optional[str], typer.Option(help="hub id, local dir, config.json or tiny:<family>")] = None,
         gpu: Annotated[Optional[str], typer.Option(help="budget: 14GiB, 16GB or a card: v100-16gb, a100-80gb, rtx6000-96gb ...")] = None,
         fit: Annotated[bool, typer.Option("--fit", help="search for the fastest configuration that fits --gpu and write it")] = False,
         out: Annotated[Optional[Path], typer.Option(help="where --fit writes the recipe")] = None,
         measure: Annotated[bool, typer.Option("--measure", help="run a few real steps and compare measured with predicted")] = False,
         gpus: Annotated[int, typer.Option(help="GPUs for per-GPU DDP / ZeRO-2 / ZeRO-3 / FSDP figures")] = 1,
         strategy: Annotated[Optional[str], typer.Option(help="ddp | zero2 | zero3 | fsdp")] = None,
         image_size: Annotated[Optional[str], typer.Option(help="image size to plan for, e.g. 1280x720")] = None,
         seq_len: Annotated[int, typer.Option(help="text tokens per example (besides image tokens)")] = 512,
         answer_tokens: Annotated[int, typer.Option(help="labelled (answer) tokens per example: what the loss runs over")] = 64,
         device: Annotated[str, typer.Option(help="cuda | cpu")] = "cuda",
         json_out: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
         set: SetOpt = None):
    """Plan training memory before a run: breakdown per component, verdict against a GPU budget, auto-fit."""
    from vlmfit.memory.plan import plan_command

    code = plan_command(_recipe_path(recipe) if recipe else None, model=model, overrides=set, gpu=gpu, json_out=json_out,
                        do_fit=fit, out=out, measure=measure, gpus=gpus, strategy=strategy, image_size=image_size,
                        text_tokens=seq_len, answer_tokens=answer_tokens, device=device, console=console)
    if code:
        raise typer.Exit(code)  # 1: a budget was given and the plan does not fit


@app.command()
def new(model: Annotated[str, typer.Option(help="hub id, local dir or tiny:<family>")],
        data: Annotated[str, typer.Option(help="data source: builtin:<name>, a file, an image folder, a prepared dir, a hub id")],
        task: Annotated[str, typer.Option(help="classification | vqa | caption | chat")] = "classification",
        method: Annotated[str, typer.Option(help="full | lora | qlora")] = "lora",
        gpu: Annotated[Optional[str], typer.Option(help="fit the recipe to this budget: 14GiB or a card, e.g. a100-80gb")] = None,
        out: Annotated[Path, typer.Option(help="where to write the recipe")] = Path("recipe.yaml"),
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing file")] = False):
    """Write a starter recipe for a model, a data source and a task (fitted to --gpu by the memory planner)."""
    from vlmfit.memory.plan import new_recipe

    path, lines = new_recipe(model, data, task, method=method, gpu=gpu, out=out, overwrite=overwrite)
    for line in lines:
        console.print(line, highlight=False)
    console.print(f"[green]written[/] {path}: next `vlmfit doctor {path}`, then `vlmfit train {path}`")


@app.command()
def models():
    """List the tiny offline models (use them as model.name: tiny:<family>)."""
    from vlmfit.models.tiny import TINY_FAMILIES, cache_root, clip_name, describe_tiny

    table = Table(title="tiny offline models (random init, real transformers classes and processors)")
    names = [f"tiny:{fam}" for fam in (*TINY_FAMILIES, "clip")]
    # The name is what users type: never cut, whatever the width; the other columns wrap instead.
    table.add_column("model.name", no_wrap=True, min_width=max(map(len, names)))
    for col in ("class", "processor", "params", "note"):
        table.add_column(col, overflow="fold")
    for fam in TINY_FAMILIES:
        d = describe_tiny(fam)
        table.add_row(f"tiny:{fam}", d.get("model_class", ""), d.get("processor_class", ""), f"{d.get('params', 0):,}", d.get("note", ""))
    card = cache_root(None) / clip_name() / "clip_card.json"
    params = f"{json.loads(card.read_text())['params']:,}" if card.is_file() else "(built on first use, ~2 min)"
    table.add_row("tiny:clip", "CLIPModel", "CLIPProcessor", params,
                  "dual encoder pretrained on upright digits: prompt tuning (method zo)")
    console.print(table)


def _quiet_libraries() -> None:
    # The run's own progress bar and messages are what users read; library shard/weight-loading bars and
    # deprecation notices from inside transformers/PEFT only bury them.
    import logging
    import warnings

    # bitsandbytes, imported by PEFT on every command, warns that the optional `kernels` package (a faster CPU 4-bit
    # matmul on AVX512-BF16 machines) is missing; its own CPU kernel is used instead, so nothing is wrong.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def main():
    _quiet_libraries()
    try:
        # typer's standalone mode prints its own usage errors (with "did you mean") and exits 2; only vlmfit's
        # UserError, which it does not know, comes out here.
        app()
    except UserError as e:
        from vlmfit.launch.local import record_failure

        record_failure(e, user=True)  # a launched rank: the launcher shows this message as the launch's
        err_console.print(f"[bold red]error[/]: {escape(e.render())}", highlight=False)  # brackets in it are text
        sys.exit(e.exit_code)
    except Exception as e:
        from vlmfit.launch.local import record_failure

        record_failure(e, user=False)
        raise
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
