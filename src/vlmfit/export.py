"""`vlmfit export`: a run directory -> a model directory that loads anywhere.

- merged (`--merge`): a LoRA or QLoRA adapter merged into its base, fully trained modules (modules_to_save)
  included. A QLoRA base is loaded as it was trained (4-bit), dequantized to the export dtype, and only then merged:
  never a merge into 4-bit weights. Saved with `save_pretrained`, so the state-dict keys are the names the hub
  checkpoint of that architecture uses (transformers 5 writes its conversion mapping back on save), with the
  processor, tokenizer, chat template, generation config and a model card;
- adapter (no `--merge`): the PEFT adapter directory with the processor, for stacks that load adapters;
- full runs: the trained weights re-saved in the export dtype.
`--push-to-hub REPO_ID` uploads the directory with huggingface_hub (token from HF_TOKEN only, never written);
`--dry-run` lists what would be uploaded.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmfit.errors import UserError
from vlmfit.rundir import SUMMARY, RunDir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CARD = "README.md"


@dataclass
class Exported:
    path: Path
    kind: str  # "merged" | "adapter" | "full"
    files: list[tuple[str, int]]  # (relative path, bytes)


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, dtype: str = "bf16", command: str = "") -> Exported:
    run = RunDir.open(run_dir, where="RUN_DIR")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'", where="--dtype", hint="bf16, fp16 or fp32")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"'{out}' exists and is not empty", where="--out", hint="choose a new directory")
    cfg = run.config()
    kind = run.trained_kind()
    if kind is None:
        raise UserError("the run directory has no saved weights", where=str(run.path),
                        hint="was it trained with output.save_model: false? train it again with weights saved")
    if kind == "prompt":
        raise UserError("a prompt-tuning run has no model weights to export: its result is prompt.safetensors (the "
                        "context vectors for the unchanged CLIP model)", where=str(run.path),
                        hint="use the CLIP model as is with those vectors (vlmfit eval RUN_DIR scores them)")
    out.mkdir(parents=True, exist_ok=True)
    if kind == "model":
        trained = run.load_trained(dtype="float32")
        model, processor, what = trained.model.to(DTYPES[dtype]), trained.processor, "full"
    elif merge:
        model, processor = merged_model(run, cfg, DTYPES[dtype])
        what = "merged"
    else:
        adapter = run.weights_path("adapter")
        for f in adapter.iterdir():  # the adapter's own files (a checkpoint also holds optimizer state)
            if f.name.startswith("adapter_"):
                shutil.copy2(f, out / f.name)
        _point_adapter_at_base(out, cfg.model.name)
        processor, model, what = run.load_trained().processor, None, "adapter"
    if model is not None:
        model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / CARD).write_text(model_card(run, cfg, what, dtype, command))
    files = sorted((str(p.relative_to(out)), p.stat().st_size) for p in out.rglob("*") if p.is_file())
    return Exported(out, what, files)


def merged_model(run: RunDir, cfg, dtype: torch.dtype):
    """The base (QLoRA: as trained in 4-bit, then dequantized) with the run's adapter merged in, in `dtype`."""
    from peft import PeftModel

    from vlmfit.models.load import load_for, load_processor

    quantized = cfg.quantization != "none"
    # Merge in fp32 (a 16-bit merge rounds twice), then cast once.
    loaded = load_for(cfg, dtype="float32")
    base = loaded.model
    if quantized:
        base = base.dequantize(dtype=torch.float32)  # transformers' bitsandbytes dequantization: nn.Linear again
    model = PeftModel.from_pretrained(base, str(run.weights_path("adapter"))).merge_and_unload()
    processor = load_processor(str(run.processor_path())) if run.processor_path() else loaded.processor
    if quantized and getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the merged weights are not quantized
    return model.to(dtype), processor


def _point_adapter_at_base(out: Path, base: str) -> None:
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def model_card(run: RunDir, cfg, what: str, dtype: str, command: str) -> str:
    before, after = run.evals()
    summary = run.read_json(SUMMARY) or {}
    lines = ["---", f"base_model: {cfg.model.name}", "library_name: " + ("peft" if what == "adapter" else "transformers"),
             "tags: [vlmfit, vision-language]", "---", "", f"# Fine-tuned {cfg.model.name} ({cfg.method}, {what})", "",
             f"- base model: `{cfg.model.name}`" + (f" (revision {cfg.model.revision})" if cfg.model.revision else ""),
             f"- data: `{cfg.data.source}` (task {cfg.data.task}, {summary.get('train_examples', '?')} training examples)",
             f"- method: {cfg.method}; {summary.get('steps', '?')} steps; exported as {what} in {dtype}"]
    if what == "merged" and cfg.method == "qlora":
        lines.append("- QLoRA: the 4-bit base was dequantized first and the adapter merged into the dequantized weights")
    if before or after:
        lines += ["", "| metric | before | after |", "|---|---|---|"]
        for mode in ("constrained", "generate"):
            b, a = (e.get(mode, {}).get("accuracy") if e else None for e in (before, after))
            if b is not None or a is not None:
                lines.append(f"| {mode} accuracy | {_pct(b)} | {_pct(a)} |")
    lines += ["", "Load it:", "", "```python"]
    if what == "adapter":
        lines += ["from peft import PeftModel", "from transformers import AutoModelForImageTextToText, AutoProcessor",
                  f"base = AutoModelForImageTextToText.from_pretrained({cfg.model.name!r})",
                  "model = PeftModel.from_pretrained(base, 'THIS_DIRECTORY')"]
    else:
        lines += ["from transformers import AutoModelForImageTextToText, AutoProcessor",
                  "model = AutoModelForImageTextToText.from_pretrained('THIS_DIRECTORY')"]
    lines += ["processor = AutoProcessor.from_pretrained('THIS_DIRECTORY')", "```", ""]
    if command:
        lines += ["Made with [vlmfit](https://github.com/) by:", "", f"    {command}", ""]
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def push(exported: Exported, repo_id: str, private: bool, dry_run: bool) -> list[str]:
    """Upload the exported directory to the hub (create the repo, upload the folder); with `dry_run`, only the
    lines saying what would be uploaded. The token comes from HF_TOKEN and is passed, never printed or saved."""
    lines = [f"{'would upload' if dry_run else 'uploading'} {len(exported.files)} files to "
             f"https://huggingface.co/{repo_id} ({'private' if private else 'public'}):"]
    lines += [f"  {name}  ({size:,} bytes)" for name, size in exported.files]
    if dry_run:
        return lines
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UserError("no hub token: vlmfit reads it from the HF_TOKEN environment variable only", where="--push-to-hub",
                        hint="export HF_TOKEN=... (a write token), or check the upload first with --dry-run")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(exported.path), repo_id=repo_id, repo_type="model",
                          commit_message="Upload model exported by vlmfit")
    except Exception as e:  # network, permissions, a bad repo id: the user needs the reason, not a traceback
        raise UserError(f"upload failed: {str(e).splitlines()[0]}", where=f"--push-to-hub {repo_id}",
                        hint="check the repo id (owner/name), the token's write permission and the network") from None
    return lines


class _CallableModule(sys.modules[__name__].__class__):
    """`vlmfit.export(run_dir, out, merge=False, dtype="bf16") -> Exported` is `vlmfit export` (this module's
    export_run), while `vlmfit.export.export_run` stays reachable: a function named `export` on the root package
    would be replaced by this module as soon as anything imports it."""

    def __call__(self, run_dir, out, merge: bool = False, dtype: str = "bf16"):
        return export_run(run_dir, out, merge=merge, dtype=dtype, command="vlmfit.export(...)")


sys.modules[__name__].__class__ = _CallableModule
