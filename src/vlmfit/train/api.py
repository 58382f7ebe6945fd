"""`vlmfit train` as a Python function: the same refusals, checks and messages as the CLI, which is a thin shell over
it. `vlmfit.train(...)` calls it."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from vlmfit.config import RunConfig, load_config, recipe_path
from vlmfit.errors import UserError
from vlmfit.rundir import RunDir


def train(recipe: str | Path | RunConfig | None = None, overrides: list[str] | None = None, *,
          resume: str | Path | None = None, overwrite: bool = False, force: bool = False, profile: bool = False,
          console: Console | None = None) -> Path:
    """Train as the recipe says (a YAML path, the name of a shipped recipe, or a RunConfig), or continue `resume`'s
    run from its last complete checkpoint; returns the run directory. `overrides`: ["train.lr=1e-4", ...].
    `force`: train even if the memory plan predicts it will not fit. `profile`: time each step's parts (SFT).
    Raises UserError (the CLI prints it and exits 2) for anything the user can fix."""
    from vlmfit.launch.ranks import world_size
    from vlmfit.memory.plan import preflight
    from vlmfit.models.load import check_model, is_dual_encoder

    console = console or Console()
    cfg, run_dir = _resolve(recipe, overrides, resume)
    m = cfg.model
    _, model_type = check_model(m.name, m.revision, chat=cfg.method != "zo", trust_remote_code=m.trust_remote_code)  # before data
    if not is_dual_encoder(model_type):  # the planner models generative VLMs (a CLIP prompt run needs inference memory)
        preflight(cfg, console, force, world=world_size())  # on a GPU (launched: per GPU under the strategy): refuse a run predicted not to fit, with the breakdown and the fix
    if profile and cfg.method in ("zo", "dpo", "grpo"):
        raise UserError(f"--profile times supervised training steps; method {cfg.method} is not profiled yet",
                        where="--profile", hint="profile the SFT recipe of the same model and data (method lora / full)")
    if cfg.method == "zo":
        from vlmfit.train.zo import train_zo

        return train_zo(cfg, console, overwrite=overwrite, resume=run_dir)
    if cfg.method == "dpo":
        from vlmfit.train.dpo import train_dpo

        return train_dpo(cfg, console, resume=run_dir, overwrite=overwrite)
    if cfg.method == "grpo":
        from vlmfit.train.grpo import train_grpo

        return train_grpo(cfg, console, resume=run_dir, overwrite=overwrite)
    from vlmfit.train.sft import train_sft

    return train_sft(cfg, console, profile=profile, resume=run_dir, overwrite=overwrite)


def _resolve(recipe, overrides, resume) -> tuple[RunConfig, RunDir | None]:
    """The config to train and the run to continue, refusing a resume that names a recipe or overrides too."""
    if resume is not None:
        if recipe is not None or overrides:
            raise UserError("--resume continues a run with its own recipe (config.yaml in the run directory)",
                            where="--resume", hint=f"run `vlmfit train --resume {resume}` alone; to change the recipe, start a new run")
        run_dir = RunDir.open(resume, where="--resume")
        return run_dir.config(), run_dir
    if recipe is None:
        raise UserError("Missing argument 'RECIPE'", where="vlmfit train",
                        hint="give a recipe (`vlmfit train recipes/demo.yaml`) or a run to continue (`vlmfit train --resume RUN_DIR`)")
    if isinstance(recipe, RunConfig):
        return (load_config(overrides=overrides, base=recipe.model_dump(mode="json")) if overrides else recipe), None
    return load_config(recipe_path(recipe), overrides), None
