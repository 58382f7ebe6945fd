"""The lean loss (LM head fused with the fp32 cross-entropy, one chunk of labelled positions at a time) equals the model's own loss over
full logits, in value and in gradients, for every family (Gemma 4's soft-capped head included), for LoRA, full and
QLoRA; its sequence log-probabilities equal the full-logits ones."""

import pytest
import torch

from vlmfit.chat.collate import IGNORE_INDEX, VisionChatCollator
from vlmfit.chat.schema import chat_example
from vlmfit.config import load_config
from vlmfit.models.load import load
from vlmfit.models.loss import causal_lm_loss, sequence_logprobs
from vlmfit.models.targets import make_trainable
from vlmfit.models.tiny import TINY_FAMILIES

from helpers import digit_image, multi_turn_example


def _batch(loaded, multi: bool):
    coll = VisionChatCollator(loaded.processor, loaded.family)
    if multi and loaded.family.prompt_style == "chat":
        return coll([multi_turn_example(), multi_turn_example(((56, 56), (28, 28)))])
    return coll([chat_example("What digit is this?", "seven", [digit_image(0)]),
                 chat_example("Which number is shown in the picture?", "two", [digit_image(5)])])


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, batch, chunk=3):
    model.train()
    ref = model(**batch, use_cache=False).loss
    ref.backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    lean = causal_lm_loss(model, batch, chunk=chunk)  # small chunks: the chunk boundaries are exercised
    lean.backward()
    g = _grads(model)
    assert torch.allclose(lean, ref, rtol=1e-5), (float(lean), float(ref))
    assert g.keys() == g_ref.keys() and g
    for n in g:  # per tensor, relative to its norm: the head's weight gradient is summed chunk by chunk, in another
        # fp32 order than one matmul over all positions (1.9e-5 at worst measured, Gemma 4's vision q_norm); a floor
        # for gradients that are zero but for rounding (attention key biases)
        diff, ref = float((g[n] - g_ref[n]).norm()), float(g_ref[n].norm())
        assert diff <= 1e-4 * ref + 1e-8, (n, diff, ref)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lean_loss_equals_full_logits_loss_with_lora(family):
    loaded = load(f"tiny:{family}", dtype="float32")
    lora = load_config(base={"model": {"name": "x"}, "lora": {"dropout": 0.0, "scope": ["language", "vision"]}}).lora
    torch.manual_seed(0)
    model, _ = make_trainable(loaded.model, loaded.family, "lora", lora)
    for p in model.parameters():  # lora_B starts at zero: move it so the adapters change the function
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    _compare(model, _batch(loaded, multi=True))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lean_loss_equals_full_logits_loss_full_finetuning(family):
    loaded = load(f"tiny:{family}", dtype="float32")
    model, _ = make_trainable(loaded.model, loaded.family, "full", None)
    _compare(model, _batch(loaded, multi=False))
    if family == "gemma4":  # the head is soft-capped (Family.softcaps_logits), as the model's own forward does
        assert loaded.model.config.get_text_config().final_logit_softcapping == 30.0


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma4"])
def test_lean_loss_equals_full_logits_loss_with_qlora(family):
    loaded = load(f"tiny:{family}", quantization="4bit")
    lora = load_config(base={"model": {"name": "x"}, "lora": {"dropout": 0.0}}).lora
    torch.manual_seed(0)
    model, _ = make_trainable(loaded.model, loaded.family, "qlora", lora)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    batch = _batch(loaded, multi=False)
    from vlmfit.evaluate.classification import eval_mode

    eval_mode(model)  # dropout off; bitsandbytes' CPU 4-bit layers stay in training mode
    ref = model(**batch, use_cache=False).loss
    lean = causal_lm_loss(model, batch, chunk=3)
    assert torch.allclose(lean, ref, rtol=1e-5)


def test_eval_mode_keeps_only_bitsandbytes_cpu_4bit_layers_training():
    """Not PEFT's LoRA wrapper around them (a class of the same name, Linear4bit): its LoRA dropout is off."""
    import bitsandbytes as bnb

    from vlmfit.evaluate.classification import eval_mode

    loaded = load("tiny:qwen2_vl", quantization="4bit")
    lora = load_config(base={"model": {"name": "x"}, "lora": {"dropout": 0.1}}).lora
    model, _ = make_trainable(loaded.model, loaded.family, "qlora", lora)
    eval_mode(model)
    training = [m for m in model.modules() if m.training]
    assert training and all(isinstance(m, bnb.nn.Linear4bit) for m in training)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in model.modules())


@pytest.mark.parametrize("family", ["qwen2_vl", "smolvlm", "gemma4", "paligemma"])
def test_sequence_logprobs_equal_full_logits(family):
    loaded = load(f"tiny:{family}", dtype="float32")
    batch = _batch(loaded, multi=True)
    with torch.no_grad():
        logits = loaded.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    target = batch["labels"][:, 1:]
    full = (logp.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1) * (target != IGNORE_INDEX)).sum(-1)
    assert torch.allclose(sequence_logprobs(loaded.model, batch, chunk=2), full, rtol=1e-5)


def _all_labelled(loaded, batch):
    """`loss_on: all`: every real position after the first carries a label (the long-label case)."""
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    return {**batch, "labels": labels}


def test_head_runs_only_on_labelled_positions_one_chunk_at_a_time():
    loaded = load("tiny:qwen2_vl", dtype="float32")
    model, _ = make_trainable(loaded.model, loaded.family, "full", None)
    batch = _all_labelled(loaded, _batch(loaded, multi=False))
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.shape))
    loss = causal_lm_loss(model, batch, chunk=5)
    forward = list(seen)
    loss.backward()
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    scored = [s for s in forward if s.numel()]
    assert labelled > 5 and all(s[0] <= 5 for s in scored), forward
    assert sum(s[0] for s in scored) == labelled  # each labelled position once, nothing else
    recomputed = [s for s in seen[len(forward):] if s.numel()]  # backward: each chunk recomputed, one at a time
    assert sum(s[0] for s in recomputed) == labelled and all(s[0] <= 5 for s in recomputed)


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma4"])
def test_no_tensor_holds_more_than_one_chunk_of_logits(family):
    """Every tensor as wide as the vocabulary, in forward and backward (gradients included), has at most `chunk`
    rows, however many positions are labelled: the [n, vocab] logits of the head over all n never exist."""
    from torch.utils._python_dispatch import TorchDispatchMode

    loaded = load(f"tiny:{family}", dtype="float32")
    model, _ = make_trainable(loaded.model, loaded.family, "full", None)
    batch = _all_labelled(loaded, _batch(loaded, multi=False))
    vocab, hidden = model.config.get_text_config().vocab_size, model.config.get_text_config().hidden_size
    widest = []

    class Widest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                # the head's weight, transposed, and its gradient are [hidden, vocab]: not logits
                if torch.is_tensor(t) and t.dim() >= 2 and t.shape[-1] == vocab and tuple(t.shape[-2:]) != (hidden, vocab):
                    widest.append(t.numel() // vocab)
            return out

    with Widest():
        causal_lm_loss(model, batch, chunk=4).backward()
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert labelled > 4 * 4 and widest and max(widest) <= 4, (labelled, max(widest))
