"""Assistant-only labels for every family, computed after image-token expansion."""

import pytest
import torch

from vlmfit.data.schema import chat_example
from vlmfit.errors import UserError
from vlmfit.models.families import FAMILIES
from vlmfit.models.load import load
from vlmfit.models.tiny import TINY_FAMILIES
from vlmfit.train.collate import IGNORE_INDEX, VisionChatCollator

from helpers import digit_image, multi_turn_example


@pytest.fixture(scope="module", params=[f for f in TINY_FAMILIES if f in FAMILIES])
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


def test_labels_are_exactly_the_assistant_replies(loaded):
    coll = VisionChatCollator(loaded.processor, loaded.family)
    tok = loaded.processor.tokenizer
    # Row 0: multi-turn, system prompt, two images of different sizes; row 1: one small image, one turn.
    batch = coll([multi_turn_example(), chat_example("What digit is this?", "nine", [digit_image(7)])])
    for row, replies in ((0, ["seven", "two"]), (1, ["nine"])):
        runs = label_runs(batch["labels"][row])
        assert len(runs) == len(replies)
        for run, reply in zip(runs, replies):
            ids = batch["input_ids"][row, run]
            assert (batch["labels"][row, run] == ids).all()
            text = tok.decode(ids, skip_special_tokens=False).strip()
            assert text == reply + loaded.family.turn_end, text
        image_id = tok.convert_tokens_to_ids(loaded.family.image_token)
        assert not (batch["labels"][row][batch["input_ids"][row] == image_id] != IGNORE_INDEX).any()
        pad = batch["attention_mask"][row] == 0
        assert (batch["labels"][row][pad] == IGNORE_INDEX).all()
    for name in loaded.family.required_inputs:
        assert name in batch, f"{loaded.family.name} needs {name}"
    # The expanded image tokens match the features the model produces: the forward pass checks this itself.
    out = loaded.model(**batch)
    assert torch.isfinite(out.loss)


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
