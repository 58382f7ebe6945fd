"""Memory planner benchmark (issue 5): is `vlmfit plan` right?

(a) parameter counts from every shipped config vs the published sizes;
(b) predicted vs measured peak tensor memory of real training steps on this CPU: random-init models of the real
    classes (Qwen2.5-VL, SmolVLM/Idefics3, Gemma 3) scaled to ~70-100M parameters, methods full / lora / qlora,
    with and without gradient checkpointing, real processors and images;
(c) predicted vs published GPU measurements (REFERENCES.md), with the settings used.

    .venv/bin/python benchmarks/memory.py            # all three, prints markdown (~5-10 min on 2 cores)
    .venv/bin/python benchmarks/memory.py --only a    # one part
Each measurement runs in its own subprocess so that one run's freed memory and caches cannot blur the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1024**3
WORK = Path(tempfile.gettempdir()) / "vlmfit-bench-memory"

# Scaled-down text/vision sizes per family (real classes, real token ids from the tiny zoo's tokenizers).
SCALES = {
    "qwen2_5_vl": dict(
        text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=32000),
        vision=dict(depth=4, hidden_size=512, intermediate_size=1376, num_heads=8, out_hidden_size=768,
                    fullatt_block_indexes=[1, 3]),
        mrope=[16, 24, 24], image=(336, 336), pixels=(56 * 56, 336 * 336)),
    "smolvlm": dict(
        text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000, head_dim=64),
        vision=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                    image_size=256, patch_size=16),
        image=(512, 512)),
    "gemma3": dict(
        text=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=128, query_pre_attn_scalar=128, vocab_size=32000,
                  sliding_window=512, layer_types=["sliding_attention", "full_attention"] * 3),
        vision=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                    image_size=224, patch_size=14),
        image=(224, 224)),
}

# (family, method, checkpointing) — 10 configurations, 3 families, full / lora / qlora, with and without.
CONFIGS = [
    ("qwen2_5_vl", "full", False), ("qwen2_5_vl", "lora", False), ("qwen2_5_vl", "lora", True),
    ("qwen2_5_vl", "qlora", True), ("smolvlm", "full", True), ("smolvlm", "lora", False),
    ("smolvlm", "qlora", False), ("gemma3", "full", False), ("gemma3", "lora", True), ("gemma3", "qlora", False),
]
BATCH, TEXT_WORDS = 2, 100


def build(family: str) -> Path:
    """Save a scaled random-init model of `family` with a real processor into WORK/<family> (once)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vlmfit.models.tiny import tiny_path

    out = WORK / family
    if (out / "config.json").is_file():
        return out
    s = SCALES[family]
    tiny = tiny_path(family)
    cfg = AutoConfig.from_pretrained(tiny)
    for k, v in s["text"].items():
        setattr(cfg.text_config, k, v)
    for k, v in s["vision"].items():
        setattr(cfg.vision_config, k, v)
    types = getattr(cfg.text_config, "layer_types", None)
    if types and "layer_types" not in s["text"]:
        cfg.text_config.layer_types = [types[0]] * cfg.text_config.num_hidden_layers
    proc = AutoProcessor.from_pretrained(tiny)
    if family == "qwen2_5_vl":
        cfg.text_config.rope_parameters = dict(cfg.text_config.rope_parameters, mrope_section=s["mrope"])
        lo, hi = s["pixels"]
        proc.image_processor.size = {"shortest_edge": lo, "longest_edge": hi}
        proc.image_processor.min_pixels, proc.image_processor.max_pixels = lo, hi
    elif family == "smolvlm":
        from transformers import Idefics3ImageProcessor, Idefics3Processor

        tile = s["vision"]["image_size"]
        image = Idefics3ImageProcessor(do_image_splitting=True, size={"longest_edge": 4 * tile},
                                       max_image_size={"longest_edge": tile})
        per_tile = (tile // s["vision"]["patch_size"]) ** 2 // cfg.scale_factor**2
        proc = Idefics3Processor(image_processor=image, tokenizer=proc.tokenizer, image_seq_len=per_tile,
                                 chat_template=proc.chat_template)
    elif family == "gemma3":
        size = s["vision"]["image_size"]
        proc.image_processor.size = {"height": size, "width": size}
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def batch_for(path: Path, family: str):
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    h, w = SCALES[family]["image"]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    words = " ".join(["the chart shows values from zero to one hundred"] * (TEXT_WORDS // 8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": [{"type": "text", "text": words}]}]
    text = proc.apply_chat_template(messages)
    enc = proc(text=[text] * BATCH, images=[[image]] * BATCH, return_tensors="pt")
    enc["labels"] = enc["input_ids"].clone()
    return dict(enc)


def run_one(family: str, method: str, ckpt: bool, answer_only: bool = False, lean: bool = True, packing: bool = False) -> dict:
    """Child process: load and prepare the model exactly as `vlmfit train` does (vlmfit.models.load.load,
    vlmfit.models.targets.make_trainable / enable_checkpointing, the optimizer HF builds for train.optim), measure 2 steps,
    and ask the planner for the same batch."""
    import torch
    from transformers import AutoConfig

    from vlmfit.config import load_config
    from vlmfit.memory.estimate import PlanInputs, estimate
    from vlmfit.memory.measure import make_optimizer, measure_steps
    from vlmfit.memory.shape import model_shape
    from vlmfit.models.load import load
    from vlmfit.models.targets import enable_checkpointing, make_trainable

    torch.manual_seed(0)
    torch.set_num_threads(2)
    path = build(family)
    batch = batch_for(path, family)
    if answer_only:  # the loss on the reply alone, as vlmfit's labels have it (the image and prompt masked)
        batch["labels"][:, : -TEXT_WORDS] = -100
    cfg = load_config(base={
        "model": {"name": str(path), "dtype": "float32"}, "method": method,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear", "scope": ["language"]},
        "train": {"batch_size": BATCH, "gradient_checkpointing": ["language"] if ckpt else [], "optim": "adamw"},
    })  # fmt: skip
    loaded = load(cfg.model.name, "float32", None, cfg.model, "4bit" if method == "qlora" else "none")
    model, _ = make_trainable(loaded.model, loaded.family, cfg.method, cfg.lora)
    enable_checkpointing(model, loaded.family, list(cfg.train.gradient_checkpointing))
    opt = make_optimizer(model, "adamw")
    plan_batch = batch
    if packing:  # the same examples end to end in one row, as train.packing builds it (chat/rows.py)
        from vlmfit.chat.rows import pack_rows, split_batch
        from vlmfit.models.packing import unpack_inputs

        rows = split_batch(batch, [1] * BATCH, [[]] * BATCH, loaded.family)
        plan_batch = pack_rows(rows, loaded.family)
        batch = unpack_inputs(model, plan_batch, loaded.family)
    t0 = time.perf_counter()
    m = measure_steps(model, batch, opt, steps=2, lean=lean)
    seconds = time.perf_counter() - t0

    shape = model_shape(AutoConfig.from_pretrained(path))
    image_tokens = int((plan_batch["input_ids"][0] == shape.config.image_token_id).sum()) // (BATCH if packing else 1)
    seq = plan_batch["input_ids"].shape[1] // (BATCH if packing else 1)
    lo_hi = SCALES[family].get("pixels", (None, None))
    inp = PlanInputs(method=method, weight_dtype="float32", precision="fp32", device="cpu", batch_size=BATCH,
                     text_tokens=seq - image_tokens, image_hw=SCALES[family]["image"], min_pixels=lo_hi[0],
                     max_pixels=lo_hi[1], checkpointing=("language",) if ckpt else (), lora_r=16, lora_dropout=0.05,
                     label_tokens=int((batch["labels"][:, 1:] != -100).sum()) // BATCH,  # lean loss: what carries a label
                     lean_loss=lean, packing=packing)
    bd = estimate(shape, inp, family)
    return {"family": family, "method": method, "checkpointing": ckpt, "params": shape.total_params, "lean": lean,
            "packing": packing, "losses": m.losses,
            "labelled": int((batch["labels"][:, 1:] != -100).sum()) // BATCH,
            "seq": seq, "image_tokens": image_tokens, "planned_image_tokens": bd.tokens["image_tokens"],
            "measured": m.as_dict(), "predicted_peak": bd.peak, "predicted": bd.components,
            "phases": bd.phases, "seconds": seconds}


def part_a() -> list[str]:
    from vlmfit.memory.catalog import catalog, load_model_config, published_counts
    from vlmfit.memory.shape import model_shape

    rows = ["| model | computed params | published | scope | error | within |", "|---|---:|---:|---|---:|---|"]
    for hub_id in catalog()["models"]:
        shape = model_shape(load_model_config(hub_id))
        pubs = published_counts(hub_id) or [None]
        for p in pubs:
            if p is None:
                rows.append(f"| {hub_id} | {shape.total_params:,} | none published | | | |")
                continue
            n = shape.total_params - (shape.params["vision"] + shape.params["projector"] if p.scope == "language" else 0)
            err = (n - p.params) / p.params
            ok = "yes" if abs(err) <= p.tolerance() else "NO"
            shown = f"{int(p.params):,}" if p.kind == "exact" else f"{p.params / 1e9:g}B ({p.source.split(':')[0]})"
            rows.append(f"| {hub_id} | {n:,} | {shown} | {p.scope} | {100 * err:+.3f}% | {ok} (tol {100 * p.tolerance():.2g}%) |")
    return rows


def _child(*args) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(list(args))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{args} failed")
    return json.loads(line[-1][7:])


def part_d() -> list[str]:
    """Lean loss vs the model's full-logits loss, labels on the reply only, same batch, each in a fresh process."""
    rows = ["| family | method | labelled / seq | full logits: measured (predicted) | lean: measured (predicted) | lean / full |",
            "|---|---|---:|---:|---:|---:|"]
    for fam, method in (("qwen2_5_vl", "lora"), ("smolvlm", "lora"), ("gemma3", "full")):
        full, lean = (_child(fam, method, False, True, flag) for flag in (False, True))
        mib = lambda r, k: r[k]["peak"] / 2**20 if k == "measured" else r[k] / 2**20  # noqa: E731
        rows.append(f"| {fam} | {method} | {lean['labelled']} / {lean['seq']} | {mib(full, 'measured'):.0f} MiB "
                    f"({mib(full, 'predicted_peak'):.0f}) | {mib(lean, 'measured'):.0f} MiB ({mib(lean, 'predicted_peak'):.0f}) | "
                    f"{lean['measured']['peak'] / full['measured']['peak']:.2f}x |")
    return rows


def part_e() -> list[str]:
    """Padded vs packed (train.packing), the part (b) batch, each in a fresh process: measured and predicted."""
    rows = ["| family | method | padded: measured (predicted) | packed: measured (predicted) | packed / padded | "
            "planner error, packed |", "|---|---|---:|---:|---:|---:|"]
    for fam, method in (("qwen2_5_vl", "lora"), ("smolvlm", "lora"), ("qwen2_5_vl", "full")):
        padded, packed = (_child(fam, method, False, False, True, flag) for flag in (False, True))
        mib = lambda r: (r["measured"]["peak"] / 2**20, r["predicted_peak"] / 2**20)  # noqa: E731
        (a, pa), (b, pb) = mib(padded), mib(packed)
        rows.append(f"| {fam} | {method} | {a:.0f} MiB ({pa:.0f}) | {b:.0f} MiB ({pb:.0f}) | {b / a:.3f}x | "
                    f"{100 * (pb - b) / b:+.1f}% |")
    return rows


def part_b() -> tuple[list[str], list[dict]]:
    results = []
    for fam, method, ckpt in CONFIGS:
        cmd = [sys.executable, __file__, "--child", json.dumps([fam, method, ckpt])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{fam} {method} failed")
        results.append(json.loads(line[-1][7:]))
        r = results[-1]
        print(f"  {fam} {method} ckpt={ckpt}: measured {r['measured']['peak'] / GiB:.3f} GiB, predicted "
              f"{r['predicted_peak'] / GiB:.3f} GiB ({r['seconds']:.0f} s)", file=sys.stderr)
    rows = ["| family | params | method | checkpointing | seq (image tokens) | weights meas/pred | peak measured | "
            "peak predicted | error |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    errs = []
    for r in results:
        meas, pred = r["measured"]["peak"], r["predicted_peak"]
        err = (pred - meas) / meas
        errs.append(abs(err))
        w = f"{r['measured']['weights'] / 2**20:.0f} / {(r['predicted']['weights'] + r['predicted']['adapters']) / 2**20:.0f} MiB"
        rows.append(f"| {r['family']} | {r['params'] / 1e6:.0f}M | {r['method']} | {'language' if r['checkpointing'] else 'none'} "
                    f"| {r['seq']} ({r['image_tokens']}, planned {r['planned_image_tokens']}) | {w} | "
                    f"{meas / 2**20:.0f} MiB | {pred / 2**20:.0f} MiB | {100 * err:+.1f}% |")
    rows.append("")
    rows.append(f"Median absolute error **{100 * statistics.median(errs):.1f}%**, worst **{100 * max(errs):.1f}%** "
                f"over {len(errs)} configurations.")
    return rows, results


# Published GPU measurements (REFERENCES.md) and the settings that reproduce them in the planner.
PUBLISHED = [
    ("ms-swift: Qwen2.5-VL-7B LoRA r8 all-linear, ViT frozen, batch 1, max_pixels 1003520, max_len 2048, bf16",
     "Qwen/Qwen2.5-VL-7B-Instruct", dict(method="lora", lora_r=8, max_pixels=1003520, max_length=2048,
                                          text_tokens=2048, checkpointing=("language", "vision")), 22 * GiB, "22 GiB"),
    ("SmolVLM notebook: QLoRA r8, batch 4, L4, on the 2.2B SmolVLM. NOT comparable: no config of that model is "
     "shipped, the planner ran the 256M one (same Idefics3 family, 17 tiles per 1024 px image)",
     "HuggingFaceTB/SmolVLM-256M-Instruct", dict(method="qlora", lora_r=8, batch_size=4, text_tokens=128,
                                                  checkpointing=("language",)), 16.4e9, "16.4 GB (2.2B model)"),
]


def part_c() -> list[str]:
    from vlmfit.memory.catalog import load_model_config
    from vlmfit.memory.estimate import NF4_BITS, PlanInputs, estimate
    from vlmfit.memory.shape import model_shape

    rows = ["| published measurement | planner settings | predicted | published |", "|---|---|---:|---:|"]
    for what, ref, kw, value, shown in PUBLISHED:
        bd = estimate(model_shape(load_model_config(ref)), PlanInputs(**kw), ref)
        settings = ", ".join(f"{k}={v}" for k, v in kw.items())
        rows.append(f"| {what} | {settings}; image 1024x1024 | {bd.peak / GiB:.2f} GiB | {shown} ({value / GiB:.2f} GiB) |")
    # QLoRA paper: LLaMA-7B 4-bit base 5048 MB. LLaVA-1.5-7B's language model is that architecture (Vicuna-7B,
    # vocab 32064), so its shipped config gives the exact split: linears quantized, embeddings + head 16-bit.
    shape = model_shape(load_model_config("llava-hf/llava-1.5-7b-hf"))
    linear = sum(w for part, w, b, o, q in shape.linears.values() if part == "language" and q)
    other = shape.params["language"] + shape.params["embeddings"] - linear
    for dq in (False, True):
        mb = (linear * NF4_BITS[dq] / 8 + other * 2) / 1e6
        rows.append(f"| QLoRA paper: LLaMA-7B 4-bit base model 5048 MB | LLaVA-1.5-7B language model: {linear / 1e9:.3f}B "
                    f"params in NF4{' + double quant' if dq else ''}, {other / 1e6:.0f}M (embeddings, head, norms) in "
                    f"16 bit | {mb:,.0f} MB | 5048 MB |")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["a", "b", "c", "d", "e"])
    ap.add_argument("--child")
    ap.add_argument("--json", type=Path, help="write the raw part (b) results here")
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(run_one(*json.loads(a.child))))
        return
    t0 = time.time()
    out = []
    if a.only in (None, "a"):
        out += ["### (a) Parameter counts vs published", ""] + part_a() + [""]
    if a.only in (None, "b"):
        rows, results = part_b()
        out += ["### (b) Predicted vs measured peak tensor memory (CPU, fp32, 2 steps, batch 2)", ""] + rows + [""]
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
    if a.only in (None, "c"):
        out += ["### (c) Predicted vs published GPU measurements", ""] + part_c() + [""]
    if a.only in (None, "d"):
        out += ["### (d) Lean loss vs full logits (CPU, fp32, 2 steps, batch 2, labels on the reply only)", ""] + part_d() + [""]
    if a.only in (None, "e"):
        out += ["### (e) Padded vs packed batches (CPU, fp32, 2 steps, batch 2)", ""] + part_e() + [""]
    print("\n".join(out))
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
