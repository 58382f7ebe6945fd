"""`vlmfit launch --hf-jobs`: the recipe as a Hugging Face job (`hf jobs uv run`). The job's machine sees no local
file, so vlmfit writes one UV script with the resolved recipe inside it; the job installs vlmfit, trains, and
uploads the whole run directory to a hub repository (a job's disk is gone when it ends, a timeout included).

Secrets go by name (`--secrets HF_TOKEN`: the job reads the value from the user's hub settings or the local
environment, never from this command line), so no value appears in what is printed or written."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from vlmfit.config import RunConfig
from vlmfit.errors import UserError

# `hf jobs hardware` flavors with GPUs (hf jobs refuses an unknown one; these are the common ones to check typos)
FLAVORS = ("cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4", "l40sx8",
           "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large", "a100x4", "a100x8", "h100",
           "h100x8", "h200", "h200x2", "h200x4", "h200x8")


@dataclass(frozen=True)
class HfJob:
    flavor: str
    push_to: str  # hub repository (user/name) that receives the run directory
    timeout: str | None = None  # hf jobs' own format: 30m, 2h, 1d
    secrets: tuple[str, ...] = ("HF_TOKEN",)  # names only
    package: str = "vlmfit"  # what the job installs (a version pin, a git URL)
    detach: bool = True


def gpus_of(flavor: str) -> int:
    """GPUs of a flavor (a100x4 -> 4, h200 -> 1, cpu-basic -> 1): the job's process count."""
    m = re.search(r"x(\d+)$", flavor)
    return int(m[1]) if m else 1


def remote_refusal(cfg: RunConfig) -> str | None:
    """Why the job's machine could not read what the recipe names (None: it can)."""
    for key, value in (("data.source", cfg.data.source), ("model.name", cfg.model.name)):
        if value.startswith(("builtin:", "tiny:")):
            continue
        if Path(value).expanduser().exists() or value.startswith((".", "/", "~")):
            kind = "dataset" if key == "data.source" else "model"
            return (f"{key} is the local path '{value}', which the job's machine cannot read: upload it "
                    f"(`hf upload <user>/<name> {value} --repo-type {kind}`) and set {key} to that hub id")
    return None


def job_script(cfg: RunConfig, job: HfJob, world: int) -> str:
    """The UV script the job runs: vlmfit train on the embedded recipe, then the run directory to `job.push_to`."""
    recipe = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": Path("/tmp/runs")})}).to_yaml()
    train = ("import subprocess, sys\n"
             f"    argv = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node={world}', "
             "'-m', 'vlmfit', 'train', str(recipe)]\n"
             "    code = subprocess.call(argv)") if world > 1 else (
             "import subprocess, sys\n"
             "    code = subprocess.call([sys.executable, '-m', 'vlmfit', 'train', str(recipe)])")
    return f'''# /// script
# requires-python = ">=3.10"
# dependencies = [{_quote(job.package)}]
# ///
"""vlmfit run {cfg.output.name}: written by `vlmfit launch --hf-jobs`; trains the recipe below and uploads the run
directory to https://huggingface.co/{job.push_to} (also when training stops early)."""

from pathlib import Path

RECIPE = {_triple(recipe)}


def main():
    recipe = Path("/tmp/recipe.yaml")
    recipe.write_text(RECIPE)
    {train}
    run = Path("/tmp/runs") / {cfg.output.name!r}
    if run.is_dir():
        from huggingface_hub import HfApi

        api = HfApi()  # the token comes from the HF_TOKEN secret
        api.create_repo({job.push_to!r}, private=True, exist_ok=True)
        api.upload_folder(repo_id={job.push_to!r}, folder_path=str(run), path_in_repo={cfg.output.name!r})
        print("run directory uploaded to https://huggingface.co/{job.push_to}/tree/main/{cfg.output.name}")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
'''


def hf_jobs_command(job: HfJob, script: Path) -> list[str]:
    if job.flavor not in FLAVORS:
        from vlmfit.errors import nearest

        near = nearest(job.flavor, FLAVORS)
        raise UserError(f"unknown job flavor '{job.flavor}'" + (f" (did you mean '{near}'?)" if near else ""),
                        where="--flavor", hint="`hf jobs hardware` lists them; e.g. a10g-large, a100-large, h200")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", job.push_to):
        raise UserError(f"'{job.push_to}' is not a hub repository id", where="--push-to", hint="e.g. my-user/vlmfit-runs")
    for name in job.secrets:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(f"'{name}' is not a secret name (pass names, never values)", where="--secret",
                            hint="e.g. --secret WANDB_API_KEY; the job reads the value from your hub settings")
    argv = ["hf", "jobs", "uv", "run", "--flavor", job.flavor]
    if job.timeout:
        argv += ["--timeout", job.timeout]
    for name in job.secrets:
        argv += ["--secrets", name]
    if job.detach:
        argv.append("--detach")
    return argv + [str(script)]


def shell(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _triple(text: str) -> str:
    if "'''" in text:
        return repr(text)
    return "'''\\\n" + text + "'''"
