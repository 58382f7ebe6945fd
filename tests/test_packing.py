"""Padding-free packing and the processor cache (issue 13, items 2 and 3): a packed row scores every example as it
scores alone (losses and gradients), attention never crosses an example boundary, per-example encodings assemble
into exactly the processor's own padded batch, the cache is keyed by processor, settings and content, and a
packed training run logs the losses of the padded one."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vlmfit.chat.collate import IGNORE_INDEX, ROW, VisionChatCollator
from vlmfit.chat.rows import EncodedCache, RowCollator, example_key, processor_fingerprint
from vlmfit.chat.schema import chat_example
from vlmfit.models.families import FAMILIES
from vlmfit.models.load import load
from vlmfit.models.packing import SEGMENTS, packing_refusal, unpack_inputs
from vlmfit.models.tiny import TINY_FAMILIES

from helpers import digit_image, multi_turn_example

PACKED = [f for f in TINY_FAMILIES if FAMILIES[f].packing]
FAST = ("qwen2_vl", "llava")  # M-RoPE and 1-D positions; the other packed families run in the slow suite
# One family per tensor layout (Qwen's patches by grid + videos, Gemma 4's per-image patches + video frames,
# Idefics3's [batch, tiles], PaliGemma's suffix labels) in the fast suite; the other four in the slow one.
LAYOUTS = ("qwen2_vl", "gemma4", "smolvlm", "paligemma")
ALL_LAYOUTS = [pytest.param(f, marks=[] if f in LAYOUTS else pytest.mark.slow) for f in TINY_FAMILIES]


def _examples(family, digit=0):
    exs = [chat_example("What digit is this?", "seven", [digit_image(digit, (56, 28))]),
           chat_example("Which number is shown in the picture?", "two", [digit_image(5)])]
    if family.prompt_style == "chat":
        exs.append(multi_turn_example())
    else:
        exs.append(chat_example("Digit?", "one", [digit_image(9, (28, 56))]))
    return exs


def _token_nll(model, inputs):
    """[rows, positions] next-token NLL, zero where the label is ignored."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1].float()
    labels = inputs["labels"][:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none").view(labels.shape)
    return nll * (labels != IGNORE_INDEX)


def _alone_and_packed(loaded, examples, budget=None):
    chat = VisionChatCollator(loaded.processor, loaded.family)
    singles = [chat([ex]) for ex in examples]
    packed = RowCollator(chat, pack=True, pack_tokens=budget)(examples)
    return singles, unpack_inputs(loaded.model, packed, loaded.family), packed[SEGMENTS][:, :2].tolist()


def _split(values, segments):
    """Per example, its positions' values (values: [rows, positions])."""
    out, used = [], {}
    for row, n in segments:
        start = used.get(row, 0)
        out.append(values[row, start:start + n - 1])  # an example's last position predicts nothing of its own
        used[row] = start + n
    return out


@pytest.mark.parametrize("family,budget", [pytest.param(f, b, marks=[] if f in FAST else pytest.mark.slow)
                                           for f in PACKED for b in (None, "longest")])
def test_packed_row_scores_each_example_as_alone_losses_and_gradients(family, budget):
    """One packed row, or (a budget of the longest example's tokens) several rows padded to the longest: the same
    per-example losses."""
    loaded = load(f"tiny:{family}", dtype="float32")
    model = loaded.model.train()  # the training mask (tiny models have no dropout)
    examples = _examples(loaded.family)
    if budget == "longest":
        chat = VisionChatCollator(loaded.processor, loaded.family)
        budget = max(chat([ex])["input_ids"].shape[1] for ex in examples)
    singles, packed, lengths = _alone_and_packed(loaded, examples, budget)
    assert len(lengths) == 3 and "attention_mask" not in packed
    rows = {row for row, _ in lengths}
    assert len(rows) == (1 if budget is None else packed["input_ids"].shape[0]) and (budget is None) == (len(rows) == 1)
    if budget is not None:
        assert all(sum(n for r, n in lengths if r == row) <= budget or sum(1 for r, _ in lengths if r == row) == 1
                   for row in rows)
    packed_nll = _token_nll(model, packed)
    packed_nll.sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    alone = []
    for s in singles:
        nll = _token_nll(model, {**s, "use_cache": False})[0]
        nll.sum().backward()  # gradients of the three examples accumulate: the packed row's sum
        alone.append(nll.detach())
    for got, want in zip(_split(packed_nll.detach(), lengths), alone):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), float((got - want).abs().max())
    assert len(g_packed) > 10
    for n, p in model.named_parameters():
        if p.grad is not None:
            # fp32 sums in another order: a few ulps of the gradient's largest element (or 1e-6 where that is ~0, as for a key bias)
            torch.testing.assert_close(g_packed[n], p.grad, rtol=1e-4, atol=max(1e-6, 1e-5 * float(p.grad.abs().max())), msg=n)


@pytest.mark.parametrize("family", FAST)
def test_no_attention_across_example_boundaries(family):
    """Another image and another question in the first example leave the other examples' logits as they were."""
    loaded = load(f"tiny:{family}", dtype="float32")
    model = loaded.model.eval()
    base = _examples(loaded.family)
    changed = [chat_example("Name the handwritten digit shown here, please.", "four", [digit_image(42, (84, 84))])] + base[1:]
    outs = []
    for exs in (base, changed):
        _, packed, lengths = _alone_and_packed(loaded, exs)
        with torch.no_grad():
            outs.append((model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0], [n for _, n in lengths]))
    (a, la), (b, lb) = outs
    assert la[1:] == lb[1:] and la[0] != lb[0]
    assert torch.allclose(a[la[0]:], b[lb[0]:], atol=1e-6)
    assert not torch.allclose(a[:la[0] - 1].sum(0), b[:lb[0] - 1].sum(0), atol=1e-3)  # the first one did change


def test_families_not_packed_are_the_ones_that_would_be_packed_wrongly():
    """gemma3 is refused because packing it changes its scores; when a transformers release fixes that, this turns
    red and the family can be switched on."""
    assert packing_refusal(FAMILIES["gemma3"]) and packing_refusal(FAMILIES["gemma4"]) and not packing_refusal(FAMILIES["qwen3_vl"])
    import dataclasses

    loaded = load("tiny:gemma3", dtype="float32")
    loaded = dataclasses.replace(loaded, family=dataclasses.replace(loaded.family, packing="positions"))
    singles, packed, lengths = _alone_and_packed(loaded, _examples(loaded.family))
    with torch.no_grad():
        got = _split(_token_nll(loaded.model.train(), packed), lengths)
        want = [_token_nll(loaded.model, {**s, "use_cache": False})[0] for s in singles]
    assert any(not torch.allclose(g, w, rtol=1e-5, atol=1e-6) for g, w in zip(got, want))


@pytest.mark.parametrize("family", ALL_LAYOUTS)
def test_rows_assemble_into_the_processors_own_padded_batch(family):
    """Cached and uncached batches are equal: per-example encodings, padded, are the processor's batch call."""
    loaded = load(f"tiny:{family}")
    chat = VisionChatCollator(loaded.processor, loaded.family)
    exs = _examples(loaded.family)
    ref, got = chat(exs), RowCollator(chat)(exs)
    assert set(got) == set(ref)
    for k in ref:
        assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k


def _video_examples():
    from helpers import sample_video_files
    from vlmfit.data.video import sample_frames, video_example

    out = []
    for path, n in zip(sample_video_files()[:2], (4, 6)):
        v = sample_frames(path, num_frames=n, max_side=56)
        ex = video_example("What happens in the video?", "Something moves.", v)
        ex["video_meta"] = [{"fps": v.source_fps, "duration": v.duration, "timestamps": list(v.timestamps)}]
        out.append(ex)
    return out


@pytest.mark.parametrize("family", ALL_LAYOUTS)
def test_one_processor_call_splits_into_the_single_example_encodings(family):
    """Cache misses are encoded in one processor call and split (split_batch): each piece equals the example's
    own encoding, images of several sizes and counts per example, and videos where the family takes them."""
    from vlmfit.chat.rows import split_batch

    loaded = load(f"tiny:{family}")
    chat = VisionChatCollator(loaded.processor, loaded.family)
    sets = [_examples(loaded.family)]
    if loaded.family.video_token:
        sets.append(_video_examples())
    for exs in sets:
        pieces = split_batch(chat(exs), [len(e["images"]) for e in exs], [[len(v) for v in e.get("videos") or []] for e in exs],
                             loaded.family)
        assert pieces is not None
        for piece, ex in zip(pieces, exs):
            alone = chat([ex])
            assert set(piece) == set(alone), (set(piece) ^ set(alone))
            for k in alone:
                assert piece[k].dtype == alone[k].dtype and torch.equal(piece[k], alone[k]), k


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_family_table_names_exactly_the_sequence_tensors_its_processor_returns(family):
    """chat/rows.py pads, packs and splits along the sequence the tensors of pad_values(family) (the family's
    sequence_inputs, with input_ids, attention_mask and labels) and treats every other one as per image: a
    [batch, tokens] output missing from the table would be cut as if per image, and a name in it that the processor
    never returns is a stale fact. Images, text only, and videos where the family takes them."""
    from vlmfit.chat.rows import pad_values
    from vlmfit.models.load import check_model, family_for, load_processor

    ref, model_type = check_model(f"tiny:{family}")
    processor = load_processor(ref)
    fam = family_for(model_type, processor, f"tiny:{family}")
    chat = VisionChatCollator(processor, fam)
    sets = [_examples(fam)]
    if fam.prompt_style == "chat":
        sets.append([chat_example("Say hi.", "hi", []), chat_example("Count to three, please.", "one two three", [])])
    if fam.video_token:
        sets.append(_video_examples())
    for exs in sets:
        batch = chat(exs)
        tokens = tuple(batch["input_ids"].shape)
        assert {k for k, v in batch.items() if tuple(v.shape[:2]) == tokens} == set(pad_values(fam)), sorted(batch)


def test_generic_family_pads_every_known_sequence_tensor():
    from vlmfit.chat.rows import pad_values
    from vlmfit.models.families import generic_family

    known = {k for f in FAMILIES.values() for k in pad_values(f)}
    assert set(pad_values(generic_family("mystery_vl"))) == known == {
        "input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids"}


def test_cache_is_reused_across_processes_and_keyed_by_model_resolution_and_data(tmp_path):
    loaded = load("tiny:qwen2_vl")
    chat = VisionChatCollator(loaded.processor, loaded.family)
    exs = [{**ex, ROW: i} for i, ex in enumerate(_examples(loaded.family))]
    fp = processor_fingerprint(chat)
    first = RowCollator(chat, EncodedCache(tmp_path, fp))
    fresh = first(exs)
    assert (first.cache.hits, first.cache.misses) == (0, 3) and len(list((tmp_path / fp).rglob("*.safetensors"))) == 3
    singles = [chat([{k: v for k, v in ex.items() if k != ROW}]) for ex in exs]
    for single, row in zip(singles, first.encode(exs)):  # the batched encoding of the misses, split per example
        assert all(torch.equal(single[k], row[k]) for k in single)
    again = RowCollator(chat, EncodedCache(tmp_path, fp))  # a new run: nothing in memory, everything on disk
    cached = again(exs)
    assert (again.cache.hits, again.cache.misses) == (0 + 3, 0)
    assert cached.keys() == fresh.keys() and all(torch.equal(cached[k], fresh[k]) for k in fresh)
    assert cached[ROW].tolist() == [0, 1, 2]  # the run's row ids are not part of what is cached

    # A torn file is encoded again, not trusted.
    victim = next((tmp_path / fp).rglob("*.safetensors"))
    victim.write_bytes(b"torn")
    third = RowCollator(chat, EncodedCache(tmp_path, fp))
    assert torch.equal(third(exs)["input_ids"], fresh["input_ids"]) and third.cache.misses == 1

    # What invalidates: another model's processor, another resolution, another image, other settings.
    other = load("tiny:qwen2_5_vl")
    assert processor_fingerprint(VisionChatCollator(other.processor, other.family)) != fp
    loaded.processor.image_processor.max_pixels = 28 * 28 * 4
    assert processor_fingerprint(chat) != fp
    assert processor_fingerprint(VisionChatCollator(other.processor, other.family, loss_on="all")) != processor_fingerprint(
        VisionChatCollator(other.processor, other.family))
    a = exs[0]
    assert example_key({**a, "images": [digit_image(1, (56, 28))]}) != example_key(a)
    assert example_key({**a, ROW: 99, "length": 5}) == example_key(a)


def test_packed_training_logs_the_losses_of_padded_training(tmp_path):
    """The trainer end to end (position ids from the model side, the Trainer's token count over accumulation):
    packed steps, cached or not, give the padded steps' losses."""
    from vlmfit.config import load_config
    from vlmfit.data.builtin import load_builtin
    from vlmfit.models.targets import make_trainable
    from vlmfit.rundir import RunDir
    from vlmfit.train.sft import make_trainer

    data = load_builtin("mnist")["train"].select(range(12))
    data = data.map(lambda ex, i: {"images": [im.resize((28 + 28 * (i % 3),) * 2) for im in ex["images"]]}, with_indices=True)
    losses = {}
    for name, make in (("padded", lambda c: c), ("packed", lambda c: RowCollator(c, pack=True)),
                       ("packed rows of 80 tokens", lambda c: RowCollator(c, pack=True, pack_tokens=80)),
                       ("packed+cache", lambda c: RowCollator(c, EncodedCache(tmp_path / "cache", processor_fingerprint(c)), True))):
        cfg = load_config(base={"model": {"name": "tiny:qwen2_vl"}}, overrides=[
            "method=full", f"output.dir={tmp_path}", "train.max_steps=3", "train.batch_size=2", "train.grad_accum=2",
            "train.lr=1e-3", "train.warmup_ratio=0", "train.logging_steps=1", "train.seed=3"])
        loaded = load(cfg.model.name, dtype="float32")
        model, _ = make_trainable(loaded.model, loaded.family, "full", None)
        run = RunDir(tmp_path / name)
        run.path.mkdir()
        make_trainer(model, loaded, make(VisionChatCollator(loaded.processor, loaded.family)), data, cfg, run).train()
        rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["padded"]) == 3
    for name in ("packed", "packed rows of 80 tokens", "packed+cache"):
        assert losses[name] == pytest.approx(losses["padded"], rel=1e-4), losses


def test_packing_falls_back_for_a_family_it_would_get_wrong_and_is_sft_only(tmp_path, vlmfit):
    from vlmfit.chat.rows import RowCollator as RC
    from vlmfit.config import load_config
    from vlmfit.train.sft import train_collator
    from rich.console import Console

    loaded = load("tiny:gemma3")
    chat = VisionChatCollator(loaded.processor, loaded.family)
    console = Console(record=True, width=200)
    cfg = load_config(base={"model": {"name": "tiny:gemma3"}}, overrides=["train.packing=true"])
    got = train_collator(chat, cfg, console)
    assert isinstance(got, RC) and not got.pack and "padded batches instead" in " ".join(console.export_text().split())
    off = load_config(base={"model": {"name": "tiny:gemma3"}}, overrides=["train.processor_cache=false"])
    assert train_collator(chat, off, console) is chat  # both off: the processor's own batch call
    code, out, err = vlmfit("train", "demo", "--set", "method=dpo", "--set", "train.packing=true")
    text = " ".join((out + err).split())
    assert code == 2 and "train.packing packs supervised fine-tuning batches" in text and "Traceback" not in text


def test_plan_and_measurement_account_for_packing():
    """The planner adds the packed row's block-diagonal mask ((batch x seq)^2 bytes) for a family that packs and
    nothing for one that falls back."""
    from vlmfit.config import load_config
    from vlmfit.memory.catalog import load_model_config
    from vlmfit.memory.plan import plan_memory
    from vlmfit.memory.shape import model_shape

    def plan(name, packing, batch=8):
        cfg = load_config(base={"model": {"name": name}}, overrides=[f"train.batch_size={batch}", f"train.packing={packing}"])
        return plan_memory(cfg, text_tokens=512, shape=model_shape(load_model_config(name)))

    qwen = "Qwen/Qwen2.5-VL-3B-Instruct"
    on, off = plan(qwen, "true"), plan(qwen, "false")
    seq = on.tokens["seq_len"]
    assert on.peak - off.peak == pytest.approx((8 * seq) ** 2, rel=0.01) and any("packing" in n for n in on.notes)
    assert plan(qwen, "true", batch=1).peak == plan(qwen, "false", batch=1).peak  # one example: nothing to mask
    cfg = load_config(base={"model": {"name": qwen}}, overrides=["train.batch_size=8", "train.packing=true",
                                                                 f"train.pack_tokens={2 * seq}"])
    rows = plan_memory(cfg, text_tokens=512, shape=model_shape(load_model_config(qwen)))  # 4 rows of 2 examples
    assert rows.peak - off.peak == pytest.approx(4 * (2 * seq) ** 2, rel=0.01)
    gemma = "google/gemma-3-4b-it"
    assert plan(gemma, "true").peak == plan(gemma, "false").peak



@pytest.mark.slow
def test_vlmfit_plan_measure_follows_packed_steps():
    """`vlmfit plan --measure` (measure_recipe) runs packed steps, and the plan is within 10% of them."""
    measured = {}
    for packing in ("false", "true"):  # each in a fresh process: tensors a process keeps from earlier work blur 3 MiB
        code = ("import json; from vlmfit.config import load_config; from vlmfit.memory.measure import measure_recipe; "
                "cfg = load_config(base={'model': {'name': 'tiny:qwen2_vl', 'dtype': 'float32'}, 'data': {'source': "
                f"'builtin:mnist'}}}}, overrides=['method=lora', 'train.batch_size=4', 'train.packing={packing}']); "
                "m, p = measure_recipe(cfg, steps=2); print('RESULT', json.dumps([m.peak, p.peak, m.losses]))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        peak, predicted, losses = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))[7:])
        assert predicted == pytest.approx(peak, rel=0.1), (packing, peak, predicted)
        measured[packing] = losses
    assert measured["true"][0] == pytest.approx(measured["false"][0], rel=1e-5)  # the same examples
