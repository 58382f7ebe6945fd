"""The memory planner: parameter counts, LoRA counts vs PEFT, how the breakdown responds, fit, budgets, measurement."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vlmfit.config import load_config
from vlmfit.errors import UserError
from vlmfit.memory import (
    PlanInputs,
    estimate,
    fit,
    load_model_config,
    model_shape,
    parse_budget,
    per_gpu,
    plan_memory,
    published_counts,
    shipped_ids,
)
from vlmfit.memory.budget import GiB, verdict
from vlmfit.memory.measure import TensorMemory, make_optimizer, measure_steps, predict_for_batch
from vlmfit.models.tiny import TINY_FAMILIES

RECIPES = Path(__file__).parents[1] / "src" / "vlmfit" / "recipes"
_SHAPES: dict = {}


def shape_of(ref):
    if ref not in _SHAPES:
        _SHAPES[ref] = model_shape(load_model_config(ref))
    return _SHAPES[ref]


@pytest.mark.parametrize("hub_id", shipped_ids())
def test_parameter_counts_match_published(hub_id):
    shape = shape_of(hub_id)
    for pub in published_counts(hub_id):
        n = shape.total_params
        if pub.scope == "language":
            n -= shape.params["vision"] + shape.params["projector"]
        assert abs(n - pub.params) / pub.params <= pub.tolerance(), (pub, n)


def test_exact_counts():
    assert shape_of("Qwen/Qwen2.5-VL-3B-Instruct").total_params == 3_754_622_976
    assert shape_of("Qwen/Qwen2.5-VL-7B-Instruct").total_params == 8_292_166_656
    assert shape_of("llava-hf/llava-1.5-7b-hf").total_params == 7_063_427_072


def test_load_model_config_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_model_config("Qwen/Qwen2.5-VL-3B-Instruct").model_type == "qwen2_5_vl"
    tiny = load_model_config("tiny:qwen2_vl")
    assert tiny.model_type == "qwen2_vl"
    (tmp_path / "config.json").write_text(tiny.to_json_string())
    assert load_model_config(str(tmp_path)).model_type == "qwen2_vl"
    assert load_model_config(str(tmp_path / "config.json")).model_type == "qwen2_vl"
    with pytest.raises(UserError) as e:
        load_model_config("Qwen/Qwen2.5-VL-3B-Instruc")
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in str(e.value)


def _peft_trainable(path, family, scope, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlmfit.models.targets import resolve_lora_targets

    model = AutoModelForImageTextToText.from_pretrained(path)
    res = resolve_lora_targets(model, family, scope, targets)
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=res.modules))
    return peft.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("family, scope, targets", [
    ("qwen2_5_vl", ["language"], "all-linear"),
    ("qwen2_5_vl", ["language", "vision"], ["q_proj", "v_proj", "qkv"]),
    ("gemma4", ["language", "vision"], "all-linear"),
])  # fmt: skip
def test_lora_counts_equal_peft(family, scope, targets):
    from vlmfit.models.families import get_family
    from vlmfit.models.tiny import tiny_path

    path = tiny_path(family)
    inp = PlanInputs(method="lora", lora_r=8, lora_scope=tuple(scope),
                     lora_targets=targets if isinstance(targets, str) else tuple(targets))
    predicted = estimate(shape_of(f"tiny:{family}"), inp).trainable_params
    assert predicted == _peft_trainable(path, get_family(family), scope, targets)


BASE = PlanInputs(method="lora", max_pixels=1003520, text_tokens=512)


def test_breakdown_responds():
    shape = shape_of("Qwen/Qwen2.5-VL-7B-Instruct")
    lora = estimate(shape, BASE)
    ckpt = estimate(shape, replace(BASE, checkpointing=("language",)))
    assert ckpt.components["activations (language)"] < 0.1 * lora.components["activations (language)"]
    assert ckpt.peak < lora.peak
    two, four = estimate(shape, replace(BASE, batch_size=2)), estimate(shape, replace(BASE, batch_size=4))
    assert four.components["activations (language)"] == pytest.approx(2 * two.components["activations (language)"])
    # the fused loss grows with the labelled positions up to one chunk (220 at this vocabulary), then stays there
    assert two.components["logits + loss"] == pytest.approx(2 * lora.components["logits + loss"])
    eight = estimate(shape, replace(BASE, batch_size=8))
    assert four.components["logits + loss"] == eight.components["logits + loss"] < 2 * two.components["logits + loss"]
    # from batch 1 to 2, CUDA sdpa with a padding mask also expands K/V to every head (no native GQA)
    assert two.components["activations (language)"] > 2 * lora.components["activations (language)"]
    q = estimate(shape, replace(BASE, method="qlora", kbit_upcast=False))
    ratio = lora.weights_by_part["language"] / q.weights_by_part["language"]
    assert 3.4 < ratio < 4.0  # 16 bits -> NF4 with double quantization (4.127 bits)
    assert q.weights_by_part["vision"] == lora.weights_by_part["vision"]  # vlmfit keeps the towers unquantized
    full = estimate(shape, replace(BASE, method="full"))
    assert full.components["optimizer"] == 2 * full.components["weights"]  # bf16 AdamW states, no master copy
    eight = estimate(shape, replace(BASE, method="full", optim="adamw-8bit"))
    assert eight.components["optimizer"] < 0.6 * full.components["optimizer"]
    frozen_vision = lora.components["activations (vision)"]
    trained_vision = estimate(shape, replace(BASE, lora_scope=("language", "vision"))).components["activations (vision)"]
    assert frozen_vision == 0 < trained_vision
    smaller = estimate(shape, replace(BASE, max_pixels=200704))
    assert smaller.tokens["image_tokens"] == 256 and smaller.peak < lora.peak


def test_image_token_rules():
    from vlmfit.memory.vision import image_cost
    from vlmfit.models.families import FAMILIES

    qwen = load_model_config("Qwen/Qwen2.5-VL-3B-Instruct")
    assert image_cost(qwen, FAMILIES["qwen2_5_vl"], 1024, 1024, max_pixels=1003520).tokens == 1225  # 35 x 35 after smart_resize
    assert image_cost(qwen, FAMILIES["qwen2_5_vl"], 1024, 1024, max_pixels=1003520).encoder_positions == 4900
    gemma3 = image_cost(load_model_config("google/gemma-3-4b-it"), FAMILIES["gemma3"], 500, 800)
    assert (gemma3.tokens, gemma3.encoder_positions) == (256, 4096)
    gemma4 = image_cost(load_model_config("google/gemma-4-31B-it"), FAMILIES["gemma4"], 1024, 1024)
    assert (gemma4.tokens, gemma4.encoder_positions) == (280, 2520)
    smol = image_cost(load_model_config("HuggingFaceTB/SmolVLM-256M-Instruct"), FAMILIES["smolvlm"], 1024, 1024)
    assert smol.tokens == 17 * 64  # 4x4 tiles + the global image, 64 tokens each
    llava = image_cost(load_model_config("llava-hf/llava-1.5-7b-hf"), FAMILIES["llava"], 1024, 1024)
    assert (llava.tokens, llava.encoder_positions) == (576, 577)


def test_multi_gpu_shards_states():
    shape = shape_of("Qwen/Qwen2.5-VL-7B-Instruct")
    bd = estimate(shape, replace(BASE, method="full"))
    ddp = per_gpu(bd, shape, "ddp", 8)["model states"]
    z2, z3 = per_gpu(bd, shape, "zero2", 8)["model states"], per_gpu(bd, shape, "zero3", 8)["model states"]
    assert z3 < z2 < ddp
    assert per_gpu(bd, shape, "fsdp", 8)["total"] < per_gpu(bd, shape, "fsdp", 2)["total"]


def test_budget_parsing_and_verdict():
    assert parse_budget("14GiB") == 14 * GiB
    assert parse_budget("16GB") == 16 * 10**9
    assert parse_budget("a100-80gb") == 81920 * 2**20
    assert parse_budget("V100-16GB") == 16160 * 2**20
    with pytest.raises(UserError) as e:
        parse_budget("a100-80")
    assert "a100-80gb" in str(e.value)
    assert verdict(85, 100) == "fits" and verdict(95, 100) == "tight" and verdict(101, 100) == "does not fit"


def test_fit_qwen_3b_in_14gib():
    cfg = load_config(base={"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct"}, "method": "lora",
                            "train": {"batch_size": 8, "grad_accum": 2}})
    budget = parse_budget("14GiB")
    assert plan_memory(cfg, budget=budget).verdict == "does not fit"
    new, reasons = fit(cfg, budget)
    bd = plan_memory(new, budget=budget)
    assert bd.verdict == "fits" and bd.peak <= 0.9 * budget
    assert new.train.batch_size * new.train.grad_accum == 16  # the global batch is kept
    assert reasons and "14.00 GiB" in reasons[0]
    load_config(base=__import__("yaml").safe_load(new.to_yaml()))  # a ready recipe


def test_fit_reports_impossible():
    cfg = load_config(base={"model": {"name": "google/gemma-4-31B-it"}, "method": "full"})
    with pytest.raises(UserError, match="no configuration"):
        fit(cfg, parse_budget("t4-16gb"))


@pytest.mark.parametrize("name, gpu", [("plan-qwen2.5-vl-3b-video-14gb", "14GiB"),
                                       ("plan-gemma4-31b-qlora-96gb", "rtx6000-96gb"),
                                       ("plan-smolvlm-chartqa", "l4-24gb")])
def test_seed_recipes_fit_their_cards(name, gpu):
    bd = plan_memory(load_config(RECIPES / f"{name}.yaml"), budget=parse_budget(gpu))
    assert bd.verdict == "fits", bd.as_dict()


def test_tensor_memory_counts_storage():
    with TensorMemory("cpu") as t:
        base = t.current
        x = torch.empty(1000, 1000)
        y = x.view(-1)  # a view shares the storage: counted once
        assert t.current - base == 4_000_000
        del x, y
        assert t.current == base and t.peak - base == 4_000_000


def test_cpu_measurement_is_plausible():
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from PIL import Image

    from vlmfit.models.tiny import tiny_path

    path = tiny_path("qwen2_vl")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "seven " * 40}]}]
    text = proc.apply_chat_template(msgs)
    batch = dict(proc(text=[text] * 4, images=[[Image.new("RGB", (112, 112))]] * 4, return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()
    m = measure_steps(model, batch, make_optimizer(model, "adamw"), steps=2)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert m.weights == pytest.approx(weights, rel=0.05)
    assert m.optimizer == pytest.approx(2 * weights, rel=0.05)  # AdamW: two fp32 states per parameter
    assert 3 * weights < m.peak < 3 * weights + 50 * 2**20
    cfg = load_config(base={"model": {"name": "tiny:qwen2_vl", "dtype": "float32"}, "method": "full",
                            "train": {"batch_size": 4}})
    predicted = predict_for_batch(cfg, batch, model.config, "cpu")
    assert predicted.peak == pytest.approx(m.peak, rel=0.25)


def test_plan_command_json(capsys):
    import json

    from vlmfit.memory.plan import plan_command

    code = plan_command(model="Qwen/Qwen2.5-VL-3B-Instruct", gpu="v100-16gb", json_out=True, gpus=4,
                        overrides=["method=full", "train.batch_size=1"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["plan"]["verdict"] == "does not fit"
    assert set(out["per_gpu"]) == {"ddp", "zero2", "zero3", "fsdp"}
    assert out["per_gpu"]["zero3"]["total"] < out["per_gpu"]["ddp"]["total"]


def test_plan_fit_with_several_gpus_builds_the_meta_model_once(monkeypatch, tmp_path, capsys):
    import vlmfit.memory.shape as shape_mod
    from vlmfit.memory.plan import plan_command

    built = []
    real = shape_mod.meta_model
    monkeypatch.setattr(shape_mod, "meta_model", lambda config: built.append(config.model_type) or real(config))
    code = plan_command(model="Qwen/Qwen2.5-VL-3B-Instruct", gpu="v100-16gb", do_fit=True, gpus=2,
                        out=tmp_path / "fit.yaml", overrides=["method=full"])
    assert code == 0 and (tmp_path / "fit.yaml").is_file() and "per GPU at 2 GPUs" in capsys.readouterr().out
    assert built == ["qwen2_5_vl"]  # plan, per-GPU table, the whole fit search and the fitted plan share one build


def test_a_config_key_the_planner_needs_is_an_error_not_a_default():
    """A family's image rule read on a config that lacks one of its keys (a real config of another architecture,
    as an unknown or renamed one would be) names the key and the model instead of assuming a value."""
    from vlmfit.errors import UserError
    from vlmfit.memory.vision import image_cost
    from vlmfit.models.families import FAMILIES

    gemma = load_model_config("google/gemma-3-4b-it")  # SigLIP tower: no spatial_merge_size (Qwen's 2x2 merge)
    with pytest.raises(UserError, match="no 'spatial_merge_size'.*google/gemma-3-4b-it"):
        image_cost(gemma, FAMILIES["qwen2_5_vl"], 1024, 1024, model="google/gemma-3-4b-it")
    llava = load_model_config("llava-hf/llava-1.5-7b-hf")  # no mm_tokens_per_image (Gemma 3's pooled count)
    with pytest.raises(UserError, match="no 'mm_tokens_per_image'"):
        image_cost(llava, FAMILIES["gemma3"], 896, 896)
    with pytest.raises(UserError, match="no 'scale_factor'"):  # Idefics3's pixel shuffle
        image_cost(llava, FAMILIES["smolvlm"], 1024, 1024)


def test_plan_counts_logits_over_labelled_tokens_only():
    """The lean loss's logits term follows the labelled tokens (and stays the full-logits term when it is off):
    the issue's Gemma 4 E2B LoRA run at 2,048 text tokens."""
    sets = ["model.name=google/gemma-4-E2B-it", "method=lora", "lora.scope=[language,vision]", "train.batch_size=1",
            "train.optim=adamw-8bit", "train.gradient_checkpointing=[language,vision]"]
    cfg = load_config(base={"model": {"name": "x"}}, overrides=sets)
    full = load_config(base={"model": {"name": "x"}}, overrides=sets + ["train.lean_loss=false"])
    shape = model_shape(load_model_config("google/gemma-4-E2B-it"))
    logits = {n: plan_memory(cfg, text_tokens=2048, answer_tokens=n, shape=shape).components["logits + loss"]
              for n in (64, 512)}
    off = plan_memory(full, text_tokens=2048, answer_tokens=64, shape=shape)
    assert logits[64] < logits[512] < 0.25 * off.components["logits + loss"]
    assert off.components["logits + loss"] / 2**30 == pytest.approx(7.96, abs=0.01)  # batch x seq x 262k vocab
    assert plan_memory(cfg, text_tokens=2048, shape=shape).peak < 0.65 * off.peak


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fp32_norms_are_the_norms_that_scale_by_their_weight_in_fp32(family):
    """Family.fp32_norms (the planner counts an fp32 copy at each: memory/shape.py) names exactly the RMSNorm classes
    of the family's model that scale in fp32: in bf16 such a norm gives its fp32 result rounded once; one that
    scales in bf16 (Llama's w * x.to(bf16)) rounds twice, and some elements differ."""
    import copy

    from vlmfit.models.load import load

    loaded = load(f"tiny:{family}", "float32")
    torch.manual_seed(0)
    seen, in_fp32 = set(), set()
    for m in loaded.model.modules():
        name = type(m).__name__
        if "RMSNorm" not in name or name in seen or "weight" not in dict(m.named_parameters(recurse=False)):
            continue
        seen.add(name)
        ref = copy.deepcopy(m).float()
        with torch.no_grad():
            ref.weight.copy_(torch.randn_like(ref.weight).bfloat16().float())  # the same weights in both dtypes
        x = torch.randn(16, ref.weight.shape[0]).bfloat16()
        if torch.equal(copy.deepcopy(ref).bfloat16()(x), ref(x.float()).bfloat16()):
            in_fp32.add(name)
    assert seen and in_fp32 == seen & set(loaded.family.fp32_norms), (seen, in_fp32)
