"""train.activation_offload (models/offload.py): same losses and gradients with a tower's saved activations in host
memory, the hooks active inside the named towers only, the refusal beside checkpointing, and the planner's split
between device and host."""

from dataclasses import replace

import pytest
import torch

from vlmfit.chat.collate import VisionChatCollator
from vlmfit.config import load_config
from vlmfit.errors import UserError
from vlmfit.memory.estimate import PlanInputs, estimate
from vlmfit.memory.catalog import load_model_config
from vlmfit.memory.shape import model_shape
from vlmfit.models.load import load
from vlmfit.models.loss import causal_lm_loss
from vlmfit.models.offload import offload_activations
from vlmfit.models.targets import make_trainable

from helpers import multi_turn_example


def _trained(family="qwen2_vl"):
    loaded = load(f"tiny:{family}", dtype="float32")
    lora = load_config(base={"model": {"name": "x"}, "lora": {"dropout": 0.0, "scope": ["language", "vision"]}}).lora
    torch.manual_seed(0)
    model, _ = make_trainable(loaded.model, loaded.family, "lora", lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    batch = VisionChatCollator(loaded.processor, loaded.family)([multi_turn_example(), multi_turn_example(((56, 56), (28, 28)))])
    return loaded, model, batch


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma4"])
def test_offloaded_activations_give_the_same_losses_and_gradients(family):
    loaded, model, batch = _trained(family)
    ref, g_ref = _loss_and_grads(model, batch)
    hooks = offload_activations(model, loaded.family, ["language", "vision"], copy_host=True)  # copies, as on a GPU
    loss, g = _loss_and_grads(model, batch)
    assert hooks.packed > 0 and hooks.bytes_moved > 0
    assert torch.equal(loss, ref) and g.keys() == g_ref.keys()
    assert all(torch.equal(g[n], g_ref[n]) for n in g)


def test_hooks_pack_inside_the_named_towers_only():
    counts = {}
    for parts in (["language"], ["vision"], ["language", "vision"]):
        loaded, model, batch = _trained()
        hooks = offload_activations(model, loaded.family, parts)
        _loss_and_grads(model, batch)
        counts[tuple(parts)] = hooks.packed
        before = hooks.packed
        x = torch.ones(3, requires_grad=True)
        (x * x).sum().backward()  # saved outside any tower, after the forward: the hooks were left
        assert hooks.packed == before
    assert counts[("language",)] > 0 and counts[("vision",)] > 0
    assert counts[("language", "vision")] == counts[("language",)] + counts[("vision",)]


def test_offload_beside_checkpointing_of_the_same_tower_is_refused():
    with pytest.raises(UserError, match="activation_offload and train.gradient_checkpointing both name language"):
        load_config(base={"model": {"name": "x"}, "train": {"activation_offload": ["language"],
                                                            "gradient_checkpointing": ["language", "vision"]}})
    load_config(base={"model": {"name": "x"}, "train": {"activation_offload": ["vision"],
                                                        "gradient_checkpointing": ["language"]}})


def test_planner_moves_offloaded_activations_to_the_host():
    shape = model_shape(load_model_config("Qwen/Qwen2.5-VL-3B-Instruct"))
    base = PlanInputs(method="lora", text_tokens=1024, lora_scope=("language", "vision"))
    plain = estimate(shape, base)
    off = estimate(shape, replace(base, activation_offload=("language",)))
    lang, lang_off = plain.components["activations (language)"], off.components["activations (language)"]
    layers = len(shape.text_layers)
    assert lang_off < 2 * lang / layers  # about one block's on the device
    host = off.host["activations (language, train.activation_offload)"]
    assert host + lang_off == pytest.approx(lang, rel=1e-9)
    assert off.peak < plain.peak and off.components["activations (vision)"] == plain.components["activations (vision)"]


def test_fit_keeps_host_memory_within_the_host_budget(monkeypatch):
    """plan --fit may offload activations, but never past the host memory it has ($VLMFIT_HOST_MEMORY)."""
    from vlmfit.memory.budget import GiB
    from vlmfit.memory.fit import search

    shape = model_shape(load_model_config("Qwen/Qwen2.5-VL-3B-Instruct"))
    inp = PlanInputs(method="lora", text_tokens=2048, batch_size=4, lora_scope=("language", "vision"))
    monkeypatch.setenv("VLMFIT_HOST_MEMORY", "1000GiB")
    roomy, _ = search(shape, inp, int(12 * GiB))
    assert any(bd.inputs.activation_offload for _, _, bd in roomy)  # offloading is among the candidates
    monkeypatch.setenv("VLMFIT_HOST_MEMORY", "2GiB")
    tight, _ = search(shape, inp, int(12 * GiB))
    assert tight and all(sum(bd.host.values()) <= 2 * GiB for _, _, bd in tight)
    assert len(tight) < len(roomy)
