"""LoRA target resolution: scopes x names, wrapper modules (Gemma 4 clipped linears), Conv3d, projector in full."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from rich.console import Console

from vlmfit.config import load_config
from vlmfit.errors import UserError
from vlmfit.models.load import load
from vlmfit.models.targets import part_of, resolve_lora_targets
from vlmfit.chat.collate import VisionChatCollator
from vlmfit.models.targets import make_trainable

from helpers import multi_turn_example

QUIET = Console(quiet=True)


def lora_cfg(tmp_path, family, **lora):
    sets = [f"model.name=tiny:{family}", "method=lora", f"output.dir={tmp_path}"] + [f"lora.{k}={v}" for k, v in lora.items()]
    return load_config(base={"model": {"name": "x"}}, overrides=sets)


def test_gemma4_named_targets_in_vision_adapt_inner_linear_and_keep_clamps(tmp_path):
    loaded = load("tiny:gemma4")
    # PEFT alone cannot adapt the wrapper that the user's names point at.
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(load("tiny:gemma4").model, LoraConfig(target_modules=["q_proj", "v_proj"]))

    res = resolve_lora_targets(loaded.model, loaded.family, ["vision"], ["q_proj", "v_proj"])
    assert res.modules and all(n.endswith((".q_proj.linear", ".v_proj.linear")) for n in res.modules)
    assert all(part_of(n, loaded.family) == "vision" for n in res.modules)

    cfg = lora_cfg(tmp_path, "gemma4", scope="[vision]", targets="[q_proj,v_proj]", r=4)
    model = make_trainable(loaded.model, loaded.family, cfg.method, cfg.lora)[0]
    wrapper = model.get_submodule("base_model.model." + res.modules[0].removesuffix(".linear"))
    assert type(wrapper).__name__ == "Gemma4ClippableLinear" and hasattr(wrapper.linear, "lora_A")
    # Give the adapter real weight, and a tight output clamp, then check the clamp still bounds the output.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
        wrapper.output_max.fill_(0.05)
        wrapper.output_min.fill_(-0.05)
    x = torch.randn(3, 7, wrapper.linear.in_features) * 10
    y = wrapper(x)
    assert y.abs().max() <= 0.05 + 1e-7
    assert (wrapper.linear(x).abs().max() > 0.05)  # without the clamp the adapted linear exceeds the bound

    # A training step through the full model works and only adapters move.
    batch = VisionChatCollator(loaded.processor, loaded.family)([multi_turn_example()])
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)

    # Merge: the clamp still applies, and merged == adapter model on a real batch.
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
        adapter_dir = tmp_path / "adapter"
        model.save_pretrained(adapter_dir)
        merged = model.merge_and_unload()
        w = merged.get_submodule(res.modules[0].removesuffix(".linear"))
        assert type(w).__name__ == "Gemma4ClippableLinear" and type(w.linear) is torch.nn.Linear
        assert w(x).abs().max() <= 0.05 + 1e-7
        diff = (merged(**batch).logits - ref).abs().max().item()
    print(f"gemma4 merged vs adapter max abs diff: {diff:.2e}")
    assert diff < 1e-4
    # Reload base + saved adapter in a fresh model: same outputs again.
    fresh = load("tiny:gemma4").model
    clamped = fresh.get_submodule(res.modules[0].removesuffix(".linear"))  # the buffers are not part of the adapter
    clamped.output_max.fill_(0.05)
    clamped.output_min.fill_(-0.05)
    reloaded = PeftModel.from_pretrained(fresh, str(adapter_dir)).eval()
    with torch.no_grad():
        assert (reloaded(**batch).logits - ref).abs().max().item() < 1e-4


def test_conv3d_patch_embed_is_skipped_with_a_note():
    loaded = load("tiny:qwen2_vl")
    res = resolve_lora_targets(loaded.model, loaded.family, ["vision"], "all-linear")
    assert not any("patch_embed" in n for n in res.modules)
    assert any("patch_embed" in s and "Conv3d" in s for s in res.skipped)


def test_projector_trained_fully_while_towers_use_lora(tmp_path):
    loaded = load("tiny:qwen2_vl")
    cfg = lora_cfg(tmp_path, "qwen2_vl", scope="[language,vision]", train_fully="[projector]")
    model = make_trainable(loaded.model, loaded.family, cfg.method, cfg.lora)[0]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    merger = {n for n in trainable if ".visual.merger." in n}
    assert merger and all("lora_" not in n for n in merger)  # the projector: full copies, no LoRA
    others = trainable - merger
    assert others and all("lora_" in n for n in others)  # everything else trainable is LoRA
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".visual.blocks." in n and "lora_" not in n)


def test_targets_matching_nothing_is_a_user_error():
    loaded = load("tiny:qwen2_vl")
    with pytest.raises(UserError, match="no linear layers match"):
        resolve_lora_targets(loaded.model, loaded.family, ["language"], ["not_a_layer"])
