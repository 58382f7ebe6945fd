"""Modules kept in host memory on a GPU run (models/placement.py): which ones a recipe keeps, that `.to()` leaves
them there, that the model computes the same with them kept, and that a merged export still writes every weight of
the base (Gemma 4's audio tower included)."""

import pytest
import torch
from safetensors.torch import load_file

from vlmfit.config import load_config
from vlmfit.models.families import get_family
from vlmfit.models.load import load
from vlmfit.models.placement import host_modules, place
from vlmfit.models.targets import make_trainable
from vlmfit.models.tiny import tiny_path

TABLE = "model.language_model.embed_tokens_per_layer"


def _model_cfg(**kw):
    return load_config(base={"model": {"name": "x", **kw}}).model


@pytest.fixture(scope="module")
def gemma4_with_audio(tmp_path_factory):
    """The tiny Gemma 4 with a small audio tower (the zoo's has none), random-init, saved as a base to load."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.models.gemma4.configuration_gemma4 import Gemma4AudioConfig

    out = tmp_path_factory.mktemp("gemma4-audio")
    config = AutoConfig.from_pretrained(str(tiny_path("gemma4")))
    config.audio_config = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            subsampling_conv_channels=(8, 4), output_proj_dims=32)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    AutoProcessor.from_pretrained(str(tiny_path("gemma4"))).save_pretrained(out)
    return out


def test_which_modules_a_recipe_keeps_on_the_host(gemma4_with_audio):
    model = load(str(gemma4_with_audio), dtype="float32").model
    fam = get_family("gemma4")
    assert set(host_modules(model, fam, _model_cfg(), "lora")) == {"model.audio_tower", "model.embed_audio", TABLE}
    assert set(host_modules(model, fam, _model_cfg(), "full")) == {"model.audio_tower", "model.embed_audio"}  # trained
    assert set(host_modules(model, fam, _model_cfg(per_layer_embeddings="cpu"), "full")) >= {TABLE}
    assert set(host_modules(model, fam, _model_cfg(per_layer_embeddings="device"), "qlora")) == {"model.audio_tower",
                                                                                                  "model.embed_audio"}
    assert host_modules(model, fam, _model_cfg(per_layer_embeddings="device", unused_towers="device"), "lora") == {}
    qwen = load("tiny:qwen2_vl", dtype="float32")
    assert host_modules(qwen.model, qwen.family, _model_cfg(), "lora") == {}


def test_kept_modules_stay_on_the_host_and_compute_the_same():
    from vlmfit.chat.collate import VisionChatCollator
    from vlmfit.chat.schema import chat_example

    from helpers import digit_image

    loaded = load("tiny:gemma4", dtype="float32")
    batch = VisionChatCollator(loaded.processor, loaded.family)([chat_example("What digit is this?", "seven", [digit_image(0)])])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref = loaded.model(**inputs).logits
    lines = place(loaded.model, host_modules(loaded.model, loaded.family, _model_cfg(), "lora"))
    assert len(lines) == 1 and TABLE in lines[0] and "GiB off the device" in lines[0]
    with torch.no_grad():
        kept = loaded.model(**inputs).logits
    assert torch.allclose(kept, ref, rtol=1e-6, atol=0)
    loaded.model.to("meta")  # any .to() of the model (the Trainer's): the table keeps its storage on the host
    table = loaded.model.get_submodule(TABLE)
    assert table.weight.device.type == "cpu" and torch.isfinite(table.weight).all()
    assert loaded.model.lm_head.weight.device.type == "meta"


def test_merged_export_writes_the_base_audio_tower_unchanged(gemma4_with_audio, tmp_path):
    loaded = load(str(gemma4_with_audio), dtype="float32")
    place(loaded.model, host_modules(loaded.model, loaded.family, _model_cfg(), "lora"))
    lora = load_config(base={"model": {"name": "x"}, "lora": {"scope": ["language", "vision"]}}).lora
    model, _ = make_trainable(loaded.model, loaded.family, "lora", lora)
    for n, p in model.named_parameters():
        if "lora_B" in n and "language_model" in n:  # the audio tower's adapters get no gradient: they stay zero
            p.data.normal_(0, 0.02)  # the adapters change the language weights
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    base = load_file(gemma4_with_audio / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert merged.keys() == base.keys()
    audio = [k for k in base if ".audio_tower." in k or ".embed_audio." in k]
    assert audio and all(torch.equal(merged[k], base[k]) for k in audio)
    assert any(not torch.equal(merged[k], base[k]) for k in base if "language_model.layers" in k)


def test_planner_keeps_gemma4_e2b_table_and_audio_tower_off_the_device():
    """The reference run of issue 30 (LoRA on both towers, 2,048 text tokens, a 1024x1024 image, 8-bit AdamW, both
    towers checkpointed): the per-layer table (262,144 x 35 x 256 in bf16) and the audio tower leave the device
    bytes, appear as host memory, and each is suggested, with its saving, when the recipe keeps it on the device."""
    from dataclasses import replace

    from vlmfit.memory.catalog import load_model_config
    from vlmfit.memory.estimate import PlanInputs, estimate
    from vlmfit.memory.fit import memory_options
    from vlmfit.memory.shape import model_shape

    shape = model_shape(load_model_config("google/gemma-4-E2B-it"))
    inp = PlanInputs(method="lora", text_tokens=2048, lora_scope=("language", "vision"), optim="adamw-8bit",
                     checkpointing=("language", "vision"))
    on_host = estimate(shape, inp)
    assert on_host.host[TABLE] == 262_144 * 35 * 256 * 2
    assert set(on_host.host) == {TABLE, "model.audio_tower", "model.embed_audio"}
    on_device = estimate(shape, replace(inp, per_layer_embeddings="device", unused_towers="device"))
    assert on_device.host == {}
    assert on_device.peak - on_host.peak == pytest.approx(sum(on_host.host.values()))
    options = dict(memory_options(shape, on_device.inputs))
    assert options["model.per_layer_embeddings: cpu"] == pytest.approx(on_host.host[TABLE])
    assert "model.unused_towers: cpu" in options
    assert estimate(shape, replace(inp, device="cpu")).host == {}  # a CPU run has no device to spare
