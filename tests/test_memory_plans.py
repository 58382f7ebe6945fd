"""The memory plan's figures pinned bit for bit (tests/golden/memory/plans.json) for plans that reach every step of
`estimate`: weights per dtype and quantization, LoRA / full / DPO reference, each optimizer, language and vision
activations with and without checkpointing, packing, video, lean and full logits, CPU and CUDA, forward-only.
A refactor of the planner must leave them equal; a deliberate change of the model regenerates the file with
`python tests/test_memory_plans.py` and says why in its commit."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from vlmfit.memory import PlanInputs, estimate, load_model_config, model_shape

GOLDEN = Path(__file__).parent / "golden" / "memory" / "plans.json"
QWEN, GEMMA, SMOL, LLAVA = ("Qwen/Qwen2.5-VL-7B-Instruct", "google/gemma-4-E2B-it", "HuggingFaceTB/SmolVLM-256M-Instruct",
                            "llava-hf/llava-1.5-7b-hf")
BASE = PlanInputs(method="lora", max_pixels=1003520, text_tokens=512)
PLANS = {
    "qwen lora, reused image features": (QWEN, replace(BASE, reuse_features=True)),
    "qwen qlora, checkpointing, paged 8-bit adam, accumulation": (QWEN, replace(
        BASE, method="qlora", batch_size=2, grad_accum=4, checkpointing=("language", "vision"), optim="paged-adamw-8bit",
        lora_scope=("language", "vision"))),
    "qwen full, 8-bit adam, cpu fp32": (QWEN, replace(
        BASE, method="full", optim="adamw-8bit", device="cpu", weight_dtype="float32", precision="fp32")),
    "qwen full dpo reference, adamw on cpu": (QWEN, replace(BASE, method="full", batch_size=2, dpo_reference=True, device="cpu")),
    "qwen lora 8-bit base, full logits, no dropout, projector trained": (QWEN, replace(
        BASE, quantization="8bit", lean_loss=False, lora_dropout=0.0, lora_train_fully=("projector",), batch_size=3)),
    "qwen packing and video": (QWEN, replace(BASE, packing=True, pack_tokens=4096, batch_size=4, images=0, video_frames=16)),
    "qwen packing without a cap, cut at max_length": (QWEN, replace(BASE, packing=True, batch_size=2, max_length=900)),
    "qwen forward-only": (QWEN, replace(BASE, method="zo", batch_size=4)),
    "gemma4 lora both towers, sgd, fp16, packing not for the family": (GEMMA, replace(
        BASE, lora_scope=("language", "vision"), optim="sgd", precision="fp16", label_tokens=2048, text_tokens=2048,
        packing=True, batch_size=2)),
    "gemma4 qlora on cpu, no upcast, no double quant": (GEMMA, replace(
        BASE, method="qlora", device="cpu", kbit_upcast=False, double_quant=False, checkpointing=("language",))),
    "smolvlm lora, fp32 weights under bf16 autocast, packing": (SMOL, replace(
        BASE, packing=True, batch_size=2, weight_dtype="float32", precision="bf16")),
    "llava full, given media tokens": (LLAVA, replace(BASE, method="full", media_tokens=(576, 577), grad_accum=2)),
}
_SHAPES: dict = {}


def figures(model: str, inp: PlanInputs, estimate_fn=estimate) -> dict:
    if model not in _SHAPES:
        _SHAPES[model] = model_shape(load_model_config(model), model)
    bd = estimate_fn(_SHAPES[model], inp, model)
    return {"peak": bd.peak, "components": bd.components, "phases": bd.phases, "weights_by_part": bd.weights_by_part,
            "tokens": bd.tokens, "trainable_params": bd.trainable_params, "notes": bd.notes}


@pytest.mark.parametrize("plan", list(PLANS))
def test_plan_figures_are_unchanged(plan):
    want = json.loads(GOLDEN.read_text())[plan]
    got = json.loads(json.dumps(figures(*PLANS[plan])))  # the same round trip as the golden file's floats
    assert got == want
    assert all(math.isfinite(v) and v >= 0 for v in got["components"].values())


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps({name: figures(*p) for name, p in PLANS.items()}, indent=1) + "\n")
