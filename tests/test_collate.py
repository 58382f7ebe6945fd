"""Assistant-only labels for every family, computed after image-token expansion."""

import pytest
import torch

from vlmfit.chat.schema import chat_example
from vlmfit.errors import UserError
from vlmfit.models.families import FAMILIES
from vlmfit.models.load import load
from vlmfit.models.tiny import TINY_FAMILIES
from vlmfit.chat.collate import IGNORE_INDEX, VisionChatCollator

from helpers import digit_image, multi_turn_example
from vlmfit.chat.schema import image_part, text_part


CHAT_FAMILIES = [f for f in TINY_FAMILIES if f in FAMILIES and FAMILIES[f].prompt_style == "chat"]


@pytest.fixture(scope="module", params=CHAT_FAMILIES)
def loaded(request):
    return load(f"tiny:{request.param}")


def label_runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of positions that carry loss."""
    runs, cur = [], []
    for pos, lab in enumerate(labels.tolist()):
        if lab != IGNORE_INDEX:
            cur.append(pos)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def three_images_example():
    return {"messages": [{"role": "user", "content": [image_part(), image_part(), text_part("Which digits?"), image_part()]},
                         {"role": "assistant", "content": [text_part("one two three")]}],
            "images": [digit_image(1), digit_image(2, (56, 84)), digit_image(3, (112, 112))]}


def text_only_example():
    return {"messages": [{"role": "system", "content": [text_part("Be brief.")]},
                         {"role": "user", "content": [text_part("Say a digit.")]},
                         {"role": "assistant", "content": [text_part("four")]},
                         {"role": "user", "content": [text_part("Another.")]},
                         {"role": "assistant", "content": [text_part("five")]}],
            "images": []}


def check_labels(loaded, batch, replies_per_row):
    tok = loaded.processor.tokenizer
    image_id = tok.convert_tokens_to_ids(loaded.family.image_token)
    for row, replies in enumerate(replies_per_row):
        runs = label_runs(batch["labels"][row])
        assert len(runs) == len(replies)
        for run, reply in zip(runs, replies):
            ids = batch["input_ids"][row, run]
            assert (batch["labels"][row, run] == ids).all()
            text = tok.decode(ids, skip_special_tokens=False).strip()
            assert text == reply + loaded.family.turn_end, text
        assert not (batch["labels"][row][batch["input_ids"][row] == image_id] != IGNORE_INDEX).any()
        pad = batch["attention_mask"][row] == 0
        assert (batch["labels"][row][pad] == IGNORE_INDEX).all()


@pytest.mark.parametrize("method", ["markers", "prefix"])
def test_labels_are_exactly_the_assistant_replies(loaded, method):
    coll = VisionChatCollator(loaded.processor, loaded.family, label_method=method)
    # Multi-turn with a system prompt and two images of different sizes; one image; three images in one turn.
    batch = coll([multi_turn_example(), chat_example("What digit is this?", "nine", [digit_image(7)]), three_images_example()])
    check_labels(loaded, batch, [["seven", "two"], ["nine"], ["one two three"]])
    for name in loaded.family.required_inputs:
        assert name in batch, f"{loaded.family.name} needs {name}"
    # The expanded image tokens match the features the model produces: the forward pass checks this itself.
    assert torch.isfinite(loaded.model(**batch).loss)
    # No images at all: a plain multi-turn chat.
    batch = coll([text_only_example()])
    check_labels(loaded, batch, [["four", "five"]])
    assert torch.isfinite(loaded.model(**batch).loss)


def test_image_tokens_equal_vision_features(loaded):
    """Per image, the processor's expanded token count equals the number of features the vision tower returns."""
    coll = VisionChatCollator(loaded.processor, loaded.family)
    batch = coll([multi_turn_example()])
    image_id = loaded.processor.tokenizer.convert_tokens_to_ids(loaded.family.image_token)
    n_tokens = int((batch["input_ids"] == image_id).sum())
    inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")}
    with torch.no_grad():
        feats = loaded.model.model.get_image_features(**inputs)
    feats = getattr(feats, "pooler_output", feats)
    n_feats = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in (feats if isinstance(feats, (list, tuple)) else [feats]))
    assert n_tokens == n_feats


def test_paligemma_prefix_suffix_labels():
    loaded = load("tiny:paligemma")
    coll = VisionChatCollator(loaded.processor, loaded.family)
    one = chat_example("What digit is this?", "nine", [digit_image(7)], system="Read the digit.")
    three = {"messages": three_images_example()["messages"], "images": [digit_image(1), digit_image(2), digit_image(3)]}
    batch = coll([one, three])
    check_labels(loaded, batch, [["nine"], ["one two three"]])
    assert torch.isfinite(loaded.model(**batch).loss)
    with pytest.raises(UserError, match="one question and one answer"):
        coll([multi_turn_example()])


def test_image_token_count_follows_image_size():
    loaded = load("tiny:qwen2_vl")
    coll = VisionChatCollator(loaded.processor, loaded.family)
    image_id = loaded.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    small = coll([chat_example("q?", "one", [digit_image(0)])])
    large = coll([chat_example("q?", "one", [digit_image(0, (112, 112))])])
    n_small, n_large = (int((b["input_ids"] == image_id).sum()) for b in (small, large))
    assert n_large > n_small > 0


def test_loss_on_all_trains_text_but_never_images_or_padding():
    loaded = load("tiny:qwen2_vl")
    coll = VisionChatCollator(loaded.processor, loaded.family, loss_on="all")
    batch = coll([multi_turn_example(), chat_example("q?", "one", [digit_image(1)])])
    image_id = loaded.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    trained = batch["labels"] != IGNORE_INDEX
    assert not trained[batch["input_ids"] == image_id].any()
    assert not trained[batch["attention_mask"] == 0].any()
    text = (batch["input_ids"] != image_id) & (batch["attention_mask"] == 1)
    assert trained[text].all()


def test_truncation_never_cuts_an_image():
    loaded = load("tiny:qwen2_vl")
    ex = chat_example("What digit is this? " * 20, "one", [digit_image(0)])
    full = VisionChatCollator(loaded.processor, loaded.family)([ex])
    n = full["input_ids"].shape[1]
    # Cutting inside the trailing text is allowed (the image survives whole).
    cut = VisionChatCollator(loaded.processor, loaded.family, max_length=n - 3)([ex])
    assert cut["input_ids"].shape[1] == n - 3 and torch.equal(cut["pixel_values"], full["pixel_values"])
    # Putting the image after the long text makes a cut go through the image: an error, not a silent cut.
    ex_late = {"messages": [{"role": "user", "content": [{"type": "text", "text": "word " * 60}, {"type": "image", "text": None}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "one"}]}], "images": [digit_image(0)]}
    with pytest.raises(UserError, match="through an image"):
        VisionChatCollator(loaded.processor, loaded.family, max_length=40)([ex_late])


def test_mismatched_image_count_is_an_error():
    loaded = load("tiny:qwen2_vl")
    ex = chat_example("q?", "one", [digit_image(0)])
    ex["images"] = []
    with pytest.raises(UserError, match="1 image placeholders"):
        VisionChatCollator(loaded.processor, loaded.family)([ex])


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "gemma3"])
def test_unknown_family_trains_by_prefix_rendering(family):
    """A model vlmfit has no table for still gets exact assistant-only labels from its chat template alone."""
    from vlmfit.models.families import generic_family
    from vlmfit.models.targets import part_of, resolve_lora_targets

    loaded = load(f"tiny:{family}")
    generic = generic_family("mystery_vl", loaded.processor)
    coll = VisionChatCollator(loaded.processor, generic)
    assert coll.label_method == "prefix"
    examples = [multi_turn_example(), chat_example("What digit is this?", "nine", [digit_image(7)])]
    known = VisionChatCollator(loaded.processor, loaded.family)(examples)
    got = coll(examples)
    assert torch.equal(got["labels"], known["labels"])
    # LoRA scopes fall back to module-name keywords: language-only targets never touch the vision tower.
    res = resolve_lora_targets(loaded.model, generic, ["language"], "all-linear")
    assert res.modules and all(part_of(n, loaded.family) == "language" for n in res.modules)
