"""Labels come from the conversation's structure: the labelled tokens of every example are exactly its assistant
replies (and their end-of-turn tokens), whatever text the messages quote, for every family and for unknown ones.

Adversarial content: user, system and assistant text quoting the turn markers of every family, images in any user
turn, and property-based conversations (hypothesis). Text the tokenizer would read as a special token is refused
with the row named."""

from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmfit.chat.collate import IGNORE_INDEX, VisionChatCollator
from vlmfit.chat.schema import ROW, image_part, message_text, text_part
from vlmfit.errors import UserError
from vlmfit.models.families import FAMILIES, generic_family
from vlmfit.models.load import load_processor, resolve_reference
from vlmfit.models.tiny import TINY_FAMILIES

from helpers import digit_image

CHAT_FAMILIES = [f for f in TINY_FAMILIES if FAMILIES[f].prompt_style == "chat"]
MARKERS = sorted({s for f in FAMILIES.values() for s in (f.assistant_start.strip(), f.turn_end) if s.strip()}
                 | {"User:", "USER:", "<|im_start|>user", "user", "model", "assistant", "system"})
WORDS = ["seven", "two", "digit", "Reply in the form", "is", "the", ",", "'", ":", "\n", "  "]


@lru_cache(maxsize=None)
def processor(family: str):
    return load_processor(resolve_reference(f"tiny:{family}"))


def collator(family: str, generic: bool = False) -> VisionChatCollator:
    proc = processor(family)
    return VisionChatCollator(proc, generic_family("mystery_vl", proc) if generic else FAMILIES[family])


def plain_markers(coll: VisionChatCollator) -> list[str]:
    """The other families' markers that are plain text for this tokenizer (its own special tokens are refused)."""
    return [m for m in MARKERS if not coll._special_text.search(m)]


def labelled_runs(batch, row: int, tok) -> list[str]:
    keep = (batch["labels"][row] != IGNORE_INDEX).numpy()
    ids = batch["input_ids"][row].numpy()
    starts = np.flatnonzero(keep & ~np.r_[False, keep[:-1]])
    ends = np.flatnonzero(keep & ~np.r_[keep[1:], False]) + 1
    return [_squash(tok.decode(ids[a:b], skip_special_tokens=False)) for a, b in zip(starts, ends)]


def _squash(text: str) -> str:
    # Whitespace-insensitive: templates differ in what they do with it (Gemma trims replies, SmolVLM adds a space).
    return "".join(text.split())


def expected_replies(example: dict, turn_end: str) -> list[str]:
    return [_squash(message_text(m) + turn_end) for m in example["messages"] if m["role"] == "assistant"]


def assert_labels_are_the_replies(coll: VisionChatCollator, examples: list[dict], turn_end: str | None = None) -> None:
    """`turn_end`: what the template closes a reply with (the family table's; an unknown family's collator only
    knows the tokenizer's eos, and must find the real end by rendering)."""
    batch = coll(examples)
    for r, ex in enumerate(examples):
        got = labelled_runs(batch, r, coll.processor.tokenizer)
        assert got == expected_replies(ex, turn_end or coll.family.turn_end), ex["messages"]


def conversation(turns: list[tuple[str, str, bool]], system: str | None = None) -> dict:
    messages, images = ([{"role": "system", "content": [text_part(system)]}] if system else []), []
    for k, (question, answer, with_image) in enumerate(turns):
        content = ([image_part()] if with_image else []) + [text_part(question)]
        images += [digit_image(k)] if with_image else []
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [text_part(answer)]}]
    return {"messages": messages, "images": images}


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_quoted_markers_in_every_role_are_not_replies(family):
    coll = collator(family)
    quotes = plain_markers(coll)
    examples = [
        # the case: a user question quoting the assistant marker
        conversation([(f"Reply in the form '{q} <word>'", "seven", True)]) for q in quotes
    ] + [
        conversation([("What digit is this?", f"{q} seven {q}", True)], system=f"You answer as {q}") for q in quotes
    ] + [
        conversation([(f"First {q}", "two", False), (f"{q} and this one?", "seven", True)], system=q) for q in quotes[:4]
    ]
    for ex in examples:  # one at a time: a batch cannot mix rows with and without images
        assert_labels_are_the_replies(coll, [ex])


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_special_token_text_in_a_message_is_refused_with_the_row(family):
    coll = collator(family)
    token = coll.family.turn_end
    ex = conversation([(f"scraped text {token} continues", "seven", True)])
    ex[ROW] = 41
    with pytest.raises(UserError, match=rf"source row 41.*message 0 \(user\) contains '{token}'"):
        coll([ex])


@st.composite
def conversations(draw, words: list[str]):
    text = st.lists(st.sampled_from(words), min_size=0, max_size=5).map(" ".join)
    n = draw(st.integers(1, 3))
    turns = [(draw(text) + " ?", draw(st.sampled_from(["seven", "two", "nine"])) + " " + draw(text), draw(st.booleans()))
             for _ in range(n)]
    return conversation(turns, system=draw(st.one_of(st.none(), text.map(lambda t: t + " ok"))))


@pytest.mark.parametrize("generic", [False, True], ids=["family table", "unknown family"])
@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_property_labelled_tokens_are_exactly_the_replies(family, generic):
    coll = collator(family, generic)
    words = WORDS + plain_markers(coll)

    @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(conversations(words))
    def check(example):
        assert_labels_are_the_replies(coll, [example], FAMILIES[family].turn_end)

    check()


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_marker_fast_path_and_structural_path_agree(family):
    """Where markers are unambiguous the fast path is taken; its labels equal the turn-by-turn rendering's."""
    coll = collator(family)
    ex = conversation([("What digit is this?", "seven", True), ("And this one?", "two", True)], system="Be short.")
    batch = coll([ex])
    ids, valid = batch["input_ids"][0].numpy(), batch["attention_mask"][0].bool().numpy()
    fast = coll.assistant_mask(ids, valid, replies=2)
    assert fast is not None  # unambiguous: one marker per assistant turn
    assert np.array_equal(fast, coll.prefix_mask(ex, ids, valid))
    quoted = conversation([(f"Say '{plain_markers(coll)[0]} x'", "seven", True)])
    b = coll([quoted])
    assert coll.assistant_mask(b["input_ids"][0].numpy(), b["attention_mask"][0].bool().numpy(), replies=1) is None or \
        plain_markers(coll)[0] not in coll.family.assistant_start
