"""The run directory and what goes in it: resolved config, environment, metrics.jsonl, loss curve, report.md."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from vlmfit.config import RunConfig
from vlmfit.errors import UserError

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
class RunDir:
    path: Path

    @classmethod
    def create(cls, cfg: RunConfig) -> "RunDir":
        name = cfg.output.name or "{}-{}-{}".format(
            cfg.model.name.replace(":", "-").replace("/", "-"), cfg.method, _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        )
        path = Path(cfg.output.dir) / name
        if path.exists() and any(path.iterdir()):
            raise UserError(f"run directory '{path}' already exists and is not empty", where="output.name",
                            hint="choose another output.name or leave it unset for a timestamped name")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        (path / "config.yaml").write_text(cfg.to_yaml())
        run.write_json("environment.json", environment())
        return run

    def write_json(self, name: str, obj) -> Path:
        p = self.path / name
        p.write_text(json.dumps(obj, indent=2) + "\n")
        return p

    def log_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def plot_loss(run: RunDir) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run.metrics() if "loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", ms=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_title(run.path.name, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run.path / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _acc(ev: dict | None, mode: str) -> str:
    if not ev or mode not in ev:
        return "-"
    return f"{100 * ev[mode]['accuracy']:.1f}%"


def _length_line(rep: dict) -> str:
    if rep.get("limit") is None:
        return "none (nothing truncated)"
    line = f"{rep['limit']} ({rep['policy']}); {rep['overlong']} examples longer, longest {rep['longest']} tokens"
    if rep.get("dropped"):
        line += f"; dropped {rep['dropped']} (rows and reasons in summary.json)"
    if rep.get("truncated"):
        line += f"; truncated {rep['truncated']} inside text"
    return line


def write_report(run: RunDir, cfg: RunConfig, summary: dict, eval_before: dict | None, eval_after: dict | None) -> Path:
    modes = [m for m in cfg.eval.modes if (eval_before and m in eval_before) or (eval_after and m in eval_after)]
    lines = [
        f"# Run {run.path.name}",
        "",
        f"- model: `{cfg.model.name}`  method: `{cfg.method}`  data: `{cfg.data.source}`",
        f"- trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,}",
        f"- steps: {summary['steps']}  train time: {summary['train_seconds']:.1f} s  final loss: {summary['final_loss']:.4f}",
        f"- training examples: {summary['train_examples']}  test examples: {summary['test_examples']}",
        f"- labels: {summary['label_method']} (loss on {cfg.train.loss_on} tokens)",
        f"- max_length: {_length_line(summary['max_length'])}",
        "",
        "| accuracy | before | after |",
        "|---|---|---|",
    ]
    lines += [f"| {m} | {_acc(eval_before, m)} | {_acc(eval_after, m)} |" for m in modes]
    lines += ["", "![loss](loss.png)", "", f"Weights: `{summary['weights']}`. Config: `config.yaml`. Environment: `environment.json`.", ""]
    out = run.path / "report.md"
    out.write_text("\n".join(lines))
    return out
