"""The run directory, and the one module that knows its layout: create it, log into it, save what a run trained
(full weights, a LoRA adapter, CLIP prompt vectors) and load it back, for every method, plus the typed run summary
the report reads. Nothing else in vlmfit builds a path inside a run directory."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from vlmfit.config import RunConfig, load_config
from vlmfit.errors import UserError

# Layout: every name inside a run directory.
CONFIG = "config.yaml"  # the resolved recipe (every default filled in)
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"  # one record per logging step (or per evaluation, for method zo)
SUMMARY = "summary.json"  # RunSummary
EVAL_PREFIX = "eval_"  # every evaluation result: eval_before.json, eval_after.json, eval_<timestamp>.json
EVAL_BEFORE = "eval_before.json"
EVAL_AFTER = "eval_after.json"
LORA_TARGETS = "lora_targets.json"
LAUNCH = "launch.json"  # how a launched run was shared out (strategy, world size, the engine arguments)
LOSS_PLOT = "loss.png"
SERVED = "served"  # `vlmfit serve` of an adapter run: the adapter merged into its base, written once
SERVED_KEY = "served/vlmfit_served.json"  # what that merge was made from (reused only while all of it is the same)
SAMPLES = "samples"  # GRPO: completions of the last rollout batch with their rewards (samples.json) and images
REPORT = "report.md"
REPORT_HTML = "report.html"  # the same, self-contained for a browser: curves, intervals, flipped examples
CHECKPOINTS = "checkpoints"  # the Trainer's output_dir: checkpoint-<step>/ (resumable), the last train.save_total_limit
CHECKPOINT_DONE = "vlmfit_checkpoint.json"  # written last, by rename: a checkpoint without it is incomplete, never used
PROCESSOR = "processor"  # the processor the run trained with (resolution caps applied)
MODEL = "model"  # full weights (full fine-tuning, or a merged DPO policy), with the processor: loads as is
ADAPTER = "adapter"  # a PEFT adapter on the base model of config.yaml
PROMPT = "prompt.safetensors"  # CLIP prompt tuning: the context vectors
PROMPT_INFO = "prompt.json"
TRACKING = "tracking"  # train.report_to: the trackers' local logs (train/tracking.py)
PROFILE = "profile.json"  # --profile: where each step's time went
ZO_TUNED = "tuned.safetensors"  # inside a forward-only run's checkpoint-<forward passes>/: the tuned values
ZO_STATE = "zo_state.json"  # ... and where its loop was (budget, seeds, batches, CMA-ES losses)

PACKAGES = ("vlmfit", "torch", "torchvision", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "bitsandbytes")


def environment() -> dict:
    """Package versions, hardware and git commit: enough to reproduce (or explain) a run."""
    import psutil
    import torch

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": psutil.cpu_count(logical=True),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "git_commit": commit,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class RunSummary:
    """What every method reports about its run (summary.json). `lengths` is the max_length policy's report (None
    when the method never truncates); `dpo` / `zo` are the method's own facts."""

    method: str
    steps: int
    train_seconds: float
    final_loss: float
    trainable_params: int
    total_params: int
    train_examples: int
    test_examples: int
    weights: str  # what was saved, in words ("adapter/", "model/", "prompt.safetensors", "not saved ...")
    label_method: str  # how the loss positions were found, in words
    lengths: dict | None = None
    dpo: dict | None = None
    grpo: dict | None = None
    zo: dict | None = None
    peak_memory_bytes: int | None = None
    resumed_from: list[int] | None = None  # the checkpoint steps this run was resumed from, in order
    divergence: list[dict] | None = None  # steps the divergence guard skipped or stopped at, with their rows
    best: dict | None = None  # eval.every_steps: the best evaluation on the validation split {step, metric, value}
    tracking: dict | None = None  # train.report_to: where each tracker's logs went {tracker: place}

    @classmethod
    def from_dict(cls, d: dict) -> "RunSummary":
        return cls(**d)


@dataclass
class Trained:
    """What a run trained, loaded back: `model` is the full model, the base with the PEFT adapter, or (kind
    "prompt") the CLIP model whose prompt is `prompt` ({"context": [n_ctx, hidden] tensor, **prompt.json})."""

    kind: str  # "model" | "adapter" | "prompt"
    model: object
    processor: object
    family: object | None  # vlmfit.models.families.Family (None for a CLIP dual encoder)
    config: RunConfig
    prompt: dict | None = field(default=None, repr=False)


@dataclass
class RunDir:
    path: Path

    # -- create / open ----------------------------------------------------------------------------------------
    @staticmethod
    def default_name(cfg: RunConfig) -> str:
        return "{}-{}-{}".format(cfg.model.name.replace(":", "-").replace("/", "-"), cfg.method,
                                 _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))

    @staticmethod
    def path_for(cfg: RunConfig) -> Path:
        return Path(cfg.output.dir) / (cfg.output.name or RunDir.default_name(cfg))

    @classmethod
    def create(cls, cfg: RunConfig, overwrite: bool = False) -> "RunDir":
        path = cls.path_for(cfg)
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                what = "holds another run" if (path / CONFIG).is_file() else "is not empty"
                raise UserError(f"run directory '{path}' already exists and {what}", where="output.name",
                                hint="choose another output.name (or leave it unset for a timestamped name), resume it with "
                                     f"`vlmfit train --resume {path}`, or replace it with --overwrite")
            if not (path / CONFIG).is_file():
                raise UserError(f"'{path}' is not a run directory; --overwrite only replaces runs", where="output.name",
                                hint="choose another output.name")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        (path / CONFIG).write_text(cfg.to_yaml())
        run.write_json(ENVIRONMENT, environment())
        return run

    @staticmethod
    def is_run_dir(path: str | Path) -> bool:
        """`path` holds a run (or a complete checkpoint of one): its resolved recipe is there."""
        return (Path(path) / CONFIG).is_file()

    @staticmethod
    def is_record(name: str) -> bool:
        """A file a run directory gains after training (`vlmfit eval` results): not part of what it trained."""
        return name.startswith(EVAL_PREFIX)

    @classmethod
    def open(cls, path: str | Path, where: str | None = None) -> "RunDir":
        """An existing run directory; a UserError if `path` is not one."""
        p = Path(path)
        if not (p / CONFIG).is_file():
            raise UserError(f"not a run directory (no {CONFIG})", where=where or str(p),
                            hint="give a directory written by `vlmfit train`, e.g. runs/<name>")
        return cls(p)

    def config(self, overrides: list[str] | None = None) -> RunConfig:
        return load_config(self.path / CONFIG, overrides)

    # -- records ----------------------------------------------------------------------------------------------
    def write_samples(self, samples: list[dict]) -> Path:
        """GRPO's sampled completions (prompt row, answer, completion, reward per function) and each one's first
        image as a small PNG beside them, for the report."""
        folder = self.path / SAMPLES
        folder.mkdir(exist_ok=True)
        rows = []
        for i, s in enumerate(samples):
            s = dict(s)
            image = s.pop("image", None)
            if image is not None:
                name = f"{i:03d}.png"
                thumb = image.convert("RGB").copy()
                thumb.thumbnail((96, 96))
                thumb.save(folder / name)
                s["image"] = f"{SAMPLES}/{name}"
            rows.append(s)
        return self.write_json(f"{SAMPLES}/samples.json", rows)

    def samples(self) -> list[dict]:
        return self.read_json(f"{SAMPLES}/samples.json") or []

    def write_json(self, name: str, obj) -> Path:
        p = self.path / name
        p.write_text(json.dumps(obj, indent=2) + "\n")
        return p

    def read_json(self, name: str):
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else None

    def log_metrics(self, record: dict) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict]:
        p = self.path / METRICS
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    def write_summary(self, summary: RunSummary) -> Path:
        return self.write_json(SUMMARY, asdict(summary))

    def summary(self) -> RunSummary:
        d = self.read_json(SUMMARY)
        if d is None:
            raise UserError(f"the run has no {SUMMARY}: it did not finish", where=str(self.path))
        return RunSummary.from_dict(d)

    def write_eval(self, when: str, result: dict) -> Path:
        """when: "before" or "after" training; a later `vlmfit eval` gets a timestamped file of its own."""
        name = {"before": EVAL_BEFORE, "after": EVAL_AFTER}.get(when) or f"{EVAL_PREFIX}{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
        return self.write_json(name, result)

    def evals(self) -> tuple[dict | None, dict | None]:
        return self.read_json(EVAL_BEFORE), self.read_json(EVAL_AFTER)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"

    def complete_checkpoint(self, step: int, info: dict, keep: int | None = None) -> Path:
        """Mark checkpoint-<step> complete (after it was written): the resolved recipe beside the weights, so the
        checkpoint evaluates or exports on its own, then the marker, written to a temporary name and renamed. With
        `keep`, only the newest `keep` complete checkpoints stay (the one pruning rule, for every method)."""
        path = self.checkpoint(step)
        if (self.path / CONFIG).is_file():
            shutil.copyfile(self.path / CONFIG, path / CONFIG)
        tmp = path / f".{CHECKPOINT_DONE}.tmp"
        tmp.write_text(json.dumps({"step": step, **info}, indent=2) + "\n")
        os.replace(tmp, path / CHECKPOINT_DONE)
        if keep is not None:
            for _, old in self.complete_checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def save_zo_checkpoint(self, step: int, tuned, state: dict, keep: int) -> Path:
        """A forward-only run's checkpoint-<step>/ (step: forward passes): the tuned values (a 1-d tensor, safetensors)
        and the loop's state (JSON), written to a temporary directory and renamed into place, then marked complete."""
        from safetensors.torch import save_file

        final = self.checkpoint(step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({"tuned": tuned.contiguous()}, str(tmp / ZO_TUNED))
        (tmp / ZO_STATE).write_text(json.dumps(state) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return self.complete_checkpoint(step, {"world_size": 1}, keep=keep)

    def load_zo_checkpoint(self, path: Path):
        """(tuned values, loop state) of a forward-only checkpoint written by save_zo_checkpoint."""
        from safetensors.torch import load_file

        return load_file(str(path / ZO_TUNED))["tuned"], json.loads((path / ZO_STATE).read_text())

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        out = []
        for p in self.checkpoints.glob("checkpoint-*") if self.checkpoints.is_dir() else []:
            if (p / CHECKPOINT_DONE).is_file() and p.name.split("-")[-1].isdigit():
                out.append((int(p.name.split("-")[-1]), p))
        return sorted(out)

    def checkpoint_info(self, path: Path) -> dict:
        return json.loads((path / CHECKPOINT_DONE).read_text())

    def drop_incomplete_checkpoints(self) -> list[str]:
        """Remove checkpoint directories a kill or a full disk left half-written; their names."""
        done = {p for _, p in self.complete_checkpoints()}
        dropped = []
        for p in self.checkpoints.glob("checkpoint-*") if self.checkpoints.is_dir() else []:
            if p not in done:
                shutil.rmtree(p, ignore_errors=True)
                dropped.append(p.name)
        return dropped

    def truncate_metrics(self, step: int) -> int:
        """Keep the metrics records up to `step` (a resume redoes the steps after its checkpoint); how many went."""
        records = self.metrics()
        keep = [r for r in records if r.get("step", 0) <= step and "train_runtime" not in r]
        (self.path / METRICS).write_text("".join(json.dumps(r) + "\n" for r in keep))
        return len(records) - len(keep)

    def drop_empty_checkpoints(self) -> None:
        """The Trainer makes its output_dir even with save_strategy "no": don't leave an empty folder in the run."""
        if self.checkpoints.is_dir() and not any(self.checkpoints.iterdir()):
            self.checkpoints.rmdir()

    @property
    def tracking(self) -> Path:
        return self.path / TRACKING

    def write_profile(self, profile: dict) -> Path:
        return self.write_json(PROFILE, profile)

    # -- what the run trained -----------------------------------------------------------------------------------
    def save_trained(self, model, processor, kind: str, adapters: list[str] | None = None) -> str:
        """What a supervised or preference run trained, with the processor it trained with: "model" (full weights)
        or "adapter" (`adapters`: which PEFT adapters; DPO leaves out TRL's frozen 'ref' copy). Returns it in words."""
        self.save_processor(processor)
        return self.save_model(model, processor) if kind == "model" else self.save_adapter(model, adapters)

    def save_processor(self, processor) -> None:
        processor.save_pretrained(self.path / PROCESSOR)

    def save_model(self, model, processor) -> str:
        """Full weights (safetensors) with the processor beside them: the directory loads with from_pretrained."""
        model.save_pretrained(self.path / MODEL)
        processor.save_pretrained(self.path / MODEL)
        return f"{MODEL}/"

    def save_adapter(self, model, adapters: list[str] | None = None) -> str:
        """The PEFT adapter(s) of `model` (PEFT format, safetensors); `adapters` selects which (DPO leaves out
        TRL's frozen 'ref' copy)."""
        model.save_pretrained(self.path / ADAPTER, **({"selected_adapters": adapters} if adapters else {}))
        return f"{ADAPTER}/"

    def save_prompt(self, context, info: dict) -> str:
        """CLIP prompt tuning: the context vectors [n_ctx, hidden] and how to use them (prompt.json)."""
        from safetensors.torch import save_file

        save_file({"context": context.detach().cpu().contiguous()}, str(self.path / PROMPT))
        (self.path / PROMPT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        return PROMPT

    @property
    def is_checkpoint(self) -> bool:
        """A complete checkpoint-<step>/ opened on its own: its weights, processor and recipe are in it, so it
        evaluates and exports like a finished run."""
        return (self.path / CHECKPOINT_DONE).is_file()

    def weights_path(self, kind: str) -> Path:
        """Where the run keeps what it trained of this kind ("model", "adapter", "prompt")."""
        if self.is_checkpoint and kind in ("model", "adapter"):
            return self.path
        return self.path / {"model": MODEL, "adapter": ADAPTER, "prompt": PROMPT}[kind]

    def processor_path(self) -> Path | None:
        """The processor the run trained with, if it saved one."""
        p = self.path if self.is_checkpoint else self.path / PROCESSOR
        return p if (p / "tokenizer_config.json").is_file() or (p / "processor_config.json").is_file() else None

    def trained_kind(self) -> str | None:
        """Which weights the run left: "model" (wins when both exist: DPO's merged policy), "adapter", "prompt"."""
        if self.is_checkpoint:  # a forward-only run's checkpoints hold flat tuned values: nothing to load alone
            return "adapter" if (self.path / "adapter_config.json").is_file() else "model" if (self.path / "config.json").is_file() else None
        for kind, name in (("model", MODEL), ("adapter", ADAPTER), ("prompt", PROMPT)):
            if (self.path / name).exists():
                return kind
        return None

    def load_trained(self, *, dtype: str | None = None, trainable: bool = False) -> Trained:
        """Load what the run trained, as it was trained: full weights; the base model of config.yaml (quantized as
        the run had it) with the adapter on top; or the CLIP model with the tuned prompt vectors."""
        cfg = self.config()
        kind = self.trained_kind()
        dtype = dtype or cfg.model.dtype
        if kind is None:
            raise UserError(f"the run directory has no saved weights ({MODEL}/, {ADAPTER}/ or {PROMPT})", where=str(self.path),
                            hint="was it trained with output.save_model: false? train it again with weights saved")
        if kind == "prompt":
            from safetensors.torch import load_file

            from vlmfit.models.load import load_dual_encoder

            model, processor = load_dual_encoder(cfg.model.name, cfg.model.revision, dtype)
            info = json.loads((self.path / PROMPT_INFO).read_text())
            ctx = load_file(str(self.path / PROMPT))["context"].to(next(model.parameters()).device)
            return Trained(kind, model, processor, None, cfg, {"context": ctx, **info})
        from vlmfit.models.load import load, load_for, load_processor

        if kind == "model":
            loaded = load(str(self.weights_path("model")), dtype)
            return Trained(kind, loaded.model, loaded.processor, loaded.family, cfg)
        from peft import PeftModel

        loaded = load_for(cfg, dtype=dtype)
        model = PeftModel.from_pretrained(loaded.model, str(self.weights_path("adapter")), is_trainable=trainable)
        processor = load_processor(str(self.processor_path())) if self.processor_path() else loaded.processor
        return Trained(kind, model, processor, loaded.family, cfg)
