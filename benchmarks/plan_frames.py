"""Frames per example that fit 14 GiB for recipes/plan-qwen2.5-vl-3b-video-14gb.yaml, with and without activation
offload and with the vision tower trained (issue 30): planned peaks from vlmfit.memory.estimate.plan_memory.

    python benchmarks/plan_frames.py
"""

from pathlib import Path

from vlmfit.config import load_config
from vlmfit.memory.estimate import plan_memory
from vlmfit.memory.budget import GiB
base = str(Path(__file__).parents[1] / "recipes" / "plan-qwen2.5-vl-3b-video-14gb.yaml")
for label, sets in (("recipe (checkpointing both towers)", []), ("activation offload language+vision, no checkpointing", ["train.activation_offload=[language,vision]", "train.gradient_checkpointing=[]"]),
                    ("checkpoint language, offload vision", ["train.activation_offload=[vision]", "train.gradient_checkpointing=[language]"]),
                    ("lora on vision too, ckpt both", ["lora.scope=[language,vision]"]),
                    ("lora on vision too, ckpt language, offload vision", ["lora.scope=[language,vision]", "train.activation_offload=[vision]", "train.gradient_checkpointing=[language]"])):
    row = []
    for n in (1, 2, 4, 8, 16):
        cfg = load_config(base, overrides=[f"data.frames_per_example={n}", *sets])
        bd = plan_memory(cfg, budget=int(14 * GiB))
        row.append(f"{n}: {bd.peak / GiB:.2f} ({bd.verdict}; host {sum(bd.host.values()) / GiB:.1f})")
    print(label, " | ".join(row))
