"""Vision-tower work per GRPO step: vlmfit's method grpo (each image encoded once for all completions of its prompt;
with the tower frozen, the generation's features reused by the loss) against plain TRL GRPOTrainer on the same model,
data and settings (TRL repeats every prompt, images included, num_generations times).

Each measurement runs in a fresh process (peak RSS is per process): `--one vlmfit|trl` prints one JSON line; the driver
alternates the two `--repeats` times and prints medians with min-max.

    python benchmarks/grpo_vision.py --repeats 3 --steps 20 --image-size 224 --scope language
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def build(args, tmp):
    import datasets
    from rich.console import Console

    from vlmfit.config import load_config
    from vlmfit.data.builtin import load_builtin
    from vlmfit.models.load import load
    from vlmfit.rundir import RunDir
    from vlmfit.train.grpo import make_trainer, prompt_rows
    from vlmfit.train.rewards import rewards_for
    from vlmfit.train.trainer import with_row_ids

    mnist = load_builtin("mnist")["train"].select(range(args.steps * args.batch // args.generations))
    if args.image_size:
        mnist = mnist.map(lambda ex: {"images": [im.resize((args.image_size, args.image_size)) for im in ex["images"]]})
    prompts = prompt_rows(with_row_ids(datasets.Dataset.from_list(list(mnist))))
    tuning = "full" if args.scope == "all" else "lora"
    base = {"model": {"name": f"tiny:{args.family}"}, "method": "grpo",
            "grpo": {"tuning": tuning, "num_generations": args.generations, "max_completion_length": 4},
            "lora": {"scope": ["language"] if args.scope == "language" else ["language", "vision"]},
            "train": {"batch_size": args.batch, "max_steps": args.steps, "lr": 1e-4, "logging_steps": 1000,
                      "save_steps": 10**6, "precision": "fp32"},
            "output": {"dir": tmp, "name": "bench"}}
    cfg = load_config(base=base)
    loaded = load(f"tiny:{args.family}")
    run = RunDir.create(cfg, overwrite=True)
    rewards, weights = rewards_for(cfg.grpo.rewards)
    if args.one == "vlmfit":
        trainer, _ = make_trainer(loaded, prompts, rewards, weights, cfg, run, Console(quiet=True))
        return trainer, loaded
    # plain TRL: the same settings as TRL's own config takes them, its own trainer class, no vlmfit wrapper
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    targets = None
    if tuning == "lora":
        from vlmfit.models.targets import peft_config, resolve_for

        targets = peft_config(cfg.lora, resolve_for(loaded.model, loaded.family, cfg.lora))
        assert isinstance(targets, LoraConfig)
    trl_args = GRPOConfig(output_dir=f"{tmp}/trl", per_device_train_batch_size=args.batch, max_steps=args.steps,
                          learning_rate=1e-4, num_generations=args.generations, max_completion_length=4,
                          logging_steps=1000, save_strategy="no", report_to=[], bf16=False, disable_tqdm=True,
                          beta=0.0, seed=42)
    trainer = GRPOTrainer(model=loaded.model, reward_funcs=rewards, args=trl_args, train_dataset=prompts,
                          processing_class=loaded.processor, peft_config=targets)
    return trainer, loaded


def one(args) -> dict:
    import torch

    from vlmfit.models.rollout import inner_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, loaded = build(args, tmp)
        tower = inner_model(trainer.model)
        tower = getattr(tower, "visual", None) or getattr(tower, "vision_tower", None) or tower.vision_model
        seen = {"calls": 0, "images": 0}

        def hook(module, a, kw, out):
            seen["calls"] += 1
            grid = kw.get("grid_thw")
            seen["images"] += int(grid.shape[0]) if grid is not None else int((a[0] if a else kw["pixel_values"]).shape[0])

        tower.register_forward_hook(hook, with_kwargs=True)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    completions = args.steps * args.batch
    return {"which": args.one, "seconds": seconds, "completions_per_s": completions / seconds,
            "tower_images_per_step": seen["images"] / args.steps, "tower_calls_per_step": seen["calls"] / args.steps,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--one", choices=["vlmfit", "trl"])
    p.add_argument("--family", default="qwen2_vl")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32, help="completions per step")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--image-size", type=int, default=0, help="resize the 28 px digits to this square size (0: as is)")
    p.add_argument("--scope", choices=["language", "both", "all"], default="language",
                   help="language: LoRA on the language model (tower frozen); both: LoRA on both towers; all: full")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    results = {"vlmfit": [], "trl": []}
    for _ in range(args.repeats):
        for which in ("trl", "vlmfit"):
            cmd = [sys.executable, __file__, "--one", which] + [a for a in sys.argv[1:] if a not in ("--one",)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[which].append(json.loads(out))
    print(f"{args.family}, {args.batch} completions/step ({args.batch // args.generations} prompts x {args.generations}), "
          f"{args.steps} steps, images {args.image_size or 28} px, scope {args.scope}; median [min-max] of {args.repeats}")
    for key in ("tower_images_per_step", "tower_calls_per_step", "completions_per_s", "peak_rss_mib"):
        row = []
        for which in ("trl", "vlmfit"):
            v = [r[key] for r in results[which]]
            row.append(f"{which} {statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]")
        print(f"  {key:24s} " + "   ".join(row))


if __name__ == "__main__":
    main()
