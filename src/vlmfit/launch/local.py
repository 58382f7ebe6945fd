"""`vlmfit launch` on this machine (or one node of several): the recipe under torchrun, one process per device.

The launcher builds no distribution of its own: torchrun starts the processes (and stops them all when one fails),
the Trainer (accelerate underneath) runs DDP / FSDP2 / DeepSpeed from launch.strategy, and each rank runs the
same `vlmfit train` as a single process would. Each rank writes how it ended to a status directory, so the launch
ends with the failing rank's own message rather than torchrun's summary alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from vlmfit.errors import UserError

STATUS_ENV = "VLMFIT_LAUNCH_STATUS"  # a directory where each rank writes rank<N>.json when it fails


@dataclass(frozen=True)
class Launch:
    recipe: str | None  # a recipe path (None with resume)
    overrides: tuple[str, ...] = ()
    strategy: str | None = None  # None: the recipe's launch.strategy
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master: str | None = None  # ADDR:PORT of node 0 (several nodes)
    resume: str | None = None
    overwrite: bool = False
    force: bool = False
    extra_env: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


def train_args(launch: Launch) -> list[str]:
    """The `vlmfit train ...` arguments every rank runs."""
    if launch.resume is not None:
        return ["train", "--resume", launch.resume]
    args = ["train", launch.recipe]
    for item in launch.overrides:
        args += ["--set", item]
    if launch.strategy is not None:
        args += ["--set", f"launch.strategy={launch.strategy}"]
    if launch.overwrite:
        args.append("--overwrite")
    if launch.force:
        args.append("--force")
    return args


def torchrun_argv(launch: Launch, python: str = sys.executable) -> list[str]:
    argv = [python, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}"]
    if launch.nnodes == 1 and launch.master is None:
        argv.append("--standalone")  # a free port on this machine; no rendezvous server to name
    else:
        if launch.master is None:
            raise UserError(f"--nnodes {launch.nnodes} needs the address of node 0", where="--master",
                            hint="pass --master ADDR:PORT (the same on every node), e.g. --master 10.0.0.1:29500")
        addr, _, port = launch.master.rpartition(":")
        if not addr or not port.isdigit():
            raise UserError(f"'{launch.master}' is not ADDR:PORT", where="--master", hint="e.g. --master 10.0.0.1:29500")
        argv += [f"--nnodes={launch.nnodes}", f"--node-rank={launch.node_rank}", f"--master-addr={addr}",
                 f"--master-port={port}"]
    return argv + ["-m", "vlmfit", *train_args(launch)]


def check(launch: Launch, method: str, strategy: str) -> None:
    """Refusals before any process starts."""
    from vlmfit.launch.strategy import require_supported

    if launch.nproc < 1 or launch.nnodes < 1:
        raise UserError("--nproc and --nnodes count processes and machines: at least 1 each", where="--nproc")
    if not 0 <= launch.node_rank < launch.nnodes:
        raise UserError(f"--node-rank {launch.node_rank} is not one of 0..{launch.nnodes - 1}", where="--node-rank")
    require_supported(strategy, method)


def check_resume(run_path: str, world: int) -> None:
    """A launched run resumes under the process count that wrote its checkpoint (the data order and the optimizer
    shards are per rank); refused before launch otherwise. The ranks check it again (train/trainer.resume_point)."""
    from vlmfit.rundir import RunDir

    run = RunDir.open(run_path, where="--resume")
    done = run.complete_checkpoints()
    if not done:
        return  # the ranks say why there is nothing to resume
    saved = run.checkpoint_info(done[-1][1]).get("world_size", 1)
    if saved != world:
        raise UserError(f"the checkpoint {done[-1][1].name} was written by {saved} processes, this launch has {world}: "
                        "the data order and the optimizer shards would not continue exactly", where=str(run_path),
                        hint=f"resume with {saved} processes in all (e.g. --nproc {saved}), or start a new run")


def run_local(launch: Launch, strategy: str, console: Console) -> int:
    """Start torchrun, wait for it, and turn a failed rank into that rank's own error."""
    from vlmfit.launch.strategy import here_refusal

    why = here_refusal(strategy)
    if why:
        raise UserError(why, where="--strategy")
    argv = torchrun_argv(launch)
    console.print(f"[bold]launch[/] {launch.world} processes: {' '.join(argv[1:])}")
    with tempfile.TemporaryDirectory(prefix="vlmfit-launch-") as status:
        env = {**os.environ, **launch.extra_env, STATUS_ENV: status}
        code = subprocess.call(argv, env=env)
        if code == 0:
            return 0
        # the first rank to fail is the cause; the others failed after it (a closed connection, a timeout)
        failures = sorted((json.loads(p.read_text()) for p in Path(status).glob("rank*.json")), key=lambda f: f["time"])
        if not failures:
            raise UserError(f"torchrun exited with code {code} before any rank reported (its message is above)",
                            where="vlmfit launch")
        first = failures[0]
        others = f"; rank {', '.join(str(f['rank']) for f in failures[1:])} failed after it" if len(failures) > 1 else ""
        if first["kind"] == "user":
            err = UserError(first["what"] + others, where=f"rank {first['rank']}: {first['where'] or 'vlmfit train'}",
                            hint=first["hint"])
            err.exit_code = first["exit_code"]
            raise err
        raise UserError(f"rank {first['rank']} crashed: {first['what']} (its traceback is above{others}; the "
                        "launch stopped every rank)", where="vlmfit launch")


def record_failure(exc: BaseException, user: bool) -> None:
    """In a launched rank (STATUS_ENV set): write how it failed, for the launcher to show."""
    status = os.environ.get(STATUS_ENV)
    if not status:
        return
    rank = int(os.environ.get("RANK", "0"))
    info = {"rank": rank, "kind": "user" if user else "crash", "exit_code": getattr(exc, "exit_code", 1),
            "time": time.time()}
    if user:
        info.update(what=exc.what, where=exc.where, hint=exc.hint)
    else:
        info.update(what=f"{type(exc).__name__}: {exc}", where=None, hint=None)
    try:
        Path(status, f"rank{rank}.json").write_text(json.dumps(info))
    except OSError:
        pass
