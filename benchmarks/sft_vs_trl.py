"""vlmfit's SFT against plain TRL on the same model, data, LoRA adapters, optimizer, seed and steps, in one run.

Plain TRL: SFTTrainer with its default VLM collator (DataCollatorForVisionLanguageModeling) and PEFT's LoRA on the
very modules vlmfit resolves, two ways:
  trl                 `messages` rows: every token trained (what TRL does with chat rows)
  trl-completion      the same rows as prompt / completion with completion_only_loss: the reply tokens only, the
                      work vlmfit does (the equal-work baseline) TRL's padding-free mode
refuses vision datasets (SFTTrainer raises for them), so there is no padding-free baseline for VLMs.
vlmfit: `vlmfit train`'s trainer and training collator (labels on the assistant reply, lean loss: the LM head only
at labelled positions, processor cache), three ways:
  vlmfit              padded batches; the processor cache empty at the start (every example encoded in the timed run)
  vlmfit-packed       train.packing: true (one padding-free row per step), cache empty at the start
  vlmfit-packed-warm  the same with the cache filled beforehand, untimed (a later epoch, or a rerun on the same data)
  vlmfit-warm         padded batches, cache filled beforehand (for families that packing refuses, e.g. Gemma 3)
  vlmfit-full-logits  padded batches with train.lean_loss: false (the model's own loss over full logits), same labels
Each run gets its own empty $VLMFIT_CACHE/encoded (the benchmark models are read from the shared cache).

Each (system, repeat) runs in its own process, so peak memory (ru_maxrss, CPU) is that run's. Timed: the training
steps only (first step begin to last step end), not loading or saving. After training, both models are scored by
the same evaluator (vlmfit's constrained classification on held-out digits).

Families:
  qwen-mixed   Qwen2-VL (dynamic resolution, ~20M parameters), digits resized to 28-112 px: token counts vary
  gemma-262k   Gemma 3 with the real 262,144-token vocabulary (~35M parameters, embedding and head full size)
  demo         the demo (recipes/demo.yaml: tiny Qwen2-VL from scratch, full fine-tuning, 10 epochs of builtin:mnist):
               a model that learns, for test accuracy after the same epochs (--steps and --batch are ignored)

    python benchmarks/sft_vs_trl.py --family qwen-mixed --steps 40 --batch 8 --repeats 3
    python benchmarks/sft_vs_trl.py --family gemma-262k --steps 15 --batch 4 --repeats 3
    python benchmarks/sft_vs_trl.py --family qwen-mixed --steps 40 --batch 8 --repeats 3 --systems trl,trl-completion,vlmfit,vlmfit-full-logits
    python benchmarks/sft_vs_trl.py --family demo --repeats 3 --epochs 1 --systems trl,trl-completion,vlmfit
    python benchmarks/sft_vs_trl.py --family qwen-mixed --system vlmfit-packed-warm --out /tmp/x --profile   # one run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = (28, 56, 84, 112)
SYSTEMS = ("trl", "trl-completion", "vlmfit", "vlmfit-full-logits", "vlmfit-warm", "vlmfit-packed", "vlmfit-packed-warm")
DEFAULT_SYSTEMS = ("trl", "vlmfit", "vlmfit-packed", "vlmfit-packed-warm")
GEMMA_VOCAB = 262_144


def bench_model(family: str) -> Path:
    """The benchmark's models, random-init (seeded) from the tiny zoo's configs, built once into the cache:
    qwen-mixed: Qwen2-VL with a 512-wide, 6-layer language model (~20M parameters, the tiny tokenizer's vocabulary);
    gemma-262k: Gemma 3 with a 128-wide language model and the real 262,144-token vocabulary (~35M, mostly the
    embedding, tied with the head)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vlmfit.models.tiny import tiny_path
    from vlmfit.models.tiny.corpus import cache_root

    if family == "demo":
        return tiny_path("qwen2_vl")
    base = "qwen2_vl" if family == "qwen-mixed" else "gemma3"
    out = cache_root(None) / f"bench-{family}"
    if (out / "model.safetensors").is_file():
        return out
    config = AutoConfig.from_pretrained(str(tiny_path(base)))
    t = config.text_config
    if family == "qwen-mixed":
        t.hidden_size, t.num_hidden_layers, t.intermediate_size = 512, 6, 1376
        t.layer_types = [t.layer_types[0]] * 6
        t.num_attention_heads, t.num_key_value_heads = 8, 4
        t.rope_parameters["mrope_section"] = [8, 12, 12]  # head_dim 64: sections sum to 32
        config.vision_config.hidden_size = 512  # Qwen2-VL's merger writes the language model's width
    else:
        t.vocab_size, t.hidden_size, t.intermediate_size, t.head_dim = GEMMA_VOCAB, 128, 512, 32
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    AutoProcessor.from_pretrained(str(tiny_path(base))).save_pretrained(out)
    return out


def dataset(family: str, n: int, split: str):
    from vlmfit.data.builtin import load_builtin

    ds = load_builtin("mnist")[split]
    ds = ds.select(range(min(n, len(ds))))
    if family != "qwen-mixed":
        return ds

    def resize(ex, i):
        side = SIZES[i % len(SIZES)]
        return {"images": [im.resize((side, side)) for im in ex["images"]]}

    return ds.map(resize, with_indices=True)


class Clock:
    """Training-step time (on_step_begin of the first step to on_step_end of the last) and tokens seen."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if clock.t0 is None:
                    clock.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                clock.t1 = time.perf_counter()

        self.t0 = self.t1 = None
        self.callback = CB()
        self.tokens = self.trained = self.samples = 0

    def counting(self, collate):
        def wrapped(examples):
            batch = collate(examples)
            self.samples += len(examples)
            mask = batch.get("attention_mask")  # a packed batch has none: every position is a real token
            self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            labels = batch.get("labels")
            self.trained += int((labels[:, 1:] != -100).sum()) if labels is not None else 0
            return batch

        return wrapped


def child(args) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from vlmfit.chat.collate import VisionChatCollator
    from vlmfit.config import load_config
    from vlmfit.evaluate.classification import evaluate_classification
    from vlmfit.models.load import load
    from vlmfit.models.targets import resolve_for
    from vlmfit.models.tiny.corpus import DIGIT_WORDS
    from vlmfit.rundir import RunDir
    from vlmfit.train.trainer import trainer_arguments

    torch.manual_seed(0)
    name = str(bench_model(args.family))
    tmp = Path(args.out)
    if args.family == "demo":  # the demo recipe as it ships, full fine-tuning
        from vlmfit.config import recipe_path

        cfg = load_config(recipe_path("demo"), overrides=[f"output.dir={tmp}", "output.name=run", "model.dtype=float32",
                                                          "train.save_steps=100000", "train.logging_steps=50",
                                                          *([f"train.epochs={args.epochs}"] if args.epochs else [])])
        n_train, n_test = 10**9, 1000
    else:
        cfg = load_config(base={"model": {"name": name}}, overrides=[
            "method=lora", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", "train.lr=2e-3",
            "train.warmup_ratio=0", "train.logging_steps=1", f"train.save_steps={10 * args.steps}", "lora.r=16",
            f"output.dir={tmp}", "output.name=run", "model.dtype=float32"])
        n_train, n_test = args.steps * args.batch, 200
    loaded = load(name, "float32", None, cfg.model)
    train = dataset(args.family, n_train, "train")
    test = dataset(args.family, n_test, "test")
    labels = list(DIGIT_WORDS)
    resolved = resolve_for(loaded.model, loaded.family, cfg.lora)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clock = Clock()
    run = RunDir(tmp / "run")
    run.path.mkdir(parents=True, exist_ok=True)
    if args.system.startswith("vlmfit"):
        from rich.console import Console

        from vlmfit.models.targets import make_trainable
        from vlmfit.train.sft import make_trainer, train_collator

        if "packed" in args.system:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"packing": True})})
        if args.system == "vlmfit-full-logits":
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lean_loss": False})})
        model, _ = make_trainable(loaded.model, loaded.family, cfg.method, cfg.lora)
        collator = train_collator(VisionChatCollator(loaded.processor, loaded.family), cfg, Console(quiet=True))
        if args.system.endswith("-warm"):
            for i in range(0, len(train), args.batch):
                collator.encode([train[j] for j in range(i, min(i + args.batch, len(train)))])
        trainer = make_trainer(model, loaded, clock.counting(collator), train, cfg, run)
    else:
        from trl import SFTConfig, SFTTrainer

        targs = trainer_arguments(cfg, run)
        targs.update(save_strategy="no", remove_unused_columns=True)  # TRL's own defaults for what vlmfit changes
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=resolved.modules)
        model = get_peft_model(loaded.model, lora) if cfg.method == "lora" else loaded.model
        rows = train.remove_columns("label")
        if args.system == "trl-completion":  # the reply alone is trained, as vlmfit trains it
            rows = rows.map(lambda ex: {"prompt": ex["messages"][:-1], "completion": ex["messages"][-1:]},
                            remove_columns=["messages"])
            targs["completion_only_loss"] = True
        trainer = SFTTrainer(model=model, args=SFTConfig(**targs), train_dataset=rows, processing_class=loaded.processor)
        trainer.data_collator = clock.counting(trainer.data_collator)
    trainer.add_callback(clock.callback)
    profiler = None
    if args.profile:
        from vlmfit.train.profile import StepProfiler

        profiler = StepProfiler(run)
        profiler.attach(trainer.model, loaded.family)
        trainer.add_callback(profiler)
    trainer.train()
    if profiler is not None:
        from rich.console import Console

        from vlmfit.train.profile import profile_table

        Console(stderr=True).print(profile_table(profiler.summary()))
    rss_trained = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = clock.t1 - clock.t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    scorer = VisionChatCollator(loaded.processor, loaded.family)
    acc = evaluate_classification(model, scorer, test, labels, ["constrained"], 32)["constrained"]["accuracy"]
    print("RESULT " + json.dumps({
        "system": args.system, "seconds": seconds, "samples_per_s": clock.samples / seconds,
        "tokens_per_s": clock.tokens / seconds, "trained_tokens_per_s": clock.trained / seconds,
        "trained_token_share": clock.trained / max(clock.tokens, 1), "peak_rss_mib": rss_trained / 1024,
        "rss_after_load_mib": rss_loaded / 1024, "final_loss": losses[-1], "accuracy": acc,
        "params": sum(p.numel() for p in model.parameters()), "test_examples": len(test)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["qwen-mixed", "gemma-262k", "demo"], default="qwen-mixed")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=float, help="demo: epochs (default: the recipe's 10)")
    ap.add_argument("--system", choices=list(SYSTEMS))
    ap.add_argument("--out")
    ap.add_argument("--profile", action="store_true", help="with --system: where that run's steps go, on stderr")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help="comma-separated, from " + ", ".join(SYSTEMS))
    args = ap.parse_args()
    if args.system:
        return child(args)
    import tempfile

    import os

    from vlmfit.cache import cache_dir

    bench_model(args.family)  # built once, before any timed run
    systems = tuple(args.systems.split(","))
    if systems[0] != "trl" or not set(systems) <= set(SYSTEMS):
        sys.exit(f"--systems: trl first, then any of {', '.join(SYSTEMS[1:])}")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for r in range(args.repeats):
        for system in systems:  # interleaved, so a slow spell of the machine hits every system
            with tempfile.TemporaryDirectory() as out:
                cache = Path(out) / "cache"
                (cache / "tiny").mkdir(parents=True)
                for model_dir in cache_dir("tiny").iterdir():  # the models, not the encoded examples
                    (cache / "tiny" / model_dir.name).symlink_to(model_dir)
                cmd = [sys.executable, __file__, "--family", args.family, "--steps", str(args.steps), "--batch",
                       str(args.batch), "--system", system, "--out", out, *(["--epochs", str(args.epochs)] if args.epochs else [])]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VLMFIT_CACHE": str(cache)})
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{system} run {r} failed:\n{proc.stderr[-3000:]}")
                results[system].append(json.loads(line[7:]))
                print(f"  repeat {r + 1} {system}: {results[system][-1]['seconds']:.1f} s", file=sys.stderr)
    med = {s: {k: statistics.median(x[k] for x in rs) for k in rs[0] if k != "system"} for s, rs in results.items()}
    spread = {s: {k: (min(x[k] for x in rs), max(x[k] for x in rs)) for k in rs[0] if k != "system"}
              for s, rs in results.items()}
    what = (f"the demo recipe (full fine-tuning, {args.epochs or 10:g} epochs x 4,000 digits, batch 32)" if args.family == "demo" else
            f"{args.steps} steps x batch {args.batch}, LoRA r=16 on the language model")
    print(f"\n{args.family}: {what}, AdamW, "
          f"median of {args.repeats} runs each [min-max]\n")
    print("| | plain TRL | " + " | ".join(systems[1:]) + " | " + " | ".join(f"{s} / TRL" for s in systems[1:]) + " |")
    print("|---" * (2 * len(systems)) + "|")
    rows = [("samples/s", "samples_per_s", "{:.2f}"), ("input tokens/s", "tokens_per_s", "{:.0f}"),
            ("trained tokens/s", "trained_tokens_per_s", "{:.0f}"), ("share of tokens trained", "trained_token_share", "{:.2f}"),
            ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"), ("RSS after loading (MiB)", "rss_after_load_mib", "{:.0f}"),
            ("final loss", "final_loss", "{:.3f}"), (f"test accuracy ({med['trl']['test_examples']:.0f} digits)", "accuracy", "{:.3f}")]
    def cell(s, key, fmt):
        lo, hi = spread[s][key]
        return f"{fmt.format(med[s][key])} [{fmt.format(lo)}-{fmt.format(hi)}]" if args.repeats > 1 else fmt.format(med[s][key])

    for label, key, fmt in rows:
        t, vs = med["trl"][key], [med[s][key] for s in systems[1:]]
        ratios = [f"{v / t:.2f}x" if t else "-" for v in vs]
        print(f"| {label} | {cell('trl', key, fmt)} | " + " | ".join(cell(s, key, fmt) for s in systems[1:]) + " | "
              + " | ".join(ratios) + " |")
    print(f"\nparams: {med['vlmfit']['params']:,.0f}; raw: {json.dumps(results)}", file=sys.stderr)


if __name__ == "__main__":
    main()
