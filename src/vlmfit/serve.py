"""`vlmfit serve`: a trained run, an export or a hub model behind an OpenAI-compatible endpoint, through an existing
server, never a hand-written one: `transformers serve` (CPU or GPU) or `vllm serve` (GPU, when vLLM is installed).

What is served: a run's full weights (model/) as they are; a run's adapter merged into its base first for
transformers (written once into the run directory, served/), or given to vLLM as a LoRA module beside its base; an
export directory or a hub id as is. The server binds to 127.0.0.1 unless told otherwise, and `vlmfit serve` says
the base URL, the model name requests must use, and the chat template and generation settings the run trained and
evaluated with (greedy, eval.max_new_tokens), so a client asks the served model what the run's own predict asks."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vlmfit.errors import UserError
from vlmfit.rundir import PROCESSOR, SERVED, SERVED_KEY, RunDir

BACKENDS = ("transformers", "vllm")


@dataclass
class Served:
    """What one `vlmfit serve` runs: the command, and what to tell the user (and a client) about it."""

    command: list[str]
    model: str  # the model name requests carry ("model": ...)
    url: str  # the OpenAI base URL
    notes: list[str] = field(default_factory=list)
    max_new_tokens: int | None = None  # the run's eval.max_new_tokens (what vlmfit predict generates)


def plan_serve(target: str, host: str = "127.0.0.1", port: int = 8000, backend: str = "transformers",
               dtype: str = "auto", device: str = "auto") -> Served:
    """The server command for `target` (a run directory, an export / model directory, tiny:<family> or a hub id),
    refusing what the backend cannot serve before anything starts."""
    from vlmfit.models.load import resolve_reference

    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'", where="--backend", hint=f"one of {', '.join(BACKENDS)}")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError("--backend vllm needs the vllm package", where="--backend",
                        hint="pip install vllm on a CUDA machine, or use --backend transformers (CPU or GPU)")
    if backend == "transformers" and importlib.util.find_spec("fastapi") is None:
        raise UserError("transformers serve needs FastAPI and Uvicorn", where="--backend",
                        hint="pip install 'transformers[serving]' (vlmfit pins the versions in constraints.txt)")
    notes, max_new, adapter, base = [], None, None, None
    path = Path(target).expanduser()
    if path.is_dir() and RunDir.is_run_dir(path):
        run = RunDir.open(path, where=str(path))
        cfg = run.config()
        max_new = cfg.eval.max_new_tokens
        kind = run.trained_kind()
        if kind == "model":
            model_dir = run.weights_path("model")
            notes.append(f"serving the run's full weights ({model_dir})")
        elif kind == "adapter":
            if backend == "vllm":
                adapter, base = run.weights_path("adapter"), resolve_reference(cfg.model.name)
                model_dir = Path(base) if Path(base).is_dir() else base
                notes.append(f"serving base {cfg.model.name} with the run's adapter as vLLM LoRA module 'adapter'")
            else:
                model_dir = merged_for_serving(run)
                notes.append(f"serving the run's adapter merged into {cfg.model.name} ({model_dir}; merged once, "
                             "transformers serve takes one model directory)")
        else:
            raise UserError("the run directory has no trained weights to serve (model/ or adapter/)", where=str(path),
                            hint="was it trained with output.save_model: false? (a CLIP prompt run is not a chat model)")
        notes.append(f"chat template: the run's processor's ({run.path / PROCESSOR}); the run evaluated with greedy "
                     f"decoding, at most {max_new} new tokens: send temperature 0 and max_tokens {max_new} for the "
                     "same answers as `vlmfit predict`")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is neither a run directory nor a model directory (no config.json)", where=str(path),
                            hint="give a run directory, an export (vlmfit export RUN --merge --out DIR) or a hub id")
        model_dir = path
        notes.append("serving the model directory as is; its chat template is its processor's")
    else:
        model_dir = resolve_reference(target)  # tiny:<family> -> its local directory; a hub id stays as given
    name = str(model_dir)
    url = f"http://{'127.0.0.1' if host in ('localhost', '0.0.0.0') else host}:{port}/v1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        notes.append(f"[yellow]listening on {host}[/]: anyone who can reach this machine can use the model")
    if backend == "transformers":
        command = [_tool("transformers"), "serve", name, "--host", host, "--port", str(port), "--device", device,
                   "--dtype", dtype]
    else:
        command = [_tool("vllm"), "serve", name, "--host", host, "--port", str(port), "--dtype", dtype]
        if adapter is not None:
            command += ["--enable-lora", "--lora-modules", f"adapter={adapter}"]
            name = "adapter"  # vLLM serves the LoRA module under its own name
    return Served(command=command, model=name, url=url, notes=notes, max_new_tokens=max_new)


def merged_for_serving(run: RunDir) -> Path:
    """The run's adapter merged into its base, written once into the run directory (served/) and reused while what
    it was made from is the same: the adapter files (size + mtime_ns), the base model and revision, the dtype and
    the versions of the libraries that merge."""
    from vlmfit.export import export_run
    from vlmfit.rundir import environment

    out = run.path / SERVED
    cfg = run.config()
    dtype = "fp32" if _cpu_only() else "bf16"
    adapter = run.weights_path("adapter")
    packages = environment()["packages"]
    key = {"adapter": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(adapter.iterdir()) if f.is_file()},
           "base": [cfg.model.name, cfg.model.revision], "dtype": dtype,
           "versions": {p: packages.get(p) for p in ("vlmfit", "torch", "transformers", "peft")}}
    if (out / "config.json").is_file() and run.read_json(SERVED_KEY) == key:
        return out
    if out.exists():
        shutil.rmtree(out)
    export_run(run.path, out, merge=True, dtype=dtype, command="vlmfit serve")
    run.write_json(SERVED_KEY, key)
    return out


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def _tool(name: str) -> str:
    """The console script installed beside this Python (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise UserError(f"the `{name}` command is not installed", where="--backend",
                        hint=f"install it in this environment (pip install {'transformers[serving]' if name == 'transformers' else name})")
    return found
