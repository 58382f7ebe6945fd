"""Memory techniques as recipe options: QLoRA (4-bit NF4, double quant), 8-bit loading, checkpointing per tower,
8-bit optimizers, image resolution caps. Gradient accumulation (4 x 1 == 1 x 4) is tests/test_accumulation.py."""

import json

import pytest
import torch
from rich.console import Console

from vlmfit.config import load_config
from vlmfit.errors import UserError
from vlmfit.models.load import load
from vlmfit.chat.collate import VisionChatCollator
from vlmfit.models.targets import enable_checkpointing
from vlmfit.train.sft import train_sft

from helpers import digit_image
from vlmfit.chat.schema import chat_example

QUIET = Console(quiet=True)


def recipe(tmp_path, *sets):
    base = ["model.name=tiny:qwen2_vl", f"output.dir={tmp_path}", "output.name=r", "data.train_limit=16", "data.eval_limit=8",
            "train.max_steps=4", "train.batch_size=2", "train.lr=1e-2", "train.warmup_ratio=0", "train.logging_steps=1"]
    return load_config(base={"model": {"name": "x"}}, overrides=base + list(sets))


def test_qlora_trains_adapters_on_a_4bit_base_with_checkpointing_and_8bit_adam(tmp_path):
    cfg = recipe(tmp_path, "method=qlora", "lora.scope=[language,vision]", "train.gradient_checkpointing=[language,vision]",
                 "train.optim=paged-adamw-8bit")
    run = train_sft(cfg, QUIET)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and (run / "adapter" / "adapter_model.safetensors").is_file()
    loaded = load("tiny:qwen2_vl", model_cfg=cfg.model, quantization="4bit")
    kinds = {type(m).__name__ for n, m in loaded.model.named_modules() if n.startswith("model.language_model.layers")}
    assert "Linear4bit" in kinds  # the language model is NF4...
    assert not any(type(m).__name__ == "Linear4bit" for n, m in loaded.model.named_modules() if n.startswith("model.visual"))
    q = next(m for m in loaded.model.modules() if type(m).__name__ == "Linear4bit")
    assert q.weight.quant_state.nested  # ...with double quantization
    losses = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_8bit_loading():
    loaded = load("tiny:qwen2_vl", quantization="8bit")
    assert any(type(m).__name__ == "Linear8bitLt" for m in loaded.model.modules())
    batch = VisionChatCollator(loaded.processor, loaded.family)([chat_example("q?", "one", [digit_image(0)])])
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**batch).loss)


@pytest.mark.parametrize("parts", [["vision"], ["language"], ["language", "vision"]])
def test_checkpointing_per_tower(tmp_path, parts):
    from vlmfit.models.targets import part_of

    loaded = load("tiny:qwen2_vl")
    enable_checkpointing(loaded.model, loaded.family, parts)
    flags = {part_of(n, loaded.family): m.gradient_checkpointing for n, m in loaded.model.named_modules()
             if isinstance(getattr(m, "gradient_checkpointing", None), bool) and part_of(n, loaded.family)}
    assert {p for p, on in flags.items() if on} == set(parts)
    # Training still matches the un-checkpointed gradient exactly.
    batch = VisionChatCollator(loaded.processor, loaded.family)([chat_example("q?", "one", [digit_image(0)])])
    loaded.model.train()
    loaded.model(**batch).loss.backward()
    ref = load("tiny:qwen2_vl")
    ref.model.train()
    ref.model(**batch).loss.backward()
    for (n, p), (_, q) in zip(loaded.model.named_parameters(), ref.model.named_parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_resolution_cap_bounds_image_tokens():
    cfg = load_config(base={"model": {"name": "tiny:qwen2_vl", "max_pixels": 56 * 56}})
    capped = load("tiny:qwen2_vl", model_cfg=cfg.model)
    free = load("tiny:qwen2_vl")
    ex = chat_example("q?", "one", [digit_image(0, (112, 112))])
    image_id = free.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n = [int((VisionChatCollator(x.processor, x.family)([ex])["input_ids"] == image_id).sum()) for x in (free, capped)]
    assert n == [16, 4]
    with pytest.raises(UserError, match="model.max_soft_tokens not supported for qwen2_vl"):
        load("tiny:qwen2_vl", model_cfg=load_config(base={"model": {"name": "x", "max_soft_tokens": 70}}).model)


def test_checkpointing_keeps_a_frozen_vision_tower_out_of_autograd():
    """LoRA on the language model with checkpointing: the frozen vision tower's patch embedding output must not
    require grad (transformers' and PEFT's input-grad hooks made it, so the whole tower kept its activations), and
    the adapters' gradients are those of the un-checkpointed model."""
    from vlmfit.models.targets import make_trainable

    lora = load_config(base={"model": {"name": "tiny:qwen2_vl"}, "method": "lora", "lora": {"dropout": 0.0}}).lora
    grads = {}
    for parts in ((), ("language",), ("language", "vision")):
        loaded = load("tiny:qwen2_vl")
        torch.manual_seed(0)  # the same LoRA initialisation (lora_A is random) for every variant
        model, _ = make_trainable(loaded.model, loaded.family, "lora", lora)
        enable_checkpointing(model, loaded.family, list(parts))
        seen = []
        model.get_submodule("base_model.model.model.visual.patch_embed").register_forward_hook(
            lambda m, i, out: seen.append(out.requires_grad))
        batch = VisionChatCollator(loaded.processor, loaded.family)([chat_example("q?", "one", [digit_image(0)])])
        model.train()
        model(**batch).loss.backward()
        assert seen == [False], parts
        grads[parts] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for parts, g in grads.items():
        assert g.keys() == grads[()].keys() and all(torch.allclose(g[n], grads[()][n], atol=1e-6) for n in g), parts


def test_dataloader_workers_collate_the_same_batches(tmp_path):
    """A collating worker process (train.dataloader_workers) changes where batches are built, not which:
    the losses equal those of collating in the training process."""
    losses = {}
    for workers in (0, 1):
        cfg = recipe(tmp_path / f"w{workers}", "method=full", "model.dtype=float32", "train.max_steps=3",
                     f"train.dataloader_workers={workers}", "eval.before=false", "eval.after=false")
        run = train_sft(cfg, QUIET)
        losses[workers] = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses[1]) == 3 and losses[1] == losses[0]
