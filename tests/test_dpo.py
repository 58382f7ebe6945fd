"""DPO (method: dpo): LoRA trains the adapter only against the adapter-disabled base, preference batches carry every
model input of the family, a prompt cut through an image fails before training, and SFT then DPO works."""

import json

import datasets
import pytest
import torch
from rich.console import Console

from vlmfit.config import load_config
from vlmfit.data.preference import EVASIVE
from vlmfit.chat.schema import image_part, text_part
from vlmfit.errors import UserError
from vlmfit.evaluate.preference import pair_logprobs, reference_of
from vlmfit.models.families import FAMILIES
from vlmfit.models.load import load
from vlmfit.models.tiny import TINY_FAMILIES
from vlmfit.rundir import RunDir
from vlmfit.chat.collate import VisionChatCollator
from vlmfit.chat.collate import PreferenceCollator
from vlmfit.train.dpo import load_pairs, make_trainer, train_dpo
from vlmfit.train.start import load_start as _load_start
from vlmfit.train.sft import apply_length_policy, train_sft

from helpers import digit_image

QUIET = Console(quiet=True)


def dpo_start(cfg, console):
    return _load_start(cfg, console, cfg.dpo.init_from, cfg.dpo.tuning, "dpo.init_from")


def dpo_cfg(tmp_path, digits, family="qwen2_vl", **extra):
    sets = [f"model.name=tiny:{family}", "method=dpo", f"output.dir={tmp_path}", f"data.source={digits}", "dpo.pairs_from_labels=mixed",
            "data.train_limit=8", "data.eval_limit=4", "train.max_steps=6", "train.batch_size=4", "train.lr=2e-2",
            "train.warmup_ratio=0", "train.scheduler=constant", "train.logging_steps=1", "dpo.beta=1.0",
            "eval.modes=[constrained]"]
    return load_config(base={"model": {"name": "x"}}, overrides=sets + [f"{k}={v}" for k, v in extra.items()])


def pair(question_before_image: str = "", answer: str = "four", rejected: str = EVASIVE, image: int = 2) -> dict:
    content = ([text_part(question_before_image)] if question_before_image else []) + [image_part(), text_part("What digit is this?")]
    return {"prompt": [{"role": "user", "content": content}], "chosen": [{"role": "assistant", "content": [text_part(answer)]}],
            "rejected": [{"role": "assistant", "content": [text_part(rejected)]}], "images": [digit_image(image)]}


def moved_towards_the_chosen(before: dict, after: dict) -> None:
    """DPO's direction on the held-out pairs (eval_before.json / eval_after.json "preference"): the mean reward margin
    (beta x the log-ratio to the reference, chosen minus rejected) grew and reward accuracy is at least the start's.
    A nonzero margin alone would pass a policy trained towards the rejected answers."""
    assert after["reward_margin"] > before["reward_margin"], (before["reward_margin"], after["reward_margin"])
    assert after["reward_accuracy"] >= before["reward_accuracy"], (before["reward_accuracy"], after["reward_accuracy"])


def lora_dpo(tmp_path, digits, family):
    """(config, pairs, where DPO starts, the trainer vlmfit builds, its reference in words, the pair collator)."""
    cfg = dpo_cfg(tmp_path, digits, family)
    data = load_pairs(cfg)
    loaded, start = dpo_start(cfg, QUIET)
    collator = PreferenceCollator(VisionChatCollator(loaded.processor, loaded.family))
    trainer, reference = make_trainer(loaded, collator, data.train, cfg, RunDir(tmp_path), QUIET)
    return cfg, data, start, trainer, reference, collator


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_lora_dpo_trains_adapter_against_the_base_model(tmp_path, digits, family):
    cfg, data, start, trainer, reference, collator = lora_dpo(tmp_path, digits, family)
    model = trainer.model
    assert start == "base" and trainer.ref_model is None and "adapter disabled" in reference
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert any("lora_B" in n for n in changed) and changed <= lora, sorted(changed - lora)[:5]
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in lora)
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: -log sigmoid(0)
    assert losses[-1] < losses[0] - 0.1, losses
    assert "rewards/accuracies" in logs[0]

    # The reference is the base model: the adapter disabled scores exactly as a freshly loaded base model, both in
    # vlmfit's evaluation and in TRL's own reference pass, while the trained policy scores differently.
    pairs = [data.test[i] for i in range(len(data.test))]
    fresh = load(cfg.model.name).model.eval()
    base_c, base_r = pair_logprobs(fresh, collator, pairs, 4)
    model.eval()
    with reference_of(model) as ref:
        ref_c, ref_r = pair_logprobs(ref, collator, pairs, 4)
    torch.testing.assert_close((ref_c, ref_r), (base_c, base_r), atol=1e-5, rtol=0)
    trl_c, trl_r = trainer.compute_ref_log_probs(model, collator(pairs))
    torch.testing.assert_close((trl_c, trl_r), (base_c, base_r), atol=1e-4, rtol=1e-5)
    pol_c, _ = pair_logprobs(model, collator, pairs, 4)
    assert not torch.allclose(pol_c, base_c, atol=1e-3)


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f in FAMILIES])
def test_preference_batch_carries_every_model_input(family):
    loaded = load(f"tiny:{family}")
    chat = VisionChatCollator(loaded.processor, loaded.family)
    pairs = [pair(answer="four", rejected="nine"), pair(answer="one", image=7)]
    batch = PreferenceCollator(chat)(pairs)
    # Everything the processor gives for the whole conversation, and every input the family table requires.
    own = chat([{"messages": p["prompt"] + p["chosen"], "images": p["images"]} for p in pairs])
    assert set(own) - {"labels"} <= set(batch)
    for key in loaded.family.required_inputs:  # e.g. Qwen's image_grid_thw + mm_token_type_ids, Gemma 3's token_type_ids
        assert key in batch and batch[key].numel() > 0, key
    # Rows: [chosen..., rejected...]; the completion is each reply with its end of turn, nothing of the prompt.
    tok = loaded.processor.tokenizer
    replies = [tok.decode(batch["input_ids"][r][batch["completion_mask"][r].bool()]).strip() for r in range(4)]
    expected = [p["chosen"][0]["content"][0]["text"] for p in pairs] + [p["rejected"][0]["content"][0]["text"] for p in pairs]
    assert [r.removesuffix(loaded.family.turn_end) for r in replies] == expected
    media = torch.isin(batch["input_ids"], torch.tensor(sorted(chat.media_ids)))
    assert not (media & batch["completion_mask"].bool()).any()
    with torch.no_grad():  # the model accepts the batch as is
        loaded.model(**{k: v for k, v in batch.items() if k != "completion_mask"})


def test_prompt_cut_through_an_image_fails_before_training(tmp_path, digits):
    out = tmp_path / "runs"
    with pytest.raises(UserError, match="truncated through an image") as e:
        train_dpo(dpo_cfg(out, digits, **{"train.max_length": 12}), QUIET)
    assert "train.max_length" in str(e.value) and "overlong: drop" in str(e.value)
    assert not out.exists()  # no run directory: nothing started

    # Row 1 has text before its image: its image tokens are positions 60-63, so a cut at 62 would split the image.
    # Row 2 has a long reply: cut at 62 inside the reply's text, which is allowed.
    loaded = load("tiny:qwen2_vl")
    rows = datasets.Dataset.from_list([pair(), pair("Look closely. " * 5), pair(answer="four " * 30)])
    collator = PreferenceCollator(VisionChatCollator(loaded.processor, loaded.family, max_length=62))
    with pytest.raises(UserError, match=r"truncated through an image .*rows 1;"):
        apply_length_policy(rows, collator, dpo_cfg(tmp_path, digits, **{"train.max_length": 62}), QUIET)
    kept, report = apply_length_policy(rows, collator, dpo_cfg(tmp_path, digits, **{"train.max_length": 62, "train.overlong": "drop"}), QUIET)
    assert len(kept) == 1 and report["dropped"] == 2 and [d["row"] for d in report["dropped_rows"]] == [1, 2]
    kept, report = apply_length_policy(rows.select([0, 2]), collator, dpo_cfg(tmp_path, digits, **{"train.max_length": 62}), QUIET)
    assert report["truncated"] == 1
    batch = collator([kept[i] for i in range(2)])
    assert batch["input_ids"].shape[1] == 62 and batch["completion_mask"][1].sum() > 0
    grid = batch["image_grid_thw"]
    assert int((batch["input_ids"] == loaded.processor.image_token_id).sum()) == int(grid.prod(-1).sum()) // 4


def test_sft_then_dpo_continues_the_lora_adapter(tmp_path, digits):
    sets = ["model.name=tiny:qwen2_vl", "method=lora", f"output.dir={tmp_path}", f"data.source={digits}", "output.name=sft", "train.max_steps=2",
            "train.batch_size=4", "data.train_limit=8", "data.eval_limit=4", "train.lr=1e-2", "eval.before=false",
            "eval.modes=[constrained]"]
    sft = train_sft(load_config(base={"model": {"name": "x"}}, overrides=sets), QUIET)
    run = train_dpo(dpo_cfg(tmp_path, digits, **{"dpo.init_from": str(sft), "output.name": "dpo"}), QUIET)

    for name in ("config.yaml", "environment.json", "metrics.jsonl", "loss.png", "eval_before.json", "eval_after.json",
                 "report.md", "summary.json", "processor/processor_config.json", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert not (run / "adapter" / "ref").exists()  # TRL's frozen reference copy is not part of the result
    summary = json.loads((run / "summary.json").read_text())
    assert "starting adapter" in summary["dpo"]["reference"] and summary["weights"] == "adapter/"
    before = json.loads((run / "eval_before.json").read_text())
    after = json.loads((run / "eval_after.json").read_text())
    # At the start the policy is the SFT model and so is the reference: every pair ties.
    assert before["preference"]["reward_ties"] == before["preference"]["n"] == 4
    assert before["preference"]["reward_accuracy"] == 0.5 and after["preference"]["reward_ties"] == 0
    moved_towards_the_chosen(before["preference"], after["preference"])
    assert set(before["preference"]["by_group"]) == {"evasive", "wrong label"} and "constrained" in after["task"]
    assert "## Preference (4 held-out pairs)" in (run / "report.md").read_text()

    from safetensors.torch import load_file

    sft_w, dpo_w = load_file(sft / "adapter/adapter_model.safetensors"), load_file(run / "adapter/adapter_model.safetensors")
    assert sft_w.keys() == dpo_w.keys() and any(not torch.equal(sft_w[k], dpo_w[k]) for k in sft_w)


def test_init_from_is_checked(tmp_path, digits):
    with pytest.raises(UserError, match="not a run directory"):
        dpo_start(dpo_cfg(tmp_path, digits, **{"dpo.init_from": str(tmp_path)}), QUIET)
    (tmp_path / "config.yaml").write_text("model: {name: tiny:gemma3}\n")
    with pytest.raises(UserError, match="set model.name: tiny:gemma3"):
        dpo_start(dpo_cfg(tmp_path, digits, **{"dpo.init_from": str(tmp_path)}), QUIET)
    with pytest.raises(UserError, match="preference pairs"):
        load_pairs(dpo_cfg(tmp_path, digits, **{"dpo.pairs_from_labels": "null"}))


def test_full_dpo_keeps_a_frozen_reference_and_lora_can_start_from_its_weights(tmp_path, digits):
    cfg = dpo_cfg(tmp_path, digits, **{"dpo.tuning": "full", "train.max_steps": 2, "train.lr": 1e-3, "eval.before": "false",
                                       "eval.after": "false", "output.name": "full"})
    loaded, _ = dpo_start(cfg, QUIET)
    collator = PreferenceCollator(VisionChatCollator(loaded.processor, loaded.family))
    trainer, reference = make_trainer(loaded, collator, load_pairs(cfg).train, cfg, RunDir(tmp_path), QUIET)
    ref = trainer.ref_model
    assert "frozen copy" in reference and ref is not trainer.model and not any(p.requires_grad for p in ref.parameters())
    frozen = {n: p.detach().clone() for n, p in ref.named_parameters()}
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in ref.named_parameters())
    assert any(not torch.equal(p, start[n]) for n, p in trainer.model.named_parameters())

    # SFT-like full weights, then LoRA DPO on them: the adapter is relative to those weights, so the run also
    # writes the merged policy (model/), which is what `vlmfit eval RUN` loads.
    full = train_dpo(cfg, QUIET)
    run = train_dpo(dpo_cfg(tmp_path, digits, **{"dpo.init_from": str(full), "train.max_steps": 2, "eval.before": "false",
                                                 "output.name": "lora"}), QUIET)
    assert (run / "adapter/adapter_model.safetensors").is_file() and (run / "model/config.json").is_file()
    assert "starting model" in json.loads((run / "summary.json").read_text())["dpo"]["reference"]


def test_preference_source_as_given(tmp_path):
    (tmp_path / "img").mkdir()
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(8):
            digit_image(i).save(tmp_path / "img" / f"{i}.png")
            f.write(json.dumps({"image": f"img/{i}.png", "question": "What digit is this?", "chosen": "a digit",
                                "rejected": EVASIVE}) + "\n")
    cfg = load_config(base={"model": {"name": "x"}}, overrides=[
        "model.name=tiny:qwen2_vl", "method=dpo", f"output.dir={tmp_path / 'runs'}", f"data.source={tmp_path / 'pairs.jsonl'}",
        "data.task=preference", "data.test_fraction=0.5", "data.val_fraction=0", "train.max_steps=1", "train.batch_size=2"])
    run = train_dpo(cfg, QUIET)
    after = json.loads((run / "eval_after.json").read_text())
    assert after["task"] is None and after["preference"]["n"] > 0 and "by_group" not in after["preference"]
    assert "No task metric" in (run / "report.md").read_text()


def test_qlora_dpo_trains_adapters_on_a_4bit_base(tmp_path, digits):
    cfg = dpo_cfg(tmp_path, digits, **{"model.quantization": "4bit", "train.max_steps": 2})
    loaded, _ = dpo_start(cfg, QUIET)
    assert getattr(loaded.model, "is_loaded_in_4bit", False)
    collator = PreferenceCollator(VisionChatCollator(loaded.processor, loaded.family))
    trainer, reference = make_trainer(loaded, collator, load_pairs(cfg).train, cfg, RunDir(tmp_path), QUIET)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert "adapter disabled" in reference
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    # The whole recipe, evaluating before training (the default): the evaluation must leave the 4-bit layers
    # trainable (bitsandbytes' CPU kernel swap in eval mode broke the first training step after it). lr 1e-2: at the
    # file's 2e-2 the second Adam step overshoots on the 4-bit base (held-out margin 0 -> -0.61 after 2 steps, and
    # training margins swing negative over 6), where LoRA on the float base at 2e-2 goes 0 -> +2.7.
    run = train_dpo(dpo_cfg(tmp_path, digits, **{"model.quantization": "4bit", "train.max_steps": 2, "train.lr": 1e-2,
                                                 "output.name": "q"}), QUIET)
    before_ev, after_ev = (json.loads((run / f).read_text()) for f in ("eval_before.json", "eval_after.json"))
    assert before_ev["preference"]["reward_accuracy"] == 0.5  # policy == reference before training: all ties
    moved_towards_the_chosen(before_ev["preference"], after_ev["preference"])
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    with pytest.raises(UserError, match="cannot be trained in full"):
        train_dpo(dpo_cfg(tmp_path, digits, **{"model.quantization": "4bit", "dpo.tuning": "full"}), QUIET)


# qwen2_vl (M-RoPE), gemma4 and paligemma (soft-capped heads) in the fast suite, the other families in the slow one
@pytest.mark.parametrize("family", [f if f in ("qwen2_vl", "gemma4", "paligemma") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in TINY_FAMILIES])
def test_dpo_log_probs_never_need_full_logits_and_equal_them(tmp_path, digits, family):
    """Issue 13, item 1 for DPO: TRL's DPOTrainer scores each pair through its fused LM head (the head runs only at
    the positions whose next token is a label, in tiles), as the trainer vlmfit builds uses it. Its per-sequence
    log-probabilities and their gradients equal the plain full-logits computation (fp32) for every family,
    soft-capped heads included."""
    _, data, _, trainer, _, collator = lora_dpo(tmp_path, digits, family)
    model = trainer.model
    batch = collator([data.train[i] for i in range(2)])
    mask = batch.pop("completion_mask")
    labels = batch["input_ids"].masked_fill(mask == 0, -100)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.05)  # a moved adapter, so the gradients are not trivially shaped

    fused = model(**batch, labels=labels, fused_lm_head=True).log_probs.sum(1)
    g_fused = torch.autograd.grad(fused.sum(), lora)
    logits = model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    per_token = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)
    full = per_token.sum(1)
    g_full = torch.autograd.grad(full.sum(), lora)
    assert torch.allclose(fused, full, rtol=1e-5, atol=1e-5), (fused, full)
    for a, b in zip(g_fused, g_full):
        # fp32 sums in another order (tiles vs one matmul) differ by a few ulps of the largest summand, which depends
        # on the CPU's kernels (CI's machine differed by 3.8e-6 on gradients of magnitude ~3): the tolerance is
        # relative to the gradient's scale; a wrong position, label or soft-cap would differ by O(|b|)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=max(1e-6, 1e-5 * float(b.abs().max())))
