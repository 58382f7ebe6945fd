"""Image features computed once (issue 13, item 3): with the vision tower and projector frozen, the second time an
image is seen its features come from the cache (the vision tower does not run) and the loss and the adapters'
gradients are those of the uncached forward; a trainable or dropout-bearing tower turns the cache off."""

import json

import pytest
import torch

from vlmfit.chat.collate import VisionChatCollator
from vlmfit.chat.rows import RowCollator
from vlmfit.chat.schema import chat_example
from vlmfit.config import load_config
from vlmfit.models.families import FAMILIES
from vlmfit.models.features import FeatureCache, feature_cache_refusal
from vlmfit.models.load import load
from vlmfit.models.loss import causal_lm_loss
from vlmfit.models.packing import unpack_inputs
from vlmfit.models.targets import make_trainable, part_of
from vlmfit.models.tiny import TINY_FAMILIES

from helpers import digit_image

CACHED = [f for f in TINY_FAMILIES if FAMILIES[f].feature_cache]


def _lora(family, scope="[language]"):
    loaded = load(f"tiny:{family}", dtype="float32")
    lora = load_config(base={"model": {"name": "x"}}, overrides=[f"lora.scope={scope}", "lora.dropout=0.0"]).lora
    torch.manual_seed(0)
    model, _ = make_trainable(loaded.model, loaded.family, "lora", lora)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)  # lora_B starts at zero: move it so the gradients reach lora_A too
    return loaded, model


def _examples():
    return [chat_example("What digit is this?", "seven", [digit_image(0, (56, 28))]),
            chat_example("Which number is shown?", "two", [digit_image(5)]),
            chat_example("Read the digit.", "one", [digit_image(9, (28, 56))])]


def _vision_calls(model, family):
    calls = []
    root = next(m for n, m in model.named_modules() if part_of(n.removeprefix("base_model.model."), family) == "vision")
    root.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("family", CACHED)
def test_cached_features_give_the_same_loss_and_gradients_without_running_the_tower(family, pack):
    loaded, model = _lora(family)
    assert feature_cache_refusal(model, loaded.family) is None
    chat = VisionChatCollator(loaded.processor, loaded.family)
    if pack and not loaded.family.packing:
        pytest.skip(f"{family} is not packed")
    batch = RowCollator(chat, pack=pack, image_keys=True)(_examples())
    plain = unpack_inputs(model, {k: v for k, v in batch.items() if k != "vlmfit_image_keys"}, loaded.family)
    model.train()
    ref = causal_lm_loss(model, plain)
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    cache, calls = FeatureCache(2**30), _vision_calls(model, loaded.family)
    for attempt in range(2):  # first: computed and kept; second: from the cache
        model.zero_grad(set_to_none=True)
        before = len(calls)
        inputs = cache.inputs(model, unpack_inputs(model, dict(batch), loaded.family))
        assert "pixel_values" not in inputs and "mm_encoder_outputs" in inputs
        loss = causal_lm_loss(model, inputs)
        loss.backward()
        assert (len(calls) - before) == (1 if attempt == 0 else 0)
        assert torch.allclose(loss, ref, rtol=1e-6), (float(loss), float(ref))
        for n, g in g_ref.items():
            assert torch.allclose(model.get_parameter(n).grad, g, rtol=1e-5, atol=1e-8), n
    assert (cache.hits, cache.misses) == (3, 3)


def test_the_cache_is_refused_when_the_tower_trains_or_is_not_verified():
    loaded, model = _lora("qwen2_vl", "[language,vision]")
    assert "trains" in feature_cache_refusal(model, loaded.family)
    assert feature_cache_refusal(model, FAMILIES["qwen3_vl"]) is not None  # deepstack features: not verified


def test_a_budget_keeps_what_fits_and_encodes_the_rest(tmp_path):
    loaded, model = _lora("qwen2_vl")
    chat = VisionChatCollator(loaded.processor, loaded.family)
    batch = RowCollator(chat, image_keys=True)(_examples())
    one = FeatureCache(2**30)
    one.inputs(model, dict(batch))
    sizes = sorted(f.numel() * f.element_size() for f in one.features.values())
    small = FeatureCache(sizes[0])  # room for the smallest image's features only
    small.inputs(model, dict(batch))
    assert len(small.features) == 1
    small.inputs(model, dict(batch))
    assert small.misses == 3 + 2  # the two that did not fit are encoded again


def test_training_with_cached_features_logs_the_same_losses(tmp_path):
    """Two epochs over the same examples: the second reads every image's features from the cache."""
    from vlmfit.data.builtin import load_builtin
    from vlmfit.rundir import RunDir
    from vlmfit.train.sft import make_trainer

    data = load_builtin("mnist")["train"].select(range(8))
    losses, hits = {}, {}
    for on in (False, True):
        cfg = load_config(base={"model": {"name": "tiny:qwen2_vl"}}, overrides=[
            "method=lora", f"output.dir={tmp_path}", "train.epochs=2", "train.batch_size=4", "train.lr=1e-3",
            "train.warmup_ratio=0", "train.logging_steps=1", "lora.dropout=0.0", f"train.cache_image_features={str(on).lower()}"])
        loaded = load(cfg.model.name, dtype="float32")
        torch.manual_seed(0)  # the same adapters' initialisation in both runs
        model, _ = make_trainable(loaded.model, loaded.family, "lora", cfg.lora)
        cache = FeatureCache(2**30) if on else None
        run = RunDir(tmp_path / str(on))
        run.path.mkdir()
        collator = RowCollator(VisionChatCollator(loaded.processor, loaded.family), image_keys=on)
        make_trainer(model, loaded, collator, data, cfg, run, features=cache).train()
        losses[on] = [json.loads(line)["loss"] for line in (run.path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        hits[on] = cache.hits if cache else 0
    assert len(losses[False]) == 4 and losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert hits[True] == 8  # epoch 2: all eight images


def test_features_not_one_per_image_are_used_once_and_the_cache_stops():
    """A family whose encoder gives one entry per tile (SmolVLM) does not match the batch's image count: that step
    still skips a second tower run, and nothing is kept from then on."""
    loaded, model = _lora("qwen2_vl")
    batch = RowCollator(VisionChatCollator(loaded.processor, loaded.family), image_keys=True)(_examples())
    plain = {k: v for k, v in batch.items() if k != "vlmfit_image_keys"}
    cache = FeatureCache(2**30)
    odd = dict(batch, vlmfit_image_keys=batch["vlmfit_image_keys"][:2])  # as if three entries for two "images"
    inputs = cache.inputs(model, odd)
    assert cache.off and not cache.features and "mm_encoder_outputs" in inputs
    assert torch.allclose(causal_lm_loss(model, inputs), causal_lm_loss(model, plain), rtol=1e-6)
    assert "pixel_values" in cache.inputs(model, dict(batch))  # off: the model encodes its images itself


def test_the_plan_says_when_image_features_are_reused():
    from vlmfit.memory.catalog import load_model_config
    from vlmfit.memory.plan import plan_memory
    from vlmfit.memory.shape import model_shape

    shape = model_shape(load_model_config("Qwen/Qwen2.5-VL-3B-Instruct"))
    notes = {}
    for sets in ([], ["lora.scope=[language,vision]"], ["train.cache_image_features=false"]):
        cfg = load_config(base={"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct"}}, overrides=sets)
        notes[tuple(sets)] = any("image features reused" in n for n in plan_memory(cfg, shape=shape).notes)
    assert notes == {(): True, ("lora.scope=[language,vision]",): False, ("train.cache_image_features=false",): False}
