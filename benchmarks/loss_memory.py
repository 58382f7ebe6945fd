"""Loss memory with many labelled positions (issue 30, item 1): the fused head + loss against full logits, and
against the lean loss of an earlier commit, each in a fresh process, on this CPU.

The model is sft_vs_trl.py's gemma-262k (Gemma 3 with the real 262,144-token vocabulary, a 128-wide language model,
head tied to the embedding), LoRA r=16 on the language model (the head frozen), fp32. One sequence of 2,049 text
tokens with every position labelled (`train.loss_on: all`: 2,048 labelled positions). Measured: the peak of live
tensor storage (vlmfit.memory.measure.TensorMemory: every storage an operator returns, freed when its storage dies)
during one forward + backward, minus what was alive before it (weights, adapters, the batch). Predicted: the
planner's "logits + loss" and language-activation components for the same shape (vlmfit.memory.estimate).

    python benchmarks/loss_memory.py                       # fused and full logits
    python benchmarks/loss_memory.py --before f1283e4      # and the lean loss as it was at that commit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

TOKENS = 2049


def child(system: str, before: str | None) -> dict:
    import torch

    from sft_vs_trl import bench_model
    from vlmfit.config import load_config
    from vlmfit.memory.measure import TensorMemory
    from vlmfit.models.load import load
    from vlmfit.models.targets import make_trainable

    torch.manual_seed(0)
    path = bench_model("gemma-262k")
    cfg = load_config(base={"model": {"name": str(path), "dtype": "float32"}, "method": "lora",
                            "lora": {"r": 16, "dropout": 0.0, "scope": ["language"]}})
    loaded = load(cfg.model.name, "float32", None, cfg.model)
    model, _ = make_trainable(loaded.model, loaded.family, "lora", cfg.lora)
    model.train()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(10, vocab, (1, TOKENS))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": ids.clone()}
    if system == "before":
        import importlib.util

        source = subprocess.run(["git", "show", f"{before}:src/vlmfit/models/loss.py"], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).parent).stdout
        file = Path(os.environ["OUT"]) / "loss_before.py"
        file.write_text(source)
        spec = importlib.util.spec_from_file_location("loss_before", file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        loss_fn = mod.causal_lm_loss
    elif system == "fused":
        from vlmfit.models.loss import causal_lm_loss as loss_fn
    else:
        loss_fn = None
    import gc

    gc.collect()
    tracker = TensorMemory("cpu")
    t0 = time.perf_counter()
    with tracker:
        before_bytes = tracker.register_existing()
        loss = model(**batch, use_cache=False).loss if loss_fn is None else loss_fn(model, batch)
        loss.backward()
        peak = tracker.peak
    seconds = time.perf_counter() - t0
    return {"system": system, "peak_above_mib": (peak - before_bytes) / 2**20, "loss": float(loss.detach()),
            "seconds": seconds, "labelled": int((batch["labels"][:, 1:] != -100).sum())}


def planned(lean: bool) -> dict:
    from transformers import AutoConfig

    from sft_vs_trl import bench_model
    from vlmfit.memory.estimate import PlanInputs, estimate
    from vlmfit.memory.shape import model_shape

    shape = model_shape(AutoConfig.from_pretrained(str(bench_model("gemma-262k"))))
    inp = PlanInputs(method="lora", weight_dtype="float32", precision="fp32", device="cpu", batch_size=1,
                     text_tokens=TOKENS, images=0, label_tokens=TOKENS - 1, lean_loss=lean, lora_r=16, lora_dropout=0.0)
    c = estimate(shape, inp, "gemma3").components
    return {"logits + loss": c["logits + loss"] / 2**20, "activations (language)": c["activations (language)"] / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", help="a commit whose models/loss.py is measured too (e.g. f1283e4)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], None if args.child[1] == "-" else args.child[1])))
        return
    import tempfile

    systems = ["full-logits", *(["before"] if args.before else []), "fused"]
    rows = {}
    for system in systems:
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run([sys.executable, __file__, "--child", system, args.before or "-"], capture_output=True,
                                  text=True, env={**os.environ, "OUT": out})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{system} failed:\n{proc.stderr[-3000:]}")
        rows[system] = json.loads(line[7:])
    plan = {"full-logits": planned(False), "fused": planned(True)}
    print(f"\ngemma-262k (262,144 vocabulary), LoRA, fp32, 1 x {TOKENS} tokens, {rows['fused']['labelled']} labelled; "
          "peak live tensor memory of one forward + backward above the weights (MiB)\n")
    print("| loss | measured | planned (logits + loss + language activations) | planner error | loss value | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for system in systems:
        r, p = rows[system], plan.get(system)
        total = p["logits + loss"] + p["activations (language)"] if p else None
        err = f"{100 * (total - r['peak_above_mib']) / r['peak_above_mib']:+.1f}%" if p else "-"
        name = f"lean loss at {args.before}" if system == "before" else system
        print(f"| {name} | {r['peak_above_mib']:,.0f} | {f'{total:,.0f}' if p else '-'} | {err} | {r['loss']:.4f} | "
              f"{r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
