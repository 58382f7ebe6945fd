"""Benchmark for issue 3: does assistant-only loss masking matter, and which parts should LoRA adapt?

(a) Loss masking. Train the offline tiny random-init Qwen2-VL (`tiny:qwen2_vl`, the `vlmfit demo` recipe: full
    fine-tuning, lr 3e-3, cosine, warmup 0.05, batch 32) from scratch on builtin:mnist twice, same seed and same
    steps: once with TRL's default VLM collator (labels = input_ids, only padding masked: loss on the system
    prompt, the question and the image placeholder tokens too) and once with vlmfit's VisionChatCollator
    (assistant reply + end of turn only). Both are evaluated the same way (vlmfit's evaluate_classification, all
    1,000 test images, constrained and free generation).
(b) LoRA scope. The model trained in (a) with vlmfit's collator is saved, loaded back with vlmfit's load(), and
    moved to a new domain: inverted digits (white background). Zero-shot accuracy, then LoRA r=8 alpha=16 on
    all linear layers with lora.scope [language] versus [language, vision], same seed and steps.

Everything goes through vlmfit's own pieces (load_config, load, load_splits, VisionChatCollator, make_trainable,
make_trainer, evaluate_classification); nothing here re-implements training or evaluation.

    .venv/bin/python benchmarks/labels.py [--epochs 4] [--lora-epochs 2] [--out /tmp/vlmfit-bench-labels]

Prints markdown tables and writes <out>/results.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import copy
import json
import shutil
import time
import warnings
from pathlib import Path

import datasets
import torch
import transformers
import yaml
from PIL import ImageOps
from rich.console import Console
from transformers import set_seed
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from vlmfit.config import load_config
from vlmfit.evaluate.classification import evaluate_classification
from vlmfit.models.load import load
from vlmfit.rundir import RunDir
from vlmfit.chat.collate import IGNORE_INDEX, VisionChatCollator
from vlmfit.data.splits import load_splits
from vlmfit.models.targets import make_trainable
from vlmfit.train.sft import make_trainer

DEMO = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml").read_text())
MODES = ["constrained", "generate"]
QUIET = Console(quiet=True)
MARKER = ".vlmfit-bench-labels"
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)


def config(base: dict, overrides: list[str]):
    # load_config writes overrides into the nested dicts of `base`: give it a copy
    return load_config(base=copy.deepcopy(base), overrides=overrides)


def train(cfg, loaded, collator, train_ds) -> tuple[torch.nn.Module, dict]:
    """make_trainable + make_trainer + trainer.train(), exactly as `vlmfit train` does, timed."""
    set_seed(cfg.train.seed)
    model = make_trainable(loaded.model, loaded.family, cfg.method, cfg.lora)[0]
    run = RunDir.create(cfg)  # make_trainer logs metrics.jsonl here
    trainer = make_trainer(model, loaded, collator, train_ds, cfg, run)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [r["loss"] for r in run.metrics() if "loss" in r]
    return model, {
        "steps": result.global_step,
        "train_seconds": round(seconds, 1),
        "final_loss": losses[-1] if losses else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def evaluate(model, collator, test_ds, labels) -> dict:
    t0 = time.perf_counter()
    res = evaluate_classification(model, collator, test_ds, labels, MODES, batch_size=64, max_new_tokens=8)
    out = {m: res[m]["accuracy"] for m in MODES}
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def label_stats(batch: dict, assistant: torch.Tensor) -> dict:
    """How many label tokens a collator trains on per batch, and which share of them are assistant tokens."""
    trained = batch["labels"] != IGNORE_INDEX
    n = int(trained.sum())
    return {"label_tokens": n, "assistant_label_tokens": int((trained & assistant).sum()),
            "assistant_fraction": int((trained & assistant).sum()) / n, "sequence_tokens": int(batch["attention_mask"].sum())}


def invert(example: dict) -> dict:
    return {"images": [ImageOps.invert(im.convert("RGB")) for im in example["images"]]}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=float, default=4, help="epochs of part (a), both runs (demo: 10)")
    ap.add_argument("--lora-epochs", type=float, default=2, help="epochs of each LoRA run in part (b)")
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--seeds", default="42", help="comma-separated; every part runs once per seed, (b) from the first seed's model")
    ap.add_argument("--no-lora", action="store_true", help="run part (a) only")
    ap.add_argument("--out", default="/tmp/vlmfit-bench-labels", help="run dirs, saved model and results.json")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise SystemExit(f"{out} exists and was not made by this script; pass another --out")
        shutil.rmtree(out)  # an earlier run of this benchmark
    out.mkdir(parents=True)
    (out / MARKER).touch()
    t_start = time.perf_counter()
    results: dict = {"args": vars(args), "a": {}, "b": {}}

    # ---- (a) loss masking: TRL's default VLM collator vs vlmfit's VisionChatCollator --------------------------
    cfg = config(DEMO, [f"train.epochs={args.epochs}", f"output.dir={out}"])
    splits = load_splits(cfg)
    train_ds, test_ds, labels = splits.train, splits.test, splits.labels
    probe = [train_ds[i] for i in range(cfg.train.batch_size)]
    base_dir = out / f"a-{seeds[0]}-vlmfit-model"
    for seed in seeds:
        for name in ("trl", "vlmfit"):
            cfg_a = config(DEMO, [f"train.epochs={args.epochs}", f"output.dir={out}", f"output.name=a-{seed}-{name}", f"train.seed={seed}"])
            loaded = load(cfg_a.model.name)  # the same saved random init every time
            ours = VisionChatCollator(loaded.processor, loaded.family)  # evaluation always uses vlmfit's collator
            collator = DataCollatorForVisionLanguageModeling(processor=loaded.processor) if name == "trl" else ours
            ref, batch = ours([dict(ex) for ex in probe]), collator([dict(ex) for ex in probe])
            assert torch.equal(batch["input_ids"], ref["input_ids"]), "the two collators must see the same tokens"
            results["a"].setdefault(name, {})["label_stats"] = label_stats(batch, ref["labels"] != IGNORE_INDEX)
            model, summary = train(cfg_a, loaded, collator, train_ds)
            results["a"][name][seed] = {**summary, **evaluate(model, ours, test_ds, labels)}
            if name == "vlmfit" and seed == seeds[0]:
                model.save_pretrained(base_dir)
                loaded.processor.save_pretrained(base_dir)
            del model, loaded

    # ---- (b) LoRA scope on a shifted domain (inverted digits), from the first seed's vlmfit model -------------
    if not args.no_lora:
        inv_train, inv_test = train_ds.map(invert), test_ds.map(invert)
        base = {**DEMO, "model": {"name": str(base_dir)}, "method": "lora", "lora": {"r": 8, "alpha": 16, "targets": "all-linear"}}
        loaded = load(str(base_dir))
        ours = VisionChatCollator(loaded.processor, loaded.family)
        results["b"]["zero-shot"] = {"trainable_params": 0, **evaluate(loaded.model, ours, inv_test, labels)}
        for seed in seeds:
            for scope in (["language"], ["language", "vision"]):
                name = "+".join(scope)
                cfg_b = config(base, [f"lora.scope=[{', '.join(scope)}]", f"train.epochs={args.lora_epochs}", f"train.lr={args.lora_lr}",
                                      f"train.seed={seed}", f"output.dir={out}", f"output.name=b-{seed}-{name}"])
                loaded = load(str(base_dir))  # fresh copy: get_peft_model wraps the model in place
                model, summary = train(cfg_b, loaded, ours, inv_train)
                results["b"].setdefault(name, {})[seed] = {**summary, **evaluate(model, ours, inv_test, labels)}
                del model, loaded
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results, seeds, out)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def print_tables(r: dict, seeds: list[int], out: Path) -> None:
    a, b = r["a"], r["b"]
    trl, ours = a["trl"], a["vlmfit"]
    print(f"\n### (a) loss masking: tiny:qwen2_vl from scratch, {ours[seeds[0]]['steps']} steps per run\n")
    print("| collator | label tokens / batch of 32 | assistant share of label tokens |\n|---|---:|---:|")
    for name, title in (("trl", "TRL DataCollatorForVisionLanguageModeling (default)"), ("vlmfit", "vlmfit VisionChatCollator")):
        st = a[name]["label_stats"]
        print(f"| {title} | {st['label_tokens']} of {st['sequence_tokens']} | {pct(st['assistant_fraction'])} |")
    print("\n| seed | TRL constrained | vlmfit constrained | vlmfit - TRL | TRL generate | vlmfit generate | vlmfit - TRL | train s TRL / vlmfit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in [*seeds, "mean"]:
        t, o = (trl[s], ours[s]) if s != "mean" else ({m: mean(trl[x][m] for x in seeds) for m in MODES}, {m: mean(ours[x][m] for x in seeds) for m in MODES})
        times = f"{t['train_seconds']} / {o['train_seconds']}" if s != "mean" else ""
        print(f"| {s} | " + " | ".join(f"{pct(t[m])} | {pct(o[m])} | {100 * (o[m] - t[m]):+.1f} pts" for m in MODES) + f" | {times} |")
    wins = sum(ours[s]["constrained"] > trl[s]["constrained"] for s in seeds)
    print(f"\nvlmfit's collator better (constrained) in {wins} of {len(seeds)} seeds")
    if b:
        z = b["zero-shot"]
        print(f"\n### (b) LoRA r=8 alpha=16 all-linear on inverted digits, from seed {seeds[0]}'s vlmfit model, "
              f"{b['language'][seeds[0]]['steps']} steps per run\n")
        print(f"base model: upright digits {pct(ours[seeds[0]]['constrained'])} constrained; inverted digits zero-shot "
              f"{pct(z['constrained'])} constrained, {pct(z['generate'])} generate\n")
        print("| seed | scope | trainable params | constrained | generate | vs zero-shot (constrained) | train s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for s in seeds:
            for name, x in ((n, b[n][s]) for n in ("language", "language+vision")):
                print(f"| {s} | {name} | {x['trainable_params']:,} | {pct(x['constrained'])} | {pct(x['generate'])} | "
                      f"{100 * (x['constrained'] - z['constrained']):+.1f} pts | {x['train_seconds']} |")
        for m in MODES:
            d = [b["language+vision"][s][m] - b["language"][s][m] for s in seeds]
            print(f"\n[language, vision] - [language], {m}: mean {100 * mean(d):+.1f} pts "
                  f"(per seed {', '.join(f'{100 * x:+.1f}' for x in d)})", end="")
        print()
    print(f"\ntotal {r['total_seconds']} s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
