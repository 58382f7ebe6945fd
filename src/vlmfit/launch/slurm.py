"""`vlmfit launch --slurm`: an sbatch script that runs the recipe on several nodes: one task per node (srun), each
starting torchrun with one process per GPU, all meeting at node 0 through torchrun's c10d rendezvous. Submitted with
sbatch when this machine has it; `--dry-run` prints it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vlmfit.errors import UserError

PORT = 29500


@dataclass(frozen=True)
class SlurmJob:
    name: str
    nodes: int
    gpus_per_node: int
    train_args: tuple[str, ...]  # what each rank runs after `python -m vlmfit`
    time: str | None = None  # Slurm's --time, e.g. 02:00:00
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    log_dir: str = "slurm-logs"
    python: str = sys.executable


def _time(value: str | None) -> str | None:
    """2h / 90m / 1d / HH:MM:SS -> Slurm's D-HH:MM:SS."""
    if value is None:
        return None
    if re.fullmatch(r"\d+(-\d{1,2})?(:\d{2}){0,2}", value):
        return value
    m = re.fullmatch(r"(\d+)([mhd])", value)
    if not m:
        raise UserError(f"'{value}' is not a duration", where="--timeout", hint="e.g. 90m, 2h, 1d or 02:00:00")
    minutes = int(m[1]) * {"m": 1, "h": 60, "d": 1440}[m[2]]
    return f"{minutes // 1440}-{minutes % 1440 // 60:02d}:{minutes % 60:02d}:00"


def sbatch_script(job: SlurmJob) -> str:
    if job.nodes < 1 or job.gpus_per_node < 1:
        raise UserError("--nodes and --gpus-per-node must be at least 1", where="--slurm")
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job.name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",  # one torchrun per node; it starts the GPU processes
        f"#SBATCH --gpus-per-node={job.gpus_per_node}",
        f"#SBATCH --output={job.log_dir}/%x-%j.out",
    ]
    for flag, value in (("cpus-per-task", job.cpus_per_task), ("time", _time(job.time)), ("partition", job.partition),
                        ("account", job.account)):
        if value is not None:
            header.append(f"#SBATCH --{flag}={value}")
    cmd = [shlex.quote(job.python), "-m", "torch.distributed.run", '--nnodes="$SLURM_NNODES"',
           f"--nproc-per-node={job.gpus_per_node}", '--rdzv-id="$SLURM_JOB_ID"', "--rdzv-backend=c10d",
           '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"', "-m", "vlmfit", *map(shlex.quote, job.train_args)]
    body = [
        "",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(job.log_dir)}",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT={PORT}",
        "export MASTER_ADDR MASTER_PORT",
        "# one task per node; a task that fails ends the job (no node left waiting in a collective)",
        "srun --kill-on-bad-exit=1 " + " \\\n    ".join(_chunks(cmd)),
        "",
    ]
    return "\n".join(header + body)


def _chunks(cmd: list[str]) -> list[str]:
    """The command split into readable lines (the train arguments together)."""
    i = cmd.index("vlmfit")
    return [" ".join(cmd[:3]), " ".join(cmd[3:6]), " ".join(cmd[6:i - 1]), " ".join(cmd[i - 1:])]


def submit(script: str, path: Path) -> str:
    """Write the script to `path` and submit it; the job id sbatch prints."""
    sbatch = shutil.which("sbatch")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if sbatch is None:
        raise UserError(f"sbatch is not on this machine's PATH (not a Slurm login node); the script is at {path}",
                        where="--slurm", hint=f"copy it to the cluster and run `sbatch {path.name}`, or use --dry-run to print it")
    out = subprocess.run([sbatch, str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"sbatch refused the job: {out.stderr.strip() or out.stdout.strip()}", where=str(path),
                        hint="fix the partition / account / time limits (--partition, --account, --timeout)")
    return out.stdout.strip()
