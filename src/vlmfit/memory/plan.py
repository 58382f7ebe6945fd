"""The `vlmfit plan` verb and the pre-flight of `vlmfit train`, as functions the CLI calls (parse, plan, print)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlmfit.errors import UserError
from vlmfit.memory.budget import GiB, parse_budget
from vlmfit.memory.estimate import STRATEGIES, Breakdown, per_gpu, plan_memory, recipe_shape
from vlmfit.memory.shape import ModelShape


def _image_hw(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        return h, w
    except ValueError:
        raise UserError(f"cannot read image size '{text}'", where="--image-size", hint="WIDTHxHEIGHT, e.g. 1280x720") from None


def recipe_config(recipe: Path | None, model: str | None, overrides: list[str] | None):
    """The run config to plan: a recipe (with --set overrides), or just a model with the default recipe."""
    from vlmfit.config import load_config

    if recipe is None and model is None:
        raise UserError("nothing to plan", hint="give a recipe, or --model <hub id | dir | config.json | tiny:family>")
    sets = list(overrides or []) + ([f"model.name={model}"] if model else [])
    if recipe is None:
        return load_config(base={"model": {"name": model}}, overrides=overrides)
    return load_config(recipe, sets)


def multi_gpu_table(bd: Breakdown, shape: ModelShape, gpus: int, strategies=STRATEGIES) -> Table:
    t = Table(title=f"per GPU at {gpus} GPUs (GiB)")
    for col in ("strategy", "model states", "activations", "overhead", "total"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for s in strategies:
        row = per_gpu(bd, shape, s, gpus)
        t.add_row(s, *(f"{row[k] / GiB:.2f}" for k in ("model states", "activations", "overhead", "total")))
    return t


def plan_command(recipe: Path | None = None, *, model: str | None = None, overrides: list[str] | None = None,
                 gpu: str | None = None, json_out: bool = False, do_fit: bool = False, out: Path | None = None,
                 measure: bool = False, gpus: int = 1, strategy: str | None = None, image_size: str | None = None,
                 text_tokens: int = 512, answer_tokens: int = 64, device: str = "cuda", console: Console | None = None) -> int:
    """Print the plan (or JSON); --fit writes a fitted recipe; --measure runs real steps. Returns the exit code:
    1 when a budget was given and the plan does not fit, else 0."""
    console = console or Console()
    cfg = recipe_config(recipe, model, overrides)
    if cfg.method == "zo" and do_fit:
        raise UserError("--fit searches backprop knobs (method, checkpointing, optimizer); forward-only training has "
                        "none of them", where="--fit", hint="plan it without --fit; a smaller zo.population_batch or "
                        "train.batch_size lowers the forward's working set")
    budget = parse_budget(gpu) if gpu else None
    hw = _image_hw(image_size)
    shape = recipe_shape(cfg)  # one meta-device build for the plan, the per-GPU table and the fit search
    bd = plan_memory(cfg, device=device, budget=budget, image_hw=hw, text_tokens=text_tokens, answer_tokens=answer_tokens,
                     shape=shape)
    result: dict = {"plan": bd.as_dict()}
    if gpus > 1:
        result["per_gpu"] = {s: {k: round(v / GiB, 3) for k, v in per_gpu(bd, shape, s, gpus).items()}
                             for s in ([strategy] if strategy else STRATEGIES)}
    code = 1 if bd.verdict == "does not fit" else 0
    if do_fit:
        if budget is None:
            raise UserError("--fit needs a budget", where="--gpu", hint="e.g. --gpu 14GiB or --gpu v100-16gb")
        from vlmfit.memory.fit import fit, write_recipe

        fitted, reasons = fit(cfg, budget, device=device, image_hw=hw, text_tokens=text_tokens, answer_tokens=answer_tokens,
                              shape=shape)
        stem = Path(recipe).stem if recipe else cfg.model.name.replace("/", "_")
        path = write_recipe(fitted, reasons, out or Path(f"{stem}-fit.yaml"))
        result["fit"] = {"recipe": str(path), "reasons": reasons,
                         "plan": plan_memory(fitted, device=device, budget=budget, image_hw=hw, text_tokens=text_tokens,
                                             answer_tokens=answer_tokens, shape=shape).as_dict()}
        code = 0
    if measure:
        from vlmfit.memory.measure import measure_recipe

        measured, predicted = measure_recipe(cfg, shape=shape)
        result["measure"] = {"measured": measured.as_dict(), "predicted_peak_bytes": int(predicted.peak),
                             "predicted_components_bytes": {k: int(v) for k, v in predicted.components.items()}}
    if json_out:
        print(json.dumps(result, indent=2))
        return code
    console.print(bd.table())
    for note in bd.notes:
        console.print(f"[dim]-[/] {note}")
    if cfg.train.lr_groups:  # memory does not depend on them; said so the plan shows the whole recipe
        rates = ", ".join(f"{part} {rate:g}" for part, rate in cfg.train.lr_groups.items())
        console.print(f"[dim]-[/] learning rates: {rates}; every other trained parameter {cfg.train.lr:g} (train.lr_groups)")
    if bd.verdict in ("does not fit", "tight"):
        from vlmfit.memory.fit import memory_options

        for label, saved in memory_options(shape, bd.inputs, cfg.model.name):
            console.print(f"[dim]-[/] would save {saved / GiB:.2f} GiB: {label}")
    if gpus > 1:
        console.print(multi_gpu_table(bd, shape, gpus, [strategy] if strategy else STRATEGIES))
    if "fit" in result:
        console.print(f"[bold]fitted recipe[/] {result['fit']['recipe']}")
        for r in result["fit"]["reasons"]:
            console.print(f"  - {r}")
    if "measure" in result:
        console.print(measure_table(result["measure"]))
    return code


def measure_table(m: dict) -> Table:
    t = Table(title=f"measured on {m['measured']['device']} vs predicted (MiB)")
    for col in ("", "measured", "predicted"):
        t.add_column(col, justify="right" if col else "left")
    p = m["predicted_components_bytes"]
    mib = lambda v: f"{v / 2**20:,.0f}"  # noqa: E731
    t.add_row("weights (+ adapters)", mib(m["measured"]["weights"]), mib(p["weights"] + p["adapters"]))
    t.add_row("optimizer state", mib(m["measured"]["optimizer"]), mib(p["optimizer"]))
    t.add_row("peak", mib(m["measured"]["peak"]), mib(m["predicted_peak_bytes"] - p["overhead"]))
    return t


def preflight(cfg, console: Console | None = None, force: bool = False, world: int = 1) -> Breakdown | None:
    """Before `vlmfit train`: plan against the CUDA device's memory and refuse a run predicted not to fit (with the
    breakdown and the fix), unless forced. Launched on `world` processes: the per-GPU figure of cfg.launch.strategy.
    No-op on the CPU (no fixed budget)."""
    import torch

    if not torch.cuda.is_available():
        return None
    budget = torch.cuda.get_device_properties(0).total_memory
    bd = plan_memory(cfg, device="cuda", budget=budget)
    if world > 1:
        total = per_gpu(bd, recipe_shape(cfg), cfg.launch.strategy, world)["total"]
        if total > budget and not force:
            raise UserError(f"predicted peak {total / GiB:.1f} GiB per GPU under {cfg.launch.strategy} at {world} "
                            f"processes does not fit this GPU ({budget / GiB:.1f} GiB)", where="memory plan",
                            hint=f"`vlmfit plan RECIPE --gpus {world}` compares the strategies; zero3 / fsdp shard "
                                 "the most; or pass --force")
        return bd
    if bd.verdict == "does not fit" and not force:
        (console or Console()).print(bd.table())
        raise UserError(
            f"predicted peak {bd.peak / GiB:.1f} GiB does not fit this GPU ({budget / GiB:.1f} GiB)",
            where="memory plan",
            hint="run `vlmfit plan --fit --gpu <card> RECIPE` for a configuration that fits, or pass --force",
        )
    return bd


def plan(recipe: str | Path | None = None, *, model: str | None = None, overrides: list[str] | None = None,
         gpu: str | None = None, image_size: str | None = None, seq_len: int = 512, answer_tokens: int = 64,
         device: str = "cuda"):
    """`vlmfit plan` as a function: the memory Breakdown of a recipe (a path or a shipped recipe's name) or of a model
    with the default recipe, against `gpu` (a budget like "14GiB" or a card name) when given. `vlmfit.plan(...)`."""
    from vlmfit.config import recipe_path

    cfg = recipe_config(recipe_path(recipe) if recipe is not None else None, model, overrides)
    return plan_memory(cfg, device=device, budget=parse_budget(gpu) if gpu else None, image_hw=_image_hw(image_size),
                       text_tokens=seq_len, answer_tokens=answer_tokens)


def new_recipe(model: str, data: str, task: str = "classification", *, method: str = "lora", gpu: str | None = None,
               out: str | Path = "recipe.yaml", overwrite: bool = False, image_size: str | None = None,
               device: str = "cuda") -> tuple[Path, list[str]]:
    """`vlmfit new`: a starter recipe for `model` on `data` read as `task`, validated by the schema; with `gpu` (a
    budget or a card), the fastest configuration the planner predicts to fit it (`vlmfit plan --fit`'s search),
    its reasons in the header. Returns (the path, the lines to tell the user)."""
    from vlmfit.config import load_config

    path = Path(out)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists", where="--out", hint="choose another --out, or pass --overwrite")
    if method not in ("full", "lora", "qlora"):
        raise UserError(f"vlmfit new writes supervised recipes (full, lora, qlora), not method {method}",
                        where="--method", hint="start from one and change method: dpo / grpo / zo (docs/recipe-reference.md)")
    modes = ["constrained", "generate"] if task == "classification" else ["generate"]
    cfg = load_config(base={"model": {"name": model}, "data": {"source": data, "task": task}, "method": method,
                            "eval": {"modes": modes}, "output": {"dir": "runs"}})
    lines = [f"model {model}, data {data} ({task}), method {method}"]
    reasons: list[str] = []
    if gpu:
        from vlmfit.memory.fit import fit

        budget = parse_budget(gpu)
        cfg, reasons = fit(cfg, budget, device=device, image_hw=_image_hw(image_size))
        bd = plan_memory(cfg, device=device, budget=budget, image_hw=_image_hw(image_size))
        lines.append(f"fitted to {gpu}: planned peak {bd.peak / GiB:.2f} GiB ({bd.verdict})")
        lines += [f"  {r}" for r in reasons]
    head = ["# Written by `vlmfit new`: every key and its default is in docs/recipe-reference.md.",
            "# Next: `vlmfit doctor " + str(path) + "` (checks data, labels and memory), then `vlmfit train " + str(path) + "`."]
    if reasons:
        head += [f"# Fitted to {gpu} by the memory planner:"] + [f"#   {r}" for r in reasons]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head) + "\n" + cfg.to_yaml())
    load_config(path)  # what was written reads back as the same valid recipe
    return path, lines
