"""Benchmark for issue 7: forward-only prompt tuning of a CLIP model. Zero-shot, MeZO, SharpZO and CoOp (backprop)
on the same few-shot data with the same budget of forward passes: accuracy, forward passes and wall time to reach
a target accuracy, and peak memory against an inference forward of the same batch.

Setup: the offline tiny CLIP (`tiny:clip`, contrastively pretrained on upright builtin digits), few-shot task on a
shifted domain (`--source`, default builtin:mnist-noisy: Gaussian pixel noise, sd 80), k shots per class, the
SharpZO/CoOp initial context "a photo of a" (4 context vectors) in front of the class name. Learning rates: each method runs a small grid and keeps the rate with the lowest final
TRAINING loss on the few-shot set (never the test accuracy); every run is listed. Everything goes through vlmfit's
own pieces (load_config, make_target, the optimizers of vlmfit.train.zo, TensorMemory).

    .venv/bin/python benchmarks/zo.py [--budget 6000] [--seeds 0,1,2] [--out /tmp/vlmfit-bench-zo]

Prints markdown tables and writes <out>/results.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import gc
import itertools
import json
import statistics
import time
from pathlib import Path

import datasets
import torch
import transformers
from rich.console import Console

from vlmfit.config import load_config
from vlmfit.memory.measure import TensorMemory
from vlmfit.train.zo import OPTIMIZERS, Budget
from vlmfit.train.zo_targets import make_target

QUIET = Console(quiet=True)
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()

GRID = {"mezo": [0.1, 0.3, 1.0], "sharpzo": [0.1, 0.3, 1.0], "coop": [0.02, 0.2]}


def recipe(args, optimizer: str, seed: int, lr: float, budget: int, eval_every: int):
    base = {
        "model": {"name": args.model, "dtype": "float32"},
        "data": {"source": args.source, "shots_per_class": args.shots, "split_seed": seed},  # a new few-shot draw per seed
        "method": "zo",
        "zo": {"optimizer": optimizer, "forward_passes": budget, "lr": lr, "eval_every": eval_every,
               "generations": args.generations, "n_ctx": args.n_ctx},
        "train": {"seed": seed, "batch_size": args.batch_size},
        "eval": {"batch_size": 500},
        "output": {"dir": args.out},
    }
    return load_config(base=base)


def run_one(args, optimizer: str, seed: int, lr: float) -> dict:
    cfg = recipe(args, optimizer, seed, lr, args.budget, args.eval_every)
    torch.manual_seed(seed)
    target = make_target(cfg, QUIET)
    log = Budget(None, target, cfg.zo.eval_every)
    t0 = time.perf_counter()
    OPTIMIZERS[optimizer](target, cfg, log)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        train_loss = target.loss(None) if optimizer != "coop" else float(target.losses(target.params[0][None].detach(), None)[0])
    return {"optimizer": optimizer, "seed": seed, "lr": lr, "accuracy": log.history[-1]["accuracy"], "train_loss": train_loss,
            "forward_passes": log.used, "train_seconds": round(log.seconds, 2), "wall_seconds": round(wall, 2),
            "zero_shot": log.history[0]["accuracy"], "history": log.history, "outliers": log.outliers}


def at(history: list[dict], passes: int) -> float:
    """Accuracy of the last evaluation at or before `passes` forward passes."""
    return [h for h in history if h["forward_passes"] <= passes][-1]["accuracy"]


def reach(history: list[dict], target: float):
    for h in history:
        if h["accuracy"] >= target:
            return h["forward_passes"], h["train_seconds"]
    return None, None


def peak_above_existing(fn) -> int:
    """Peak live tensor bytes while `fn()` runs, above what was alive before it (weights, cached features, batch)."""
    gc.collect()
    tm = TensorMemory("cpu")
    with tm:
        base = tm.register_existing()
        fn()
        return tm.peak - base


def measure_memory(args) -> dict:
    """Live tensor bytes above the weights (TensorMemory, CPU). `whole`: an inference forward of the few-shot batch
    (image tower + text tower + logits) against a whole training run (feature caching + optimizer loop). `loop`:
    with the image features already cached, one loss evaluation without grad against the optimizer loop alone."""
    out = {}
    for what in ("inference", "sharpzo", "sharpzo (population_batch 8)", "mezo", "coop"):
        opt = what.split(" ")[0] if what != "inference" else "mezo"
        cfg = recipe(args, opt, 0, 1e-2, args.memory_budget, 10**9)
        if "population_batch" in what:
            cfg = cfg.model_copy(update={"zo": cfg.zo.model_copy(update={"population_batch": 8})})
        target = make_target(cfg, QUIET)
        images = [ex[0] for ex in _train_images(cfg)]
        feats_train = target.features.pop("train")

        def inference_forward():
            with torch.no_grad():
                px = target.processor(images=images, return_tensors="pt")["pixel_values"]
                img = torch.nn.functional.normalize(target.model.get_image_features(pixel_values=px).pooler_output, dim=-1)
                text = target.text_features(target.context(target.params[0][None]))
                assert torch.einsum("pce,ne->pnc", text, img).shape[-1] == len(target.class_names)

        def train_run():
            target.cache_images("train", images, feats_train[1].tolist(), batch_size=len(images))
            OPTIMIZERS[opt](target, cfg, Budget(None, target, 10**9, track_accuracy=False))

        out[what] = {"whole": peak_above_existing(inference_forward if what == "inference" else train_run)}
        target.features["train"] = target.features.get("train", feats_train)
        if what == "inference":
            out[what]["loop"] = peak_above_existing(lambda: torch.no_grad()(target.loss)(None))
        else:
            out[what]["loop"] = peak_above_existing(lambda: OPTIMIZERS[opt](target, cfg, Budget(None, target, 10**9, track_accuracy=False)))
        target = None  # free the model before the next one loads
    for k in list(out):  # both against the inference forward of the batch (image tower + text tower + logits)
        for part in ("whole", "loop"):
            out[k][f"{part}_ratio"] = out[k][part] / out["inference"]["whole"]
    return out


def measure_memory_lora(args) -> dict:
    """The same for a generative VLM (tiny:qwen2_vl, LoRA r=16 on the language model, one batch of 16 digits):
    an inference forward, MeZO and SharpZO steps on LoRA, and a backprop LoRA step (AdamW) for comparison."""
    from vlmfit.memory.measure import make_optimizer, measure_steps

    out = {}
    for what in ("inference", "mezo", "sharpzo", "backprop (LoRA SFT step, AdamW)"):
        cfg = load_config(base={
            "model": {"name": "tiny:qwen2_vl", "dtype": "float32"}, "method": "zo",
            "data": {"source": "builtin:mnist", "train_limit": 64, "eval_limit": 10}, "train": {"batch_size": 16},
            "lora": {"dropout": 0.0},
            "zo": {"optimizer": "mezo" if what == "inference" or what.startswith("backprop") else what,
                   "forward_passes": 24, "popsize": 4, "generations": 2, "eval_every": 10**9},
            "output": {"dir": args.out}})
        target = make_target(cfg, QUIET)
        batch = next(target.batches(16, 0))
        target.batches = lambda batch_size, seed: itertools.repeat(batch)  # every run sees this very batch
        if what.startswith("backprop"):
            for p in target.params:
                p.requires_grad_(True)
            target.model.train()
            m = measure_steps(target.model, batch, make_optimizer(target.model, "adamw"), steps=2)
            out[what] = {"peak_above_weights": m.peak - m.weights}
            continue
        if what == "inference":
            out[what] = {"peak_above_weights": peak_above_existing(lambda: torch.no_grad()(target.loss)(batch))}
        else:
            out[what] = {"peak_above_weights": peak_above_existing(
                lambda: OPTIMIZERS[what](target, cfg, Budget(None, target, 10**9, track_accuracy=False)))}
        target = None  # free the model before the next one loads
    inf = out["inference"]["peak_above_weights"]
    for k in out:
        out[k]["ratio_to_inference"] = out[k]["peak_above_weights"] / inf
    return out


def _train_images(cfg):
    from vlmfit.data.splits import load_splits

    return load_splits(cfg).train["images"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny:clip")
    ap.add_argument("--source", default="builtin:mnist-noisy")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=160, help="few-shot images per loss evaluation (160 = all)")
    ap.add_argument("--budget", type=int, default=6000, help="forward passes per run, every method")
    ap.add_argument("--generations", type=int, default=100, help="SharpZO switch point (CMA-ES generations)")
    ap.add_argument("--n-ctx", type=int, default=None, help="context vectors (default: the 4 words of 'a photo of a')")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--memory-budget", type=int, default=400, help="forward passes of the memory runs")
    ap.add_argument("--out", default="/tmp/vlmfit-bench-zo")
    ap.add_argument("--tables", metavar="RESULTS_JSON", help="only print the tables of an earlier run")
    args = ap.parse_args()
    if args.tables:
        r = json.loads(Path(args.tables).read_text())
        print_tables(r, [int(s) for s in r["args"]["seeds"].split(",")])
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runs = []
    for optimizer, lrs in GRID.items():
        for lr in lrs:
            for seed in seeds:
                r = run_one(args, optimizer, seed, lr)
                runs.append(r)
                print(f"{optimizer:8s} lr {lr:g} seed {seed}: acc {100 * r['accuracy']:.1f}%  train loss {r['train_loss']:.4f}  "
                      f"{r['train_seconds']} s", flush=True)
    memory = measure_memory(args)
    memory_lora = measure_memory_lora(args)
    results = {"args": vars(args), "runs": runs, "memory": memory, "memory_lora": memory_lora, "total_seconds": round(time.perf_counter() - t_start, 1)}
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results, seeds)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def print_tables(r: dict, seeds: list[int]) -> None:
    runs, a = r["runs"], r["args"]
    chosen = {}
    for opt, lrs in GRID.items():
        by_lr = {lr: [x for x in runs if x["optimizer"] == opt and x["lr"] == lr] for lr in lrs}
        best = min(lrs, key=lambda lr: med(x["train_loss"] for x in by_lr[lr]))
        chosen[opt] = by_lr[best]
    zero = med(x["zero_shot"] for x in runs)
    mezo_final = med(x["accuracy"] for x in chosen["mezo"])
    print(f"\n### Few-shot prompt tuning, {a['model']} on {a['source']}, {a['shots']} shots x 10 classes, "
          f"{a['budget']:,} forward passes per run, seeds {a['seeds']} (medians)\n")
    print(f"| method | lr (chosen by train loss) | test accuracy | vs zero-shot | forward passes to MeZO's final "
          f"{100 * mezo_final:.1f}% | train s to it | train s total |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| zero-shot (\"a photo of a {{class}}.\") | | {100 * zero:.1f}% | | | | |")
    for opt in ("mezo", "sharpzo", "coop"):
        xs = chosen[opt]
        hits = [reach(x["history"], mezo_final) for x in xs]
        n_hit = sum(h[0] is not None for h in hits)
        print(f"| {opt} | {xs[0]['lr']:g} | {100 * med(x['accuracy'] for x in xs):.1f}% | "
              f"{100 * (med(x['accuracy'] for x in xs) - zero):+.1f} pts | {med(h[0] for h in hits)} ({n_hit}/{len(hits)} runs) | "
              f"{med(h[1] for h in hits)} | {med(x['train_seconds'] for x in xs)} |")
    marks = [m for m in (500, 1000, 2000, 3000, 4000, a["budget"]) if m <= a["budget"]]
    print("\nTest accuracy at equal forward passes (median over seeds; chosen lr):\n")
    print("| method | " + " | ".join(f"{m:,}" for m in marks) + " |\n|---|" + "---:|" * len(marks))
    for opt in ("mezo", "sharpzo", "coop"):
        print(f"| {opt} | " + " | ".join(f"{100 * med(at(x['history'], m) for x in chosen[opt]):.1f}%" for m in marks) + " |")
    print("\nEvery run (final test accuracy, final few-shot training loss):\n")
    print("| method | lr | " + " | ".join(f"seed {s}" for s in seeds) + " |\n|---|---:|" + "---:|" * len(seeds))
    for opt, lrs in GRID.items():
        for lr in lrs:
            xs = {x["seed"]: x for x in runs if x["optimizer"] == opt and x["lr"] == lr}
            print(f"| {opt} | {lr:g} | " + " | ".join(f"{100 * xs[s]['accuracy']:.1f}% ({xs[s]['train_loss']:.3f})" for s in seeds) + " |")
    m = r["memory"]
    print(f"\n### Peak memory above the weights (live tensor bytes, CPU; {a['memory_budget']} forward passes per run)\n")
    print("| run | whole run: peak | ratio to an inference forward of the batch | optimizer loop alone (features cached): "
          "peak | ratio to the same inference forward |\n|---|---:|---:|---:|---:|")
    for k, v in m.items():
        print(f"| {k} | {v['whole'] / 2**20:.2f} MiB | {v['whole_ratio']:.2f}x | {v['loop'] / 2**20:.3f} MiB | {v['loop_ratio']:.2f}x |")
    print("\nGenerative VLM, tiny:qwen2_vl + LoRA r=16 (language), one batch of 16 digits:\n")
    print("| run | peak above weights | ratio to an inference forward of the same batch |\n|---|---:|---:|")
    for k, v in r["memory_lora"].items():
        print(f"| {k} | {v['peak_above_weights'] / 2**20:.2f} MiB | {v['ratio_to_inference']:.2f}x |")
    print(f"\ntotal {r['total_seconds']} s")


if __name__ == "__main__":
    main()
